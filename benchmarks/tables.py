"""Markdown tables from the harness's JSON outputs (what the README's results section shows).

    python -m benchmarks.tables                       # benchmarks/results/quality.json and speed.json
    python -m benchmarks.tables --quality FILE --speed FILE
    python -m benchmarks.tables --quality docs/results/quality_methods.json --plot docs/figures/methods_smollm2.png

Prints the tables to stdout (with the methods' comparison when the run had method rows); a missing or unfinished
file is named on stderr and skipped.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import RESULTS_DIR


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _mix(mix: Optional[Dict[str, float]]) -> str:
    if not mix:
        return "-"
    short = {"special": "s", "punct": "p", "frequent": "f", "local": "l", "full": "full"}
    parts = sorted(mix.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{'+'.join(short.get(n, n) for n in k.split('+'))} {100 * v:.0f}%" for k, v in parts)


def _label(r: Dict) -> str:
    if r["kind"] == "fixed":
        x = r.get("ratio")
        return f"{r['policy']} (r={_fmt(x, '.3f')}) @ T={r['T']:g} memory"
    return r["name"]


def _ci(r: Dict, key: str, spec: str) -> str:
    """A value with its 95% interval, e.g. `1.031 [1.020, 1.043]`."""
    v = r.get(key)
    lo, hi = (r.get("ci") or {}).get(key, (None, None))
    if lo is None:
        return _fmt(v, spec)
    return f"{_fmt(v, spec)} [{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _header(q: Dict) -> str:
    m = q["model"]
    t = q.get("tasks") or {}
    texts = " and ".join(Path(x).name for x in q.get("texts", []))
    tasks = (f"tasks at {', '.join(map(str, t['lengths'])) or 'no length that fits the context'} tokens, depths {', '.join(f'{d:g}' for d in t['depths'])}"
             f", {t['trials']} trial(s) per depth, seed {t['seed']}; " if t else "")
    return (f"{m['name']} ({m['n_params'] / 1e6:.1f}M parameters, {m['dtype']}): {tasks}teacher forcing on "
            f"{q['n_windows']} windows ({q['n_prompts']} per text: {texts}) of P={q['prompt_len']} prompt and "
            f"C={q['cont_len']} scored tokens; [95% paired bootstrap intervals over windows]; "
            f"{_duration(q['timings_s'].get('total', 0))} ({q['machine'].get('torch_threads')} thread(s), "
            f"{q['machine'].get('cpu_model') or q['machine']['machine']})."
            + ("" if q.get("complete", True) else f" **Unfinished** (stage: {q.get('stage')})."))


def quality_tables(q: Dict) -> str:
    """The per-setting table (teacher-forced metrics with intervals, task accuracy), the calibration table, task
    accuracy by cell and by depth."""
    G = q.get("gen_len") or 0
    t = q.get("tasks") or {}
    ts = t.get("settings", {})
    out: List[str] = [_header(q), "",
                      "| setting | mem ratio | ppl ratio | top-1 | KL | recovery | task accuracy | task mem ratio | "
                      + (f"greedy prefix / {G} | " if G else "") + "policy mix |",
                      "| --- |" + " --- |" * (8 + bool(G))]
    for r in q["settings"]:
        mix = "-" if r["kind"] != "fastgen" else _mix(r.get("policy_mix"))
        out.append(
            f"| {_label(r)} | {_fmt(r.get('mem_ratio'), '.3f')} | {_ci(r, 'ppl_ratio', '.3f')} | "
            f"{_ci(r, 'top1_agreement', '.3f')} | {_ci(r, 'kl_mean', '.4f')} | {_fmt(r.get('recovery_mean'), '.3f')} | "
            f"{_fmt(r.get('task_accuracy'), '.2f')} | {_fmt(r.get('task_mem_ratio'), '.3f')} | "
            + (f"{_fmt(r.get('greedy_prefix_mean'), '.1f')} | " if G else "") + f"{mix} |")
    if not t:
        return "\n".join(out)
    tasks, lengths = t["tasks"], t["lengths"]
    cal = {(c["task"], c["length"]): c for c in t["calibration"]}
    out += ["", f"Calibration: uncompressed accuracy per task and length ({len(t['depths']) * t['trials']} items "
                f"per cell); cells below {t['min_accuracy']:g} are dropped from the suite (*dropped*):", "",
            "| length | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for L in lengths:
        cells = []
        for task in tasks:
            c = cal.get((task, L))
            cells.append("-" if c is None else _fmt(c["uncompressed_accuracy"], ".2f")
                         + ("" if c["kept"] else " *dropped*"))
        out.append(f"| {L} | " + " | ".join(cells) + " |")
    kept = t["kept_cells"]
    if not kept:
        return "\n".join(out)
    n_items = next((v["task_items"] for v in ts.values()), 0)
    out += ["", f"Task accuracy (mean score, partial credit) on the kept cells ({n_items} items in all), per length "
                f"and task; memory ratio and overall accuracy in the first table:"]
    for L in lengths:
        cols = [task for task in tasks if f"{task}@{L}" in kept]
        if not cols:
            continue
        out += ["", f"| setting (L={L}) | all at {L} | " + " | ".join(cols) + " |",
                "| --- |" + " --- |" * (len(cols) + 1)]
        for r in q["settings"]:
            v = ts.get(r["name"])
            if v is None:
                continue
            out.append(f"| {_label(r)} | {_fmt(v.get('by_length', {}).get(str(L)), '.2f')} | "
                       + " | ".join(_fmt(v.get("by_cell", {}).get(f"{c}@{L}"), ".2f") for c in cols) + " |")
    depths = [f"{d:g}" for d in t["depths"]]
    out += ["", "Task accuracy by depth of the planted fact (tasks with a depth) and by length:", "",
            "| setting | " + " | ".join(f"depth {d}" for d in depths) + " | "
            + " | ".join(f"L={n}" for n in lengths) + " |", "| --- |" + " --- |" * (len(depths) + len(lengths))]
    for r in q["settings"]:
        v = ts.get(r["name"])
        if v is None:
            continue
        out.append(f"| {_label(r)} | " + " | ".join(_fmt(v.get("by_depth", {}).get(d), ".2f") for d in depths)
                   + " | " + " | ".join(_fmt(v.get("by_length", {}).get(str(n)), ".2f") for n in lengths) + " |")
    return "\n".join(out)


def _point(r: Dict) -> str:
    """The operating point of a comparison row: a budget share, FastGen's T (matched rows), or every token."""
    if r["kind"] == "uncompressed" or (r.get("method") == "fastgen" and r.get("T") is None):
        return "all tokens"
    if r["kind"] == "fastgen" or r.get("T") is not None:
        return f"FastGen T={r['T']:g}"
    return f"budget {r['budget']:g}"


