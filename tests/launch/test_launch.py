"""The launch scripts produce real `mmjax train` command lines and wire up processes.

Nothing here needs gcloud, SLURM or Kubernetes: the TPU and SLURM scripts are run
with their dry-run switches, the JobSet is read as YAML, and every training
command found is parsed back and fed through mmjax's own CLI up to the point
where training would start. The scripts' real (non-dry) paths run too, with
stand-ins on PATH for what is not here: gcloud (its "TPU VM" is a temporary
$HOME on this machine), srun/scancel/scontrol, pip and the training process.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

import mmjax.cli
import mmjax.train.loop
from _helpers import ROOT, process_alive
from mmjax.config.loading import load_config

LAUNCH = os.path.join(ROOT, "launch")
# Values with characters a shell would mangle: braces, spaces, quotes.
SHARDS = "/data/{00000..00099}.tar"
TOKENIZER = "hf:/tok dir/it's.json"


def run_script(args, env=None, check=True):
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def printed_commands(stdout: str) -> list[list[str]]:
    """`+ cmd args` lines -> argv lists (the scripts quote each word with printf %q)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("+ ") for ln in lines), stdout
    return [shlex.split(ln[2:]) for ln in lines]


def train_argv(words: list[str]) -> list[str]:
    """The `mmjax train ...` part of a shell word list, up to the first redirection."""
    start = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["mmjax", "train"])
    end = start
    while end < len(words) and words[end] not in (";", "&", "&&", "||", "|", "<") \
            and not words[end].startswith((">", "2>")):
        end += 1
    return words[start:end]


def check_train_command(argv: list[str], monkeypatch, *, config: str, workdir: str,
                        overrides: dict) -> None:
    """Run argv through `mmjax.cli.main` up to the call of `train`, and check the result.

    `overrides` maps dotted config keys to the values they must end up with.
    """
    assert argv[:2] == ["mmjax", "train"], argv
    seen = {}

    def fake_train(cfg, wd):  # stands in for the training run itself
        seen.update(config=cfg, workdir=wd)
        return {}

    monkeypatch.setattr(mmjax.train.loop, "train", fake_train)
    monkeypatch.chdir(ROOT)  # the command's relative --config path is from the repo root
    assert mmjax.cli.main(argv[1:]) == 0
    assert seen["workdir"] == workdir
    i = argv.index("--config")
    assert argv[i + 1] == config
    assert os.path.isfile(os.path.join(ROOT, config.split(":")[0]))
    # The same overrides through load_config directly (a typo'd key would raise here).
    direct = load_config(os.path.join(ROOT, config),
                         [a[len("--config."):] for a in argv if a.startswith("--config.")])
    for key, want in overrides.items():
        for cfg in (seen["config"], direct):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == want, (key, node, want)


# ---------------------------------------------------------------------------- TPU pod

TPU_ARGS = ["--name", "pod1", "--zone", "us-east5-a", "--accelerator", "v5p-64",
            "--version", "v2-alpha-tpuv5", "--project", "proj", "--spot",
            "--config", "configs/clip_b16.py", "--workdir", "gs://b/run", "--dry-run", "--",
            "--config.batch_size=2048", f"--config.data.train.shards={SHARDS}",
            f"--config.data.train.tokenizer={TOKENIZER}"]


