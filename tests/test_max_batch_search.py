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
    from mmjax.train.compile_report import largest_fitting
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
