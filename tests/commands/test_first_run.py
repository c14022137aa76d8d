"""What a first-time user sees: shard-writing progress, which data the final
zero-shot number is on, `mmjax eval` with nothing to evaluate or no folder,
one final result line from a multi-process job."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from _helpers import ROOT, mmjax_log
from mmjax import cli
from mmjax.data.synthetic import ensure_synthetic_shards, write_synthetic_shards

TINY = ["--config", "clip_tiny:tiny"]
pytestmark = pytest.mark.usefixtures("mmjax_cache")


def test_writing_the_built_in_shards_logs_progress(tmp_path):
    with mmjax_log(logger_level=logging.INFO) as records:
        ensure_synthetic_shards(tmp_path, "train", num_samples=40, image_size=16,
                                samples_per_shard=20, log_every_s=0)
        first = [r.getMessage() for r in records]
        ensure_synthetic_shards(tmp_path, "train", num_samples=40, image_size=16,
                                samples_per_shard=20, log_every_s=0)  # reused: no writing
    assert first[0].startswith("writing the built-in train data (40 samples")
    assert str(tmp_path) in first[0] and "once" in first[0]
    periodic = [ln for ln in first[1:] if "/40 samples" in ln]
    assert len(periodic) == 40  # every 0 s: one line per sample here
    assert "samples/s" in periodic[0] and "eta " in periodic[0]
    assert periodic[-1].startswith("built-in train data: 40/40 samples") and "done in" in \
        periodic[-1]
    assert [r.getMessage() for r in records] == first


def test_final_zero_shot_line_names_its_data_and_eval_says_when_nothing_to_do(
        tmp_path, capsys):
    own = write_synthetic_shards(str(tmp_path / "own"), "train", num_samples=64, image_size=32,
                                 samples_per_shard=32, prefix="own")
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--workdir", str(run),
                     f"--config.data.train.shards={'::'.join(own)}"]) == 0
    final = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("zero-shot")]
    assert len(final) == 1, final
    assert final[0].startswith(
        "zero-shot top-1 on held-out built-in data (evals.zeroshot.shards=synthetic): "), final

    # The same run with every evaluation switched off: say so, and how to ask for one.
    code = cli.main(["eval", "--workdir", str(run), "--config.evals.zeroshot.shards=",
                     "--config.evals.retrieval.shards="])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "nothing to evaluate" in err[0] and str(run) in err[0], err
    assert "--config.evals.zeroshot.shards=" in err[0] and "--config.evals.vqa.shards=" in err[0]


def test_eval_of_a_missing_folder_is_one_line(tmp_path, capsys):
    code = cli.main(["eval", "--workdir", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"mmjax: error: --workdir {tmp_path / 'nope'}: no such folder"]


def test_two_process_train_prints_the_final_result_once(tmp_path, mmjax_cache):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "MMJAX_CACHE": mmjax_cache}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
         "--devices-per-process", "2", "--timeout", "400", "--", sys.executable, "-m",
         "mmjax.cli", "train", *TINY, "--workdir", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    final = [ln for ln in proc.stdout.splitlines() if "zero-shot top-1 on" in ln]
    assert len(final) == 1 and final[0].startswith("[p0] "), final


LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "libtpu", "INVALID_ARGUMENT", "TPU accelerator type")


def test_train_on_a_cpu_host_prints_no_libtpu_start_up_errors(tmp_path, mmjax_cache):
    """With libtpu installed (the `test` extra brings it for deviceless TPU compiles)
    and no TPU on the host, `import jax; jax.devices()` prints libtpu's failed
    start; `mmjax train` prints none of it (`cli.skip_unusable_tpu_backend`)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "MMJAX_CACHE": mmjax_cache}
    env.pop("JAX_PLATFORMS", None)  # as on a user's machine (conftest sets it for the tests)
    plain = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert any(word in plain.stderr for word in LIBTPU_NOISE), plain.stderr  # the premise
    run = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", *TINY, "--workdir",
                          str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "zero-shot top-1" in out
    assert not [l for l in out.splitlines() if any(w in l for w in LIBTPU_NOISE)], out[:3000]
