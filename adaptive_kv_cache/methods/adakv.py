"""AdaKV (Feng et al., 2024) as a wrapper around any scoring method: `{"method": "adakv", "scorer": NAME,
"alpha": a, ...NAME's options}` is NAME's config with `budgets: adakv` (a layer-wide top-k with a floor of
alpha x budget per head; `adaptive_kv_cache/budgets.py`). Unlike kvpress, which masks per-head budgets with fake
keys, the packed store frees what each head drops."""

from typing import Any, Mapping

from adaptive_kv_cache.config import _fail


class AdaKV:
    """Not a method of its own: `config_from_dict` returns the scorer's config with adakv budgets."""

    @staticmethod
    def config_from_dict(d: Mapping[str, Any]):
        from adaptive_kv_cache.registry import METHODS, load_method_config

        d = dict(d)
        d.pop("method", None)
        scorer = d.pop("scorer", "snapkv")
        banned = ("adakv", "headkv", "fastgen", "razor")
        if scorer in banned or scorer not in METHODS:
            allowed = [m for m in METHODS if m not in banned]
            _fail(f"scorer={scorer!r} cannot be wrapped by adakv; allowed scorers: {', '.join(allowed)}")
        if d.get("budgets", "adakv") != "adakv":
            _fail(f"budgets={d['budgets']!r} contradicts method adakv; leave budgets out")
        return load_method_config({**d, "method": scorer, "budgets": "adakv"})
