"""KV-memory logs: the per-layer table, policy counts, and a JSON file with the numbers and the run behind them.

Kept outside the cache: it only reads `memory_stats()` dictionaries.

Like with like: the table sets the bytes a cache keeps for its tokens against the bytes a dense cache holds for
the same positions (`raw_bytes`). Capacity beyond the kept tokens is reported on its own line: the packed
cache's growth slack, or the dense cache's preallocation (a buffer sized for prompt + max_gen_len, partly
unused when generation stops early), which used to show up as negative savings.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

MB = 1024 * 1024


def _pct(part: float, whole: float) -> float:
    return 100.0 * (1.0 - part / whole) if whole else 0.0


#: Extra columns of a quantised cache's table: the allocated bytes by kind, and the saving against 16 bits.
QUANT_COLUMNS = ("codes MB", "scales MB", "residual MB", "saved vs 16-bit dense %")


def _quant_cells(layer: Dict) -> List[str]:
    alloc = layer["codes_bytes"] + layer["scales_bytes"] + layer["residual_bytes"]
    return [f"{layer['codes_bytes'] / MB:.4f}", f"{layer['scales_bytes'] / MB:.4f}",
            f"{layer['residual_bytes'] / MB:.4f}", f"{_pct(alloc, layer['raw16_bytes']):.2f}"]


def memory_table(stats: Dict) -> str:
    """Markdown table: | layer_id | dense KV MB (same positions) | kept KV MB | saved % |.

    dense = an uncompressed cache of the same positions; kept = the bytes of the tokens the cache holds;
    saved % = 100 * (1 - kept / dense). The `total ave` row averages the layers (saved % from the totals).
    A quantised cache (kv_quant int8 / int4) adds the allocated codes, scales and full-precision window, and the
    share of a 16-bit dense cache of the same positions that its allocation saves.
    """
    quant = stats.get("kv_quant", "none") != "none"
    head = ["layer_id", "dense KV MB (same positions)", "kept KV MB", "saved %", *(QUANT_COLUMNS if quant else ())]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    raws, kepts = [], []
    for i, layer in enumerate(stats["layers"]):
        raw, kept = layer["raw_bytes"], layer["kept_bytes"]
        raws.append(raw), kepts.append(kept)
        cells = [str(i), f"{raw / MB:.4f}", f"{kept / MB:.4f}", f"{_pct(kept, raw):.2f}"]
        lines.append("| " + " | ".join(cells + (_quant_cells(layer) if quant else [])) + " |")
    n = max(len(raws), 1)
    cells = ["total ave", f"{sum(raws) / n / MB:.4f}", f"{sum(kepts) / n / MB:.4f}", f"{_pct(sum(kepts), sum(raws)):.2f}"]
    if quant:
        t = stats["total"]
        cells += [f"{t[k] / n / MB:.4f}" for k in ("codes_bytes", "scales_bytes", "residual_bytes")]
        cells.append(f"{_pct(t['codes_bytes'] + t['scales_bytes'] + t['residual_bytes'], t['raw16_bytes']):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def policy_table(stats: Dict) -> str:
    """Markdown table of how many (sequence, KV head) segments chose each candidate, per layer."""
    names: List[str] = stats["candidates"]
    lines = ["| layer_id | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for i, layer in enumerate(stats["layers"]):
        lines.append(f"| {i} | " + " | ".join(str(layer["policies"].get(n, 0)) for n in names) + " |")
    lines.append("| total | " + " | ".join(str(stats["total"]["policies"].get(n, 0)) for n in names) + " |")
    return "\n".join(lines)


def summary(stats: Dict, compressed: bool = True) -> str:
    """What the cache held, against a dense cache of the same positions, and what it allocated beyond that."""
    t = stats["total"]
    raw, kept, alloc = t["raw_bytes"], t["kept_bytes"], t["allocated_bytes"]
    head = f"KV cache after {stats['tokens']} positions, batch {stats['batch']}"
    if not compressed:
        positions = round(alloc * stats["tokens"] / raw) if raw else 0
        return (
            f"{head}: uncompressed, {raw} B for these positions (the dense reference: nothing saved).\n"
            f"Dense preallocation (not a saving or a loss): {alloc} B allocated for {positions} positions "
            f"(prompt + max_gen_len), of which {alloc - raw} B unused because generation stopped at "
            f"{stats['tokens']}."
        )
    quant = ""
    if stats.get("kv_quant", "none") != "none":
        quant = (f"\nStored as {stats['kv_quant']} codes: {t['codes_bytes']} B codes + {t['scales_bytes']} B scales + "
                 f"{t['residual_bytes']} B full-precision window = {alloc} B allocated, "
                 f"{_pct(alloc, t['raw16_bytes']):.2f}% saved against a 16-bit dense cache of these positions "
                 f"({t['raw16_bytes']} B).")
    return (
        f"{head}: a dense cache holds {raw} B for these positions; "
        f"{'FastGen' if stats.get('method', 'fastgen') == 'fastgen' else stats['method']} keeps {kept} B "
        f"({_pct(kept, raw):.2f}% saved).\n"
        f"Allocated: {alloc} B = kept + {t['slack_bytes']} B growth slack ({_pct(alloc, raw):.2f}% saved counting "
        f"it); policy metadata {t['metadata_bytes']} B on top; peak allocated {stats['peak_allocated_bytes']} B "
        f"against a peak dense {stats['peak_raw_bytes']} B." + quant
    )


def render_memory(stats: Dict, compressed: bool = True) -> str:
    """The memory part of a log (summary, per-layer table, policies when compressed), as markdown."""
    parts = [summary(stats, compressed), "", memory_table(stats)]
    if compressed:
        parts += ["", "Policies per layer:", "", policy_table(stats)]
    return "\n".join(parts)


def render(stats: Dict, config: Optional[Dict] = None) -> str:
    """A memory-only log as markdown (config None = uncompressed run)."""
    parts = ["# KV cache memory", "", render_memory(stats, compressed=config is not None)]
    if config is not None:
        parts += ["", "## Configuration", "", "```json", json.dumps(config, indent=1), "```"]
    return "\n".join(parts) + "\n"


def _describe(config: Dict) -> str:
    """A config dict (its method named, FastGen's when it names none) in one line; other methods list every
    option, kv_quant included."""
    if config.get("method", "fastgen") == "fastgen":
        return (f"FastGen T={config['T']:g} r_l={config['r_l']:g} r_f={config['r_f']:g}"
                + (f", {config['kv_quant']} codes" if config.get("kv_quant", "none") != "none" else ""))
    return f"{config['method']} (" + ", ".join(f"{k}={v}" for k, v in config.items()
                                               if k != "method" and v is not None) + ")"


def _fence(text: str) -> List[str]:
    return ["````text", text, "````"]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)  # a dialog


def render_run(run: Dict, batches: List[Dict], config: Optional[Dict]) -> str:
    """The log of a whole run: what ran (command, model, files, device, settings), then each batch's prompts,
    outputs and KV memory."""
    s = run["settings"]
    rows = [
        ("command", f"`{run['command']}`"),
        ("model", run["model"]),
        ("checkpoint", run["ckpt_dir"]),
        ("tokenizer", run["tokenizer_path"]),
        ("trained context", run["trained_context"] if run["trained_context"] else "not known"),
        ("device, dtype, threads", f"{run['device']}, {run['dtype']}, {run['threads']}"
                                   + (f", {run['model_parallel']} model-parallel ranks"
                                      if run["model_parallel"] > 1 else "")),
        ("settings", ", ".join(f"{k}={v}" for k, v in s.items())),
        ("KV cache", _describe(config) if config else "uncompressed"),
    ]
    parts = [f"# Run {run['run_id']}", "", "| | |", "| --- | --- |"]
    parts += [f"| {k} | {v} |" for k, v in rows]
    for b in batches:
        n = len(b["prompts"])
        parts += ["", f"## {b['label']}: {n} sequence{'s' if n != 1 else ''}, {b['seconds']:.2f} s"]
        cut = b.get("cut") or [False] * n
        for i, (prompt, length, out) in enumerate(zip(b["prompts"], b["prompt_tokens"], b["outputs"])):
            parts += ["", f"### Sequence {i} ({length} prompt tokens)", "", "Prompt:", ""] + _fence(_prompt_text(prompt))
            parts += ["", "Output (cut by max_gen_len):" if cut[i] else "Output:", ""] + _fence(out)
        if b["kv"] is not None:
            parts += ["", "### KV cache memory", "", render_memory(b["kv"], compressed=config is not None)]
    if config is not None:
        parts += ["", "## Configuration", "", "```json", json.dumps(config, indent=1), "```"]
    return "\n".join(parts) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _layer_rows(stats: Dict) -> List[Dict]:
    rows = []
    for i, layer in enumerate(stats["layers"]):
        raw, kept, comp = layer["raw_bytes"], layer["kept_bytes"], layer["allocated_bytes"]
        rows.append({"layer_id": i, "raw_mb": raw / MB, "kept_mb": kept / MB, "compress_mb": comp / MB,
                     "saved_pct": _pct(kept, raw), "saved_allocated_pct": _pct(comp, raw), **layer})
    return rows


def _kv_payload(stats: Dict) -> Dict:
    payload = {k: v for k, v in stats.items() if k != "layers"}
    payload["layers"] = _layer_rows(stats)
    return payload


def write_logs(stats: Dict, log_dir="logs", config: Optional[Dict] = None, tag: str = "kv_cache",
               stem: Optional[str] = None, run: Optional[Dict] = None,
               batches: Optional[List[Dict]] = None) -> Dict[str, Path]:
    """Writes `{stem}.md` and `.json` into log_dir, each atomically (a reader never sees half a file).

    Args:
        stats: memory statistics of the latest generation (the JSON's top-level numbers).
        log_dir: folder, created if missing.
        config: FastGen settings (None: uncompressed run).
        tag: file name prefix when `stem` is not given (`{tag}_{time}`).
        stem: file name without extension; the same stem rewrites the same files (a run's log grows per batch).
        run: what ran (see `adaptive_kv_cache.cli.RunRecord`); with it the markdown is the whole run's log.
        batches: each generation of the run: prompts, prompt lengths, outputs, seconds, memory statistics.

    Returns:
        dict with the paths under keys 'md' and 'json'.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        import time

        stem = f"{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
    paths = {"md": log_dir / f"{stem}.md", "json": log_dir / f"{stem}.json"}
    payload = _kv_payload(stats)
    payload["config"] = config
    if run is not None:
        payload["run"] = run
        payload["batches"] = [{**{k: v for k, v in b.items() if k != "kv"},
                               "kv": _kv_payload(b["kv"]) if b.get("kv") is not None else None}
                              for b in batches or []]
        markdown = render_run(run, batches or [], config)
    else:
        markdown = render(stats, config)
    _atomic_write(paths["md"], markdown)
    _atomic_write(paths["json"], json.dumps(payload, indent=1) + "\n")
    return paths
