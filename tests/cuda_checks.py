"""A check every compressed cache shares on CUDA (its tests skip without a GPU)."""

import torch


def assert_steady_decode_never_synchronises(g, tokens):
    """Steady-state decode (no prompt ending, no eviction due) issues no host-device synchronisation.

    Args:
        g: a compressed `Llama` on CUDA with evict_every > 2.
        tokens: 80 token ids; the first 60 are the prompt.
    """
    tokens = torch.tensor([tokens], device="cuda")
    cache = g.new_cache([tokens[0, :60].tolist()], 80)
    g.model.forward(tokens[:, :60], 0, cache)
    for pos in range(60, 62):  # up to just after the prompt's end compacted
        g.model.forward(tokens[:, pos : pos + 1], pos, cache)
    # the passes before the next eviction (an eviction reads the new lengths back to the host, by design)
    stop = 62 + cache.evict_every - 1 - cache.steps_since_compaction
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pos in range(62, stop):
            g.model.forward(tokens[:, pos : pos + 1], pos, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stop > 63 and cache.steps_since_compaction == cache.evict_every - 1  # several passes, none evicted
