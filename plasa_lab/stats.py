"""The statistics that compare programs over seeds, in one place: mean and sd, Welch's t-test and
the verdict it gives, a paired t-test over shared seeds, a one-sample test of a claimed value, and
the change of perplexity.

Every test runs on val_loss = log(val_ppl), one value per seed: on the log scale a seed's noise
adds to the loss, where on perplexity it would multiply. Standard library only, but for scipy's
t distribution, imported when a test is actually computed (it takes a second to import, and the
progress line asks for a verdict only once a program has several seeds).
"""

import math
import statistics
import warnings

VERDICTS = ("better beyond noise", "within noise", "worse beyond noise")
ALPHA = 0.05  # two-sided


def mean_sd(values) -> tuple[float, float | None]:
    """The mean and the sample sd (None for a single value: no estimate of the spread)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def welch_p(sample: list[float], reference: list[float]) -> float | None:
    """Two-sided p of Welch's t-test (unequal variances) of two samples; None when there is no
    estimate of the noise: fewer than 2 values in either, or no variance in both."""
    if len(sample) < 2 or len(reference) < 2:
        return None
    if statistics.pvariance(sample) == 0 and statistics.pvariance(reference) == 0:
        return None
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # nearly identical samples: scipy warns, the p-value says enough
        warnings.simplefilter("ignore")
        p = float(ttest_ind(sample, reference, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def paired_change(losses: dict[int, float], reference: dict[int, float]) -> tuple[float, float | None, int]:
    """(mean change of val_loss, two-sided p of a paired t-test, n) over the seeds both have. On one
    seed every program trains from the same trunk initialisation and batches, so the seed's share of
    the noise cancels in the difference."""
    seeds = sorted(set(losses) & set(reference))
    diffs = [losses[s] - reference[s] for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), None, len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return mean, (1.0 if mean == 0 else 0.0), len(diffs)
    from scipy.stats import t as student

    t = mean / (sd / math.sqrt(len(diffs)))
    return mean, float(2 * student.sf(abs(t), len(diffs) - 1)), len(diffs)


def verdict(losses: list[float], reference: list[float]) -> tuple[str, float | None]:
    """(one of VERDICTS, p) of a program's per-seed val_losses against the reference's: beyond
    noise when Welch's p < ALPHA, better when its mean loss is the lower; else within noise."""
    p = welch_p(losses, reference)
    if p is None or p >= ALPHA:
        return "within noise", p
    return ("better beyond noise" if statistics.mean(losses) < statistics.mean(reference) else "worse beyond noise"), p


def claim_p(values: list[float], claimed: float) -> float | None:
    """Two-sided p of a one-sample t-test: is the mean of `values` different from a claimed value?
    None with fewer than 2 values or none of them different from another."""
    if len(values) < 2 or statistics.stdev(values) == 0:
        return None
    from scipy.stats import t as student

    t = (statistics.fmean(values) - claimed) / (statistics.stdev(values) / math.sqrt(len(values)))
    return float(2 * student.sf(abs(t), len(values) - 1))


def ppl_change_pct(losses: list[float], reference: list[float]) -> float:
    """The change, in percent, of the geometric mean perplexity exp(mean val_loss) against the
    reference's (negative is better)."""
    return 100 * math.expm1(statistics.fmean(losses) - statistics.fmean(reference))
