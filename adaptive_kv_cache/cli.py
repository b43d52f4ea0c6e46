"""What the example scripts share: a parser that fails fast, checks before any model work, one-line errors,
threads, streaming, and the run record written to logs/ and images/.

Order of a run: parse (unknown flags rejected at once) -> check every setting and file (`check_common`) ->
set threads -> `Llama.build` -> generate -> report. A known user error (bad path, bad setting, malformed
prompt file) prints one line `<script>: error: <message>` and exits non-zero, on rank 0 only under torchrun;
`--debug` or ADAPTIVE_KV_DEBUG=1 shows the traceback instead.
"""

import argparse
import difflib
import json
import math
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from adaptive_kv_cache.config import DEFAULT_CONFIG_PATH, KV_QUANT
from adaptive_kv_cache.registry import METHODS, config_dict, describe

METHOD_NAMES = tuple(METHODS)

DEBUG_ENV = "ADAPTIVE_KV_DEBUG"


class UserError(Exception):
    """A mistake in the command line or its files; its message is the whole report.

    Attributes:
        exit_code: 2 for command-line syntax (argparse's convention), 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (with a close flag name when there is one)."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            known = [s for a in self._actions for s in a.option_strings]
            close = [m for f in flags for m in difflib.get_close_matches(f, known, n=1)]
            if close:
                hint = f" (did you mean {', '.join(close)}?)"
        raise UserError(f"{message}{hint}; see --help", exit_code=2)


# --- argument types: each rejects a bad value with a sentence, at parse time --------------------------------------


def _number(kind, lo=None, hi=None, lo_open=False):
    """argparse type: an int or float within bounds (argparse prefixes the flag name to the message)."""

    def parse(text: str):
        what = "an integer" if kind is int else "a number"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be {what} <= {hi}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def default_threads() -> int:
    """Intra-op CPU threads per process when --threads is not given.

    OMP_NUM_THREADS when set; otherwise 1 on machines with at most 4 logical CPUs per process, where a second
    intra-op thread costs more in wake-ups than it gives (2-vCPU machine: chat demo 22 s with 1 thread, 54 s
    with 2); otherwise torch's own default.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if per_rank <= 4:
        return 1
    import torch

    return torch.get_num_threads()


