"""The benchmark scripts run with --quick and write what they promise (benchmarks/quality.py, benchmarks/speed.py).

Both run in-process through their main(argv) into a temporary folder: stories260K for quality, the tiny random
model and stories260K for speed (about half a minute together on 2 cores).
"""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import STORIES_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (STORIES_DIR / "params.json").is_file(), reason="stories260K not available")

ROW_FIELDS = {
    "name", "kind", "T", "policy", "ratio", "config", "kv_bytes_mean", "kv_bytes_peak", "mem_ratio", "peak_ratio",
    "mem_ratio_exact", "metadata_bytes_mean", "mem_ratio_incl_metadata", "ppl", "ppl_ratio", "top1_agreement",
    "kl_mean", "next_token_acc",
    "recovery_mean", "policy_mix", "greedy_prefix_mean", "greedy_prefix_frac", "greedy_identical", "rouge_l",
    "retrieval_accuracy", "retrieval_token_accuracy", "retrieval_answer_logprob", "retrieval_mem_ratio",
}


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    from benchmarks import quality

    out = tmp_path_factory.mktemp("quality")
    result = quality.main(["--quick", "--out", str(out), "--no_progress"])
    return out, result


@pytest.fixture(scope="module")
def speed(tmp_path_factory):
    from benchmarks import speed

    out = tmp_path_factory.mktemp("speed")
    result = speed.main(["--quick", "--out", str(out), "--no_progress"])
    return out, result


def _rows(result):
    return {r["name"]: r for r in result["settings"]}