def _gcloud(cmds, verb):
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def _flag(cmd, name):
    values = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def test_tpu_pod_dry_run(monkeypatch):
    cmds = printed_commands(run_script(["bash", "launch/tpu_pod.sh", *TPU_ARGS]).stdout)
    (describe,), (create,) = _gcloud(cmds, "describe"), _gcloud(cmds, "create")
    assert describe[5] == create[5] == "pod1"
    assert _flag(create, "--accelerator-type") == "v5p-64"
    assert _flag(create, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    for cmd in [c for c in cmds if c[0] == "gcloud"]:
        assert _flag(cmd, "--zone") == "us-east5-a" and _flag(cmd, "--project") == "proj"

    # The tarball that is made is the one copied to every worker.
    (tar,) = [c for c in cmds if c[0] == "tar"]
    (scp,) = _gcloud(cmds, "scp")
    tarball = tar[tar.index("-czf") + 1]
    assert scp[5] == tarball and scp[6].startswith("pod1:") and "--worker=all" in scp
    assert tar[tar.index("-C") + 1] == ROOT

    ssh = _gcloud(cmds, "ssh")
    on_all = [shlex.split(_flag(c, "--command")) for c in ssh if "--worker=all" in c]
    assert len(on_all) == 2
    install, start = on_all
    assert install[install.index("install"):][:3] == ["install", "-q", "-e"]
    assert "tpu" in install[install.index("-e") + 1]
    assert install[install.index("-xzf") + 1] == scp[6].split(":", 1)[1]
    assert "nohup" in start and start[-4:-2] == ["echo", "$!"]  # detached, pid kept

    argv = train_argv(start)
    check_train_command(argv, monkeypatch, config="configs/clip_b16.py", workdir="gs://b/run",
                        overrides={"batch_size": 2048, "data.train.shards": SHARDS,
                                   "data.train.tokenizer": TOKENIZER})
    # Worker 0's log is followed, and it is the file training writes to.
    (follow,) = [shlex.split(_flag(c, "--command")) for c in ssh if "--worker=0" in c]
    assert follow[0] == "tail" and follow[-1] == start[start.index(">") + 1]


@pytest.mark.parametrize("drop, message", [("--zone", "--zone is required"),
                                           ("--config", "--config is required")])
def test_tpu_pod_missing_flag_is_named(drop, message):
    args = [a for i, a in enumerate(TPU_ARGS) if drop not in (a, TPU_ARGS[i - 1])]
    proc = run_script(["bash", "launch/tpu_pod.sh", *args], check=False)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


def test_tpu_pod_rejects_bad_config_and_extra_args():
    bad = [a.replace("clip_b16", "nope") for a in TPU_ARGS]
    proc = run_script(["bash", "launch/tpu_pod.sh", *bad], check=False)
    assert proc.returncode == 2 and "configs/nope.py not found" in proc.stderr
    proc = run_script(["bash", "launch/tpu_pod.sh", *TPU_ARGS, "--batch_size=3"], check=False)
    assert proc.returncode == 2 and "--batch_size=3" in proc.stderr


def _write_scripts(directory, scripts: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = directory / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)


def _fake_tpu_vm(tmp_path):
    """A `gcloud` whose TPU VM is this machine: scp copies into $HOME, ssh runs the
    command there. pip and `mmjax` are stand-ins that log what they are asked to do."""
    home, events = tmp_path / "home", tmp_path / "events"
    home.mkdir()
    _write_scripts(tmp_path / "bin", {"gcloud": f"""
printf '%q ' "$@" >> {events}; echo >> {events}
case $4 in
  describe) [[ -n $FAKE_STATE ]] || exit 1; echo "$FAKE_STATE" ;;
  scp) cp "$5" "$HOME/${{6#*:}}" ;;
  ssh) for a in "$@"; do [[ $a == --command=* ]] && cmd=${{a#--command=}}; done
       cd "$HOME" && PATH="{tmp_path}/vm_bin:$PATH" bash -c "$cmd" ;;
esac"""})
    _write_scripts(tmp_path / "vm_bin", {"python3": f'echo "python3 $* in $PWD" >> {events}'})
    # Where a user-level `pip install` puts the entry point; the start command adds it to PATH.
    _write_scripts(home / ".local" / "bin", {"mmjax": f"""
trap 'echo "mmjax checkpoint $$" >> {events}; exit 0' TERM
printf 'mmjax started %s' $$ >> {events}; printf ' %q' "$@" >> {events}; echo >> {events}
for _ in $(seq 600); do sleep 0.1; done  # never outlives the test by long"""})
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(home),
           "TMPDIR": str(tmp_path)}
    return home, events, env


