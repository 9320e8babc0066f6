"""The statistics that compare programs over seeds, in one place: mean and sd, the paired t-test
over shared seeds and the verdict it gives (Welch's t-test only where the seeds differ), the run's
paired noise, a one-sample test of a claimed value, the change of perplexity and the winner's curse.

Every program trains on a seed from the same trunk initialisation, batches, dropout masks and
validation windows, so two programs' losses on one seed share most of their noise: their
difference is what a comparison should test (here the paired differences spread by about a
quarter of what the seeds do).

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


def seed_losses(metrics: dict, search_seed: int | None = None) -> dict[int, float]:
    """seed -> val_loss of the seeds a program's metrics carry (a noise-aware run's val_loss_seedN);
    without them, its val_loss at `search_seed` (a one-seed run trains every program on that seed)."""

    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    out = {}
    for key, value in (metrics or {}).items():
        if key.startswith("val_loss_seed") and key[13:].isdigit() and finite(value):
            out[int(key[13:])] = float(value)
    if not out and search_seed is not None and finite((metrics or {}).get("val_loss")):
        out[search_seed] = float(metrics["val_loss"])
    return out


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


def verdict(losses: dict[int, float], reference: dict[int, float]) -> tuple[str, float | None, str]:
    """(one of VERDICTS, p, the test's name) of a program's val_loss per seed against the
    reference's: a paired t-test when both were trained on the same seeds, Welch's where the seeds
    differ (a seed failed or was never run). Beyond noise when p < ALPHA, better when its mean loss
    is the lower; else within noise."""
    if set(losses) == set(reference):
        _, p, _ = paired_change(losses, reference)
        test = "paired t-test"
    else:
        p, test = welch_p(list(losses.values()), list(reference.values())), "Welch's t-test"
    if p is None or p >= ALPHA:
        return "within noise", p, test
    better = statistics.mean(losses.values()) < statistics.mean(reference.values())
    return ("better beyond noise" if better else "worse beyond noise"), p, test


def pooled_paired_sd(differences: list[list[float]]) -> tuple[float | None, int]:
    """(sd, degrees of freedom) of one paired difference, pooled over programs: each list is one
    program's per-seed differences from the same reference; its own mean (the program's effect) is
    taken out, and what is left is the noise of a difference on one seed. None with no program on
    two seeds."""
    squares = sum(sum((d - statistics.fmean(ds)) ** 2 for d in ds) for ds in differences if len(ds) > 1)
    df = sum(len(ds) - 1 for ds in differences if len(ds) > 1)
    return (math.sqrt(squares / df) if df else None), df


def shrinkage(claimed_pct: float, replayed_pct: float) -> float | None:
    """The winner's curse as a share: how much of the change a program was selected on is gone on
    seeds it was not selected on (0: it held; 1: none of it is left). None without a claimed gain."""
    return 1 - replayed_pct / claimed_pct if claimed_pct < 0 else None


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
