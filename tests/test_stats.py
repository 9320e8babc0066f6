"""plasa_lab.stats: the numbers every comparison of programs over seeds rests on, checked by hand."""

import math

import pytest

from plasa_lab.stats import claim_p, mean_sd, pooled_paired_sd, ppl_change_pct, shrinkage, verdict, welch_p


def test_mean_sd_has_no_sd_for_a_single_value():
    assert mean_sd([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([5.0]) == (5.0, None)


def test_welch_p_needs_two_values_and_some_variance_on_each_side():
    assert welch_p([1.0], [1.0, 2.0]) is None
    assert welch_p([1.0, 1.0], [2.0, 2.0]) is None
    assert 0 < welch_p([1.0, 1.1, 0.9], [1.5, 1.6, 1.4]) < 0.05


def by_seed(*losses, first=42):
    return {first + i: loss for i, loss in enumerate(losses)}


def test_a_verdict_needs_a_difference_beyond_noise():
    assert verdict(by_seed(6.00, 6.02, 6.01), by_seed(6.30, 6.32, 6.31))[0] == "better beyond noise"
    assert verdict(by_seed(6.30, 6.35, 6.27), by_seed(6.30, 6.32, 6.31))[0] == "within noise"


def test_on_shared_seeds_the_verdict_is_paired_and_sees_what_welchs_test_cannot():
    """The seeds move both programs together (6.20 to 6.40); the program is 0.01-0.02 lower on each."""
    reference, program = by_seed(6.30, 6.40, 6.20), by_seed(6.28, 6.38, 6.19)
    word, p, test = verdict(program, reference)
    assert (word, test) == ("better beyond noise", "paired t-test") and p < 0.05
    assert welch_p(list(program.values()), list(reference.values())) > 0.5  # unpaired: lost in the seeds' spread


def test_on_different_seeds_the_verdict_falls_back_to_welch_and_says_so():
    word, p, test = verdict(by_seed(6.00, 6.02), by_seed(6.30, 6.32, 6.31))  # a seed of the program failed
    assert (word, test) == ("better beyond noise", "Welch's t-test")
    assert verdict(by_seed(5.0), by_seed(6.0)) == ("within noise", None, "paired t-test")


def test_the_paired_sd_is_pooled_over_programs_each_around_its_own_effect():
    sd, df = pooled_paired_sd([[0.10, 0.12, 0.14], [-0.05, -0.03], [0.3]])  # the last has no spread to give
    assert df == 3 and sd == pytest.approx(math.sqrt((0.02**2 + 0 + 0.02**2 + 0.01**2 + 0.01**2) / 3))
    assert pooled_paired_sd([[0.1]]) == (None, 0)


def test_shrinkage_is_the_share_of_a_claimed_gain_that_unseen_seeds_take_back():
    assert shrinkage(-1.7, -1.1) == pytest.approx(1 - 1.1 / 1.7)  # the audit's figures: a third is winner's curse
    assert shrinkage(-1.0, 0.5) == pytest.approx(1.5) and shrinkage(0.5, -1.0) is None


def test_claim_p_is_the_two_sided_one_sample_t_test():
    values = [1.0, 2.0, 3.0]  # mean 2, sd 1: t = (2 - 0) / (1 / sqrt(3)) = 3.46 on 2 degrees of freedom
    assert claim_p(values, 0.0) == pytest.approx(0.0742, abs=1e-4)
    assert claim_p(values, 2.0) == pytest.approx(1.0)
    assert claim_p([1.0, 1.0], 0.0) is None and claim_p([1.0], 0.0) is None


def test_ppl_change_is_of_the_geometric_mean_perplexity():
    assert ppl_change_pct([math.log(110.0)], [math.log(100.0)]) == pytest.approx(10.0)
    assert ppl_change_pct([math.log(90.0), math.log(110.0)], [math.log(math.sqrt(9900.0))]) == pytest.approx(0.0)
