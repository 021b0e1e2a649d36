"""Confidence intervals (Wilson for accuracies, bootstrap for perplexity and token match) and
the greedy token match of two runs' outputs."""
from __future__ import annotations

import math
import random


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_ratio(parts: list[tuple[float, float]], reps: int = 1000, seed: int = 0,
                    alpha: float = 0.05, f=lambda r: r) -> tuple[float, float, float]:
    """f(sum x / sum n) over parts (x, n) and its percentile CI, resampling the parts."""
    rng = random.Random(seed)
    total = sum(s for s, _ in parts) / sum(n for _, n in parts)
    stats = []
    for _ in range(reps):
        pick = [parts[rng.randrange(len(parts))] for _ in parts]
        stats.append(f(sum(s for s, _ in pick) / sum(n for _, n in pick)))
    stats.sort()
    lo = stats[int(alpha / 2 * reps)]
    hi = stats[min(reps - 1, int((1 - alpha / 2) * reps))]
    return f(total), lo, hi


def bootstrap_ppl(block_nlls: list[list[float]], reps: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> tuple[float, float, float]:
    """PPL and its percentile CI, resampling blocks of consecutive tokens (tokens in a block are
    correlated, blocks much less so)."""
    return bootstrap_ratio([(sum(b), len(b)) for b in block_nlls if b], reps, seed, alpha,
                           math.exp)


def bootstrap_ppl_delta(base: list[list[float]], other: list[list[float]], reps: int = 1000,
                        seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """PPL(other) - PPL(base) over the same token blocks, with a paired percentile CI (the
    spread between texts cancels, so small differences between methods are resolvable)."""
    rng = random.Random(seed)
    a = [(sum(b), len(b)) for b in base]
    o = [(sum(b), len(b)) for b in other]
    assert [n for _, n in a] == [n for _, n in o], "paired blocks must match"

    def ppl(x, idx):
        return math.exp(sum(x[i][0] for i in idx) / sum(x[i][1] for i in idx))

    every = range(len(a))
    delta = ppl(o, every) - ppl(a, every)
    stats = []
    for _ in range(reps):
        idx = [rng.randrange(len(a)) for _ in a]
        stats.append(ppl(o, idx) - ppl(a, idx))
    stats.sort()
    return delta, stats[int(alpha / 2 * reps)], stats[min(reps - 1, int((1 - alpha / 2) * reps))]


def token_match(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far greedy outputs `b` follow the reference outputs `a`, prompt by prompt."""
    same_seq = sum(x == y for x, y in zip(a, b))
    same_tok = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                  for x, y in zip(a, b)]
    return {"identical_sequences": f"{same_seq}/{len(a)}",
            "token_match_rate": same_tok / max(1, sum(len(x) for x in a)),
            "first_divergence": first_diff}
