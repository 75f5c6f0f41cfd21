"""benchmark/advantage_noise.py: the split of returns into parts odd and even in the exploration noise."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def advantage_noise(benchmark_script):
    return benchmark_script("advantage_noise")


def test_returns_split_into_odd_even_and_between_segment_parts(advantage_noise):
    """Two segments of K=4 (two antithetic pairs each) at one step, worked by hand."""
    a, b, c, d, e1, e2 = 1.0, 3.0, -2.0, 0.0, 0.5, -1.5
    returns = np.array([[a + e1, a - e1, b + e2, b - e2, c, c, d, d]])
    parts = advantage_noise.decompose(returns, 4)
    assert parts["odd"] == pytest.approx(np.var([e1, e2, 0.0, 0.0]))
    assert parts["even"] == pytest.approx(np.var([(a - b) / 2, (b - a) / 2, (c - d) / 2, (d - c) / 2]))
    assert parts["between segments"] == pytest.approx(np.var([(a + b) / 2, (c + d) / 2]))