def add_common_arguments(parser: argparse.ArgumentParser, ckpt_dir: Optional[str], max_gen_len: Optional[int],
                         max_seq_len: int = 512, max_batch_size: int = 4) -> None:
    """Model, device, sampling, KV-compression and output flags shared by both examples."""
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt_dir", default=ckpt_dir, required=ckpt_dir is None,
                   help="native checkpoint (params.json + consolidated.NN.pth) or Hugging Face Llama folder "
                        "(config.json + *.safetensors)" + (f"; default {ckpt_dir}" if ckpt_dir else ""))
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer.model, tokenizer.gguf or tokenizer.json; default: the one in --ckpt_dir")
    g.add_argument("--max_seq_len", type=_number(int, lo=1), default=max_seq_len,
                   help=f"positions per sequence, prompt included (default {max_seq_len})")
    g.add_argument("--max_batch_size", type=_number(int, lo=1), default=max_batch_size,
                   help=f"sequences generated together; more prompts run in several batches (default "
                        f"{max_batch_size})")
    g = parser.add_argument_group("device")
    g.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="weights and KV cache (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--threads", type=_number(int, lo=1), default=None,
                   help="CPU threads per process (default: OMP_NUM_THREADS if set, else 1 on machines with up to "
                        "4 CPUs per process, where more threads are slower; otherwise torch's default)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=_number(float, lo=0), default=0.6,
                   help="0 = greedy (default 0.6)")
    g.add_argument("--top_p", type=_number(float, lo=0, hi=1), default=0.9, help="default 0.9")
    g.add_argument("--max_gen_len", type=_number(int, lo=1), default=max_gen_len,
                   help="tokens generated per answer" + (f" (default {max_gen_len})" if max_gen_len else
                                                         " (default: up to max_seq_len)"))
    g.add_argument("--seed", type=int, default=1, help="sampling seed, the same on every rank (default 1)")
    g = parser.add_argument_group("KV-cache compression (FastGen by default; --method picks another)")
    g.add_argument("--kv_config", default=None, help=f"config JSON (default {DEFAULT_CONFIG_PATH.name} shipped in "
                                                     f"adaptive_kv_cache/configs; one NAME.json per method there)")
    g.add_argument("--method", default=None, metavar="NAME",
                   help="compression method: " + ", ".join(METHOD_NAMES) + " (default: the config's, fastgen)")
    g.add_argument("--budget", type=float, default=None,
                   help="tokens each (sequence, KV head) keeps, as a share of its prompt in (0, 1] (not fastgen)")
    g.add_argument("--budget_tokens", type=int, default=None,
                   help="... or as a token count >= 1 (not fastgen)")
    g.add_argument("--budgets", default=None, metavar="HOW",
                   help="split of a layer's budget: uniform, pyramid or adakv (not fastgen)")
    g.add_argument("--kv_option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (repeatable; VALUE read as JSON, else as text), e.g. "
                        "--kv_option window=32 --kv_option sinks=4")
    g.add_argument("--T", type=float, default=None, help="FastGen: recovery threshold in [0, 1] (overrides the "
                                                         "config)")
    g.add_argument("--r_l", type=float, default=None, help="FastGen: local window ratio in (0, 1]")
    g.add_argument("--r_f", type=float, default=None, help="FastGen: frequent-token ratio in (0, 1]")
    g.add_argument("--evict_every", type=int, default=None,
                   help="decode steps between evictions, k >= 1 (1: after every token, as in the paper)")
    g.add_argument("--kv_quant", choices=KV_QUANT, default=None,
                   help="store kept tokens as int8 or int4 codes (adaptive_kv_cache/codecs.py); default: the config's")
    g.add_argument("--compress", dest="compress", action="store_true", default=True, help="compress (default)")
    g.add_argument("--no-compress", "--nocompress", dest="compress", action="store_false",
                   help="run with the uncompressed cache")
    g = parser.add_argument_group("outputs")
    g.add_argument("--log_dir", default="logs", help="run logs (markdown + JSON) go here (default logs)")
    g.add_argument("--image_dir", default="images", help="heatmaps go to IMAGE_DIR/<run id>/ (default images)")
    g.add_argument("--save_images", action="store_true",
                   help="draw attention heatmaps and the policy mix (also SAVE_IMAGE=1); needs matplotlib")
    g.add_argument("--image_seq", type=_number(int, lo=0), default=0,
                   help="which sequence (prompt or dialog index) the heatmaps show (default 0)")
    g.add_argument("--debug", action="store_true", help=f"show tracebacks (also {DEBUG_ENV}=1)")


