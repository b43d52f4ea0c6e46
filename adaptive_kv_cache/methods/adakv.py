"""AdaKV (Feng et al., 2024) as a wrapper around any scoring method: `{"method": "adakv", "scorer": NAME,
"alpha": a, ...NAME's options}` is NAME's config with `budgets: adakv` (a layer-wide top-k with a floor of
alpha x budget per head; `adaptive_kv_cache/budgets.py`). Unlike kvpress, which masks per-head budgets with fake
keys, the packed store frees what each head drops."""

from adaptive_kv_cache.methods.base import BudgetWrapper


class AdaKV(BudgetWrapper):
    """Not a method of its own: `config_from_dict` returns the scorer's config with adakv budgets."""

    allocation = "adakv"
