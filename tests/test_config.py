import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow plain `pytest` without an installed package
    sys.path.insert(0, str(REPO))

from adaptive_kv_cache.config import (  # noqa: E402
    BASIC_POLICIES,
    DEFAULT_CONFIG_PATH,
    FastGenConfig,
    KVConfigError,
    load_config,
    resolve_kv_config,
)

DEFAULT_CANDS = (
    ("special",),
    ("special", "punct"),
    ("special", "punct", "frequent"),
    ("special", "punct", "frequent", "local"),
    ("full",),
)


def test_defaults():
    c = FastGenConfig()
    assert c.T == 0.95 and c.r_l == 0.3 and c.r_f == 0.3
    assert c.candidates == DEFAULT_CANDS
    assert c.special_strings == ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
    assert c.gqa_aggregation == "mean"
    assert c.evict_every == json.loads(DEFAULT_CONFIG_PATH.read_text())["evict_every"] >= 1
    assert c.candidate_labels[1] == "special+punct"
    assert set(BASIC_POLICIES) == {"special", "punct", "local", "frequent", "full"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.T = 0.5  # type: ignore[misc]


def test_shipped_json_equals_dataclass_defaults():
    assert DEFAULT_CONFIG_PATH.is_file()
    raw = json.loads(DEFAULT_CONFIG_PATH.read_text())
    assert raw == FastGenConfig().to_dict()
    assert set(raw) == {f.name for f in dataclasses.fields(FastGenConfig)}
    assert load_config(DEFAULT_CONFIG_PATH) == FastGenConfig()


def test_round_trip_and_json_lists_become_tuples():
    d = FastGenConfig().to_dict()
    json.dumps(d)  # serialisable for logs
    c = FastGenConfig.from_dict(d)
    assert c == FastGenConfig()
    assert isinstance(c.candidates, tuple) and all(isinstance(x, tuple) for x in c.candidates)
    assert isinstance(c.special_strings, tuple)


def test_string_candidates_and_int_numbers():
    c = FastGenConfig(candidates=["special", "special+punct", " special + local ", ["full"]], T=1)
    assert c.candidates == (("special",), ("special", "punct"), ("special", "local"), ("full",))
    assert c.T == 1.0 and isinstance(c.T, float)
    assert FastGenConfig(T=0).T == 0.0
    assert FastGenConfig(candidates=[["full"]]).candidates == (("full",),)


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        ({"T": -0.1}, ["T=-0.1", "[0, 1]"]),
        ({"T": 1.5}, ["T=1.5", "[0, 1]"]),
        ({"T": math.nan}, ["T=nan", "[0, 1]"]),
        ({"r_l": 0}, ["r_l=0", "(0, 1]"]),
        ({"r_l": 1.2}, ["r_l=1.2", "(0, 1]"]),
        ({"r_f": 0}, ["r_f=0", "(0, 1]"]),
        ({"r_f": -1}, ["r_f=-1", "(0, 1]"]),
        ({"candidates": [["special"], ["foo"], ["full"]]}, ["candidates[1]", "'foo'", "special, punct, local, frequent, full"]),
        ({"candidates": ["special+foo", "full"]}, ["candidates[0]", "'foo'", "allowed policies"]),
        ({"candidates": []}, ["candidates", "empty", "full"]),
        ({"candidates": [[], ["full"]]}, ["candidates[0]", "empty", "special, punct, local, frequent, full"]),
        ({"candidates": ["", "full"]}, ["candidates[0]", "empty"]),
        ({"candidates": [["special"], ["special", "punct"]]}, ["candidates[-1]", "['full']", "falls back", "reaches T"]),
        ({"candidates": [["special", "special"], ["full"]]}, ["candidates[0]", "repeats", "'special'"]),
        ({"candidates": [["special", "full"], ["full"]]}, ["candidates[0]", "'full'"]),
        ({"candidates": [["full"], ["special"], ["full"]]}, ["candidates[0]", "never be chosen"]),
        ({"candidates": [["special"], ["special"], ["full"]]}, ["candidates[1]", "duplicates"]),
        ({"candidates": "special"}, ["candidates", "list"]),
        ({"gqa_aggregation": "median"}, ["gqa_aggregation='median'", "'mean', 'max'"]),
        ({"evict_every": 0}, ["evict_every=0", "[1, inf)"]),
        ({"obs_window": -1}, ["obs_window=-1", "[0, inf)"]),
        ({"pool": 4}, ["pool=4", "odd"]),
        ({"pool": 0}, ["pool=0", "[1, inf)"]),
        ({"evict_every": 1.5}, ["evict_every", "integer"]),
        ({"T": True}, ["T", "number", "bool"]),
        ({"T": "0.9"}, ["T", "number", "str"]),
        ({"evict_every": True}, ["evict_every", "integer", "bool"]),
        ({"special_strings": ["[INST]", ""]}, ["special_strings[1]", "non-empty"]),
        ({"special_strings": "[INST]"}, ["special_strings", "list"]),
    ],
)
def test_bad_settings_fail_with_key_and_range(overrides, must_contain):
    for build in (
        lambda: FastGenConfig(**overrides),
        lambda: FastGenConfig.from_dict(overrides),
        lambda: FastGenConfig().replace(**overrides),
        lambda: resolve_kv_config(overrides),
    ):
        with pytest.raises(ValueError) as ei:
            build()
        msg = str(ei.value)
        assert msg.startswith("kv config:"), msg
        for s in must_contain:
            assert s in msg, (s, msg)
        assert isinstance(ei.value, KVConfigError)


