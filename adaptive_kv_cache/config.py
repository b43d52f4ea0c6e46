"""FastGen adaptive KV cache configuration.

One frozen dataclass, :class:`FastGenConfig`, validated in ``__post_init__`` so that a bad
setting fails before any model work starts. The shipped defaults live in
``configs/config.json`` (:data:`DEFAULT_CONFIG_PATH`) and must equal the dataclass defaults.

Every validation error is a :class:`KVConfigError` (a ``ValueError``) whose message names the
key, the bad value and what is allowed, e.g.
``kv config: T=1.5 is outside the allowed range [0, 1]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASIC_POLICIES",
    "DEFAULT_CANDIDATES",
    "DEFAULT_CONFIG_PATH",
    "FastGenConfig",
    "KVConfigError",
    "load_config",
    "resolve_kv_config",
]

DEFAULT_CONFIG_PATH: Path = Path(__file__).resolve().parent / "configs" / "config.json"

#: The five basic policies of fastgen.md, in the order they are documented.
BASIC_POLICIES: tuple[str, ...] = ("special", "punct", "local", "frequent", "full")

DEFAULT_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("special",),
    ("special", "punct"),
    ("special", "punct", "frequent"),
    ("special", "punct", "frequent", "local"),
    ("full",),
)

#: Codecs of the kept tokens (adaptive_kv_cache/codecs.py).
KV_QUANT: tuple[str, ...] = ("none", "int8", "int4")

DEFAULT_SPECIAL_STRINGS: tuple[str, ...] = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

_PREFIX = "kv config"


class KVConfigError(ValueError):
    """A setting of the KV cache configuration is invalid."""


def _fail(msg: str) -> None:
    raise KVConfigError(f"{_PREFIX}: {msg}")


def _is_number(v: Any) -> bool:
    # bool is an int subclass; True/False is never a meaningful ratio or threshold.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_float(name: str, v: Any, lo: float, hi: float, lo_open: bool) -> float:
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not _is_number(v):
        _fail(f"{name} must be a number (int or float) in {rng}, got {type(v).__name__} {v!r}")
    v = float(v)
    ok = (lo < v if lo_open else lo <= v) and v <= hi  # NaN fails both comparisons
    if not ok or math.isnan(v):
        _fail(f"{name}={v:g} is outside the allowed range {rng}")
    return v


def _check_int(name: str, v: Any, lo: int) -> int:
    if not _is_int(v):
        _fail(f"{name} must be an integer in [{lo}, inf), got {type(v).__name__} {v!r}")
    if v < lo:
        _fail(f"{name}={v} is outside the allowed range [{lo}, inf)")
    return int(v)


def _check_kv_quant(value: Any) -> str:
    """Checks a `kv_quant` setting (an option of every method, FastGen's and the scoring methods' alike).

    Args:
        value: the setting as given.

    Returns:
        the codec name, one of KV_QUANT.

    Raises:
        KVConfigError: one line naming the allowed values.
    """
    if value not in KV_QUANT:
        _fail(f"kv_quant={value!r} is not allowed; allowed values: {', '.join(map(repr, KV_QUANT))}")
    return value


def _normalise_candidate(i: int, c: Any) -> tuple[str, ...]:
    if isinstance(c, str):
        names = tuple(p.strip() for p in c.split("+")) if c.strip() else ()
    elif isinstance(c, (list, tuple)):
        names = tuple(c)
    else:
        _fail(
            f"candidates[{i}]={c!r} must be a list of policy names or a string such as "
            f"'special+punct', got {type(c).__name__}"
        )
    allowed = ", ".join(BASIC_POLICIES)
    if not names:
        _fail(f"candidates[{i}]={c!r} is empty; each candidate must name at least one of: {allowed}")
    for n in names:
        if not isinstance(n, str):
            _fail(f"candidates[{i}]={c!r} contains {n!r} ({type(n).__name__}); policy names are strings")
        if n not in BASIC_POLICIES:
            _fail(f"candidates[{i}]={c!r} has unknown policy {n!r}; allowed policies: {allowed}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            _fail(f"candidates[{i}]={c!r} repeats policy {n!r}; each policy may appear once per candidate")
        seen.add(n)
    if "full" in names and len(names) > 1:
        _fail(f"candidates[{i}]={c!r} combines 'full' with other policies; 'full' already keeps everything, write ['full']")
    return names


@dataclass(frozen=True)
class FastGenConfig:
    """Hyper-parameters of FastGen (see shared/docs/fastgen.md).

    T            recovery threshold, [0, 1]
    r_l          locality ratio, (0, 1]: the local window is ceil(r_l * L) tokens
    r_f          frequency ratio, (0, 1]: the frequent set is ceil(r_f * n) tokens
    candidates   hybrid policies, cheapest first; each a union of basic policy names;
                 the last must be ('full',)
    special_strings  strings whose token sub-sequences count as special tokens
    gqa_aggregation  how query heads sharing a KV head are combined while profiling: mean|max
    evict_every  k: decode steps between evictions; a head may hold up to k - 1 tokens beyond its policy
                 between them (k = 1: evict after every token, as the paper describes)
    kv_quant     how kept tokens are stored: none | int8 | int4 (adaptive_kv_cache/codecs.py)
    obs_window   W >= 0: 0 is the paper (every prompt query counts); W > 0 profiles and ranks frequency on the
                 attention of the prompt's last W queries (SnapKV's observation window, where a question sits)
                 plus every generated query, and a hybrid's recovery is that attention's share on the keys
                 it keeps when the prompt ends (an option of this project, not of the paper)
    pool         odd >= 1: 1 is the paper; > 1 ranks the frequency policy's tokens by the best score among their
                 `pool` nearest held tokens in position order (max pooling, as SnapKV's), so a multi-token value
                 next to an attended token is kept whole (an option of this project)
    """

    T: float = 0.95
    r_l: float = 0.3
    r_f: float = 0.3
    candidates: tuple[tuple[str, ...], ...] = DEFAULT_CANDIDATES
    special_strings: tuple[str, ...] = DEFAULT_SPECIAL_STRINGS
    gqa_aggregation: str = "mean"
    evict_every: int = 16
    kv_quant: str = "none"
    obs_window: int = 0
    pool: int = 1

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)

        set_("T", _check_float("T", self.T, 0.0, 1.0, lo_open=False))
        set_("r_l", _check_float("r_l", self.r_l, 0.0, 1.0, lo_open=True))
        set_("r_f", _check_float("r_f", self.r_f, 0.0, 1.0, lo_open=True))

        # candidates
        cands = self.candidates
        if isinstance(cands, (str, bytes)) or not isinstance(cands, (list, tuple)):
            _fail(
                f"candidates must be a list of candidates (each a list of policy names), "
                f"got {type(cands).__name__} {cands!r}"
            )
        if len(cands) == 0:
            _fail(
                "candidates=[] is empty; it must list at least one candidate and end with ['full'] "
                "(the profiler falls back to the last candidate when no cheaper one reaches T)"
            )
        norm = tuple(_normalise_candidate(i, c) for i, c in enumerate(cands))
        if norm[-1] != ("full",):
            _fail(
                f"candidates[-1]={list(norm[-1])} must be ['full']: the profiler falls back to the "
                f"last candidate when no cheaper candidate reaches T, so it must keep every token "
                f"(recovery 1)"
            )
        for i, c in enumerate(norm[:-1]):
            if c == ("full",):
                _fail(
                    f"candidates[{i}]=['full'] appears before the last candidate; full always reaches "
                    f"T, so the candidates after it could never be chosen"
                )
        seen_sets: dict[frozenset[str], int] = {}
        for i, c in enumerate(norm):
            key = frozenset(c)
            if key in seen_sets:
                _fail(f"candidates[{i}]={list(c)} duplicates candidates[{seen_sets[key]}]")
            seen_sets[key] = i
        set_("candidates", norm)

        # special strings
        ss = self.special_strings
        if isinstance(ss, (str, bytes)) or not isinstance(ss, (list, tuple)):
            _fail(f"special_strings must be a list of strings, got {type(ss).__name__} {ss!r}")
        for i, s in enumerate(ss):
            if not isinstance(s, str) or not s:
                _fail(f"special_strings[{i}]={s!r} must be a non-empty string")
        if len(set(ss)) != len(ss):
            dup = next(s for s in ss if list(ss).count(s) > 1)
            _fail(f"special_strings repeats {dup!r}")
        set_("special_strings", tuple(ss))

        if not isinstance(self.gqa_aggregation, str) or self.gqa_aggregation not in ("mean", "max"):
            _fail(f"gqa_aggregation={self.gqa_aggregation!r} is not allowed; allowed values: 'mean', 'max'")

        set_("evict_every", _check_int("evict_every", self.evict_every, 1))
        set_("obs_window", _check_int("obs_window", self.obs_window, 0))
        set_("pool", _check_int("pool", self.pool, 1))
        if self.pool % 2 == 0:
            _fail(f"pool={self.pool} must be odd (the pooled scores keep one value per token)")

        _check_kv_quant(self.kv_quant)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_keys(cls, keys) -> None:
        known = cls.field_names()
        unknown = [k for k in keys if k not in known]
        if unknown:
            _fail(
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
                f"known keys: {', '.join(known)}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FastGenConfig":
        """Build from a mapping (e.g. parsed JSON). Missing keys take the dataclass defaults."""
        if not isinstance(d, Mapping):
            _fail(f"expected a mapping (JSON object) of settings, got {type(d).__name__}")
        cls._check_keys(d.keys())
        return cls(**dict(d))

    def replace(self, **overrides: Any) -> "FastGenConfig":
        """A copy with ``overrides`` applied; the result is validated again."""
        self._check_keys(overrides.keys())
        return dataclasses.replace(self, **overrides)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "FastGenConfig":
        if overrides is None:
            return self
        if not isinstance(overrides, Mapping):
            _fail(f"overrides must be a mapping, got {type(overrides).__name__}")
        return self.replace(**dict(overrides))

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        return {
            "T": self.T,
            "r_l": self.r_l,
            "r_f": self.r_f,
            "candidates": [list(c) for c in self.candidates],
            "special_strings": list(self.special_strings),
            "gqa_aggregation": self.gqa_aggregation,
            "evict_every": self.evict_every,
            "kv_quant": self.kv_quant,
            "obs_window": self.obs_window,
            "pool": self.pool,
        }

    @property
    def candidate_labels(self) -> tuple[str, ...]:
        """Candidates written as 'special+punct' etc., for logs."""
        return tuple("+".join(c) for c in self.candidates)


def _read_json(p: Path) -> Any:
    if not p.is_file():
        raise FileNotFoundError(f"{_PREFIX}: file not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KVConfigError(
            f"{_PREFIX}: {p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e


def load_config(path: str | Path) -> FastGenConfig:
    """Read a FastGen JSON config file. Keys left out take the dataclass defaults; a "method" key must say
    fastgen."""
    p = Path(path)
    data = _read_json(p)
    if isinstance(data, Mapping) and "method" in data:
        if data["method"] != "fastgen":
            raise KVConfigError(f"{_PREFIX}: {p} configures method {data['method']!r}, not fastgen")
        data = {k: v for k, v in data.items() if k != "method"}
    try:
        return FastGenConfig.from_dict(data)
    except KVConfigError as e:
        raise KVConfigError(f"{e} (in {p})") from e


def resolve_kv_config(kv_config: Any):
    """Normalise the user-facing ``kv_config`` argument.

    None -> None (no compression); a config object (FastGenConfig, or a registered method's) -> itself; a
    mapping -> its method's shipped defaults (``configs/<method>.json``; FastGen's ``configs/config.json`` when
    the mapping names no method) with those overrides; str / Path -> a JSON file read the same way.
    """
    if kv_config is None:
        return None
    if isinstance(kv_config, FastGenConfig) or hasattr(kv_config, "method") and hasattr(kv_config, "to_dict"):
        return kv_config
    if isinstance(kv_config, Mapping):
        if "method" not in kv_config:
            return load_config(DEFAULT_CONFIG_PATH).with_overrides(kv_config)
        from adaptive_kv_cache.registry import load_method_config

        return load_method_config(kv_config)
    if isinstance(kv_config, (str, Path)):
        data = _read_json(Path(kv_config))
        if isinstance(data, Mapping) and "method" in data:
            from adaptive_kv_cache.registry import load_method_config

            try:
                return load_method_config(data)
            except KVConfigError as e:
                raise KVConfigError(f"{e} (in {kv_config})") from e
        return load_config(kv_config)
    raise TypeError(
        f"{_PREFIX}: kv_config must be None, a config object, a dict of settings or a path to a "
        f"JSON file, got {type(kv_config).__name__}"
    )
