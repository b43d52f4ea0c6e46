"""KV-memory logs: the per-layer table of the seed README, policy counts, and a JSON file with the numbers.

Kept outside the cache: it only reads `memory_stats()` dictionaries.
"""

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

MB = 1024 * 1024


def memory_table(stats: Dict) -> str:
    """Markdown table: | layer_id | raw KV cache mem MB | compress KV cache mem MB | compress ratio % |.

    compressed MB is what the cache allocated (slack included); compress ratio % is the share of raw memory
    saved, 100 * (1 - compressed / raw). The `total ave` row averages the layers.
    """
    lines = ["| layer_id | raw KV cache mem MB | compress KV cache mem MB | compress ratio % |",
             "| --- | --- | --- | --- |"]
    ratios, raws, comps = [], [], []
    for i, layer in enumerate(stats["layers"]):
        raw, comp = layer["raw_bytes"] / MB, layer["allocated_bytes"] / MB
        ratio = 100.0 * (1.0 - comp / raw) if raw else 0.0
        raws.append(raw), comps.append(comp), ratios.append(ratio)
        lines.append(f"| {i} | {raw:.4f} | {comp:.4f} | {ratio:.2f} |")
    n = max(len(raws), 1)
    lines.append(f"| total ave | {sum(raws) / n:.4f} | {sum(comps) / n:.4f} | {sum(ratios) / n:.2f} |")
    return "\n".join(lines)


def policy_table(stats: Dict) -> str:
    """Markdown table of how many (sequence, KV head) segments chose each candidate, per layer."""
    names: List[str] = stats["candidates"]
    lines = ["| layer_id | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for i, layer in enumerate(stats["layers"]):
        lines.append(f"| {i} | " + " | ".join(str(layer["policies"].get(n, 0)) for n in names) + " |")
    lines.append("| total | " + " | ".join(str(stats["total"]["policies"].get(n, 0)) for n in names) + " |")
    return "\n".join(lines)


def summary(stats: Dict) -> str:
    """One paragraph: totals, the saving, and the slack and metadata that come on top of the kept tokens."""
    t = stats["total"]
    saved = 100.0 * (1.0 - t["allocated_bytes"] / t["raw_bytes"]) if t["raw_bytes"] else 0.0
    return (
        f"KV cache after {stats['tokens']} positions, batch {stats['batch']}: raw {t['raw_bytes']} B, "
        f"allocated {t['allocated_bytes']} B ({saved:.2f}% saved); kept tokens {t['kept_tokens']} "
        f"= {t['kept_bytes']} B, growth slack {t['slack_bytes']} B, policy metadata {t['metadata_bytes']} B "
        f"(not in the table); peak allocated {stats['peak_allocated_bytes']} B of peak raw "
        f"{stats['peak_raw_bytes']} B."
    )


def render(stats: Dict, config: Optional[Dict] = None) -> str:
    """The whole log as markdown."""
    parts = ["# KV cache memory", "", summary(stats), "", memory_table(stats), "", "## Policies per layer", "",
             policy_table(stats)]
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


def write_logs(stats: Dict, log_dir="logs", config: Optional[Dict] = None, tag: str = "kv_cache") -> Dict[str, Path]:
    """Writes `{tag}_{time}.md` (tables) and `.json` (the same numbers plus allocated bytes) into log_dir.

    Returns:
        dict with the paths under keys 'md' and 'json'.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
    paths = {"md": log_dir / f"{stem}.md", "json": log_dir / f"{stem}.json"}
    rows = []
    for i, layer in enumerate(stats["layers"]):
        raw, comp = layer["raw_bytes"], layer["allocated_bytes"]
        rows.append({"layer_id": i, "raw_mb": raw / MB, "compress_mb": comp / MB,
                     "compress_ratio_pct": 100.0 * (1.0 - comp / raw) if raw else 0.0, **layer})
    payload = {k: v for k, v in stats.items() if k != "layers"}
    payload["layers"] = rows
    payload["config"] = config
    _atomic_write(paths["md"], render(stats, config))
    _atomic_write(paths["json"], json.dumps(payload, indent=1) + "\n")
    return paths
