"""The real train step compiled by the TPU compiler, on this CPU host (libtpu,
deviceless: `jax.experimental.topologies`). What only an accelerator compile can
show: state creation touches no device, the step lowers for the mesh's platform,
and gradients are summed across replicas in the configured dtype."""
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may compile too

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu) for deviceless compiles")

from jax.experimental import topologies  # noqa: E402

from _helpers import mesh_trainer  # noqa: E402
from mmjax.train import sharding as shd  # noqa: E402
from mmjax.perf.bench import batch_shapes  # noqa: E402
from mmjax.config.loading import load_config  # noqa: E402
from mmjax.perf.hlo import collectives  # noqa: E402


@pytest.fixture(scope="module")
def tpu_devices():
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices


def _trainer(recipe, mesh_shape, devices, overrides=()):
    config = load_config(recipe, ["batch_size=16", "model.dtype=bfloat16", "total_steps=10",
                                  *overrides])
    return config, mesh_trainer(config, mesh_shape, devices)


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


# ----------------------------------------------------------------------------
# `mmjax compile` on a small slice: every accelerator recipe, reduced in width and
# depth (`:tiny`), keeping its sharding on a (data 2, fsdp 2, tensor 2) mesh.

from mmjax.commands.compile import compile_command  # noqa: E402
from mmjax.perf.compile import compile_for_target  # noqa: E402
from mmjax.perf.targets import TargetError, parse_target  # noqa: E402

RECIPES = ["clip_b16:tiny", "siglip_b16:tiny", "coca_b16:tiny", "blip2_stage1:tiny",
           "blip2_stage2:tiny", "llava:finetune,tiny"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.split(":")[0] for r in RECIPES])
def test_every_recipe_compiles_for_a_tpu_slice(recipe):
    config = load_config(recipe, ["batch_size=16", "model.dtype=bfloat16", "mesh.data=2",
                                  "mesh.fsdp=2", "mesh.tensor=2"])
    report = compile_for_target(config, parse_target("v5p-16"))
    mem = report["memory"]
    assert report["devices"] == 8 and "data=2 x fsdp=2 x tensor=2" in report["mesh"]
    # Plausible memory: the arguments hold at least the sharded state, the temporaries
    # are real, and a tiny model is far below a v5p's 95 GiB.
    assert mem["argument"] >= report["state"] > 0
    assert 0 < mem["temp"] and mem["total"] < 2 ** 30 and report["fits"]
    assert report["cpu_path_ops"] == 0  # the CPU-only bf16 GEMM path did not leak in
    assert "f32" in report["reduction_dtypes"]
    assert report["collectives"] and not report["unknown_loops"]
    # (kind, scope) of the losses' collectives: forward `jvp(<loss>)`, backward
    # `transpose(jvp(<loss>))`, from the losses' named scopes.
    loss_sources = {(c["kind"], c["source"].split("/shard_map")[0].split("/")[-1])
                    for c in report["collective_sources"] if "/shard_map" in c["source"]}
    if recipe.startswith("siglip"):  # the sigmoid loss is a ring: no all-gather of the batch
        assert report["loss_collectives"] == ["collective-permute"]
        assert loss_sources == {("collective-permute", "jvp(sigmoid_contrastive_loss)"),
                                ("collective-permute", "transpose(jvp(sigmoid_contrastive_loss))")}
    if recipe.startswith("clip"):    # the softmax loss gathers the other devices' features
        assert "all-gather" in report["loss_collectives"]
        assert ("all-gather", "jvp(softmax_contrastive_loss)") in loss_sources


