"""The benchmarks' statistics: the median's confidence interval and paired speedups."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import below_one_summary, median_interval, ratio_with_interval, slower_beyond_noise


def _binomial_below(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) < k)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [6, 7, 11, 21, 41, 100])
def test_interval_is_the_widest_order_statistics_within_the_confidence(n):
    values = [float(v) for v in range(1, n + 1)]  # the k-th smallest is k
    lo, hi = median_interval(values)
    k = int(lo)
    assert hi == n + 1 - k  # symmetric: k-th smallest to k-th largest
    assert 2 * _binomial_below(n, k) <= 0.05  # covers the median with at least 95%
    assert 2 * _binomial_below(n, k + 1) > 0.05  # and one order further in would not


def test_known_orders():
    # n = 41 (the sweep's rounds): the 14th smallest to the 14th largest.
    assert median_interval(list(range(1, 42))) == (14, 28)
    assert median_interval(list(range(1, 22))) == (6, 16)


def test_too_few_values_give_their_whole_range():
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert median_interval([5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_order_of_values_does_not_matter():
    values = [random.Random(1).gauss(1.0, 0.1) for _ in range(41)]
    shuffled = values[:]
    random.Random(2).shuffle(shuffled)
    assert median_interval(values) == median_interval(shuffled)


def test_covers_the_true_median_about_as_often_as_it_claims():
    rng = random.Random(0)
    trials, n, hits = 2000, 41, 0
    for _ in range(trials):
        lo, hi = median_interval([rng.expovariate(1.0) for _ in range(n)])
        hits += lo <= math.log(2) <= hi  # the exponential's median
    # Order statistics give at least 95% (97.1% for n = 41); 2000 trials put
    # the observed rate within about ±1.2% of that.
    assert 0.95 <= hits / trials <= 0.99


def test_a_cell_is_slower_beyond_noise_only_when_its_whole_interval_is_under_one():
    under = tuple(0.90 + 0.001 * i for i in range(41))  # interval 0.913-0.927
    straddling = tuple(0.98 + 0.001 * i for i in range(41))  # median 1.0, interval to 1.007
    assert slower_beyond_noise(under)
    assert not slower_beyond_noise(straddling)
    assert ratio_with_interval(under) == "0.92× (0.91–0.93)†"
    assert ratio_with_interval(straddling) == "1.00× (0.99–1.01)"


def test_below_one_summary_counts():
    assert below_one_summary(342, 5, 2) == (
        "337 of 342 cells at or above 1.0×; 2 below it beyond the noise "
        "(95% interval of the median wholly under 1.0)."
    )


def test_the_gpu_table_and_its_checks_from_known_times():
    """bench_bn.py --device cuda's report, from made-up times (the timing itself needs a GPU)."""
    import torch

    from _bench_cuda import CASES, MODES, report

    rows = []
    for case in CASES:
        torch_s, ours = (2e-5, 1e-5) if case.large else (1e-5, 2e-5)  # bnlab slower on LeNet's
        rows.append((case, torch.float32, {m: {"torch": torch_s, "bnlab": ours} for m in MODES}))
    text = report(rows, copy_gbs=4000.0)
    assert text.count("\n| ") == len(CASES) * len(MODES)
    assert "Slower than torch: 64×6×28×28 float32 train (0.50×)" in text
    assert "✓ 64×64×56×56 float32 fwd+bwd 2.00×" in text
    assert "64×64×56×56 CL float32 fwd+bwd" not in text.split("fwd+bwd ≥ 1.5×")[1].split("\n")[0]
    # eval of (64, 64, 56, 56) float32: 2S = 102.8 MB in 10 µs is 10276 GB/s, 257% of 4000
    assert "✓ 64×64×56×56 float32 eval 257%" in text
