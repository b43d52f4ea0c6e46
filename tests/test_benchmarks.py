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
    "ci", "ci_by_text", "windows", "task_accuracy", "task_exact", "task_mem_ratio", "task_items",
    "method", "budget", "kv_quant", "replay",
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
    for name in ("quality.json", "quality.csv", "quality.png", "quality_methods.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind
    on_disk = json.loads((out / "quality.json").read_text())
    assert on_disk["complete"] and on_disk["settings"][0]["name"] == "uncompressed"
    for key in ("machine", "model", "prompt_len", "cont_len", "n_prompts", "gen_len", "tasks", "replay_check",
                "timings_s", "texts", "window_texts", "bootstrap", "methods", "budgets", "methods_skipped",
                "replay_checks", "kv_quant", "quant_methods"):
        assert key in on_disk, key
    for row in on_disk["settings"]:
        missing = ROW_FIELDS - set(row)
        assert not missing, (row["name"], missing)
    with open(out / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in on_disk["settings"]]
    assert {"mem_ratio", "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "top1_agreement", "kl_mean", "kl_mean_hi",
            "policy_mix", "rouge_l", "task_accuracy", "task_mem_ratio"} <= set(rows[0])
    kinds = {r["kind"] for r in on_disk["settings"]}
    assert kinds == {"uncompressed", "fastgen", "fixed", "method"}
    assert [r["name"] for r in on_disk["settings"] if r["kind"] == "fastgen"] == [
        "fastgen T=1", "fastgen T=0.95", "fastgen T=0.9"]
    # two kinds of text, the same number of windows from each; every window scored cont_len tokens
    names = [Path(t).name for t in on_disk["texts"]]
    assert names == ["tinyshakespeare.txt", "tinystories_valid.txt"]
    assert on_disk["window_texts"] == [n for n in names for _ in range(on_disk["n_prompts"])]
    for row in on_disk["settings"]:
        assert row["windows"]["n"] == [on_disk["cont_len"]] * on_disk["n_windows"]
        assert set(row["ci_by_text"]) == set(names)


def test_quality_uncompressed_is_the_reference(quality):
    _, result = quality
    ref = _rows(result)["uncompressed"]
    assert ref["mem_ratio"] == 1.0 and ref["peak_ratio"] == 1.0
    assert ref["ppl_ratio"] == 1.0
    assert ref["top1_agreement"] == 1.0 and ref["kl_mean"] == 0.0
    assert ref["greedy_identical"] == 1.0 and ref["greedy_prefix_frac"] == 1.0 and ref["rouge_l"] == 1.0
    assert ref["task_mem_ratio"] == 1.0
    assert ref["ci"] == {"ppl_ratio": [1.0, 1.0], "kl_mean": [0.0, 0.0], "top1_agreement": [1.0, 1.0]}
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
    assert t1["ci"] == ref["ci"]
    # every task item: the same reply, hence the same score
    tasks = result["tasks"]["settings"]
    assert tasks["fastgen T=1"]["items"] == tasks["uncompressed"]["items"]
    assert {i["task"] for i in tasks["uncompressed"]["items"]} == set(result["tasks"]["tasks"])
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
        assert r["match"]["rel_error_all_windows"] == r["match_rel_error"]
        assert r["policy_mix"] == {r["policy"]: 1.0}  # every head forced to the hybrid
        assert 0.0 < r["ratio"] <= 1.0


def test_quality_tasks_and_replay(quality):
    _, result = quality
    t = result["tasks"]
    from benchmarks.tasks import TASKS

    assert t["tasks"] == list(TASKS) and t["lengths"] and max(t["lengths"]) < result["model"]["context"]
    n_cells = len(TASKS) * len(t["lengths"])
    assert len(t["calibration"]) == n_cells and len(t["kept_cells"]) == n_cells  # --quick keeps every cell
    per_cell = len(t["depths"]) * t["trials"]
    assert len(t["manifest"]) == n_cells * per_cell
    assert len({m["prompt_sha256_16"] for m in t["manifest"]}) == len(t["manifest"])
    for name, s in t["settings"].items():
        assert s["task_items"] == len(t["manifest"]) == len(s["items"]), name
        assert 0.0 <= s["task_accuracy"] <= 1.0
        assert set(s["by_cell"]) == {f"{task}@{L}" for task in TASKS for L in t["lengths"]}
        assert set(s["by_depth"]) == {f"{d:g}" for d in t["depths"]}
        assert s["task_accuracy"] == pytest.approx(sum(i["score"] for i in s["items"]) / len(s["items"]))
    rows = _rows(result)
    for r in result["settings"]:
        assert r["task_accuracy"] == t["settings"][r["name"]]["task_accuracy"]
        if r["kind"] == "fastgen" and r["T"] < 1:
            assert r["task_mem_ratio"] < 1.0
    assert rows["fastgen T=0.9"]["task_mem_ratio"] <= rows["fastgen T=0.95"]["task_mem_ratio"] * 1.001
    # replaying the recorded prefill into a compressed cache makes the same decisions as running it, and the
    # same decode logits up to the rounding of the two prefill kernels
    check = result["replay_check"]
    assert check["ok"] and check["same_policies"] and check["max_abs_logit_diff"] < 1e-3, check


def test_quality_methods_at_budgets_and_fastgen_points(quality):
    """Every method of --quick at each budget share (memory between what the prompt budget alone and the prompt
    budget plus every decode token allocate) and matched to FastGen's memory at each T < 1, with intervals and
    task rows."""
    _, result = quality
    rows = _rows(result)
    P, C = result["prompt_len"], result["cont_len"]
    methods, budgets = result["methods"], result["budgets"]
    assert methods == ["streaming_llm", "snapkv"] and budgets == [0.5, 0.25] and result["methods_skipped"] == {}
    for m in methods:
        for b in budgets:
            r = rows[f"{m} b={b:g}"]
            assert (r["kind"], r["method"], r["budget"], r["config"]["budget"]) == ("method", m, b, b)
            # a segment keeps floor(b P) prompt tokens plus at most the C decode tokens; the dense cache holds
            # P + C; the packed store's growth slack stays under 3% of it
            assert b * P / (P + C) - 1e-9 <= r["mem_ratio"] <= (b * P + C) / (P + C) + 0.03, (r["name"], r["mem_ratio"])
            assert abs(r["mem_ratio"] - b) <= 0.08
            lo, hi = r["ci"]["ppl_ratio"]
            assert lo <= r["ppl_ratio"] <= hi and r["ci"]["kl_mean"][0] >= 0.0
            assert r["task_items"] == rows["uncompressed"]["task_items"] > 0
            assert r["task_mem_ratio"] < 1.0 and r["replay"] is True
        fastgen = {r["T"]: r for r in result["settings"] if r["kind"] == "fastgen" and r["T"] < 1.0}
        for T, fg in fastgen.items():
            r = rows[f"{m} @T={T:g}"]
            assert r["T"] == T and 0.0 < r["budget"] < 1.0 and r["config"]["budget"] == r["budget"]
            assert r["matched"] and abs(r["kv_bytes_mean"] / fg["kv_bytes_mean"] - 1.0) <= result["match_tol"]
            assert r["match"]["evaluations"] and r["match_rel_error"] == r["match"]["rel_error_all_windows"]
    # the recorded prefill is valid for each method: same per-head budgets, logits within float rounding
    assert set(result["replay_checks"]) == set(methods)
    for m, chk in result["replay_checks"].items():
        assert chk["ok"] and chk["same_policies"] and chk["setting"] == f"{m} b={budgets[0]:g}", chk


def test_quality_budget_one_is_uncompressed(tmp_path):
    """Every registered method at budget 1 keeps every token: the uncompressed rows exactly, teacher forcing,
    greedy text and every task reply. C = 15 stays below evict_every (16): methods that evict during decoding
    cap a segment at budget x its prompt, so at the first eviction they would drop decode tokens even at 1."""
    from adaptive_kv_cache.registry import METHODS
    from benchmarks import quality

    methods = [m for m in METHODS if m not in ("fastgen", "headkv")]  # headkv needs a head scores file
    result = quality.main(["--quick", "--out", str(tmp_path), "--no_progress", "--no_plot", "--baselines",
                           "--T", "1", "--gen_len", "15", "--cont_len", "15", "--tasks", "single_needle",
                           "multi_key", "--lengths", "320", "--budgets", "1.0", "--methods", *methods,
                           "--no_method_match"])
    rows = _rows(result)
    ref = rows["uncompressed"]
    tasks = result["tasks"]["settings"]
    assert [r["name"] for r in result["settings"]] == ["uncompressed", "fastgen T=1"] + [f"{m} b=1" for m in methods]
    for m in methods:
        r = rows[f"{m} b=1"]
        assert tasks[r["name"]]["items"] == tasks["uncompressed"]["items"], m
        assert r["greedy_identical"] == 1.0 and r["top1_agreement"] == 1.0, m
        if m == "h2o":
            # its decode steps ask attention for column sums: the kernel with statistics rounds differently
            assert abs(r["ppl_ratio"] - 1.0) < 1e-6 and r["kl_mean"] < 1e-9  # float32 logits
            continue
        assert r["ppl"] == ref["ppl"] and r["windows"]["nll"] == ref["windows"]["nll"], m
        assert r["kl_mean"] == 0.0 and r["ci"] == ref["ci"], m


def test_quality_kv_quant_rows_or_clear_error(tmp_path):
    """--kv_quant adds a codec-alone row and the codec with each --quant_methods; before issue 13's codecs are
    merged the run stops at once with one line saying so."""
    from adaptive_kv_cache.config import KVConfigError, resolve_kv_config
    from benchmarks import quality

    argv = ["--quick", "--out", str(tmp_path), "--no_progress", "--no_plot", "--baselines", "--T", "1", "0.9",
            "--gen_len", "0", "--tasks", "single_needle", "--lengths", "320", "--no_methods", "--budgets", "0.5",
            "--kv_quant", "int8", "--quant_methods", "fastgen", "snapkv"]
    try:
        resolve_kv_config({"method": "snapkv", "kv_quant": "int8"})
    except KVConfigError:
        with pytest.raises(SystemExit, match=r"^--kv_quant int8: the installed adaptive_kv_cache has no kv_quant "):
            quality.main(argv)
        return
    result = quality.main(argv)
    rows = _rows(result)
    for name in ("int8 alone", "snapkv int8 b=0.5", "fastgen T=0.9 int8"):
        assert rows[name]["kind"] == "quant" and rows[name]["kv_quant"] == "int8", name
        assert rows[name]["config"]["kv_quant"] == "int8" and rows[name]["mem_ratio"] < 1.0, name
    assert rows["int8 alone"]["config"]["T"] == 1.0


def test_quality_method_flags_fail_clearly():
    from benchmarks import quality

    with pytest.raises(SystemExit, match="--methods: nosuch not allowed; registered methods: streaming_llm"):
        quality.main(["--quick", "--methods", "nosuch"])
    with pytest.raises(SystemExit, match="--methods: fastgen not allowed.*its thresholds, --T"):
        quality.main(["--quick", "--methods", "fastgen"])
    with pytest.raises(SystemExit, match=r"--budgets: 1.5 outside \(0, 1\]"):
        quality.main(["--quick", "--budgets", "0.5", "1.5"])
    with pytest.raises(SystemExit, match=r"--method_T: 0.8, 1 not among the thresholds below 1 of --T "
                                         r"\(1, 0.95, 0.9\)"):
        quality.main(["--quick", "--method_T", "0.95", "0.8", "1"])


def test_secant_match():
    """Memory affine in the budget (m = 100 + 1000 x): the proportional first step misses, the secant lands."""
    from benchmarks.quality import secant_match

    calls = []

    def mem(x):
        calls.append(x)
        return 100.0 + 1000.0 * x

    x, info = secant_match(mem, 600.0, 0.6, iters=3, tol=1e-6)
    assert x == pytest.approx(0.5) and info["matched"] and len(calls) == 3
    assert calls[:2] == [0.6, pytest.approx(0.6 * 600.0 / 700.0)]
    assert info["evaluations"][-1] == (x, pytest.approx(600.0))
    x, info = secant_match(mem, 1e6, 0.5, iters=3, tol=0.01)  # out of reach: the best is the top of the range
    assert x == 1.0 and not info["matched"]


def test_quality_task_calibration_drops_cells(tmp_path):
    """The uncompressed model's accuracy decides the cells: with a bar above what it reaches, it runs alone."""
    from benchmarks import quality

    result = quality.main(["--quick", "--out", str(tmp_path), "--no_progress", "--no_plot", "--baselines",
                           "--T", "1", "--gen_len", "0", "--tasks", "single_needle", "--lengths", "320",
                           "--min_accuracy", "0.99"])
    cal = result["tasks"]["calibration"]
    assert [(c["task"], c["length"], c["kept"]) for c in cal] == [("single_needle", 320, False)]
    assert "uncompressed accuracy" in cal[0]["reason"] and result["tasks"]["kept_cells"] == []
    assert result["tasks"]["settings"]["fastgen T=1"]["task_items"] == 0
    assert len(result["tasks"]["calibration_items"]) == len(result["tasks"]["depths"]) * result["tasks"]["trials"]


def test_corrected_ratio():
    """Memory linear in x on the subset (m = 100 + 200 x), all windows 10% above it: one step lands on target."""
    from benchmarks.quality import Matcher, corrected_ratio

    evals = [(0.001, 100.2), (1.0, 300.0), (0.5, 200.0), (0.45, 190.0)]
    mem_all = 1.1 * 190.0  # at x = 0.45 on all windows
    x = corrected_ratio(0.45, mem_all, target_all=1.1 * 200.0, evaluations=evals)
    assert x == pytest.approx(0.5)  # slope 200 on the subset, 220 on all windows
    assert corrected_ratio(0.45, mem_all, 1e9, evals) == Matcher.HI
    assert corrected_ratio(0.45, mem_all, 0.0, evals) == Matcher.LO
    assert corrected_ratio(0.45, mem_all, 200.0, [(0.45, 190.0)]) is None  # no slope
    assert corrected_ratio(0.45, mem_all, 200.0, [(0.45, 190.0), (0.5, 180.0)]) is None  # not increasing


def test_extra_settings_are_named_kv_configs(tmp_path):
    """A new method adds rows as named kv configs (--setting NAME=CONFIG: inline JSON or a file)."""
    from benchmarks.quality import _extra_settings

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"T": 0.8, "r_l": 0.2}))
    a, b = _extra_settings(['loose={"T": 0.97}', f"file={path}"])
    assert (a.name, a.kind, a.T, a.config.T) == ("loose", "config", 0.97, 0.97)
    assert (b.name, b.config.T, b.config.r_l) == ("file", 0.8, 0.2)
    with pytest.raises(SystemExit, match="NAME=CONFIG"):
        _extra_settings(["nameonly"])
    with pytest.raises(SystemExit, match="'bad': kv config: T=1.5"):  # one line naming the row and the key
        _extra_settings(['bad={"T": 1.5}'])
    with pytest.raises(SystemExit, match="malformed JSON"):
        _extra_settings(['bad={"T": '])
    w = _extra_settings(['fastgen T=0.9 w64={"method": "fastgen", "T": 0.9, "obs_window": 64}'])[0]
    assert (w.name, w.config.T, w.config.obs_window) == ("fastgen T=0.9 w64", 0.9, 64)  # "=" inside a name


