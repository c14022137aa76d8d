"""Two JAX processes on CPU: disjoint shards, correct global batch.

The test starts two copies of this file as JAX processes (gloo collectives,
2 simulated CPU devices each); each writes what it saw to an .npz file.
"""
import os
import subprocess
import sys
import time

import numpy as np

from _helpers import ROOT, TESTS

NUM_SHARDS, PER_SHARD, LOCAL_BATCH, STEPS = 8, 4, 4, 2


def _child(address: str, process_id: int, out_dir: str, pattern: str):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from _shards import CharTokenizer
    from mmjax.data import batch as batch_lib
    from mmjax.data import pipeline

    jax.distributed.initialize(address, num_processes=2, process_id=process_id,
                               initialization_timeout=40)
    cfg = pipeline.default_data_config()
    cfg.shards, cfg.image_size, cfg.workers, cfg.shuffle_buffer = pattern, 16, 0, 4
    it = pipeline.build_train_iterator(cfg, LOCAL_BATCH, tokenizer=CharTokenizer(8))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    saved = {}
    for step in range(STEPS):
        local = next(it)
        glob = batch_lib.make_global_batch(local, sharding)
        for name, arr in glob.items():
            assert arr.shape == (2 * LOCAL_BATCH,) + local[name].shape[1:], (name, arr.shape)
            assert arr.sharding == sharding
            # This process's devices hold exactly its own rows.
            mine = np.concatenate([np.asarray(s.data) for s in
                                   sorted(arr.addressable_shards, key=lambda s: s.index[0].start)])
            assert np.array_equal(mine, local[name]), name
            saved[f"global_{name}_{step}"] = multihost_utils.process_allgather(arr, tiled=True)
            saved[f"local_{name}_{step}"] = local[name]
    np.savez(os.path.join(out_dir, f"p{process_id}.npz"), **saved)
    jax.distributed.shutdown()


def test_two_processes_disjoint_shards_and_global_batch(tmp_path):
    import socket
    from _shards import write_dataset

    write_dataset(tmp_path, NUM_SHARDS, PER_SHARD)
    pattern = str(tmp_path / ("shard-{000..%03d}.tar" % (NUM_SHARDS - 1)))
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    # The repository and tests/ (for `_helpers`, `_shards`) on the children's path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, address, str(i), str(tmp_path), pattern],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    deadline = time.monotonic() + 55
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    res = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    shards = [{int(x) // 1000 for s in range(STEPS) for x in r[f"local_label_{s}"]} for r in res]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    for s in range(STEPS):
        for name in ("image", "text", "label"):
            union = np.concatenate([res[0][f"local_{name}_{s}"], res[1][f"local_{name}_{s}"]])
            assert np.array_equal(res[0][f"global_{name}_{s}"], union), name
            assert np.array_equal(res[1][f"global_{name}_{s}"], union), name


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