def test_tpu_pod_runs_and_stops_on_a_fake_vm(tmp_path):
    home, events, env = _fake_tpu_vm(tmp_path)
    args = [a for a in TPU_ARGS if a != "--dry-run"]
    args.insert(args.index("--"), "--no-follow")
    try:
        for state, verbs in [("PREEMPTED", ["describe", "delete", "create"]),
                             ("READY", ["describe"])]:
            events.write_text("")
            run_script(["bash", "launch/tpu_pod.sh", *args], env={**env, "FAKE_STATE": state})
            _wait_for(events, "mmjax started")
            lines = events.read_text().splitlines()
            gcloud = [shlex.split(ln)[3] for ln in lines if ln.startswith("compute ")]
            assert gcloud == verbs + ["scp", "ssh", "ssh"], lines
            # The checkout was unpacked on the "worker" and installed from there.
            assert (home / "mmjax" / "launch" / "tpu_pod.sh").is_file()
            assert f"python3 -m pip install -q -e .[tpu,remote] in {home / 'mmjax'}" in lines
            (line,) = [ln for ln in lines if ln.startswith("mmjax started")]
            pid, *argv = shlex.split(line)[2:]
            assert argv == ["train", "--config", "configs/clip_b16.py", "--workdir", "gs://b/run",
                            *TPU_ARGS[TPU_ARGS.index("--") + 1:]]
            assert (home / "mmjax_train.pid").read_text().strip() == pid
            # --stop reaches that very process: it checkpoints and exits.
            run_script(["bash", "launch/tpu_pod.sh", "--name", "pod1", "--zone", "z", "--stop"],
                       env=env)
            _wait_for(events, f"mmjax checkpoint {pid}")
    finally:  # whatever happened, no stand-in outlives the test
        text = events.read_text()
        for line in text.splitlines():
            pid = line.split()[2] if line.startswith("mmjax started") else None
            if pid and f"mmjax checkpoint {pid}" not in text:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------- SLURM

SBATCH = os.path.join(LAUNCH, "slurm_gpu.sbatch")


