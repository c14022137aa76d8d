"""Train-state details: gradient accumulation, restoring onto another mesh."""
import logging

import jax
import numpy as np

from _helpers import mesh_trainer
from mmjax.train.checkpoint import Checkpointer
from mmjax.config.loading import load_config


def _trainer(overrides, mesh_shape=(1, 1, 1)):
    config = load_config("clip_tiny:tiny", overrides)
    return config, mesh_trainer(config, mesh_shape)


def _batch(config, seed=0):
    rng = np.random.RandomState(seed)
    b, s, l = config.batch_size, config.data.train.image_size, config.data.train.max_len
    text = rng.randint(3, 200, (b, l)).astype(np.int32)
    text[:, -1] = 2
    return {"image": rng.randn(b, s, s, 3).astype(np.float32), "text": text}


def test_accumulated_gradient_is_mean_of_micro_batch_gradients():
    config, trainer = _trainer(["optim.accum_steps=2", "batch_size=8"], (2, 1, 1))
    state = trainer.init_state(0)
    batch = _batch(config)
    rng = jax.random.key(3)
    with trainer.context():
        loss, metrics, grads = jax.jit(trainer._loss_and_grads)(
            state["params"], jax.device_put(batch, trainer.batch_sharding), rng)
    # Micro-batch m holds rows m*2..m*2+1 of each of the 2 data shards (4 rows each).
    _, single = _trainer(["optim.accum_steps=1", "batch_size=4"])
    host_params = jax.device_get(state["params"])
    parts = []
    for m in range(2):
        rows = np.concatenate([np.arange(s * 4 + m * 2, s * 4 + m * 2 + 2) for s in range(2)])
        mb = {k: v[rows] for k, v in batch.items()}
        with single.context():
            parts.append(jax.jit(single._loss_and_grads)(host_params, mb, rng))
    want_loss = (parts[0][0] + parts[1][0]) / 2
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    wants = [(a + b) / 2 for a, b in zip(jax.tree.leaves(parts[0][2]),
                                         jax.tree.leaves(parts[1][2]))]
    # float32 sums in another order: absolute tolerance scaled to the largest gradient.
    atol = 1e-5 * max(float(np.abs(w).max()) for w in wants)
    for g, want in zip(jax.tree.leaves(grads), wants):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=atol)


class _Compiles(logging.Handler):
    """Names of the XLA compilations logged while attached (`jax.log_compiles`)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if "Finished XLA compilation of" in message:
            self.names.append(message.split("Finished XLA compilation of ")[1].split(" in ")[0])


def test_restore_onto_a_different_mesh(tmp_path):
    config, trainer = _trainer(["batch_size=8"], (8, 1, 1))
    state = trainer.init_state(0)
    state, _ = trainer.step(state, jax.device_put(_batch(config), trainer.batch_sharding))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    compiled = _Compiles()
    logging.getLogger("jax").addHandler(compiled)
    try:
        with jax.log_compiles():
            ckpt.save(1, state, {"position": 7})
            ckpt.wait()
    finally:
        logging.getLogger("jax").removeHandler(compiled)
    # Small replicated arrays are written whole, not split over their 8 replicas
    # (orbax's default compiles a slice program per array shape for that).
    assert compiled.names == []
    want = jax.device_get(state["params"])
    _, other = _trainer(["batch_size=8", "mesh.fsdp=4"], (2, 4, 1))
    restored, data_state, step = ckpt.restore(None, other.abstract_state)
    ckpt.close()
    assert step == 1 and data_state == {"position": 7}
    kernel = restored["params"]["image_tower"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == other.state_sharding["params"]["image_tower"]["layers_0"]["mlp"]["fc1"]["kernel"]
    for a, b in zip(jax.tree.leaves(jax.device_get(restored["params"])), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # Training continues on the new mesh.
    restored, metrics = other.step(restored, jax.device_put(_batch(config, 1), other.batch_sharding))
    assert np.isfinite(float(metrics["loss"]))
