"""Per-example scores to task metrics and standard errors, computed the way lm-eval 0.4 does.

acc/acc_norm stderr is the sample standard deviation (n-1) over sqrt(n). lambada perplexity has
no closed form, so the harness bootstraps it: chunk i of 1000 resamples draws from
random.Random(i) with random.choices. numpy's legacy RandomState seeded with the list [i] runs the
same Mersenne Twister stream, so the identical resamples are drawn here, vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HARNESS_BOOTSTRAP_ITERS = 100_000
BOOTSTRAP_CHUNK = 1000


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_stddev(values: Sequence[float]) -> float:
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean; NaN for one value, where the harness reports N/A."""
    if len(values) < 2:
        return float("nan")
    return sample_stddev(values) / math.sqrt(len(values))


def perplexity(loglikelihoods: Sequence[float]) -> float:
    return math.exp(-mean(loglikelihoods))


def perplexity_stderr(loglikelihoods: Sequence[float], iters: int = HARNESS_BOOTSTRAP_ITERS) -> float:
    """Bootstrap stderr of perplexity, resample for resample as the harness draws them."""
    values = np.asarray(loglikelihoods, dtype=np.float64)
    n = len(values)
    replicates = []
    for chunk in range(iters // BOOTSTRAP_CHUNK):
        uniforms = np.random.RandomState([chunk]).random_sample((BOOTSTRAP_CHUNK, n))
        resampled = values[np.floor(uniforms * n).astype(np.int64)]
        replicates.append(np.exp(-resampled.mean(axis=1)))
    if not replicates:
        return float("nan")
    return sample_stddev(np.concatenate(replicates).tolist())


def choice_predictions(loglikelihoods: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
    """(argmax of loglikelihood, argmax of loglikelihood per character of the choice text).

    lm-eval's acc_norm divides by len(choice) in characters (its byte-normalised variant is the
    separate acc_bytes metric); first index wins ties, as with np.argmax.
    """
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.asarray([float(len(text)) for text in choice_texts])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))
