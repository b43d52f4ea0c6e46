"""Benchmarks of the adaptive KV cache: quality against memory (`benchmarks.quality`) and decode speed
(`benchmarks.speed`). Run from the repository root, e.g. ``python -m benchmarks.quality --quick``.

This module holds the small helpers both scripts share: default paths, the tokenizer next to a checkpoint,
a description of the machine, atomic output files and KV-memory bookkeeping.
"""

import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES_DIR = SHARED / "models" / "stories260K"
SMOLLM2_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
DEFAULT_TEXT = SHARED / "data" / "tinystories_valid.txt"
LONG_TEXT = SHARED / "data" / "tinyshakespeare.txt"  # 1.1 MB: long prompts and the task documents
RESULTS_DIR = REPO / "benchmarks" / "results"

def default_context(ckpt_dir) -> int:
    """The context the checkpoint was trained for (params.json does not hold it).

    An HF ``config.json`` next to the checkpoint (max_position_embeddings) wins; otherwise known model
    names (stories*: 512, SmolLM2: 8192); otherwise 2048 (ModelArgs' default).
    """
    ckpt_dir = Path(ckpt_dir)
    hf = ckpt_dir / "config.json"
    if hf.is_file():
        try:
            n = json.loads(hf.read_text()).get("max_position_embeddings")
            if isinstance(n, int) and n > 0:
                return n
        except (ValueError, AttributeError):
            pass
    name = ckpt_dir.name.lower()
    if name.startswith("stories"):
        return 512
    if "smollm2" in name:
        return 8192
    return 2048


def machine_info(device: str = "cpu") -> Dict:
    """Platform, CPU, memory, Python/torch versions and thread settings of this run."""
    import torch

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device,
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other jobs on the cores distort timings
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give outputs the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path, text: str) -> None:
    """Writes `text` to `path` atomically (a temporary file in the same folder, then a rename)."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_csv(path, rows: List[Dict], columns: Optional[Iterable[str]] = None) -> None:
    """Rows of flat dicts as CSV; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    write_text(path, buf.getvalue())


def save_figure(fig, path) -> None:
    """Saves a matplotlib figure as PNG atomically."""
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def kv_allocated_bytes(stats: Dict) -> int:
    """Allocated K/V bytes from a cache's memory_stats() (either the per-layer layout or the flat one)."""
    if "total" in stats:
        return int(stats["total"]["allocated_bytes"])
    return int(stats.get("allocated_bytes", 0))


def kv_metadata_bytes(stats: Dict) -> int:
    """Per-slot bookkeeping bytes of a compressed cache (positions, classes, scores); 0 for a dense cache."""
    if "total" in stats:
        return int(stats["total"].get("metadata_bytes", 0))
    return 0


def peak_memory_growth(fn, device: str = "cpu") -> Optional[int]:
    """Runs fn() and returns its peak memory growth in bytes: on CUDA the peak of allocated memory over what was
    allocated before; on CPU the peak resident set size over the resident size before (the kernel's high-water
    mark, reset through /proc/self/clear_refs). None where neither can be read."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def read(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
            f.write("5")
        before = read("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return read("VmHWM") - before


def progress(iterable=None, **kw):
    """A tqdm progress bar on stderr (a no-op wrapper when tqdm is missing or disabled)."""
    disable = kw.pop("disable", False)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or disable:
        class _Null:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it if self.it is not None else ())

            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        return _Null(iterable)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
