"""The example CLIs and the API's device/dtype: fail fast, one-line errors, prompts, interactive chat, logs, images.

Most runs call the scripts' `main` in-process through `run_cli` (what `python example_*.py` runs); the
behaviours that only a real process shows (unknown flag before torch is even imported, stdin, torchrun) run
as subprocesses on stories260K.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import example_chat
import example_text_completion
from adaptive_kv_cache.cli import default_threads, run_cli
from conftest import REPO, STORIES_DIR
from llama.generation import Llama
from test_llama import GREEDY_IDS, GREEDY_TEXT, PROMPT, PROMPT_IDS

STORIES = ["--ckpt_dir", str(STORIES_DIR)]
def run_main(main, argv, capsys):
    """Runs a script module's main as `python script ARGV` would; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(main.main, argv, prog=main.PROG)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def run_script(script, args, stdin=None, torchrun=False, timeout=120, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # this session's one-process group set RANK, MASTER_PORT, ...: the child must make its own
    for key in ("ADAPTIVE_KV_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd + [str(REPO / script), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or REPO)


def error_line(err: str) -> str:
    """The single line a user error prints; fails if there is more (a traceback, a second message)."""
    lines = [line for line in err.splitlines() if not line.startswith("> initializing")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- fail fast ---------------------------------------------------------------------------------------------------


def test_unknown_flag_rejected_before_any_model_work(tmp_path):
    """A typo'd flag fails in the parser: before torch is imported, nothing loaded, nothing written."""
    r = run_script("example_chat.py", [*STORIES, "--temprature", "0", "--log_dir", str(tmp_path / "logs")])
    assert r.returncode == 2
    assert error_line(r.stderr) == ("example_chat.py: error: unrecognized arguments: --temprature 0 (did you mean "
                                    "--temperature?); see --help")
    assert r.stdout == "" and not (tmp_path / "logs").exists()


def test_user_error_under_torchrun_is_one_line_from_the_worker(tmp_path):
    """Under torchrun the worker prints its one line (once) and no traceback of its own; torchrun then adds its
    failure summary for any non-zero exit, which the worker cannot suppress."""
    r = run_script("example_text_completion.py", [*STORIES, "--T", "1.5"], torchrun=True)
    assert r.returncode != 0
    message = "example_text_completion.py: error: kv config: T=1.5 is outside the allowed range [0, 1]"
    assert r.stderr.splitlines()[0] == message and r.stderr.count("T=1.5") == 1
    assert "example_text_completion.py\", line" not in r.stderr  # no frame of the worker


def _dialog_file(tmp_path, text):
    path = tmp_path / "dialogs.json"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("script, args, message", [
    (example_text_completion, ["--T", "1.5"], "kv config: T=1.5 is outside the allowed range [0, 1]"),
    (example_text_completion, ["--top_p", "2"], "argument --top_p: must be a number <= 1, got 2; see --help"),
    (example_text_completion, ["--prompt_file", "missing.txt"], "--prompt_file missing.txt: no such file"),
    (example_text_completion, ["--tokenizer_path", "missing.model"], "--tokenizer_path missing.model: no such file"),
    (example_text_completion, ["--prompt", "a", "--image_seq", "1"],
     "--image_seq 1: there are only 1 prompts (0-based)"),
    (example_chat, ["--dialog_file", "{tmp}/none.json"], "--dialog_file {tmp}/none.json: no such file"),
    (example_chat, ["--dialog_file", "BAD_JSON"], "--dialog_file {tmp}/dialogs.json: not valid JSON (line 1, "
                                                  "column 38: Expecting value)"),
    (example_chat, ["--dialog_file", "BAD_ROLES"], "--dialog_file {tmp}/dialogs.json: dialog 0, message 1: "
                                                   "expected role 'assistant' (only the first message may be "
                                                   "'system'; then 'user' and 'assistant' alternate), got 'user'"),
    (example_chat, ["--interactive", "--prompt", "hi"],
     "--interactive reads the conversation from stdin; drop --prompt and --dialog_file"),
    (example_chat, ["--dtype", "fp8"],
     "argument --dtype: invalid choice: 'fp8' (choose from float32, bfloat16, float16); see --help"),
], ids=["bad_T", "bad_top_p", "missing_prompt_file", "missing_tokenizer", "image_seq", "missing_dialog_file",
        "bad_json_dialogs", "bad_roles", "interactive_and_prompt", "bad_dtype"])
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, script, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "BAD_JSON" in args:
        args[args.index("BAD_JSON")] = _dialog_file(tmp_path, '[ {"role": "user", "content": "hi"}, ]')
    if "BAD_ROLES" in args:
        args[args.index("BAD_ROLES")] = _dialog_file(tmp_path, json.dumps([[{"role": "user", "content": "a"},
                                                                           {"role": "user", "content": "b"}]]))
    code, out, err = run_main(script, [*STORIES, *args, "--log_dir", str(tmp_path / "logs")], capsys)
    assert code in (1, 2)
    line = error_line(err)
    expected = f"{script.PROG}: error: {message.replace('{tmp}', str(tmp_path))}"
    if "choose from" in message:  # argparse quotes choices differently across Python versions
        line = line.replace("'float32', 'bfloat16', 'float16'", "float32, bfloat16, float16")
    assert line == expected
    assert "Loaded" not in err and not (tmp_path / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    expected = (f"device 'cuda' was requested but this torch build ({torch.__version__}) has no CUDA support; run "
                f"with --device cpu") if torch.version.cuda is None else \
        "device 'cuda' was requested but torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES); " \
        "run with --device cpu"
    with pytest.raises(ValueError) as e:
        Llama.build(str(STORIES_DIR), None, 64, 1, device="cuda")
    assert str(e.value) == expected
    code, out, err = run_main(example_chat, [*STORIES, "--device", "cuda"], capsys)
    assert code == 1 and error_line(err).endswith(f"error: {expected}")


def test_bad_device_and_dtype_in_the_api(dist):
    with pytest.raises(ValueError, match=r"device='tpu' is not a device; use 'cpu', 'cuda' or 'cuda:N'"):
        Llama.build(str(STORIES_DIR), None, 64, 1, device="tpu")
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; choose one of float32, bfloat16, float16"):
        Llama.build(str(STORIES_DIR), None, 64, 1, device="cpu", dtype="int8")


# --- device and precision -----------------------------------------------------------------------------------------


def test_bfloat16_on_cpu_generates_coherent_text(dist, stories_llama):
    g = Llama.build(str(STORIES_DIR), None, 512, 4, device="cpu", dtype="bfloat16")
    assert g.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in g.model.parameters())
    out, _ = g.generate([PROMPT_IDS], 48, temperature=0)
    assert out[0][:16] == GREEDY_IDS[:16]  # float32's story for the first 16 tokens
    # Later tokens depend on the CPU's bfloat16 kernels (on one EPYC machine the story changed at token 17, on
    # another, with AVX512-BF16, it stays float32's for all 48 tokens), so the reference is float32 itself: fed
    # the bfloat16 continuation, it ranks every bfloat16 choice among its own top 3 (garbage would not be).
    fp32 = Llama(stories_llama.model, stories_llama.tokenizer)
    seq = PROMPT_IDS + out[0]
    with torch.inference_mode():
        logits = stories_llama.model.forward(torch.tensor([seq]), 0, fp32.new_cache([seq], len(seq)))
    top = logits[0, len(PROMPT_IDS) - 1 : -1].topk(3).indices.tolist()
    assert [t in top[i] for i, t in enumerate(out[0])] == [True] * 48
    # the KV cache is in the model's dtype: half of float32's bytes for the same positions
    fp32.generate([PROMPT_IDS], 48, temperature=0)
    assert 2 * g.kv_stats["total"]["raw_bytes"] == fp32.kv_stats["total"]["raw_bytes"]
    compressed = Llama(g.model, g.tokenizer, kv_config={"T": 0.95})
    compressed.generate([PROMPT_IDS], 16, temperature=0)
    t = compressed.kv_stats["total"]
    assert t["kept_bytes"] == t["kept_tokens"] * 2 * g.model.params.head_dim * 2  # 2 bytes per element


def test_threads_default():
    env = os.environ.get("OMP_NUM_THREADS")
    assert default_threads() == (int(env) if env and env.isdigit() else 1 if (os.cpu_count() or 1) <= 4
                                 else torch.get_num_threads())


def test_trained_context_warning(dist, capsys):
    Llama.build(str(STORIES_DIR), None, 1024, 1, device="cpu")
    assert ("warning: max_seq_len=1024 exceeds the 512 positions stories260K was trained on; text past position 512 "
            "is unreliable") in capsys.readouterr().err
    Llama.build(str(STORIES_DIR), None, 512, 1, device="cpu")
    assert "warning" not in capsys.readouterr().err


# --- prompts ------------------------------------------------------------------------------------------------------


def test_text_completion_prompts_in_batches_none_dropped(tmp_path, capsys):
    args = [*STORIES, "--prompt", PROMPT, "--prompt", "The cat", "--max_batch_size", "1", "--temperature", "0",
            "--max_gen_len", str(len(GREEDY_IDS)), "--no-compress", "--log_dir", str(tmp_path)]
    code, out, err = run_main(example_text_completion, args, capsys)
    assert code == 0, err
    assert "2 prompts, --max_batch_size 1: running 2 batches" in err
    assert f"{PROMPT}\n> {GREEDY_TEXT}\n" in out and "The cat\n> " in out
    assert out.count("| total ave |") == 2  # a KV table per batch
    log = json.loads(next(tmp_path.glob("kv_cache_*.json")).read_text())
    assert [b["outputs"][0] for b in log["batches"]][0] == GREEDY_TEXT and len(log["batches"]) == 2
    assert log["batches"][0]["prompt_tokens"] == [len(PROMPT_IDS)]
    run = log["run"]
    assert run["model"] == "stories260K" and run["ckpt_dir"] == str(STORIES_DIR.resolve())
    assert (run["dtype"], run["device"]) == ("float32", "cpu") and run["settings"]["compress"] is False
    assert "--prompt 'Once upon a time'" in run["command"] and log["config"] is None
    md = next(tmp_path.glob("kv_cache_*.md")).read_text()
    assert GREEDY_TEXT in md and "| device, dtype, threads | cpu, float32," in md
    assert "Dense preallocation (not a saving or a loss)" in md
    assert re.search(r"\| total ave \| [\d.]+ \| [\d.]+ \| 0\.00 \|", md)  # uncompressed: nothing saved, nothing lost


def _expected_answer(stories_llama, dialog, max_gen_len):
    """What chat_completion answers with the CLI's default compression (greedy), as the CLI prints it: with a
    cut mark when the answer ran into max_gen_len instead of a stop token."""
    g = Llama(stories_llama.model, stories_llama.tokenizer, kv_config={})
    fmt = g.chat_format
    out, _ = g.generate([fmt.encode_dialog_prompt(dialog)], max_gen_len, temperature=0, stop_tokens=fmt.stop_tokens)
    text = g.tokenizer.decode(out[0])
    assert text == g.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]
    return text, "" if len(out[0]) < max_gen_len else f" [cut at --max_gen_len {max_gen_len}]"


def test_chat_prompt_and_dialog_file(stories_llama, tmp_path, capsys):
    dialog = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once there was a dog."},
              {"role": "user", "content": "What did the dog do?"}]
    path = _dialog_file(tmp_path, json.dumps([dialog]))
    args = [*STORIES, "--prompt", "Hello", "--dialog_file", path, "--temperature", "0", "--max_gen_len", "12",
            "--log_dir", str(tmp_path / "logs")]
    code, out, err = run_main(example_chat, args, capsys)
    assert code == 0, err
    hello, hello_cut = _expected_answer(stories_llama, [{"role": "user", "content": "Hello"}], 12)
    dog, dog_cut = _expected_answer(stories_llama, dialog, 12)
    assert f"User: Hello\n\n> Assistant: {hello}{hello_cut}\n" in out
    assert f"User: What did the dog do?\n\n> Assistant: {dog}{dog_cut}\n" in out
    log = json.loads(next((tmp_path / "logs").glob("*.json")).read_text())
    assert log["batches"][0]["prompts"][1] == dialog and log["batches"][0]["outputs"] == [hello, dog]
    assert log["batches"][0]["cut"] == [bool(hello_cut), bool(dog_cut)]
    assert log["config"]["T"] == 0.95 and "FastGen keeps" in out