def sbatch_directives() -> dict:
    out = {}
    with open(SBATCH, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#SBATCH "):
                key, _, value = line[len("#SBATCH "):].strip().partition("=")
                out[key] = value
    return out


def test_slurm_header():
    d = sbatch_directives()
    assert "--requeue" in d
    assert d["--ntasks-per-node"] == "1" and int(d["--gpus-per-node"]) >= 1
    sig, _, seconds = d["--signal"].partition("@")
    assert sig in ("B:USR1", "B:TERM") and int(seconds) >= 60


def test_slurm_dry_run(monkeypatch):
    env = {"MMJAX_DRY_RUN": "1", "CONFIG": "configs/siglip_b16.py:tiny", "WORKDIR": "/shared/r",
           "EXTRA_ARGS": f"--config.batch_size=64  --config.data.train.shards={SHARDS}",
           "SLURM_GPUS_ON_NODE": "4"}
    proc = run_script(["bash", "launch/slurm_gpu.sbatch", f"--config.data.train.tokenizer={TOKENIZER}"],
                      env=env)
    cmds = printed_commands(proc.stdout)
    exports = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    (srun,) = [c for c in cmds if c[0] == "srun"]
    check_train_command(train_argv(srun), monkeypatch, config="configs/siglip_b16.py:tiny",
                        workdir="/shared/r",
                        overrides={"batch_size": 64, "data.train.shards": SHARDS,
                                   "data.train.tokenizer": TOKENIZER})
    # One process per node sees all 4 GPUs of its node.
    assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert float(exports["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == 0.9
    flags = exports["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    # Every flag is known to the installed XLA (an unknown one aborts the process).
    check = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                           env={**os.environ, "XLA_FLAGS": exports["XLA_FLAGS"],
                                "JAX_PLATFORMS": "cpu"},
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "3.0", check.stderr[-2000:]


def test_slurm_one_process_per_gpu_leaves_devices_to_jax():
    env = {"MMJAX_DRY_RUN": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2"}
    cmds = printed_commands(run_script(["bash", "launch/slurm_gpu.sbatch"], env=env).stdout)
    assert not any(c[0] == "export" and c[1].startswith("JAX_LOCAL_DEVICE_IDS=") for c in cmds)


def _fake_slurm(tmp_path):
    """srun/scancel/scontrol/mmjax stand-ins; they log what they are asked to do."""
    bin_dir, log = tmp_path / "bin", tmp_path / "events"
    scripts = {
        # srun: drop its own options, then become the task (its pid is the step's).
        "srun": f'while [[ $1 == -* ]]; do shift; done\necho $$ > {tmp_path}/step.pid\nexec "$@"',
        "scancel": f'echo "scancel $*" >> {log}\nkill -"${{1#--signal=}}" "$(cat {tmp_path}/step.pid)"',
        "scontrol": f'echo "scontrol $*" >> {log}',
        # mmjax: like `mmjax train`, checkpoint and exit 0 on SIGTERM.
        "mmjax": f'trap \'echo "mmjax checkpoint $*" >> {log}; exit 0\' TERM\n'
                 f'echo "mmjax started" >> {log}\nfor _ in $(seq 600); do sleep 0.1; done',
    }
    _write_scripts(bin_dir, scripts)
    return bin_dir, log


def _wait_for(path, text, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_checkpoints_then_requeues(tmp_path, sig, requeued):
    """Time-limit warning (USR1): checkpoint then requeue. SIGTERM: checkpoint only."""
    bin_dir, log = _fake_slurm(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "WORKDIR": str(tmp_path / "run")}
    proc = subprocess.Popen(["bash", SBATCH], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(log, "mmjax started")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:  # whatever happened, neither the script nor the stand-in outlives the test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            try:
                os.kill(int((tmp_path / "step.pid").read_text()), signal.SIGKILL)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
    events = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert "scancel --signal=TERM 4242" in events
    (ckpt,) = [e for e in events if e.startswith("mmjax checkpoint")]
    assert f"--workdir {tmp_path / 'run'}" in ckpt
    assert ("scontrol requeue 4242" in events) == requeued
    if requeued:  # requeue only after the checkpoint was written
        assert events.index("scontrol requeue 4242") > events.index(ckpt)


# ---------------------------------------------------------------------------- Kubernetes

def test_k8s_jobset(monkeypatch):
    with open(os.path.join(LAUNCH, "k8s_jobset.yaml"), encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    (js,) = docs
    assert js["kind"] == "JobSet" and js["apiVersion"].startswith("jobset.x-k8s.io/")
    (rjob,) = js["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    n = rjob["replicas"] * job["parallelism"]
    assert job["completions"] == job["parallelism"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MMJAX_NUM_PROCESSES"]["value"] == str(n)
    assert env["MMJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # The coordinator is pod 0 of job 0 under the JobSet's headless service.
    host, port = env["MMJAX_COORDINATOR"]["value"].rsplit(":", 1)
    name, subdomain = js["metadata"]["name"], js["spec"]["network"]["subdomain"]
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    assert host == f"{name}-{rjob['name']}-0-0.{subdomain}"
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    assert pod["terminationGracePeriodSeconds"] >= 60  # room for the SIGTERM checkpoint

    argv = container["command"]
    i = argv.index("--workdir")
    check_train_command(argv, monkeypatch, config=argv[argv.index("--config") + 1],
                        workdir=argv[i + 1], overrides={"batch_size": 4096})


# ---------------------------------------------------------------------------- local

PRINT_ENV = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
             "('MMJAX_COORDINATOR', 'MMJAX_NUM_PROCESSES', 'MMJAX_PROCESS_ID', 'XLA_FLAGS')}))")

# Each process joins the job the way `mmjax train` does, then reports what JAX sees.
JOIN = ("import json, jax; from mmjax.train.multihost import join; "
        "join(); "
        "print(json.dumps([jax.process_index(), jax.process_count(), jax.device_count(), "
        "jax.local_device_count()]))")


def _per_process_json(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[p") and "] " in line:
            prefix, _, rest = line.partition("] ")
            if rest.startswith(("{", "[")):
                out[int(prefix[2:])] = json.loads(rest)
    return out


def test_local_env():
    proc = run_script([sys.executable, "launch/local.py", "--processes", "2",
                       "--devices-per-process", "1", "--", sys.executable, "-c", PRINT_ENV])
    got = _per_process_json(proc.stdout)
    assert sorted(got) == [0, 1]
    assert {got[i]["MMJAX_PROCESS_ID"] for i in got} == {"0", "1"}
    assert got[0]["MMJAX_PROCESS_ID"] == "0" and got[1]["MMJAX_PROCESS_ID"] == "1"
    assert got[0]["MMJAX_COORDINATOR"] == got[1]["MMJAX_COORDINATOR"]
    assert got[0]["MMJAX_COORDINATOR"].startswith("127.0.0.1:")
    assert all(g["MMJAX_NUM_PROCESSES"] == "2" for g in got.values())
    assert all("--xla_force_host_platform_device_count=1" in g["XLA_FLAGS"].split()
               and "device_count=8" not in g["XLA_FLAGS"] for g in got.values())


def test_local_processes_form_one_jax_job():
    proc = run_script([sys.executable, "launch/local.py", "--processes", "2",
                       "--devices-per-process", "2", "--timeout", "90", "--",
                       sys.executable, "-c", JOIN])
    got = _per_process_json(proc.stdout)
    assert got == {0: [0, 2, 4, 2], 1: [1, 2, 4, 2]}, proc.stdout


# A child for the launcher's own tests: writes its pid (and that of a grandchild
# `sleep`) to OUT_pN, records a SIGTERM in OUT_termN and exits 0 on it; process
# FAIL exits with status 3 after 1 s. Others wait up to 60 s.
CHILD = """
import os, signal, subprocess, sys, time
out, fail = sys.argv[1], int(sys.argv[2])
i = int(os.environ["MMJAX_PROCESS_ID"])
grand = subprocess.Popen(["sleep", "300"])
open(f"{out}_p{i}", "w").write(f"{os.getpid()} {grand.pid}")
def term(*_):
    open(f"{out}_term{i}", "w").write("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
if i == fail:
    time.sleep(1)
    sys.exit(3)
time.sleep(60)
"""


def _start_local(tmp_path, fail):
    out = str(tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "launch/local.py", "--processes", "2", "--grace",
                             "10", "--", sys.executable, "-c", CHILD, out, str(fail)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not all(os.path.exists(f"{out}_p{i}") for i in range(2)):
        assert time.monotonic() < end and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # the pid files are written before the handlers are installed
    pids = [int(p) for i in range(2) for p in open(f"{out}_p{i}").read().split()]
    return proc, out, pids


def test_local_forwards_sigterm_and_leaves_no_process(tmp_path):
    """SIGTERM to the launcher reaches every process (they exit 0: the launcher
    does too); no child or grandchild survives it."""
    proc, out, pids = _start_local(tmp_path, fail=-1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert all(open(f"{out}_term{i}").read() == "TERM" for i in range(2))
    assert "SIGTERM received: passed to every process" in stderr
    assert not any(process_alive(p) for p in pids), [p for p in pids if process_alive(p)]


def test_local_stops_the_others_when_one_fails(tmp_path):
    """Process 1 exits 3 while process 0 runs on: the launcher notices at once
    (not when process 0 ends), names it, stops process 0 and exits 3."""
    start = time.monotonic()
    proc, out, pids = _start_local(tmp_path, fail=1)
    stdout, stderr = proc.communicate(timeout=45)
    assert time.monotonic() - start < 30  # process 0 alone would run 60 s
    assert proc.returncode == 3, stderr
    assert "process 1 exited with status 3; stopping process 0" in stderr, stderr
    assert os.path.exists(f"{out}_term0")  # stopped by SIGTERM, its handler ran
    assert not any(process_alive(p) for p in pids), [p for p in pids if process_alive(p)]


def test_local_reports_the_root_cause_not_its_consequence():
    """Several processes can end within one poll: the one killed by a signal or
    failing on its own is named, not a peer that stopped because of it (75)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mmjax_launch_local",
                                                  os.path.join(ROOT, "launch", "local.py"))
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    assert local.root_cause([75, 2]) == (1, 2)
    assert local.root_cause([75, -9, None]) == (1, -9)
    assert local.root_cause([None, 75]) == (1, 75)
    assert local.root_cause([3, 2]) == (0, 3)
    assert local.describe(-9) == "was killed by SIGKILL" and local.exit_code(-9) == 137
