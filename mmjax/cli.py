"""mmjax: train, evaluate and run image-, audio- and video-text models.

    mmjax train [--config configs/X.py[:arg]] [--workdir DIR] [--config.a.b=value ...]
    mmjax eval --workdir DIR [--step N] [--config configs/X.py] [--config.a.b=value ...]
    mmjax eval --hf PATH [--config.evals.zeroshot.shards=...]
    mmjax generate --workdir DIR --image PATH [--prompt "question"] [--step N] [--max-new-tokens N]
    mmjax explain --workdir DIR --image PATH --text "a red circle" [--text ...] --out map.png
    mmjax shards --images DIR --captions FILE --out DIR | --synthetic [--split S] [--num-samples N] --out DIR
    mmjax tokenizer --shards PATTERN|synthetic --out FILE [--kind bpe|sentencepiece] [--vocab-size N]
    mmjax curate (--workdir RUN | --hf PATH) --shards PATTERN --out DIR (--keep-fraction F | --threshold T) [--captioner RUN] [--dedup COS]
    mmjax bench [--config configs/X.py[:arg]] [--steps N] [--aot] [--config.a.b=value ...]
    mmjax compile --config configs/X.py[:arg] --target v5p-256|h100x8|... [--max-batch] [--json PATH]
    mmjax --version

`mmjax COMMAND --help` describes a command's options; `--config.a.b=value`
overrides any key of the recipe's config (train, eval, bench, compile).
"""
from __future__ import annotations

import os
import sys

from mmjax.commands.util import fail


def version() -> str:
    """mmjax's installed version (package metadata), or 'unknown' from a bare checkout."""
    from importlib import metadata
    try:
        return metadata.version("mmjax")
    except metadata.PackageNotFoundError:
        return "unknown"


def skip_unusable_tpu_backend() -> bool:
    """Keep JAX from starting libtpu as a backend on a host that has no TPU.

    libtpu comes with the `test` and `tpu` extras (for deviceless TPU compiles);
    on a CPU host JAX still tries it as a backend, and its failed start prints
    `INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` lines before anything else.
    Only where JAX would end on the CPU anyway: JAX_PLATFORMS unset, no TPU chip
    on this host (JAX's own check of the PCI bus), no GPU plugin installed, and
    no backend started yet. `mmjax compile` loads libtpu by itself for its
    targets, so it is unaffected. Returns whether it chose the CPU.
    """
    import importlib.metadata
    import jax
    from jax._src import hardware_utils, xla_bridge
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or xla_bridge.backends_are_initialized()):
        return False
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return False
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return False  # a GPU (or other) plugin: JAX's own choice
    jax.config.update("jax_platforms", "cpu")
    return True


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # the process's own command line (the `mmjax` program)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "generate", "explain", "bench", "shards",
                            "curate"):
        if argv[0] != "shards" and "jax" not in sys.modules:
            # a fresh process that runs steps: before JAX starts its threads
            from mmjax.perf.host_memory import restart_with_hugepages, reuse_host_memory
            try:  # both read MMJAX_HOST_MALLOC (an unknown value is an error)
                if entry:
                    restart_with_hugepages()  # returns only where no restart applies
                reuse_host_memory()
            except ValueError as e:
                return fail(str(e))
        skip_unusable_tpu_backend()
    commands = ("train", "eval", "generate", "explain", "shards", "tokenizer", "bench",
                "compile", "curate")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mmjax {version()}")
        return 0
    cmd = argv[0]
    if cmd not in commands:
        return fail(f"unknown command {cmd!r}; choose one of {sorted(commands)}")
    return _command(cmd)(argv[1:])


def _command(name: str):
    """The `mmjax NAME` entry point (`mmjax/commands/NAME.py`), imported on use."""
    import importlib
    return getattr(importlib.import_module(f"mmjax.commands.{name}"), f"{name}_command")


if __name__ == "__main__":
    sys.exit(main())
