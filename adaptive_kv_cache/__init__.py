"""FastGen adaptive KV-cache compression (Ge et al., ICLR 2024) for the `llama` fork.

Kept light on purpose: `config` must import before any model work, so a bad setting fails fast.
"""
