"""Accelerator targets to compile for without owning them.

A target names a slice the way its users do: Cloud TPU accelerator types
(`v4-8`, `v5litepod-16`, `v5p-256`, `v6e-64`; the number counts TensorCores
for v4 and v5p, chips for v5e and v6e), a raw topology (`tpu:v5p:4x4x8`), or
NVIDIA GPU nodes (`h100x8`, `h200x8`, `a100x8`, `h100x8:4` for four nodes).
`target_devices(target)` returns compile-only devices of that target from its
own compiler: libtpu for TPUs (deviceless, `jax.experimental.topologies`),
the CUDA PJRT plugin with a GPU target description for GPUs.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Optional
from mmjax.errors import UserError
from mmjax.train.mfu import peak_flops_of_kind

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Facts about one accelerator chip (datasheets)."""
    family: str             # topology prefix ("v5p") or GPU name ("h100")
    device_kind: str        # as jax reports it
    hbm_bytes: int          # memory per device (TPU: what a program may use; GPU: total)
    dims: int = 0           # TPU torus dimensions (2 or 3); 0 for GPUs
    cores_per_chip: int = 1  # TensorCores counted by the accelerator type's number

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s per device (`mmjax.train.mfu.PEAK_FLOPS`, the one table)."""
        return peak_flops_of_kind(self.device_kind)


CHIPS = {
    # TPU HBM as the TPU compiler lets a program use it (its out-of-memory
    # errors give it as the available HBM): v4 30.75 of 32 GiB, v5p 95.74,
    # v5e 15.75 of 16, v6e 31.25 of 32.
    "v4": Chip("v4", "TPU v4", int(30.75 * GIB), dims=3, cores_per_chip=2),
    "v5p": Chip("v5p", "TPU v5", int(95.74 * GIB), dims=3, cores_per_chip=2),
    "v5e": Chip("v5e", "TPU v5 lite", int(15.75 * GIB), dims=2),
    "v6e": Chip("v6e", "TPU v6 lite", int(31.25 * GIB), dims=2),
    # GPU memory as CUDA reports the device's total (not the "80 GB" of the name):
    # H100 SXM 79.10 GiB (XLA's own H100 description), H200 140.40, A100 80GB 79.32.
    # JAX's allocator takes a fraction of it (`gpu_memory_fraction`).
    "h100": Chip("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584),
    "h200": Chip("h200", "NVIDIA H200", 150_754_820_096),
    "a100": Chip("a100", "NVIDIA A100-SXM4-80GB", 85_167_243_264),
}
# Accelerator-type prefixes as Cloud TPU spells them.
TPU_TYPES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
# Sizes Cloud TPU offers (the accelerator type's number).
TPU_SIZES = {
    "v4": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    "v5p": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 12288],
    "v5e": [1, 4, 8, 16, 32, 64, 128, 256],
    "v6e": [1, 4, 8, 16, 32, 64, 128, 256],
}
GPUS_PER_NODE = 8


class TargetError(UserError, ValueError):
    """A target name that cannot be compiled for (a usage error)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: `name` as given, `chip`, `topology` ("2x2x2" for TPUs,
    "1x<nodes>x8" for GPUs) and the device count."""
    name: str
    chip: Chip
    topology: str

    @property
    def platform(self) -> str:
        return "gpu" if self.chip.dims == 0 else "tpu"

    @property
    def num_devices(self) -> int:
        return math.prod(int(x) for x in self.topology.split("x"))


def _torus(chips: int, dims: int) -> str:
    """Cloud TPU's slice shape for `chips` chips: powers of two grown on the
    smallest axis (4 -> 2x2x1, 16 -> 2x2x4, 128 -> 4x4x8; 2-D: 8 -> 2x4), and
    multiples of a 16x16 plane above 4096 chips (6144 -> 16x16x24)."""
    if dims == 3 and chips > 4096:
        if chips % 256:
            raise TargetError(f"no {chips}-chip slice shape")
        return f"16x16x{chips // 256}"
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    if math.prod(shape) != chips:
        raise TargetError(f"no {chips}-chip slice shape")
    shape = sorted(shape, key=lambda s: (s == 1, s))  # 2x2x1, 2x2x4, 4x4x8
    return "x".join(str(s) for s in shape)


def parse_target(text: str) -> Target:
    """`Target` for a user-written name (see the module docstring); TargetError
    with the valid forms for anything else."""
    name = text.strip().lower()
    m = re.fullmatch(r"tpu:(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        chip = CHIPS[m.group(1)]
        if len(m.group(2).split("x")) != chip.dims:
            raise TargetError(f"target {text!r}: {chip.family} topologies have {chip.dims} "
                              "dimensions, e.g. " + ("2x2x2" if chip.dims == 3 else "4x4"))
        return Target(text, chip, m.group(2))
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if m:
        chip = CHIPS[TPU_TYPES[m.group(1)]]
        n = int(m.group(2))
        if n not in TPU_SIZES[chip.family]:
            raise TargetError(f"target {text!r}: {m.group(1)} sizes are "
                              f"{', '.join(map(str, TPU_SIZES[chip.family]))}.")
        return Target(text, chip, _torus(n // chip.cores_per_chip, chip.dims))
    m = re.fullmatch(r"(h100|h200|a100)x(\d+)(?::(\d+))?", name)
    if m:
        per_node, nodes = int(m.group(2)), int(m.group(3) or 1)
        if not 1 <= per_node <= GPUS_PER_NODE or nodes < 1:
            raise TargetError(f"target {text!r}: 1..{GPUS_PER_NODE} GPUs per node and "
                              "at least one node, e.g. h100x8 or h100x8:4.")
        return Target(text, CHIPS[m.group(1)], f"1x{nodes}x{per_node}")
    raise TargetError(f"unknown target {text!r}; use a Cloud TPU type (v4-8, v5litepod-16, "
                      "v5p-256, v6e-64), tpu:v5p:4x4x8, or h100x8 / h200x8 / a100x8[:NODES]; "
                      "`mmjax compile --list-targets` lists them.")


def list_targets() -> list[str]:
    """Every named target, for `--list-targets`."""
    out = []
    for prefix, family in (("v4", "v4"), ("v5p", "v5p"), ("v5litepod", "v5e"), ("v6e", "v6e")):
        out += [f"{prefix}-{n}" for n in TPU_SIZES[family]]
    return out + ["h100x8", "h200x8", "a100x8", "h100x8:N (N nodes)",
                  "tpu:v5p:AxBxC (any topology)"]


# ----------------------------------------------------------------------------
# Devices from the target's own compiler

def _gpu_target_config(chip: Chip) -> str:
    """A GPU target description (XLA's `GpuTargetConfigProto` as text) written from
    the device's published facts: compute capability, SMs, memory, clocks."""
    facts = {  # cc, SMs, memory bytes, core clock kHz, memory clock kHz, bus width bits, L2
        "h100": ((9, 0), 132, chip.hbm_bytes, 1980000, 2619000, 5120, 50 * 2 ** 20),
        "h200": ((9, 0), 132, chip.hbm_bytes, 1980000, 3201000, 6144, 50 * 2 ** 20),
        "a100": ((8, 0), 108, chip.hbm_bytes, 1410000, 1593000, 5120, 40 * 2 ** 20),
    }[chip.family]
    (major, minor), sms, mem, clock, mem_clock, bus, l2 = facts
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {233472 if major >= 9 else 167936}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(mem_clock * 1e3 * 2 * bus / 8)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock / 1e6}
  device_memory_size: {mem}
  shared_memory_per_block_optin: {232448 if major >= 9 else 166912}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 1
  patch: 0
}}
device_description_str: "{chip.device_kind}"
"""


def target_devices(target: Target) -> list:
    """Compile-only jax devices of `target` (nothing runs on them)."""
    from jax.experimental import topologies
    if target.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server here
        # Several processes may compile at once (libtpu otherwise takes a lock file).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if importlib.util.find_spec("libtpu") is None:
            raise TargetError("compiling for a TPU needs libtpu (the TPU compiler): pip "
                              "install 'mmjax[tpu]' (about 700 MB installed; no TPU needed).")
        # Two-TensorCore chips (v4, v5p) run as one device per chip ("megacore"),
        # as JAX meshes on them require; the default description lists both cores.
        extra = {"chip_config_name": "megacore"} if target.chip.cores_per_chip == 2 else {}
        topo = topologies.get_topology_desc(platform="tpu",
                                            topology_name=f"{target.chip.family}:"
                                                          f"{target.topology}", **extra)
        return list(topo.devices)
    try:
        topo = topologies.get_topology_desc(
            target.name, "cuda", target_config=_gpu_target_config(target.chip),
            topology=target.topology)
    except Exception as e:  # plugin missing or unusable without a GPU
        raise TargetError(f"target {target.name!r}: compiling for NVIDIA GPUs needs the CUDA "
                          f"plugin (pip install 'mmjax[gpu]'); it failed with: "
                          f"{str(e).splitlines()[0][:200]}") from e
    return list(topo.devices)


def gpu_memory_fraction(env: Optional[dict] = None) -> float:
    """The fraction of a GPU's memory JAX's allocator lets a program use, from
    the environment the job will run with: `XLA_CLIENT_MEM_FRACTION` (or the
    older `XLA_PYTHON_CLIENT_MEM_FRACTION`), JAX's default 0.75 when unset, 1.0
    with `XLA_PYTHON_CLIENT_ALLOCATOR=platform` (no pool)."""
    env = os.environ if env is None else env
    if env.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0
    text = env.get("XLA_CLIENT_MEM_FRACTION") or env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not text:
        return 0.75
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise TargetError(f"XLA_CLIENT_MEM_FRACTION={text!r}: expected a fraction in (0, 1], "
                          f"e.g. 0.9.")
    return fraction


def memory_share(target: Target, override: Optional[float] = None) -> Optional[float]:
    """The share of each device's memory a step of `target` may use: on a GPU
    `gpu_memory_fraction()`; None for TPUs (the chip figure is already what the
    compiler allows) and when `override` (GiB) replaces the figure."""
    return gpu_memory_fraction() if target.platform == "gpu" and not override else None


def hbm_bytes(target: Target, override: Optional[float] = None) -> int:
    """Memory per device (bytes) a step of `target` may use, or `override` (GiB).
    TPU: what the compiler allows. GPU: the device's total times
    `memory_share` (JAX preallocates that share and cannot grow past it)."""
    if override:
        return int(float(override) * GIB)
    share = memory_share(target)
    return int(target.chip.hbm_bytes * share) if share else target.chip.hbm_bytes