def _option(text: str):
    """`KEY=VALUE` -> (key, value): VALUE as JSON (numbers, true/false, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--kv_option {text!r} must look like KEY=VALUE, e.g. --kv_option window=32")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def kv_config_from_flags(kv_config: Optional[str] = None, T: Optional[float] = None, r_l: Optional[float] = None,
                         r_f: Optional[float] = None, compress: bool = True, evict_every: Optional[int] = None,
                         method: Optional[str] = None, budget: Optional[float] = None,
                         budget_tokens: Optional[int] = None, budgets: Optional[str] = None,
                         kv_option: Sequence[str] = (), kv_quant: Optional[str] = None):
    """`--kv_config PATH --method NAME --budget --budget_tokens --budgets --kv_option KEY=VALUE --T --r_l --r_f
    --evict_every --kv_quant --compress/--no-compress` -> a validated config (None = uncompressed).

    The config file (default: FastGen's shipped one, or the shipped NAME.json when --method is given) with the
    flags on top. Runs before the model is loaded, so a bad setting fails first.
    """
    if not compress:
        return None
    from adaptive_kv_cache.config import _read_json
    from adaptive_kv_cache.registry import check_name, resolve_with

    data = {}
    if kv_config is not None:
        data = _read_json(Path(kv_config))
        if not isinstance(data, dict):
            raise UserError(f"--kv_config {kv_config}: expected a JSON object of settings")
    if method is not None:
        check_name(method)
        if data.get("method", method) != method and kv_config is not None:
            raise UserError(f"--method {method} contradicts method {data.get('method')!r} in --kv_config "
                            f"{kv_config}; drop one of them")
        data["method"] = method
    name = data.get("method", "fastgen")
    fastgen_only = {"T": T, "r_l": r_l, "r_f": r_f}
    scored_only = {"budget": budget, "budget_tokens": budget_tokens, "budgets": budgets}
    wrong = [k for k, v in (scored_only if name == "fastgen" else fastgen_only).items() if v is not None]
    if wrong:
        raise UserError(f"--{wrong[0]} is not an option of method {name}; "
                        + ("pick a method with --method" if name == "fastgen" else "FastGen's --T, --r_l and "
                           "--r_f need --method fastgen"))
    # evict_every and kv_quant are options of every method
    flags = {**fastgen_only, **scored_only, "evict_every": evict_every, "kv_quant": kv_quant}
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(dict(_option(o) for o in kv_option))
    return resolve_with(data, overrides, source=kv_config)


def save_images_requested(args=None) -> bool:
    if args is not None and getattr(args, "save_images", False):
        return True
    return os.environ.get("SAVE_IMAGE", "0") not in ("", "0", "false", "False")


def check_common(args) -> Dict:
    """Checks every setting and file of the common flags before any model work.

    Returns:
        {"kv_config": FastGenConfig or None, "device": torch.device, "dtype": torch.dtype,
         "tokenizer_path": str, "threads": int}

    Raises:
        UserError, ValueError, FileNotFoundError: with the sentence to show.
    """
    if not args.compress and args.kv_quant not in (None, "none"):
        raise UserError(f"--kv_quant {args.kv_quant} quantises the compressed cache; drop --no-compress (to keep "
                        f"every token: --T 1 with fastgen, --budget 1 --kv_option decode=false otherwise)")
    kv_config = kv_config_from_flags(args.kv_config, args.T, args.r_l, args.r_f, args.compress, args.evict_every,
                                     args.method, args.budget, args.budget_tokens, args.budgets, args.kv_option,
                                     args.kv_quant)
    ckpt = Path(args.ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"--ckpt_dir {args.ckpt_dir}: no such directory (a native checkpoint holds params.json and "
                        f"consolidated.00.pth, a Hugging Face folder config.json and *.safetensors)")
    if args.tokenizer_path is not None and not Path(args.tokenizer_path).is_file():
        raise UserError(f"--tokenizer_path {args.tokenizer_path}: no such file")
    if save_images_requested(args):
        if args.save_images and not args.compress:
            raise UserError("--save_images draws what FastGen's profiling saw; it needs compression (drop "
                            "--no-compress)")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--save_images needs matplotlib (pip install matplotlib)") from None

    # the checks below need torch (a few seconds to import): the ones above answer first
    from llama.checkpoint import check_hf_folder, find_native_shards, is_hf_folder
    from llama.generation import load_params, resolve_device, resolve_dtype
    from llama.tokenizer import find_tokenizer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if is_hf_folder(ckpt):
        check_hf_folder(ckpt)
    else:
        if not find_native_shards(ckpt):
            raise UserError(f"--ckpt_dir {args.ckpt_dir}: no consolidated.NN.pth (native) and no config.json "
                            f"(Hugging Face); convert other formats with scripts/convert_*.py")
        load_params(ckpt)
    tokenizer_path = args.tokenizer_path if args.tokenizer_path is not None else find_tokenizer(str(ckpt))
    return {"kv_config": kv_config, "device": device, "dtype": dtype, "tokenizer_path": tokenizer_path,
            "threads": args.threads if args.threads is not None else default_threads()}


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _process_group_initialized() -> bool:
    if "torch" not in sys.modules:  # a bad flag exits before torch is imported: no group to tear down
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            prog: Optional[str] = None) -> None:
    """Runs `main(argv)` and turns known user errors into one line, `<prog>: error: <message>`, and an exit status.

    Exit status: main's return value; 2 for a bad command line; 1 for other user errors; 130 on Ctrl-C.
    Tracebacks: unexpected exceptions always; user errors with --debug or ADAPTIVE_KV_DEBUG=1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    prog = prog or Path(sys.argv[0]).name or "adaptive-kv"
    had_group = _process_group_initialized()
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except (UserError, ValueError, OSError) as e:
        if debug:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        # every rank hits the same bad setting: say it once
        if rank() == 0:
            print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        code = e.exit_code if isinstance(e, UserError) else 1
    except RuntimeError as e:
        if debug or "out of memory" not in str(e):
            raise
        print(f"{prog}: error: out of memory ({str(e).splitlines()[0]}); lower --max_seq_len or --max_batch_size, "
              f"or use --dtype bfloat16", file=sys.stderr)
        code = 1
    finally:
        if not had_group and _process_group_initialized():  # the group this run made (Llama.build)
            import torch.distributed as dist

            dist.destroy_process_group()
    sys.stdout.flush()
    sys.exit(code or 0)


# --- streaming ---------------------------------------------------------------------------------------------------


class TokenStream:
    """`on_token` callback for `Llama.generate` that prints one sequence's text as it is generated.

    Decodes the whole answer at each step and prints what is new, holding back a trailing U+FFFD (the first
    bytes of a character whose remaining bytes come with the next token).
    """

    def __init__(self, tokenizer, stop_tokens, out=None, seq: int = 0):
        self.tokenizer = tokenizer
        self.stop_tokens = frozenset(stop_tokens)
        self.out = out if out is not None else sys.stdout
        self.seq = seq
        self.tokens: List[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, cur_pos: int, next_token, generated) -> None:
        if self.done or not bool(generated[self.seq]):
            return
        tok = int(next_token[self.seq])
        if tok in self.stop_tokens:
            self.done = True
            return
        self.tokens.append(tok)
        text = self.tokenizer.decode(self.tokens).rstrip("\ufffd")
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


class Progress:
    """`on_token` callback showing a progress bar (tqdm, on a terminal only) while a batch is generated, and
    noting which sequences ended with a stop token (the others were cut by max_gen_len or max_seq_len)."""

    def __init__(self, total: int, stop_tokens=(), bsz: int = 0, desc: str = "generating"):
        from tqdm import tqdm

        self.stop_tokens = frozenset(stop_tokens)
        self.stopped = [False] * bsz
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty() or rank() != 0)

    def __call__(self, cur_pos, next_token, generated) -> None:
        self.bar.update(1)
        if self.stop_tokens:
            for i, (tok, live) in enumerate(zip(next_token.tolist(), generated.tolist())):
                if live and tok in self.stop_tokens:
                    self.stopped[i] = True

    def close(self) -> None:
        self.bar.close()