def test_interactive_chat_through_stdin(stories_llama, tmp_path):
    r = run_script("example_chat.py", [*STORIES, "--interactive", "--temperature", "0", "--max_gen_len", "10",
                                       "--log_dir", str(tmp_path)], stdin="Hello\nTell me more\n/exit\n")
    assert r.returncode == 0, r.stderr
    first, first_cut = _expected_answer(stories_llama, [{"role": "user", "content": "Hello"}], 10)
    second_dialog = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Tell me more"}]
    second, second_cut = _expected_answer(stories_llama, second_dialog, 10)
    assert f"User: Hello\nAssistant: {first}{first_cut}\n" in r.stdout
    assert f"User: Tell me more\nAssistant: {second}{second_cut}\n" in r.stdout
    assert r.stdout.count("| total ave |") == 2  # the KV table after each answer
    assert r.stdout.index(first) < r.stdout.index("| total ave |") < r.stdout.index(second)
    log = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [b["label"] for b in log["batches"]] == ["Turn 1", "Turn 2"]
    assert log["batches"][1]["prompts"][0] == second_dialog


def test_token_stream_prints_text_as_generated(stories_llama, capsys):
    from adaptive_kv_cache.cli import TokenStream

    tok = stories_llama.tokenizer
    pieces = []

    class Out:
        def write(self, s):
            pieces.append(s)

        def flush(self):
            pass

    stream = TokenStream(tok, {tok.eos_id}, out=Out())
    out, _ = stories_llama.generate([PROMPT_IDS], len(GREEDY_IDS), temperature=0, on_token=stream)
    assert stream.tokens == GREEDY_IDS == out[0]
    assert "".join(pieces) == GREEDY_TEXT and len(pieces) > 20  # piece by piece, not at the end