def test_calibrate():
    from benchmarks.quality import calibrate

    res = [{"task": "a", "length": 1, "score": s} for s in (1, 1, 0.5, 1)] + \
          [{"task": "b", "length": 1, "score": s} for s in (1, 0, 0)]
    rows = calibrate(res, 0.7)
    assert [(r["task"], r["items"], r["uncompressed_accuracy"], r["kept"]) for r in rows] == [
        ("a", 4, 0.875, True), ("b", 3, pytest.approx(1 / 3), False)]
    assert rows[0]["reason"] is None and "0.33 < 0.70" in rows[1]["reason"]


def _windows(nll, kl=None, agree=None, n=64):
    m = len(nll)
    return {"nll": list(nll), "kl": list(kl or [0.0] * m), "agree": list(agree or [n] * m), "n": [n] * m}


def test_paired_bootstrap_identical_rows():
    from benchmarks.quality import paired_bootstrap

    ref = _windows([150.0, 170.0, 140.0, 160.0])
    ci = paired_bootstrap(ref, ref, n_boot=500, seed=0)
    assert ci == {"ppl_ratio": [1.0, 1.0], "kl_mean": [0.0, 0.0], "top1_agreement": [1.0, 1.0]}


def test_paired_bootstrap_covers_a_known_shift_and_is_deterministic():
    import random

    from benchmarks.quality import paired_bootstrap

    rng = random.Random(0)
    n, shift = 64, 0.03  # nats per token: a perplexity ratio of exp(0.03)
    ref_nll = [n * rng.uniform(2.0, 3.0) for _ in range(16)]
    alt_nll = [x + n * (shift + rng.gauss(0, 0.02)) for x in ref_nll]  # paired noise around the shift
    kl = [n * rng.uniform(0.005, 0.015) for _ in range(16)]
    agree = [rng.randint(56, 64) for _ in range(16)]
    ref, alt = _windows(ref_nll, n=n), _windows(alt_nll, kl, agree, n=n)
    ci = paired_bootstrap(ref, alt, n_boot=2000, seed=1)
    lo, hi = ci["ppl_ratio"]
    assert lo < math.exp(shift) < hi and hi - lo < 0.03
    assert ci["kl_mean"][0] < 0.01 < ci["kl_mean"][1]
    point = sum(agree) / (16 * n)
    assert ci["top1_agreement"][0] <= point <= ci["top1_agreement"][1] <= 1.0
    assert paired_bootstrap(ref, alt, n_boot=2000, seed=1) == ci  # a pure function of its inputs and seed
    assert paired_bootstrap(ref, alt, n_boot=2000, seed=2) != ci
    # pairing: a shift common to both settings cancels out, an unpaired test would not see through it
    moved = _windows([x + 30.0 * i for i, x in enumerate(ref_nll)], n=n)
    assert paired_bootstrap(moved, moved, n_boot=200)["ppl_ratio"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="same windows"):
        paired_bootstrap(ref, _windows(alt_nll[:8], n=n))


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
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| setting", "| length"))
            and "---" not in ln]
    n_settings = len(q["settings"])
    # the main table, a task table per length and the depth table: one row per setting each; the calibration
    # table one row per length
    n_lengths = len(q["tasks"]["lengths"])
    assert len(rows) == (2 + n_lengths) * n_settings + n_lengths
    assert rows[0].startswith("| uncompressed | 1.000 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | "
                              "0.0000 [0.0000, 0.0000] |")
    t95 = _rows(q)["fastgen T=0.95"]
    lo, hi = t95["ci"]["ppl_ratio"]
    assert f"| fastgen T=0.95 | {t95['mem_ratio']:.3f} | {t95['ppl_ratio']:.3f} [{lo:.3f}, {hi:.3f}] |" in md
    acc = q["tasks"]["settings"]["fastgen T=0.95"]
    assert f"| {acc['task_accuracy']:.2f} | {acc['task_mem_ratio']:.3f} |" in md.split("fastgen T=0.95 |")[1]
    L = q["tasks"]["lengths"][0]
    cell = " | ".join(f"{acc['by_cell'][f'{t}@{L}']:.2f}" for t in q["tasks"]["tasks"])
    assert f"| fastgen T=0.95 | {acc['by_length'][str(L)]:.2f} | {cell} |" in md
    # the methods' comparison: uncompressed, each budget share, then each FastGen point with its matched methods
    cmp = tables.comparison_table(q).splitlines()
    body = [ln for ln in cmp if ln.startswith("| ") and not ln.startswith("| method") and "---" not in ln]
    Ts = [r["T"] for r in q["settings"] if r["kind"] == "fastgen" and r["T"] < 1.0]
    n_methods = len(q["methods"])
    assert len(body) == 1 + n_methods * len(q["budgets"]) + len(Ts) * (1 + n_methods)
    assert [ln.split(" | ")[1] for ln in body] == ["all tokens"] + [f"budget {b:g}" for b in q["budgets"]
                                                                    for _ in range(n_methods)] \
        + [f"FastGen T={T:g}" for T in sorted(Ts, reverse=True) for _ in range(1 + n_methods)]
    sn = _rows(q)["snapkv b=0.25"]
    lo, hi = sn["ci"]["kl_mean"]
    assert (f"| snapkv | budget 0.25 | 0.250 | {sn['mem_ratio']:.3f} | {sn['ppl_ratio']:.3f} "
            f"[{sn['ci']['ppl_ratio'][0]:.3f}, {sn['ci']['ppl_ratio'][1]:.3f}] | "
            f"{sn['kl_mean']:.4f} [{lo:.4f}, {hi:.4f}] |"
            in tables.comparison_table(q))
    assert tables.comparison_table(q) in tables._quality_all(q)
    assert (q_out / "quality_methods.png").stat().st_size > 0
    sp = tables.speed_table(json.loads((s_out / "speed.json").read_text()))
    body = [ln for ln in sp.splitlines() if ln.startswith("| ") and not ln.startswith("| model") and "---" not in ln]
    assert len(body) == len(s["rows"])  # one row per (model, context, setting)
    fg = s["rows"][1]
    assert body[1].startswith(f"| {fg['model']} | {fg['context']} | {fg['setting']} | {fg['prefill_s']:.2f} |")
    assert f"| {fg['step_ms_mean']:.1f} | {fg['latency_ratio']:.2f} |" in body[1]
    assert tables.main(["--quality", str(q_out / "quality.json"), "--speed", str(q_out / "missing.json")]) == 0
    assert tables.main(["--quality", str(q_out / "missing.json"), "--speed", str(q_out / "missing.json")]) == 1