def test_oversized_batch_exits_1_with_one_line(capsys, tmp_path, monkeypatch):
    """The TPU compiler refuses a step that needs more than a v5e's 16 GiB per chip:
    exit 1 and one line with needed vs available and the keys that trade memory.
    Compiling reads no text: a tokenizer that is nowhere (not in an empty, offline
    hub cache) does not stop it when the config gives the vocabulary size and ids
    (a `:tiny` config takes them from the tokenizer, so it is the small recipe here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    code = compile_command(["--config", "clip_tiny", "--target", "v5litepod-4",
                            "--config.batch_size=131072",
                            "--config.data.train.tokenizer=clip",
                            "--config.model.text.vocab_size=49408",
                            "--config.model.text.eos_id=49407", "--config.model.text.pad_id=49407"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "does not fit v5litepod-4" in err[0] and "batch_size" in err[0]
    assert "GiB" in err[0] and "remat" in err[0] and "mesh.fsdp" in err[0]


def test_target_names_and_usage_errors(capsys):
    assert parse_target("v5p-16").topology == "2x2x2"
    assert parse_target("v5p-8").topology == "2x2x1"        # 4 chips: 8 TensorCores
    assert parse_target("v5p-256").num_devices == 128
    assert parse_target("v5litepod-16").topology == "4x4"
    assert parse_target("v6e-8").topology == "2x4"
    assert parse_target("tpu:v5p:4x4x8").num_devices == 128
    assert parse_target("h100x8:4").num_devices == 32
    for bad in ("v5p-7", "tpu:v5e:2x2x2", "b200x8", "h100x9"):
        with pytest.raises(TargetError):
            parse_target(bad)
    assert compile_command(["--config", "clip_tiny", "--target", "v9-8"]) == 2
    assert "unknown target 'v9-8'" in capsys.readouterr().err
    assert compile_command(["--list-targets"]) == 0
    assert "v5p-256" in capsys.readouterr().out.split()


def test_gpu_memory_is_the_share_jax_takes(monkeypatch, capsys):
    """A GPU step may use what JAX's allocator takes of the device's memory:
    75% by default, XLA_CLIENT_MEM_FRACTION (or the older name) when set, all
    of it without a pool; `--hbm-gib` overrides; a bad fraction is a usage error."""
    from mmjax.perf.targets import CHIPS, gpu_memory_fraction, hbm_bytes
    h100 = parse_target("h100x8")
    total = CHIPS["h100"].hbm_bytes
    assert 79 * 2 ** 30 < total < 80 * 2 ** 30  # CUDA's total for an "80 GB" H100
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    assert hbm_bytes(h100) == int(0.75 * total)
    assert hbm_bytes(parse_target("v5p-16")) == CHIPS["v5p"].hbm_bytes  # TPU: no share
    assert gpu_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.9
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.95")
    assert hbm_bytes(h100) == int(0.95 * total)
    assert hbm_bytes(h100, 40.0) == 40 * 2 ** 30
    assert gpu_memory_fraction({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == 1.0
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "95")
    with pytest.raises(TargetError, match="XLA_CLIENT_MEM_FRACTION='95'"):
        hbm_bytes(h100)
    assert compile_command(["--config", "clip_tiny", "--target", "h100x8"]) == 2
    assert "XLA_CLIENT_MEM_FRACTION='95'" in capsys.readouterr().err


@pytest.mark.parametrize("name,chips", [("v4-16", 8), ("v5p-16", 8), ("v6e-8", 8)])
def test_every_tpu_generation_gives_one_device_per_chip(name, chips):
    """A mesh over a TPU slice has one device per chip: two-TensorCore chips
    (v4, v5p) as one megacore device, as on the real slice (the compiler's
    default description of v4 lists both cores, which JAX meshes refuse)."""
    from mmjax.perf.targets import target_devices
    target = parse_target(name)
    devices = target_devices(target)
    assert len(devices) == target.num_devices == chips
    assert {d.core_on_chip for d in devices} == {0} and len({tuple(d.coords) for d in devices}) == chips
    mesh = shd.make_mesh({"data": -1}, devices)
    assert mesh.shape["data"] == chips


def test_collectives_in_loops_count_every_iteration(tpu_devices):
    """An independent check of the trip-count accounting: a scan of 5 steps whose
    body all-reduces a [64] float32 array over 4 chips runs that all-reduce 5 times."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mmjax.perf.hlo import step_collectives, summarize_collectives
    mesh = Mesh(np.array(tpu_devices[:4]), ("x",))

    def body(c, _):
        with jax.named_scope("my_reduction"):
            y = jax.shard_map(lambda a: jax.lax.psum(a * 2.0, "x"), mesh=mesh, in_specs=P(),
                              out_specs=P())(c)
        return y + 1.0, None

    f = jax.jit(lambda c: jax.lax.scan(body, c, None, length=5)[0])
    arg = jax.ShapeDtypeStruct((64,), np.float32, sharding=NamedSharding(mesh, P()))
    colls, unknown = step_collectives(f.lower(arg).compile().as_text())
    reduces = [c for c in colls if c.kind == "all-reduce"]
    assert not unknown and reduces
    assert sum(c.runs for c in reduces) == 5 and all(c.group == 4 for c in reduces)
    assert all(c.bytes == 64 * 4 for c in reduces)
    # Where each came from: the named scope, without the outer jit(...).
    by_source = summarize_collectives(reduces, by="source")
    assert [r["runs_per_step"] for r in by_source] == [5]
    assert "/my_reduction/" in by_source[0]["source"] + "/"
    assert not by_source[0]["source"].startswith("jit(")


