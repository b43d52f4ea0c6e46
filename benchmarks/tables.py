"""Markdown tables from the harness's JSON outputs (what the README's results section shows).

    python -m benchmarks.tables                       # benchmarks/results/quality.json and speed.json
    python -m benchmarks.tables --quality FILE --speed FILE

Prints the tables to stdout; a missing or unfinished file is named on stderr and skipped.
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


def quality_tables(q: Dict) -> str:
    """The per-setting table, the retrieval table by length and a header line describing the run."""
    m = q["model"]
    G = q.get("gen_len") or 0
    out: List[str] = [
        f"{m['name']} ({m['n_params'] / 1e6:.1f}M parameters, {m['dtype']}), text {Path(q['text']).name}: "
        f"{q['n_prompts']} prompts of P={q['prompt_len']} tokens, C={q['cont_len']} teacher-forced tokens each, "
        f"{G} greedy tokens; {_duration(q['timings_s'].get('total', 0))} "
        f"({q['machine'].get('torch_threads')} thread(s), {q['machine'].get('cpu_model') or q['machine']['machine']})."
        + ("" if q.get("complete", True) else f" **Unfinished** (stage: {q.get('stage')}).")
    ]
    ret = q.get("retrieval") or {}
    rs = ret.get("settings", {})
    n_ret = next((v["retrieval_trials"] for v in rs.values()), 0)
    out += ["", "| setting | mem ratio | ppl ratio | top-1 | KL | recovery | greedy prefix / "
                f"{G} | ROUGE-L | retrieval ({n_ret}) | policy mix |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in q["settings"]:
        acc = rs.get(r["name"], {}).get("retrieval_accuracy")
        retr = f"{round(acc * n_ret)}/{n_ret}" if isinstance(acc, float) else "-"
        mix = "-" if r["kind"] != "fastgen" else _mix(r.get("policy_mix"))
        out.append(
            f"| {_label(r)} | {_fmt(r.get('mem_ratio'), '.3f')} | {_fmt(r.get('ppl_ratio'), '.4f')} | "
            f"{_fmt(r.get('top1_agreement'), '.3f')} | {_fmt(r.get('kl_mean'), '.4f')} | "
            f"{_fmt(r.get('recovery_mean'), '.3f')} | {_fmt(r.get('greedy_prefix_mean'), '.1f')} | "
            f"{_fmt(r.get('rouge_l'), '.3f')} | {retr} | {mix} |")
    if rs:
        lengths = [str(n) for n in ret["lengths"]]
        depths = [f"{d:g}" for d in ret["depths"]]
        out += ["", f"Retrieval accuracy by prompt length and by depth ({ret['trials']} trial(s) per cell):", "",
                "| setting | " + " | ".join(f"L={n}" for n in lengths) + " | "
                + " | ".join(f"depth {d}" for d in depths) + " | mem ratio | answer log-prob |",
                "| --- |" + " --- |" * (len(lengths) + len(depths) + 2)]
        for r in q["settings"]:
            v = rs.get(r["name"])
            if v is None:
                continue
            out.append(f"| {_label(r)} | " + " | ".join(_fmt(v["retrieval_by_length"].get(n), ".2f") for n in lengths)
                       + " | " + " | ".join(_fmt(v["retrieval_by_depth"].get(d), ".2f") for d in depths)
                       + f" | {_fmt(v.get('retrieval_mem_ratio'), '.3f')} | "
                         f"{_fmt(v.get('retrieval_answer_logprob'), '.2f')} |")
    return "\n".join(out)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n")[0])
    p.add_argument("--quality", default=str(RESULTS_DIR / "quality.json"))
    p.add_argument("--speed", default=str(RESULTS_DIR / "speed.json"))
    args = p.parse_args(argv)
    shown = 0
    for path, render in ((args.quality, quality_tables), (args.speed, speed_table)):
        if not Path(path).is_file():
            print(f"{path}: not found (run the benchmark first)", file=sys.stderr)
            continue
        print(render(json.loads(Path(path).read_text())))
        print()
        shown += 1
    return 0 if shown else 1


if __name__ == "__main__":
    sys.exit(main())
