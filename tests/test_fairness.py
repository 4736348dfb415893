import math

from reuseport_ctl.stats import fairness as f


def test_jain_equal_and_skewed():
    assert f.jain([5, 5, 5, 5]) == 1.0
    assert math.isclose(f.jain([10, 0, 0, 0]), 0.25)


def test_max_min_ratio():
    assert f.max_min_ratio([3, 1]) == 3.0
    assert math.isinf(f.max_min_ratio([3, 0]))
    assert f.max_min_ratio([0, 0]) == 1.0


def test_chi_square_uniform():
    assert f.chi_square_uniform_ok([250, 260, 245, 245])
    assert not f.chi_square_uniform_ok([400, 200, 200, 200])


def test_summarize_inf_is_null():
    s = f.summarize([4, 0])
    assert s["max_min_ratio"] is None and s["total"] == 4