def test_quality_outputs(quality):
    out, result = quality
    for name in ("quality.json", "quality.csv", "quality.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind
    on_disk = json.loads((out / "quality.json").read_text())
    assert on_disk["complete"] and on_disk["settings"][0]["name"] == "uncompressed"
    for key in ("machine", "model", "prompt_len", "cont_len", "n_prompts", "gen_len", "retrieval", "replay_check",
                "timings_s"):
        assert key in on_disk, key
    for row in on_disk["settings"]:
        missing = ROW_FIELDS - set(row)
        assert not missing, (row["name"], missing)
    with open(out / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in on_disk["settings"]]
    assert {"mem_ratio", "ppl_ratio", "top1_agreement", "kl_mean", "policy_mix", "rouge_l"} <= set(rows[0])
    kinds = {r["kind"] for r in on_disk["settings"]}
    assert kinds == {"uncompressed", "fastgen", "fixed"}


def test_quality_uncompressed_is_the_reference(quality):
    _, result = quality
    ref = _rows(result)["uncompressed"]
    assert ref["mem_ratio"] == 1.0 and ref["peak_ratio"] == 1.0
    assert ref["ppl_ratio"] == 1.0
    assert ref["top1_agreement"] == 1.0 and ref["kl_mean"] == 0.0
    assert ref["greedy_identical"] == 1.0 and ref["greedy_prefix_frac"] == 1.0 and ref["rouge_l"] == 1.0
    assert ref["retrieval_mem_ratio"] == 1.0
    assert ref["policy_mix"] == {"full": 1.0} and ref["recovery_mean"] == 1.0
    assert ref["metadata_bytes_mean"] == 0 and ref["mem_ratio_incl_metadata"] == 1.0
    assert math.isfinite(ref["ppl"]) and ref["ppl"] > 1.0


def test_quality_T1_identical_to_uncompressed(quality):
    _, result = quality
    rows = _rows(result)
    ref, t1 = rows["uncompressed"], rows["fastgen T=1"]
    assert t1["ppl_ratio"] == 1.0 and t1["ppl"] == ref["ppl"]
    assert t1["top1_agreement"] == 1.0 and t1["kl_mean"] == 0.0
    assert t1["greedy_identical"] == 1.0 and t1["greedy_prefix_mean"] == ref["greedy_prefix_mean"]
    assert t1["rouge_l"] == 1.0
    assert t1["policy_mix"] == {"full": 1.0} and t1["recovery_mean"] == 1.0
    ret = result["retrieval"]["settings"]
    assert ret["fastgen T=1"]["items"] == ret["uncompressed"]["items"]
    # the compressed cache's bookkeeping: it keeps every token, plus bounded slack
    assert 0.9 < t1["mem_ratio_exact"] and t1["mem_ratio_exact"] >= 1.0


def test_quality_compression_frees_memory(quality):
    _, result = quality
    fastgen = [r for r in result["settings"] if r["kind"] == "fastgen" and r["T"] < 1.0]
    assert fastgen
    for r in fastgen:
        assert r["mem_ratio"] < 1.0 and r["mem_ratio_exact"] < 1.0 and r["peak_ratio"] < 1.0, r["name"]
        assert set(r["policy_mix"]) != {"full"}, r["name"]
        assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl_mean"] >= 0.0
        assert 0.0 < r["recovery_mean"] <= 1.0
    # lower T never keeps more
    by_T = sorted(fastgen, key=lambda r: r["T"])
    assert all(a["kv_bytes_mean"] <= b["kv_bytes_mean"] * 1.001 for a, b in zip(by_T, by_T[1:]))


def test_quality_baselines_match_fastgen_memory(quality):
    _, result = quality
    fastgen = {r["T"]: r for r in result["settings"] if r["kind"] == "fastgen"}
    fixed = [r for r in result["settings"] if r["kind"] == "fixed"]
    hybrids = {r["policy"] for r in fixed}
    assert hybrids == {"special+punct+local", "special+punct+frequent", "special+punct+frequent+local"}
    assert len(fixed) == len(hybrids) * sum(1 for T in fastgen if T < 1.0)
    for r in fixed:
        target = fastgen[r["T"]]["kv_bytes_mean"]
        assert abs(r["kv_bytes_mean"] / target - 1.0) <= 0.05, (r["name"], r["kv_bytes_mean"], target)
        assert r["matched"] and abs(r["match_rel_error"]) <= result["match_tol"]
        assert r["policy_mix"] == {r["policy"]: 1.0}  # every head forced to the hybrid
        assert 0.0 < r["ratio"] <= 1.0


def test_quality_retrieval_and_replay(quality):
    _, result = quality
    ret = result["retrieval"]
    assert ret["lengths"] and max(ret["lengths"]) + 48 <= result["model"]["context"]
    for name, s in ret["settings"].items():
        assert 0.0 <= s["retrieval_accuracy"] <= 1.0
        assert set(s["retrieval_by_depth"]) == {f"{d:g}" for d in ret["depths"]}
        assert set(s["retrieval_by_length"]) == {str(L) for L in ret["lengths"]}
        assert s["retrieval_trials"] == len(ret["lengths"]) * len(ret["depths"]) * ret["trials"]
    # replaying the recorded prefill into a compressed cache makes the same decisions as running it, and the
    # same decode logits up to the rounding of the two prefill kernels
    check = result["replay_check"]
    assert check["ok"] and check["same_policies"] and check["max_abs_logit_diff"] < 1e-3, check


def test_rouge_l():
    from benchmarks.quality import rouge_l

    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("a b", "c d") == 0.0
    assert rouge_l("", "") == 1.0


def test_speed_outputs(speed):
    out, result = speed
    for name in ("speed.json", "speed.csv", "speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "speed.json").read_text())["complete"]
    m = result["machine"]
    for key in ("platform", "cpu_count", "torch", "torch_threads", "device"):
        assert key in m, key
    rows = result["rows"]
    models = {r["model"] for r in rows}
    assert models == {"tiny-random", "stories260K"}
    peer = result["peer"]["transformers"]
    expected = ["uncompressed", "fastgen T=0.95"] + (["transformers"] if peer else [])
    for model in models:
        for ctx in result["contexts"]:
            group = [r for r in rows if r["model"] == model and r["context"] == ctx]
            assert [r["setting"] for r in group] == expected
            ref, fg = group[:2]
            assert ref["latency_ratio"] == 1.0 and ref["prefill_ratio"] == 1.0 and ref["mem_ratio"] == 1.0
            for r in group:
                assert r["step_ms_mean"] > 0 and r["tokens_per_s"] == pytest.approx(1e3 / r["step_ms_mean"])
                assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"] and r["prefill_s"] > 0
                assert r["timed_steps"] == result["steps"] * result["repeats"]
                assert r["prefill_peak_mb"] is not None and r["prefill_extra_mb"] is not None
            assert fg["latency_ratio"] == pytest.approx(fg["step_ms_mean"] / ref["step_ms_mean"])
            assert fg["prefill_ratio"] == pytest.approx(fg["prefill_s"] / ref["prefill_s"])
            if peer:
                hf = group[2]
                assert hf["step_vs_peer"] == 1.0
                assert ref["step_vs_peer"] == pytest.approx(ref["step_ms_mean"] / hf["step_ms_mean"])
                # same weights, same tokens, an exact-size cache of the same positions
                assert hf["kv_bytes"] == 2 * result["models"][0 if model == "tiny-random" else 1]["params"][
                    "n_layers"] * hf_kv_row(result, model) * (ctx + result["warmup"] + result["steps"])
    with open(out / "speed.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # real text compresses on stories260K
    assert any(r["mem_ratio"] < 1.0 for r in rows if r["model"] == "stories260K" and "fastgen" in r["setting"])


def hf_kv_row(result, model):
    """Bytes of one position's keys (or values) in one layer: n_kv_heads * head_dim * 4 (float32)."""
    p = next(m for m in result["models"] if m["name"] == model)["params"]
    return p["n_kv_heads"] * (p["dim"] // p["n_heads"]) * 4


def test_tables_render_the_results(quality, speed):
    from benchmarks import tables

    q_out, q = quality
    s_out, s = speed
    md = tables.quality_tables(json.loads((q_out / "quality.json").read_text()))
    lines = md.splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| setting") and "---" not in ln]
    n_settings = len(q["settings"])
    assert len(rows) == 2 * n_settings  # the main table and the retrieval table, one row per setting each
    assert rows[0].startswith("| uncompressed | 1.000 | 1.0000 | 1.000 | 0.0000 | 1.000 |")
    t95 = _rows(q)["fastgen T=0.95"]
    assert f"| fastgen T=0.95 | {t95['mem_ratio']:.3f} | {t95['ppl_ratio']:.4f} |" in md
    sp = tables.speed_table(json.loads((s_out / "speed.json").read_text()))
    body = [ln for ln in sp.splitlines() if ln.startswith("| ") and not ln.startswith("| model") and "---" not in ln]
    assert len(body) == len(s["rows"])  # one row per (model, context, setting)
    fg = s["rows"][1]
    assert body[1].startswith(f"| {fg['model']} | {fg['context']} | {fg['setting']} | {fg['prefill_s']:.2f} |")
    assert f"| {fg['step_ms_mean']:.1f} | {fg['latency_ratio']:.2f} |" in body[1]
    assert tables.main(["--quality", str(q_out / "quality.json"), "--speed", str(q_out / "missing.json")]) == 0
    assert tables.main(["--quality", str(q_out / "missing.json"), "--speed", str(q_out / "missing.json")]) == 1