def comparison_rows(q: Dict) -> List[Dict]:
    """The rows of the methods' comparison in table order: every token (uncompressed, codecs alone), then each
    budget share, then each FastGen operating point (FastGen first, then the methods matched to its memory);
    run order inside a point. The fixed baselines stay in the main table."""
    rows = [r for r in q["settings"] if r["kind"] in ("uncompressed", "method", "quant")
            or (r["kind"] == "fastgen" and r["T"] < 1.0)]
    points = list(dict.fromkeys(["all tokens"] + [f"budget {b:g}" for b in q.get("budgets") or []]
                                + sorted({_point(r) for r in rows if r.get("T") is not None},
                                         key=lambda p: -float(p.split("=")[1]))))
    return [r for p in points for r in rows if _point(r) == p]


def comparison_table(q: Dict) -> str:
    """Method x operating point at equal kept memory: memory ratio, perplexity ratio, KL and top-1 agreement
    with their 95% intervals, task accuracy and memory ratio on the task prompts."""
    rows = comparison_rows(q)
    out = ["Methods at equal kept memory (budget: kept share of each prompt; at a FastGen point the budget is "
           "matched to FastGen's memory)"
           + (f"; left out: {', '.join(q['methods_skipped'])} (see the JSON's methods_skipped)"
              if q.get("methods_skipped") else "") + ":", "",
           "| method | operating point | budget | mem ratio | ppl ratio | KL | top-1 | task accuracy | "
           "task mem ratio |",
           "| --- |" + " --- |" * 8]
    for r in rows:
        if r["kind"] in ("method", "quant") and _point(r) != "all tokens":
            name = " ".join(x for x in ("FastGen" if r["method"] == "fastgen" else r["method"], r.get("kv_quant")) if x)
        else:
            name = "FastGen" if r["kind"] == "fastgen" else r["name"]
        out.append(f"| {name} | {_point(r)} | {_fmt(r.get('budget'), '.3f')} | {_fmt(r.get('mem_ratio'), '.3f')} | "
                   f"{_ci(r, 'ppl_ratio', '.3f')} | {_ci(r, 'kl_mean', '.4f')} | {_ci(r, 'top1_agreement', '.3f')} | "
                   f"{_fmt(r.get('task_accuracy'), '.2f')} | {_fmt(r.get('task_mem_ratio'), '.3f')} |")
    return "\n".join(out)


