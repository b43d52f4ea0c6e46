"""The compression methods by name, their default configs, and the cache a `Llama` builds from a config.

`METHODS` maps a name to the class implementing it ("module:Class", imported when used, so naming a method
costs nothing). Each has a JSON of defaults, `adaptive_kv_cache/configs/<name>.json`; a user config is those
defaults plus the keys it sets: `{"method": NAME, ...options, "evict_every": k}`. A config without "method" is
FastGen's (the format from before the registry).
"""

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

from adaptive_kv_cache.config import KVConfigError, _fail

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

METHODS = {
    "fastgen": "adaptive_kv_cache.fastgen:FastGen",
    "streaming_llm": "adaptive_kv_cache.methods.streaming:StreamingLLM",
    "h2o": "adaptive_kv_cache.methods.h2o:H2O",
    "tova": "adaptive_kv_cache.methods.tova:TOVA",
    "snapkv": "adaptive_kv_cache.methods.snapkv:SnapKV",
    "pyramidkv": "adaptive_kv_cache.methods.pyramid:PyramidKV",
    "adakv": "adaptive_kv_cache.methods.adakv:AdaKV",
    "headkv": "adaptive_kv_cache.methods.headkv:HeadKV",
    "razor": "adaptive_kv_cache.methods.razor:RazorAttention",
}


def check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in METHODS:
        _fail(f"method={name!r} is not a registered method; registered: {', '.join(METHODS)}")
    return name


def method_class(name: str):
    module, cls = METHODS[check_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def defaults(name: str) -> dict:
    """The shipped defaults of a method (its JSON)."""
    return json.loads((CONFIG_DIR / f"{check_name(name)}.json").read_text(encoding="utf-8"))


def load_method_config(d: Mapping[str, Any]):
    """A validated config from a mapping that names its method: the method's defaults plus these keys.

    FastGen gives a FastGenConfig (the mapping's "method" key aside), AdaKV its scorer's config with adakv
    budgets, the others their dataclass.
    """
    if not isinstance(d, Mapping):
        _fail(f"expected a mapping (JSON object) of settings, got {type(d).__name__}")
    name = check_name(d.get("method", "fastgen"))
    if name == "fastgen":
        from adaptive_kv_cache.config import DEFAULT_CONFIG_PATH, load_config

        return load_config(DEFAULT_CONFIG_PATH).with_overrides({k: v for k, v in d.items() if k != "method"})
    cls = method_class(name)
    if hasattr(cls, "config_from_dict"):  # a wrapper (adakv)
        return cls.config_from_dict({**defaults(name), **d})
    base = cls.Config.from_dict({**defaults(name), "method": name})
    return base.with_overrides({k: v for k, v in d.items() if k != "method"})


def resolve_with(data: Mapping[str, Any], overrides: Mapping[str, Any], source=None):
    """A config from a file's settings (`data`, may be empty) and flags on top; errors name the file."""
    name = check_name(data.get("method", "fastgen"))
    try:
        return load_method_config({**data, **overrides, "method": name})
    except KVConfigError as e:
        raise KVConfigError(f"{e} (in {source})" if source is not None and not overrides else str(e)) from e


def method_name(config) -> str:
    return getattr(config, "method", "fastgen") or "fastgen"


def config_dict(config) -> dict:
    """The config as JSON, with its method named (FastGen's own to_dict leaves the name out)."""
    return {"method": method_name(config), **{k: v for k, v in config.to_dict().items() if k != "method"}}


def describe(config) -> str:
    """One line for logs."""
    if method_name(config) == "fastgen":
        return (f"FastGen T={config.T:g} r_l={config.r_l:g} r_f={config.r_f:g} evict_every={config.evict_every} "
                f"kv_quant={config.kv_quant}")
    return config.describe()


class Prepared:
    """A config bound to a model: what its method needs once (FastGen's token classes, Razor's retrieval heads),
    and a new cache per generation."""

    def __init__(self, config, llama):
        self.config = config
        self.name = method_name(config)
        self.cls = method_class(self.name)
        self.context = self.cls.prepare(config, llama)

    def new_cache(self, n_layers: int, prompt_tokens, max_seq_len: int, observer=None):
        from adaptive_kv_cache.codecs import make_codec
        from adaptive_kv_cache.compressed import CompressedCache

        method = self.cls.create(self.config, self.context, observer)
        # the codec is chosen here, the one place a cache is built, so it composes with every method
        return CompressedCache(method, n_layers, prompt_tokens, max_seq_len, evict_every=self.config.evict_every,
                               codec=make_codec(self.config.kv_quant))


__all__ = ["METHODS", "KVConfigError", "Prepared", "check_name", "config_dict", "defaults", "describe",
           "load_method_config", "method_class"]