@pytest.mark.parametrize("ring,blocks", [("two_way", 9), ("one_way", 7)])
def test_fsdp_weight_gather_bytes_in_windowed_matmul_loops(ring, blocks):
    """An FSDP matmul (weights sharded over 8 chips) that XLA:TPU lowers to a
    windowed loop of collective-permutes: every loop's trip count is found, each
    permute counts the block that arrives once (the async form returns operand and
    result). Run both ways round the ring (XLA's default: counter 0, 2, ... < 4)
    it moves 9 blocks of 1/8 of the weight; one way (`config.mesh.fsdp_ring`'s
    default, counter 0, 1, ... < 8, the permute in a branch skipped on the last
    iteration) the 7 that live elsewhere: the minimum."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mmjax.perf.hlo import step_collectives
    from mmjax.perf.targets import target_devices
    from mmjax.train.sharding import compiler_options
    mesh = Mesh(np.array(target_devices(parse_target("v5p-16"))), ("x",))  # 8 chips

    def f(x, w):
        return jnp.sum(jnp.tanh(x @ w.astype(jnp.bfloat16)))

    x = jax.ShapeDtypeStruct((8192, 768), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((768, 3072), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "x")))
    options = compiler_options(mesh, ring)
    assert options == {"xla_tpu_spmd_bidirectional_windowed_einsum": ring == "two_way"}
    text = jax.jit(f, compiler_options=options).lower(x, w).compile().as_text()
    assert "windowed_dot_general" in text  # the lowering this test is about
    colls, unknown = step_collectives(text)
    permutes = [c for c in colls if c.kind == "collective-permute"]
    assert not unknown and permutes
    block = 768 * 3072 // 8 * 2  # one chip's bf16 share of the weight
    assert all(c.bytes == block for c in permutes)
    assert sum(c.bytes * c.runs for c in permutes) == blocks * block


def test_fsdp_ring_option_follows_the_mesh_and_names_the_key():
    """The trainer compiles its step with the ring option only for a TPU mesh (the
    mesh's devices decide, not the host); a wrong value names the key."""
    from mmjax.errors import ConfigError
    from mmjax.perf.targets import target_devices
    from mmjax.train.step import build_trainer
    config = load_config("clip_tiny", ["batch_size=16"])
    tpu = build_trainer(config, target_devices(parse_target("v5p-16")))
    assert tpu.compiler_options == {"xla_tpu_spmd_bidirectional_windowed_einsum": False}
    assert build_trainer(config, jax.devices("cpu")[:1]).compiler_options == {}
    with pytest.raises(ConfigError, match="config.mesh.fsdp_ring"):
        build_trainer(load_config("clip_tiny", ["mesh.fsdp_ring=both"]), jax.devices("cpu")[:1])


def test_gpu_target_compiles_with_the_cuda_plugin():
    """8 x H100 from a GPU target description (needs the CUDA plugin, not a GPU:
    `pip install jax-cuda12-plugin==<jax version>`)."""
    pytest.importorskip("jax_cuda12_plugin", reason="the CUDA plugin compiles GPU targets")
    config = load_config("clip_b16:tiny", ["batch_size=64", "model.dtype=bfloat16"])
    report = compile_for_target(config, parse_target("h100x8"))
    assert report["devices"] == 8 and "H100" in report["chip"]
    assert report["fits"] and report["memory"]["temp"] > 0
    assert report["cpu_path_ops"] == 0 and report["reduction_dtypes"] == ["f32"]


def test_max_batch_is_the_largest_batch_that_fits():
    """`--max-batch` over real compiles, in steps of the batch-sharding size;
    checked against its own compiles: the answer fits and one more step of the
    batch does not (the search itself against exhaustive search:
    tests/perf/test_compile_max_batch.py)."""
    from mmjax.perf.compile import max_batch, used_bytes
    # 128 and 256 (doubling) fit; the line through their peaks points at 280,
    # which fits, and 284 does not: 4 compiles.
    config = load_config("clip_b16:tiny", ["batch_size=128", "model.dtype=bfloat16",
                                           "data.train.tokenizer=bytes",  # the sizes above
                                           "model.text.vocab_size=259", "model.text.eos_id=2",
                                           "model.text.pad_id=0"])
    target = parse_target("v5p-8")  # 4 chips: batches in steps of 4
    hbm_gib = 24 / 1024  # 24 MiB per chip: a few hundred tiny images
    best, reports = max_batch(config, target, hbm_gib, log=lambda *_: None)
    by_batch = {r["batch"]: r for r in reports}
    assert best % 4 == 0 and by_batch[best]["fits"]
    # On TPU the fit is read from XLA's peak (tests/perf/test_compile_max_batch.py).
    assert used_bytes(by_batch[best]) == by_batch[best]["memory"]["peak"] <= hbm_gib * 2 ** 30
    assert not by_batch[best + 4]["fits"]
    assert len(reports) <= 5, sorted(by_batch)


def test_weights_gathered_once_are_not_gathered_again_in_the_backward():
    """`config.mesh.fsdp_weights="gather_once"` on a v5p-16 FSDP mesh: the layer
    stacks' weights are gathered in the forward pass only (the backward pass,
    remat `full` included, gathers none of them again), gradients still reduce in
    float32, and the step moves fewer collective bytes than with XLA's in-matmul
    gathers (`python -m mmjax compile ... --sources N` shows the same per source)."""
    base = ["batch_size=64", "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=8",
            "model.image.remat=full", "model.text.remat=full"]
    reports = {w: compile_for_target(load_config("clip_b16:tiny", base + [f"mesh.fsdp_weights={w}"]),
                                     parse_target("v5p-16"))
               for w in ("in_matmul", "gather_once")}

    def backward_layer_gathers(report):
        return [c for c in report["collective_sources"] if "transpose(" in c["source"]
                and "/layers/" in c["source"] and (c["kind"] == "all-gather" or (
                    c["kind"] == "collective-permute" and c["dtype"] == "bf16"))]

    def total(report):
        return sum(c["bytes_per_step"] for c in report["collectives"])
    assert backward_layer_gathers(reports["in_matmul"])  # what the option removes
    assert not backward_layer_gathers(reports["gather_once"])
    assert reports["gather_once"]["reduction_dtypes"] == ["f32"]
    assert total(reports["gather_once"]) < total(reports["in_matmul"])