def test_exact_message_example():
    with pytest.raises(ValueError, match=r"^kv config: T=1\.5 is outside the allowed range \[0, 1\]$"):
        FastGenConfig(T=1.5)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ValueError) as ei:
        FastGenConfig.from_dict({"T": 0.9, "tau": 0.5})
    msg = str(ei.value)
    assert "'tau'" in msg
    for k in ("T", "r_l", "r_f", "candidates", "special_strings", "gqa_aggregation", "evict_every"):
        assert k in msg
    with pytest.raises(ValueError, match="'tau'"):
        FastGenConfig().replace(tau=0.5)
    with pytest.raises(ValueError, match="'tau'"):
        resolve_kv_config({"tau": 0.5})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        FastGenConfig.from_dict([("T", 0.5)])  # type: ignore[arg-type]


def test_malformed_json_names_path_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "T": 0.9,\n  "r_l": ,\n}\n')
    with pytest.raises(ValueError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "line 3" in msg and "column" in msg


def test_bad_value_in_file_names_path(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"T": 2}))
    with pytest.raises(ValueError) as ei:
        load_config(p)
    assert "T=2" in str(ei.value) and str(p) in str(ei.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as ei:
        load_config(p)
    assert str(p) in str(ei.value)
    with pytest.raises(FileNotFoundError):
        resolve_kv_config(str(p))


def test_partial_file_takes_defaults(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"T": 0.9, "candidates": ["special", "special+punct", "full"]}))
    c = load_config(p)
    assert c.T == 0.9 and c.r_l == 0.3
    assert c.candidates == (("special",), ("special", "punct"), ("full",))


def test_resolve_kv_config(tmp_path):
    assert resolve_kv_config(None) is None
    c = FastGenConfig(T=0.5)
    assert resolve_kv_config(c) is c
    d = resolve_kv_config({"T": 0.9, "r_f": 0.8})
    assert d == FastGenConfig(T=0.9, r_f=0.8)
    assert resolve_kv_config({}) == FastGenConfig()
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"r_l": 0.5}))
    assert resolve_kv_config(p) == FastGenConfig(r_l=0.5)
    assert resolve_kv_config(str(p)) == FastGenConfig(r_l=0.5)
    assert resolve_kv_config(DEFAULT_CONFIG_PATH) == FastGenConfig()
    for bad in (0.95, 3, ["T", 0.9], object(), True):
        with pytest.raises(TypeError, match="kv_config"):
            resolve_kv_config(bad)


def test_overrides_revalidate():
    c = FastGenConfig()
    c2 = c.replace(T=0.9, candidates=["special", "full"])
    assert c2.T == 0.9 and c2.candidates == (("special",), ("full",))
    assert c.T == 0.95  # original untouched
    assert c.with_overrides({"r_l": 0.8}) == FastGenConfig(r_l=0.8)
    assert c.with_overrides(None) is c
    with pytest.raises(ValueError, match=r"T=1\.5"):
        c.replace(T=1.5)
    with pytest.raises(ValueError, match="r_l=0"):
        c.with_overrides({"r_l": 0})
    with pytest.raises(ValueError, match="evict_every=0"):
        c2.replace(evict_every=0)