def comparison_plot(q: Dict, path: Path) -> None:
    """Quality against KV memory ratio with every method (a curve per method over its budgets and matched
    points, FastGen over T, codecs), 95% intervals as error bars; the fixed baselines are left out."""
    from benchmarks.quality import plot

    plot({**q, "settings": comparison_rows(q)}, Path(path))


def speed_table(s: Dict) -> str:
    """The speed table: every setting's prefill and decode, with ratios to our dense cache and to the peer."""
    mach = s["machine"]
    peer = (s.get("peer") or {}).get("transformers")
    out = [f"{mach.get('cpu_model') or mach['machine']}, {mach['device']}, {mach.get('torch_threads')} thread(s), "
           f"torch {mach['torch']}" + (f", transformers {peer}" if peer else ", no transformers peer")
           + f"; batch {s['batch']}, prefill in one pass, then {s['steps']} timed decode steps after "
           f"{s['warmup']} warm-up, interleaved across settings, {s['repeats']} repeat(s); "
           f"{_duration(s.get('total_s', 0))}."
           + ("" if s.get("complete", True) else " **Unfinished**: the rows measured before it was stopped."), "",
           "| model | context | setting | prefill s | prefill / ours | prefill / transformers | prefill MB beyond KV | "
           "step ms (mean) | step / ours | step / transformers | KV memory ratio | policy mix |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        out.append(
            f"| {r['model']} | {r['context']} | {r['setting']} | {r['prefill_s']:.2f} | {r['prefill_ratio']:.2f} | "
            f"{_fmt(r.get('prefill_vs_peer'), '.2f')} | {_fmt(r.get('prefill_extra_mb'), '.0f')} | "
            f"{r['step_ms_mean']:.1f} | {r['latency_ratio']:.2f} | {_fmt(r.get('step_vs_peer'), '.2f')} | "
            f"{r['mem_ratio']:.3f} | {_mix(r.get('policy_mix'))} |")
    return "\n".join(out)


def _quality_all(q: Dict) -> str:
    """The quality tables, then the comparison when the run has method rows."""
    if any(r["kind"] in ("method", "quant") for r in q["settings"]):
        return quality_tables(q) + "\n\n" + comparison_table(q)
    return quality_tables(q)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n")[0])
    p.add_argument("--quality", default=str(RESULTS_DIR / "quality.json"))
    p.add_argument("--speed", default=str(RESULTS_DIR / "speed.json"))
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the methods' comparison (quality against memory ratio) from --quality")
    args = p.parse_args(argv)
    shown = 0
    for path, render in ((args.quality, _quality_all), (args.speed, speed_table)):
        if not Path(path).is_file():
            print(f"{path}: not found (run the benchmark first)", file=sys.stderr)
            continue
        print(render(json.loads(Path(path).read_text())))
        print()
        shown += 1
    if args.plot and Path(args.quality).is_file():
        comparison_plot(json.loads(Path(args.quality).read_text()), Path(args.plot))
        print(f"comparison plot: {args.plot}", file=sys.stderr)
    return 0 if shown else 1


if __name__ == "__main__":
    sys.exit(main())