# --- images -------------------------------------------------------------------------------------------------------


def test_images_of_the_selected_sequence_in_a_run_folder(tmp_path, capsys):
    args = [*STORIES, "--prompt", PROMPT, "--prompt", "Lily and Ben went to the park", "--temperature", "0",
            "--max_gen_len", "8", "--save_images", "--image_seq", "1", "--image_dir", str(tmp_path / "images"),
            "--log_dir", str(tmp_path / "logs")]
    code, out, err = run_main(example_text_completion, args, capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "images").iterdir()  # one folder, named by the run id, no temporary left
    log = json.loads(next((tmp_path / "logs").glob("*.json")).read_text())
    assert run_dir.name == log["run"]["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == [f"layer{i}_attention.png" for i in range(5)] + [
        "policy_distribution.png"]
    assert f"images: {run_dir}/" in err


def test_image_folder_is_all_or_nothing(stories_llama, tmp_path, monkeypatch):
    from adaptive_kv_cache import images

    g = Llama(stories_llama.model, stories_llama.tokenizer, kv_config={})
    g.generate([PROMPT_IDS], 4, temperature=0)

    drawn = []

    def draw_then_fail(self, layer_id, *args):
        if layer_id == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while drawing layer 2
        drawn.append(layer_id)
        (self.out_dir / f"layer{layer_id}_attention.png").write_bytes(b"png")

    monkeypatch.setattr(images.AttentionHeatmaps, "__call__", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        images.write_run_images(g, PROMPT_IDS, 0, tmp_path / "run")
    assert drawn == [0, 1] and list(tmp_path.iterdir()) == []  # neither the run folder nor a temporary one


def test_hugging_face_folder_from_the_command_line(dist, tmp_path, capsys):
    """--ckpt_dir takes a HF folder (config.json + safetensors + tokenizer.json) as it is."""
    from conftest import HF_VOCAB, TINY_PARAMS, random_state_dict, write_hf_folder

    params = {**TINY_PARAMS, "vocab_size": HF_VOCAB}
    folder = write_hf_folder(tmp_path / "hf-tiny", params, random_state_dict(params, seed=7), tied=True, shards=1)
    args = ["--ckpt_dir", str(folder), "--prompt", "Once upon a time", "--temperature", "0", "--max_gen_len", "6",
            "--dtype", "bfloat16", "--log_dir", str(tmp_path / "logs")]
    code, out, err = run_main(example_text_completion, args, capsys)
    assert code == 0, err
    assert "Loaded hf-tiny (" in err and "dtype bfloat16" in err
    run = json.loads(next((tmp_path / "logs").glob("*.json")).read_text())["run"]
    assert run["tokenizer_path"] == str((folder / "tokenizer.json").resolve()) and run["dtype"] == "bfloat16"
    assert run["trained_context"] == 4096
