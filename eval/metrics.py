"""Benchmark metrics from graded samples: avg@k, unbiased pass@k, maj@k, standard errors, lengths.

Notation: a benchmark has N problems; problem i has n_i graded samples of which c_i are correct.

Choices:
1) avg@n is the mean over problems of c_i / n_i ("pass@1 estimated with n samples", DeepSeek-R1 convention).
2) pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021), averaged over problems, computed
   in the numerically stable product form; it needs k <= n.
3) maj@k votes over the extracted answers of the *first k samples* (by sample index). Samples without an extracted
   answer do not vote; a problem where no sample has an answer counts as wrong. Ties go to the answer seen first
   (lowest sample index). The winning answer is right when the first sample that gave it was graded correct.
4) Two standard errors of avg@n: over problems, sd_i(p_i) / sqrt(N), the noise of drawing these N problems; and over
   samples, sqrt(sum_i p_i (1 - p_i) / (n_i - 1)) / N with p_i = c_i / n_i, the seed noise with the problems fixed
   (the unbiased plug-in estimate of sum_i Var(p_i) / N^2). Both are NaN where undefined (N = 1, or some n_i = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    Args:
        n: samples drawn for the problem, n >= 1.
        c: correct samples among them, 0 <= c <= n.
        k: samples in the hypothetical draw, 1 <= k <= n.
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: list[str | None], correct: list[bool]) -> bool:
    """True when the most frequent extracted answer is a correct one (rules in the module docstring)."""
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote got {len(answers)} answers but {len(correct)} grades")
    counts: dict[str, int] = {}
    first_correct: dict[str, bool] = {}
    for answer, ok in zip(answers, correct):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first_correct.setdefault(answer, ok)
    if not counts:
        return False
    # dicts keep insertion order and max() returns the first maximum, so ties go to the answer seen first
    winner = max(counts, key=counts.__getitem__)
    return first_correct[winner]


def ks_for(n: int) -> list[int]:
    """The k values reported for n samples: 1, 2, 4, ... up to n, plus n itself."""
    if n < 1:
        raise ValueError(f"need at least one sample per problem, got n={n}")
    ks = [2**e for e in range(n.bit_length()) if 2**e <= n]
    return ks if ks[-1] == n else ks + [n]


@dataclass
class ProblemSamples:
    """The graded samples of one problem, ordered by sample index."""

    problem_id: str
    gold: str
    correct: list[bool]
    answers: list[str | None]  # the grader's normalised extracted answer per sample (None: nothing extracted)
    num_tokens: list[int]
    truncated: list[bool]  # generation stopped at max_tokens

    def __post_init__(self) -> None:
        sizes = {len(self.correct), len(self.answers), len(self.num_tokens), len(self.truncated)}
        if len(sizes) != 1 or not self.correct:
            raise ValueError(f"problem {self.problem_id!r}: need the same non-zero number of grades, answers, "
                             f"lengths and truncation flags, got sizes {sorted(sizes)}")

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass
class BenchmarkMetrics:
    """Metrics of one benchmark; `pass_at`/`maj_at` map k to the mean over problems."""

    num_problems: int
    samples: int  # n, the samples per problem every metric uses
    avg: float  # avg@n
    se_problems: float
    se_samples: float
    pass_at: dict[int, float] = field(default_factory=dict)
    maj_at: dict[int, float] = field(default_factory=dict)
    mean_tokens: float = 0.0
    truncation_rate: float = 0.0

    def flat(self, prefix: str = "") -> dict[str, float]:
        """One flat name -> value dict (for logs and tables): avg@n, pass@k, maj@k, se, lengths."""
        row = {f"{prefix}avg@{self.samples}": self.avg, f"{prefix}se_problems": self.se_problems,
               f"{prefix}se_samples": self.se_samples}
        row |= {f"{prefix}pass@{k}": v for k, v in self.pass_at.items()}
        row |= {f"{prefix}maj@{k}": v for k, v in self.maj_at.items()}
        row |= {f"{prefix}mean_tokens": self.mean_tokens, f"{prefix}truncation_rate": self.truncation_rate}
        return row


def standard_errors(accuracies: list[float], samples: list[int]) -> tuple[float, float]:
    """(SE over problems, SE over samples) of the mean accuracy; see the module docstring."""
    num = len(accuracies)
    if num < 2:
        se_problems = math.nan
    else:
        mean = sum(accuracies) / num
        se_problems = math.sqrt(sum((p - mean) ** 2 for p in accuracies) / (num - 1) / num)
    if num == 0 or min(samples) < 2:
        return se_problems, math.nan
    var_sum = sum(p * (1 - p) / (n - 1) for p, n in zip(accuracies, samples))
    return se_problems, math.sqrt(var_sum) / num


def compute_metrics(problems: list[ProblemSamples]) -> BenchmarkMetrics:
    """All metrics of a benchmark; every problem must have the same number of samples n."""
    if not problems:
        raise ValueError("compute_metrics needs at least one problem")
    sizes = {len(p.correct) for p in problems}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    accuracies = [p.accuracy for p in problems]
    se_problems, se_samples = standard_errors(accuracies, [n] * len(problems))
    ks = ks_for(n)
    pass_at = {k: _mean([pass_at_k(n, sum(p.correct), k) for p in problems]) for k in ks}
    maj_at = {k: _mean([float(majority_vote(p.answers[:k], p.correct[:k])) for p in problems]) for k in ks}
    tokens = [t for p in problems for t in p.num_tokens]
    truncated = [t for p in problems for t in p.truncated]
    return BenchmarkMetrics(
        num_problems=len(problems), samples=n, avg=_mean(accuracies), se_problems=se_problems,
        se_samples=se_samples, pass_at=pass_at, maj_at=maj_at, mean_tokens=_mean(tokens),
        truncation_rate=_mean([float(t) for t in truncated]),
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
