"""pass@k with the unbiased estimator of the Codex paper (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code"): from n samples of which c pass, the probability that at
least one of k samples drawn without replacement passes, 1 - C(n - c, k) / C(n, k), computed
as a product so that it stays exact for large n."""

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """The mean over problems of pass@k, each given as (samples, passed)."""
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
