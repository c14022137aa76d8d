"""The real train step compiled by the TPU compiler, on this CPU host (libtpu,
deviceless: `jax.experimental.topologies`). What only an accelerator compile can
show: state creation touches no device, the step lowers for the mesh's platform,
and gradients are summed across replicas in the configured dtype."""
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile only

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu) for deviceless compiles")

from jax.experimental import topologies  # noqa: E402

from mmjax.models import build  # noqa: E402
from mmjax.train import sharding as shd  # noqa: E402
from mmjax.train.bench import batch_shapes  # noqa: E402
from mmjax.train.config_utils import load_config  # noqa: E402
from mmjax.train.hlo import collectives  # noqa: E402
from mmjax.train.optimizer import build_optimizer  # noqa: E402
from mmjax.train.step import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def tpu_devices():
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices


def _trainer(recipe, mesh_shape, devices, overrides=()):
    config = load_config(recipe, ["batch_size=16", "model.dtype=bfloat16", *overrides])
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)),
                         devices[:int(np.prod(mesh_shape))])
    tx, schedule = build_optimizer(config.optim, 10)
    return config, Trainer(config, build(config.model), tx, schedule, mesh)


def _compile(recipe, mesh_shape, devices, overrides=()):
    config, trainer = _trainer(recipe, mesh_shape, devices, overrides)
    return trainer.lower(batch_shapes(config, trainer.batch_sharding)).compile()


def test_state_is_created_without_touching_a_device(tpu_devices):
    """Compile-only devices cannot run anything: building the Trainer (abstract
    state, shardings) must not create a key or an array on them eagerly."""
    assert tpu_devices[0].platform == "tpu"
    _, trainer = _trainer("clip_b16:tiny", (2, 2, 1), tpu_devices)
    shardings = jax.tree.leaves(trainer.abstract_state)
    assert shardings and all(
        x.sharding.mesh.devices.flat[0].platform == "tpu" for x in shardings)
    assert trainer.policy.platform == "tpu"  # kernels follow the mesh, not the CPU host


def _reductions(compiled):
    """Floating dtypes of the all-reduce / reduce-scatter instructions."""
    return [c for c in collectives(compiled.as_text())
            if c.kind in ("all-reduce", "reduce-scatter")
            and c.dtypes & {"f32", "bf16", "f16"}]


@pytest.mark.parametrize("recipe,mesh_shape", [
    ("clip_b16:tiny", (4, 1, 1)),          # data parallel: all-reduce of the gradients
    ("clip_b16:tiny", (1, 4, 1)),          # FSDP: reduce-scatter of the gradients
    ("llava:finetune,tiny", (2, 2, 1)),    # decoder LM: token embedding, untied head
    ("blip2_stage1:tiny", (2, 2, 1)),      # Q-Former: query tokens, BERT FFN
])
def test_gradients_are_reduced_in_float32(tpu_devices, recipe, mesh_shape):
    """Default `optim.grad_reduce_dtype="float32"`: with bfloat16 compute, every
    cross-replica sum in the TPU-compiled step is float32. Without tensor
    parallelism the only floating reductions are the gradients' (and float32
    loss scalars), so any bfloat16 one would be a gradient summed in bfloat16."""
    reductions = _reductions(_compile(recipe, mesh_shape, tpu_devices))
    assert reductions, "no gradient reduction found: the probe sees nothing"
    low = [c.line[:160] for c in reductions if c.dtypes & {"bf16", "f16"}]
    assert not low, low


def test_compute_dtype_gradient_reduction_is_a_choice(tpu_devices):
    """`optim.grad_reduce_dtype="compute"` keeps the weight gradients in bfloat16
    (half the gradient bytes on the wire)."""
    reductions = _reductions(_compile("clip_b16:tiny", (4, 1, 1), tpu_devices,
                                      ["optim.grad_reduce_dtype=compute"]))
    assert any("bf16" in c.dtypes for c in reductions)


def test_unknown_grad_reduce_dtype_names_the_key(tpu_devices):
    with pytest.raises(ValueError, match="config.optim.grad_reduce_dtype"):
        _trainer("clip_b16:tiny", (4, 1, 1), tpu_devices, ["optim.grad_reduce_dtype=fp8"])
