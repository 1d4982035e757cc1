"""Sample-based benchmark metrics (pure Python, no model).

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k),
  the chance that at least one of k samples drawn without replacement from n (c correct) is
  correct, computed as a product (no huge binomials).
- `majority_index(keys)`: the sample whose answer is most frequent (maj@k).
- `best_index(scores)`: the highest-scored sample (best-of-N with a reward model or PRM).
- `powers_of_two(k)`: the k values reported for a run with k samples per problem.
- `processbench_mean_f1(tasks)`: ProcessBench's overall score, the mean of the splits' F1.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, List, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i); 1.0 when fewer than k samples
    are wrong (every k-subset then holds a correct one)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_exact(n: int, c: int, k: int) -> float:
    """The same estimator with exact integer binomials (reference for tests; slow for large n)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(keys: Sequence[Optional[Hashable]]) -> Optional[int]:
    """Index of the first sample of the most frequent answer key (ties: the key seen first);
    None keys (no answer extracted) never win; None if every key is None."""
    counts, first = {}, {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score (ties: the first); NaN scores never win unless all are NaN."""
    if not scores:
        raise ValueError("best-of-N needs at least one score")
    order = [(-math.inf if math.isnan(s) else s, -i) for i, s in enumerate(scores)]
    return -max(order)[1]


def powers_of_two(k: int) -> List[int]:
    """1, 2, 4, ... up to k, and k itself."""
    out, v = [], 1
    while v < k:
        out.append(v)
        v *= 2
    return out + [k]


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def processbench_mean_f1(tasks: Dict[str, dict]) -> Optional[float]:
    """ProcessBench's average F1: the unweighted mean of each split's F1 (the harmonic mean of
    its error and correct accuracies), as the benchmark reports it beside the per-split F1;
    not the F1 of pooled accuracies. `tasks` maps a task name to its report (`kind` and
    `metrics`); the ProcessBench-form tasks with an F1 are the splits. None unless there are at
    least two (with one split its own F1 is the score)."""
    f1s = [t["metrics"]["processbench_f1"] for t in tasks.values()
           if t.get("kind") == "processbench" and t.get("metrics", {}).get("processbench_f1") is not None]
    return sum(f1s) / len(f1s) if len(f1s) >= 2 else None
