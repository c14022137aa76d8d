"""Multi-host: 2 local processes x 2 CPU devices give the losses of 1 process x 4 devices.

Each process runs this file as a child (through launch/local.py, which sets
the coordinator environment); every process builds the same global batch from
a seed and contributes its own rows, as the input pipeline does.
"""
import os
import sys

import numpy as np

from _local import run_local_processes

STEPS = 4


def _losses(config, trainer, devices_rows):
    import jax
    from mmjax.data.batch import make_global_batch
    rng = np.random.RandomState(0)
    s, l, b = config.data.train.image_size, config.data.train.max_len, config.batch_size
    state, out = trainer.init_state(0), []
    for _ in range(STEPS):
        text = rng.randint(3, 200, (b, l)).astype(np.int32)
        text[:, -1] = 2
        batch = {"image": rng.randn(b, s, s, 3).astype(np.float32), "text": text}
        lo, hi = devices_rows
        local = {k: v[lo:hi] for k, v in batch.items()}
        state, metrics = trainer.step(state, make_global_batch(local, trainer.batch_sharding))
        out.append(float(metrics["loss"]))
    return np.array(out)


def _setup():
    from mmjax.config.loading import load_config
    from mmjax.train.step import build_trainer
    import jax
    config = load_config("clip_tiny:tiny", ["batch_size=8", "mesh.data=2", "mesh.fsdp=2"])
    return config, build_trainer(config, jax.devices()[:4])


def _child(out_dir):
    from mmjax.train.multihost import join
    join()
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 4
    config, trainer = _setup()
    rows = config.batch_size // 2
    i = jax.process_index()
    losses = _losses(config, trainer, (i * rows, (i + 1) * rows))
    np.save(os.path.join(out_dir, f"losses_{i}.npy"), losses)


def test_two_processes_match_one_process(tmp_path):
    run_local_processes(__file__, tmp_path)
    per_process = [np.load(tmp_path / f"losses_{i}.npy") for i in range(2)]
    np.testing.assert_array_equal(per_process[0], per_process[1])
    config, trainer = _setup()  # this pytest process: 1 process, first 4 of 8 devices
    single = _losses(config, trainer, (0, config.batch_size))
    np.testing.assert_allclose(per_process[0], single, rtol=1e-5, atol=1e-6)
    assert single[0] != single[-1]


if __name__ == "__main__":
    _child(sys.argv[1])
