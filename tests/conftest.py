"""Test-session setup: 8 simulated CPU devices, set before jax starts.

Single-device computations run on device 0; sharding tests build meshes over
all 8. Multi-process tests start their own subprocesses.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
