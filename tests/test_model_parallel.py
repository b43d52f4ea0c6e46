"""Two model-parallel ranks (torchrun, gloo on CPU) generate what one rank generates, with and without FastGen."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama.generation import Llama
from scripts.shard_checkpoint import shard_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "mp_generate.py"
PROMPTS = ["Once upon a time", "The cat"]
MAX_GEN_LEN = 24
# set by llama.generation._init_distributed for this process's one-rank group; torchrun must choose its own
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@pytest.fixture(scope="module")
def stories_mp2(tmp_path_factory, stories_dir) -> Path:
    return shard_checkpoint(stories_dir, tmp_path_factory.mktemp("stories_mp2") / "ckpt", 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mp(ckpt_dir: Path, nproc: int, kv_compress: bool = False) -> dict:
    """Runs tests/mp_generate.py under torchrun and returns the JSON that rank 0 printed."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SCRIPT), "--ckpt_dir", str(ckpt_dir), "--max_gen_len", str(MAX_GEN_LEN)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    if kv_compress:
        cmd.append("--kv_compress")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line from rank 0, got stdout:\n{proc.stdout}"
    result = json.loads(lines[0])
    assert result["world_size"] == nproc
    return result


def prompt_tokens(llama):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]


def test_two_ranks_generate_like_one(stories_llama, stories_mp2):
    expected, _ = stories_llama.generate(prompt_tokens(stories_llama), max_gen_len=MAX_GEN_LEN, temperature=0.0)
    assert all(len(t) == MAX_GEN_LEN for t in expected)
    assert run_mp(stories_mp2, 2)["tokens"] == expected


def test_two_ranks_compressed_generate_and_account_like_one(stories_llama, stories_mp2):
    compressed = Llama(stories_llama.model, stories_llama.tokenizer, kv_config={})
    expected, _ = compressed.generate(prompt_tokens(compressed), max_gen_len=MAX_GEN_LEN, temperature=0.0)
    total = compressed.kv_stats["total"]
    # the comparison has teeth: the cache really dropped tokens (an uncompressed one keeps every position of
    # every (sequence, KV head, layer) segment)
    positions = compressed.kv_stats["tokens"]
    assert total["kept_tokens"] < total["segments"] * positions

    result = run_mp(stories_mp2, 2, kv_compress=True)
    assert result["tokens"] == expected
    for key in ("kept_tokens", "kept_bytes", "raw_bytes", "segments"):
        assert result["kv_total"][key] == total[key], key
    # allocated bytes add each rank's own group padding and headroom (a rank groups only its heads), and the
    # report accounts for every allocated byte on both
    two = result["kv_total"]
    for t in (two, total):
        assert t["allocated_bytes"] == t["kept_bytes"] + t["slack_bytes"]