# --- the run record ----------------------------------------------------------------------------------------------


def new_run_id() -> str:
    """`YYYYmmdd-HHMMSS-xxxx`: sortable, and unique for runs started in the same second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


class RunRecord:
    """What a run did: model, files, settings, command line, and each batch's prompts, outputs and KV memory.

    The log (`LOG_DIR/kv_cache_<run id>.md` and `.json`) is rewritten atomically after every batch or chat turn,
    so an interrupted run leaves a complete log of what it finished. Only rank 0 writes.
    """

    def __init__(self, script: str, args, generator, checked: Dict, argv: Sequence[str]):
        self.run_id = new_run_id()
        self.log_dir = Path(args.log_dir)
        self.image_dir = Path(args.image_dir)
        self.save_images = save_images_requested(args)
        self.image_seq = args.image_seq
        self.generator = generator
        kv = generator.kv_config
        self.config = config_dict(kv) if kv is not None else None
        self.meta = {
            "run_id": self.run_id,
            "command": " ".join(shlex.quote(a) for a in [script, *argv]),
            "model": Path(args.ckpt_dir).resolve().name,
            "ckpt_dir": str(Path(args.ckpt_dir).resolve()),
            "tokenizer_path": str(Path(checked["tokenizer_path"]).resolve()),
            "trained_context": generator.trained_context,
            "device": str(generator.device),
            "dtype": str(generator.dtype).replace("torch.", ""),
            "threads": checked["threads"],
            "model_parallel": world_size(),
            "settings": {
                "temperature": args.temperature, "top_p": args.top_p, "max_seq_len": args.max_seq_len,
                "max_batch_size": args.max_batch_size, "max_gen_len": args.max_gen_len, "seed": args.seed,
                "compress": kv is not None,
            },
        }
        self.batches: List[Dict] = []

    def add_batch(self, prompts: List, prompt_tokens: List[List[int]], outputs: List[str], seconds: float,
                  label: str, cut: Optional[List[bool]] = None) -> Dict:
        """Records one generation and writes the log; returns the paths {'md', 'json'} (rank 0) or {}.

        `cut` marks the outputs that ended at max_gen_len (or max_seq_len) rather than at a stop token.
        """
        from adaptive_kv_cache.report import write_logs

        stats = self.generator.kv_stats
        self.batches.append({
            "label": label,
            "prompts": prompts,
            "prompt_tokens": [len(t) for t in prompt_tokens],
            "outputs": outputs,
            "cut": cut,
            "seconds": round(seconds, 3),
            "kv": stats,
        })
        if rank() != 0 or stats is None:
            return {}
        return write_logs(stats, self.log_dir, config=self.config, stem=f"kv_cache_{self.run_id}",
                          run=self.meta, batches=self.batches)

    def images(self, prompt_tokens: List[List[int]], first_index: int, subfolder: str = "") -> Optional[Path]:
        """Heatmaps of sequence --image_seq when it is in this batch (indices first_index...), into
        IMAGE_DIR/<run id>/[subfolder], written atomically. Every rank runs the prefill; rank 0 draws."""
        if not self.save_images or self.generator.kv_config is None:
            return None
        local = self.image_seq - first_index
        if not 0 <= local < len(prompt_tokens):
            return None
        from adaptive_kv_cache.images import write_run_images

        folder = self.image_dir / self.run_id / subfolder if subfolder else self.image_dir / self.run_id
        return write_run_images(self.generator, prompt_tokens[local], self.image_seq, folder,
                                draw=rank() == 0)

    def report(self, paths: Dict, images: Optional[Path] = None) -> None:
        """Prints the last batch's KV table (stdout) and where the log and images went (stderr); rank 0."""
        from adaptive_kv_cache.report import render_memory

        if rank() != 0 or self.generator.kv_stats is None:
            return
        print(render_memory(self.generator.kv_stats, compressed=self.generator.kv_config is not None))
        if paths:
            print(f"log: {paths['md']} {paths['json']}", file=sys.stderr)
        if images is not None:
            print(f"images: {images}/", file=sys.stderr)


def build_generator(prog: str, args, checked: Dict, argv):
    """Sets the threads, builds the model from the checked flags, states what will run; returns
    (generator, RunRecord)."""
    import torch

    torch.set_num_threads(checked["threads"])
    from llama import Llama

    generator = Llama.build(
        ckpt_dir=args.ckpt_dir,
        tokenizer_path=checked["tokenizer_path"],
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
        kv_config=checked["kv_config"],
        device=checked["device"],
        dtype=checked["dtype"],
    )
    run = RunRecord(prog, args, generator, checked, sys.argv[1:] if argv is None else argv)
    log_model_line(generator, checked)
    return generator, run


def log_model_line(generator, checked: Dict) -> None:
    """States, on stderr, what will run: device, dtype, threads, compression."""
    if rank() != 0:
        return
    kv = generator.kv_config
    what = describe(kv) if kv is not None else "uncompressed KV cache"
    print(f"running on {generator.device}, {str(generator.dtype).replace('torch.', '')}, "
          f"{checked['threads']} thread(s), {what}", file=sys.stderr)
