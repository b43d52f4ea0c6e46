"""FastGen's profiler: attention statistics + candidates + T -> one policy per (sequence, KV head).

recovery(C) = (1/M) * sum_t sum_{j<=t} A[t, j] * keep_C(t, j), with M = sum_t sum_j A[t, j] the total mass:
M = L for fastgen.md's mean over a query group (rows sum to 1); with the max over a group rows sum to more
than 1, and dividing by M keeps recovery a share in [0, 1]. Column policies (special, punct, frequent,
full) keep a fixed set X of keys for every row, and local keeps the band t - j < W, so

    recovery(C) = (1/M) * (sum_{j in X} colsum_j + [local in C] * sum_{j not in X} band_j)

where colsum_j = sum_t A[t, j] and band_j = sum_{t: t - j < W} A[t, j]. Both are vectors of length L, which the
cache accumulates in row chunks while the prompt is processed, so no L x L map is ever kept.

With an observation window (`obs_window`, band None) the rows are the prompt's last queries only and every
policy, local included, is the set of keys it keeps when the prompt ends: recovery(C) = (1/M) sum_{j in X_C}
colsum_j.
"""

from typing import Optional, Sequence, Tuple

import torch

from adaptive_kv_cache.policies import Hybrid, TokenStats


def recoveries(stats: TokenStats, band: Optional[torch.Tensor], candidates: Sequence[Hybrid]) -> torch.Tensor:
    """Attention recovered by each candidate.

    Args:
        stats: prompt statistics with n = prompt_len = L; `score` holds the column sums of A.
        band: (..., S) attention each key received from queries within the local window, or None: the local
            policy counts as the column set it keeps at n = L (observation-window profiling).
        candidates: hybrids, cheapest first.

    Returns:
        torch.Tensor: (..., len(candidates)) float64 recovery in [0, 1]; exactly 1 for full.
    """
    score = stats.score.double() * stats.valid
    band = None if band is None else band.double() * stats.valid
    mass = score.sum(-1)
    out = []
    for cand in candidates:
        if any(m.name == "full" for m in cand.members):
            out.append(torch.ones_like(mass))
            continue
        cols = torch.zeros_like(stats.valid)
        for m in cand.members:
            if band is None or not m.windowed:
                cols = cols | m.keep(stats)
        rec = (score * cols).sum(-1)
        if band is not None and any(m.windowed for m in cand.members):
            rec = rec + (band * ~cols).sum(-1)
        out.append((rec / mass.clamp(min=1e-30)).clamp(0.0, 1.0))
    return torch.stack(out, dim=-1)


def profile(
    stats: TokenStats, band: Optional[torch.Tensor], candidates: Sequence[Hybrid], T: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chooses, for every segment, the first (cheapest) candidate whose recovery reaches T.

    T = 1 asks for no loss at all, now and during decoding; only a candidate containing full guarantees that
    (another may recover everything of a short prompt and still evict later), so only those qualify.

    Args:
        stats: see `recoveries`; leading dims (...) index the segments.
        band: (..., S), or None (see `recoveries`).
        candidates: hybrids, cheapest first; the last must contain full.
        T: recovery threshold in [0, 1].

    Returns:
        choice: (...) long, index into candidates.
        recovery: (..., len(candidates)) float64.
    """
    recovery = recoveries(stats, band, candidates)
    if T >= 1.0:
        lossless = torch.tensor([any(m.name == "full" for m in c.members) for c in candidates],
                                device=recovery.device)
        eligible = lossless.expand_as(recovery)
    else:
        eligible = recovery >= T
    choice = eligible.to(torch.uint8).argmax(dim=-1)  # first eligible candidate
    return choice, recovery
