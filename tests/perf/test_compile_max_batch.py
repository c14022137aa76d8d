"""The search behind `mmjax compile --max-batch` (no compiler needed: the probes
are synthetic memory curves, the reference is trying every batch)."""
import numpy as np
import pytest


@pytest.mark.parametrize("seed", range(3))
def test_largest_fitting_search_equals_exhaustive_search(seed):
    """The search behind `--max-batch` against trying every k: memory curves
    that are linear, curved (quadratic terms, steps) or give no figures (an
    out-of-memory error without numbers), boundaries anywhere (none fits, all
    fit), any start. Its answer is always probed on both sides."""
    from mmjax.perf.compile import largest_fitting
    rng = np.random.RandomState(seed)
    counts = []
    for _ in range(300):
        top = int(rng.choice([1, 7, 64, 1000, 2 ** 18]))
        boundary = int(rng.randint(0, top + 1))  # largest k that fits
        kind = rng.choice(["linear", "curved", "steps", "blind"])
        slope = rng.uniform(1e3, 1e9)

        def slack(k):
            x = (k - boundary - 0.5) * slope
            if kind == "curved":
                x += rng.uniform(0, 0.3) * slope * (k ** 2 - (boundary + 0.5) ** 2) / max(top, 1)
            if kind == "steps":
                x = slope * (np.floor((k - boundary - 0.5) / 3.0) + 0.5)
            return x

        probed = []

        def probe(k):
            assert 1 <= k <= top, (k, top)
            probed.append(k)
            fits = k <= boundary
            s = None if kind == "blind" else float(slack(k))
            if s is not None:  # the figures agree with the verdict
                s = -abs(s) if fits else abs(s) + 1.0
            return fits, s

        start = int(rng.randint(1, top + 1))
        assert largest_fitting(probe, start, top) == boundary, (kind, top, boundary, start)
        if boundary > 0:
            assert boundary in probed
        if boundary < top:
            assert boundary + 1 in probed
        if kind == "linear":
            counts.append(len(probed))
    assert np.median(counts) <= 4 and max(counts) <= 8, counts


def test_fit_and_slack_read_peak_on_tpu_total_elsewhere_needed_on_refusal():
    """Which per-device figure decides a fit: XLA's peak on TPU (a v5e step the
    compiler accepted: total 18.35 GiB, peak 15.17 GiB, HBM 15.75 GiB, so the
    peak agrees with the compiler and the total does not), `total` on GPU, and
    the `needed` of an out-of-memory refusal; the search's slack is that figure
    minus the memory available."""
    from mmjax.perf.compile import _slack, misfit_line, used_bytes
    gib = 2 ** 30
    hbm = 15.75 * gib
    memory = {"argument": 2.0 * gib, "output": 2.0 * gib, "alias": 2.0 * gib,
              "temp": 16.35 * gib, "total": 18.35 * gib, "peak": 15.17 * gib}
    tpu = {"platform": "tpu", "hbm": hbm, "memory": memory}
    gpu = {"platform": "gpu", "hbm": hbm, "memory": memory}
    refused = {"platform": "tpu", "hbm": hbm, "target": "v5litepod-16", "batch": 4064,
               "mesh": "data=16", "memory": {"needed": 16.06 * gib, "available": 15.5 * gib}}
    assert used_bytes(tpu) == memory["peak"] and _slack(tpu) == memory["peak"] - hbm < 0
    assert used_bytes(gpu) == memory["total"] and _slack(gpu) == memory["total"] - hbm > 0
    assert used_bytes(refused) == 16.06 * gib
    assert abs(_slack(refused) - 0.56 * gib) < 1e-3 * gib
    assert "16.06 GiB" in misfit_line(refused) and "15.50 GiB" in misfit_line(refused)
    assert _slack({"platform": "tpu", "hbm": hbm,
                   "memory": {"needed": float("nan"), "available": float("nan")}}) is None


def test_search_on_a_measured_tpu_memory_curve():
    """clip_b16 on v5p-16 as the TPU compiler measured it (peak GiB per chip by
    global batch; steps past 18,144 refused with the `needed` figure; HBM the
    compiler allows: 95.74 GiB). Memory is not linear near HBM (2.5 GiB per
    1,000 images, then 5.4, then +0.9 GiB for 8 images), yet the search finds
    18,144 in at most 8 compiles. With HBM taken as 95 GiB, fitting steps read
    as over the limit and the same search needs twice as many."""
    from mmjax.perf.compile import largest_fitting
    measured = {16384: 89.20, 17536: 92.10, 18088: 95.06, 18104: 95.13, 18128: 95.29,
                18144: 95.36, 18152: 96.29, 18200: 96.55, 18304: 97.06, 21760: 114.94,
                25424: 133.31, 32768: 172.00}
    xs = sorted(measured)
    gib = 2 ** 30

    def search(hbm):
        probed = []

        def probe(k):  # k in units of the 8 data-parallel chips
            batch = 8 * k
            probed.append(batch)
            used = float(np.interp(batch, xs, [measured[x] for x in xs]))
            if batch > xs[-1]:
                used = measured[xs[-1]] + (batch - xs[-1]) * 5.2e-3
            fits = batch <= 18144
            return fits, (used - (hbm if fits else 95.74)) * gib

        return largest_fitting(probe, 16384 // 8, 2 ** 17) * 8, probed

    from mmjax.perf.targets import CHIPS
    best, probed = search(CHIPS["v5p"].hbm_bytes / gib)  # mmjax's figure for v5p
    assert best == 18144 and len(probed) <= 8, probed
    assert 18144 in probed and 18152 in probed
    best, probed_wrong_hbm = search(95.0)
    assert best == 18144 and len(probed_wrong_hbm) >= 2 * len(probed), probed_wrong_hbm
