"""plasa_lab.stats: the numbers every comparison of programs over seeds rests on, checked by hand."""

import math

import pytest

from plasa_lab.stats import claim_p, mean_sd, ppl_change_pct, verdict, welch_p


def test_mean_sd_has_no_sd_for_a_single_value():
    assert mean_sd([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([5.0]) == (5.0, None)


def test_welch_p_needs_two_values_and_some_variance_on_each_side():
    assert welch_p([1.0], [1.0, 2.0]) is None
    assert welch_p([1.0, 1.0], [2.0, 2.0]) is None
    assert 0 < welch_p([1.0, 1.1, 0.9], [1.5, 1.6, 1.4]) < 0.05


def test_a_verdict_needs_a_difference_beyond_noise():
    assert verdict([6.00, 6.02, 6.01], [6.30, 6.32, 6.31])[0] == "better beyond noise"
    assert verdict([6.30, 6.35, 6.27], [6.30, 6.32, 6.31])[0] == "within noise"


def test_claim_p_is_the_two_sided_one_sample_t_test():
    values = [1.0, 2.0, 3.0]  # mean 2, sd 1: t = (2 - 0) / (1 / sqrt(3)) = 3.46 on 2 degrees of freedom
    assert claim_p(values, 0.0) == pytest.approx(0.0742, abs=1e-4)
    assert claim_p(values, 2.0) == pytest.approx(1.0)
    assert claim_p([1.0, 1.0], 0.0) is None and claim_p([1.0], 0.0) is None


def test_ppl_change_is_of_the_geometric_mean_perplexity():
    assert ppl_change_pct([math.log(110.0)], [math.log(100.0)]) == pytest.approx(10.0)
    assert ppl_change_pct([math.log(90.0), math.log(110.0)], [math.log(math.sqrt(9900.0))]) == pytest.approx(0.0)
