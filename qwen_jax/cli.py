"""The ``qwen-jax`` command line: convert, generate, demo. User errors print one line and exit 1."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (``qwen-jax: error: ...``, exit 2) instead of the whole usage."""

    def error(self, message):
        command = self.prog.partition(" ")[2]     # subparsers are named "qwen-jax generate"
        self.exit(2, f"qwen-jax: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Arguments a command does not take are refused by that command (its --help named), not the top parser."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})
            commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _add_model_options(p: argparse.ArgumentParser, sparse_threshold_default: str = "32768, Qwen's") -> None:
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk size in tokens (default 32768)")
    p.add_argument("--attention", default=None,
                   help="attention implementation: pallas (the GPU/TPU kernels; default there), blockwise (default on "
                        "CPUs) or reference")
    p.add_argument("--dca", default=None, metavar="K=V,...",
                   help="dual chunk attention, e.g. chunk_size=32768,local_size=2048[,original_max_position_embeddings=N]")
    p.add_argument("--sparse", action="store_true",
                   help="sparse prefill (MInference vertical-slash, needs --dca): default budgets (1000, 6096)")
    p.add_argument("--sparse-threshold", type=int, default=None,
                   help=f"prompts longer than this run sparse (default {sparse_threshold_default})")
    p.add_argument("--sparse-config", default=None, metavar="FILE",
                   help="Qwen's sparse_attention_config.json with per-head budgets (implies --sparse)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window baseline: keys this many positions back or more are invisible")
    p.add_argument("--kv-cache-dtype", default=None, choices=CACHE_DTYPE_NAMES,
                   help="KV cache storage: auto (the model dtype, default) or fp8 (float8_e4m3fn: half of bf16)")
    p.add_argument("--block-q", type=int, default=None, help="query tile of the attention (default: per implementation)")
    p.add_argument("--block-k", type=int, default=None, help="key tile of the attention (default: per implementation)")


def _size(text: str) -> int:
    """argparse type for a memory size (``memory.parse_size``): a usage error, not a traceback."""
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.memory import parse_size
    try:
        return parse_size(text)
    except QwenJaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(args, *flags: str) -> None:
    """Refuse a given integer flag below 1 (None: not given), before any work starts."""
    from qwen_jax.errors import QwenJaxError
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise QwenJaxError(f"{flag} must be a positive integer, got {value}")


def _read_text(path: str, flag: str) -> str:
    """A UTF-8 text file ('-': standard input), or a one-line error naming it."""
    from qwen_jax.errors import QwenJaxError
    try:
        if path == "-":
            # the bytes, decoded strictly: sys.stdin's own decoding uses surrogateescape in a C or UTF-8 locale,
            # so a non-UTF-8 byte became a lone surrogate the tokenizer refused with a TypeError traceback
            # (newlines translated as text mode, and a file opened by path, translate them)
            return sys.stdin.buffer.read().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        name = "standard input" if path == "-" else path
        raise QwenJaxError(f"{flag} {name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_outputs(**paths) -> None:
    """Refuse output files that could not be written (missing or read-only folder, a folder in the way, the
    same file twice), before the long run whose results they keep: ``_check_outputs(json=args.json, ...)``."""
    import os

    from qwen_jax.bench import output_problem
    from qwen_jax.errors import QwenJaxError
    seen = {}
    for name, path in paths.items():
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        if problem := output_problem(path, flag):
            raise QwenJaxError(problem)
        full = os.path.realpath(path)
        parent = os.path.dirname(full)
        if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
            raise QwenJaxError(f"{flag} {path}: not writable (permission denied)")
        if full in seen:
            raise QwenJaxError(f"{seen[full]} and {flag} name the same file {path}")
        seen[full] = flag


def _check_attention(args) -> None:
    """``--attention pallas`` where no Pallas kernel runs natively: say which choices do, in the CLI's words; tile
    sizes for the path that has none."""
    from qwen_jax.errors import QwenJaxError
    if args.attention == "reference" and (args.block_q is not None or args.block_k is not None):
        raise QwenJaxError("--block-q / --block-k set the tiles of --attention blockwise and pallas; reference "
                           "attention is dense and has none")
    if args.attention != "pallas":
        return
    import jax

    import pallas_kernels
    try:
        pallas_kernels.resolve_impl("auto")
    except ValueError:
        raise QwenJaxError(f"--attention pallas needs a GPU or TPU; on {jax.default_backend()!r} use --attention "
                           "blockwise (the default there) or reference") from None


def _model_overrides(args) -> dict:
    from qwen_jax.attention import AttentionSpec
    from qwen_jax.config import read_sparse_config
    from qwen_jax.errors import QwenJaxError
    _positive(args, "--prefill-chunk", "--window", "--block-q", "--block-k")
    _check_attention(args)
    overrides = {}
    if args.prefill_chunk is not None:
        overrides["prefill_chunk_size"] = args.prefill_chunk
    if args.kv_cache_dtype:
        overrides["kv_cache_dtype"] = args.kv_cache_dtype
    if args.attention or any(x is not None for x in (args.window, args.block_q, args.block_k)):
        overrides["attn_implementation"] = AttentionSpec(
            impl=args.attention or AttentionSpec.impl, window=args.window, block_q=args.block_q, block_k=args.block_k)
    sparse = args.sparse or args.sparse_config or args.sparse_threshold is not None
    if args.dca is not None or sparse:
        # --dca and the sparse flags edit the checkpoint's own block, key by key (a 1M checkpoint keeps its
        # original_max_position_embeddings and budgets file); a model without one takes --dca as the block
        block = dict(_checkpoint_dca(args))
        if args.dca is not None and not args.dca.strip():
            raise QwenJaxError("--dca is empty: give key=integer pairs such as chunk_size=32768,local_size=2048")
        for part in args.dca.split(",") if args.dca else []:
            key, _, value = part.partition("=")
            if not value.strip().lstrip("-").isdigit():
                raise QwenJaxError(f"bad --dca {args.dca!r}: expected key=integer pairs such as chunk_size=32768")
            block[key.strip()] = int(value)
        if sparse and not block:
            raise QwenJaxError("sparse prefill runs on top of dual chunk attention: pass --dca too (this "
                               "checkpoint's config.json has no dual_chunk_attention_config)")
        overrides["dual_chunk_attention_config"] = block
    if sparse:
        block["sparse_attention_enabled"] = True
        if args.sparse_threshold is not None:
            block["sparse_attention_threshold"] = args.sparse_threshold
        if args.sparse_config:
            block["sparse_attention_config"] = read_sparse_config(args.sparse_config, f"--sparse-config {args.sparse_config}")
    return overrides


def _folder(args) -> str:
    """``--model`` as a local folder (a hub repo id is downloaded, once): what every later step reads."""
    if getattr(args, "model_folder", None) is None:
        from qwen_jax.api import resolve_checkpoint
        args.model_folder = resolve_checkpoint(args.model)
    return args.model_folder


def _checkpoint_dca(args) -> dict:
    """The ``dual_chunk_attention_config`` of ``--model``'s config.json ({} without one)."""
    import os

    from qwen_jax.config import read_config_json
    folder = _folder(args)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return {}
    block = read_config_json(folder).get("dual_chunk_attention_config")
    return block if isinstance(block, dict) else {}


def _require_tokenizer(args) -> None:
    """Text prompts need the checkpoint's tokenizer: refuse a folder without one before its weights load."""
    import os

    from qwen_jax.errors import CheckpointError
    if not os.path.isfile(os.path.join(_folder(args), "tokenizer.json")):
        raise CheckpointError(f"--model {args.model}: no tokenizer.json, so the prompt cannot be encoded (this "
                              f"command needs the checkpoint's tokenizer)")


def _load(args, **kw):
    """``qwen_jax.load`` with the model options, once they and the checkpoint's tokenizer (every command that loads
    encodes text) are checked; a sparse-config file the model cannot use is named in the error."""
    import qwen_jax
    from qwen_jax.errors import ConfigError
    overrides = _model_overrides(args)
    _require_tokenizer(args)
    try:
        return qwen_jax.load(_folder(args), dtype=args.dtype, **kw, **overrides)
    except ConfigError as e:
        if args.sparse_config and str(e).startswith("sparse_attention_config"):
            raise ConfigError(f"--sparse-config {args.sparse_config}: {e}") from None
        raise


def _prefill_bar(enabled: bool):
    """``progress(done, total)`` for ``generate`` / ``passkey``: a bar on stderr over each long prompt's prefill
    chunks (tqdm's rules: none where stderr is not a terminal), so stdout keeps only the text."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    state = {"bar": None, "done": 0}

    def report(done: int, total: int) -> None:
        if state["bar"] is None or done <= state["done"]:        # a new prompt
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, leave=False, disable=None,
                                file=sys.stderr)
            state["done"] = 0
        state["bar"].update(done - state["done"])
        state["done"] = done
        if done >= total:
            state["bar"].close()
            state["bar"] = None

    return report


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process jobs (one process per host; see README, Multi-host)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address, or 'auto' for JAX's cluster detection (TPU pods, SLURM); "
                        "default $QWEN_JAX_COORDINATOR, else a single-process run")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the job ($QWEN_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0-based ($QWEN_JAX_PROCESS_ID)")


def _start_distributed(args) -> bool:
    """Join the job if one is asked for (flags or environment); True when this process should print."""
    import os

    from qwen_jax import distributed
    if args.coordinator or os.environ.get(distributed.ENV_COORDINATOR):
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        # C++ libraries print to the process's stdout (gloo: "Rank 0 is connected to 3 peer ranks"): send
        # file descriptor 1 to stderr and keep the real stdout for this command's output.
        sys.stdout.flush()
        results = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = open(results, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    elif args.num_processes is not None or args.process_id is not None:
        from qwen_jax.errors import QwenJaxError
        raise QwenJaxError(f"--num-processes/--process-id need --coordinator HOST:PORT (or auto, or "
                           f"${distributed.ENV_COORDINATOR})")
    import jax
    return jax.process_index() == 0


BENCHMARKS = {"prefill": "qwen_jax.bench.prefill", "decode": "qwen_jax.bench.decode",
              "attention": "pallas_kernels.bench", "sparse": "qwen_jax.bench.sparse",
              "generation": "qwen_jax.bench.generation", "compile": "qwen_jax.bench.compile",
              "stream": "qwen_jax.bench.stream", "prefix": "qwen_jax.bench.prefix"}


# what qwen_jax.load's dtype= and kv_cache_dtype= take (their aliases aside)
MODEL_DTYPES = ("auto", "bfloat16", "float32", "float16")
CACHE_DTYPE_NAMES = ("auto", "bfloat16", "float32", "float16", "fp8")
DTYPE_HELP = "parameter dtype (auto, the default: bfloat16 on GPU/TPU, float32 on CPU where it fits)"
# the sampling flags' values when neither the flag nor --generation-config gives one: greedy
SAMPLING_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                   help="HF's repetition penalty on ids already in the prompt or output (default 1: off)")
    p.add_argument("--generation-config", action="store_true",
                   help="start from the sampling the checkpoint's generation_config.json recommends; the sampling "
                        "flags given override it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable), taken literally: not included in the output (a newline: --stop "
                        "$'\\n' in bash); a special token's text (--stop '<|im_start|>') stops at that token")


def build_parser() -> argparse.ArgumentParser:
    from qwen_jax import __version__
    parser = _Parser(prog="qwen-jax", description="Qwen2.5 inference in JAX.")
    parser.add_argument("--version", action="version", version=f"qwen-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices

    p = sub.add_parser("convert", help="convert a checkpoint: HF safetensors -> qwen-jax (orbax), or back with --to hf")
    p.add_argument("src", help="source folder")
    p.add_argument("dst", help="destination folder (must not exist)")
    p.add_argument("--to", choices=("jax", "hf"), default="jax", help="target format (default jax)")
    # every cast convert_checkpoint takes (convert.CAST_DTYPES: the model dtypes; not imported, to keep --help quick)
    p.add_argument("--dtype", choices=MODEL_DTYPES[1:], default=None, help="cast weights (default: keep)")

    p = sub.add_parser("generate", help="generate text, streaming tokens as they come")
    p.add_argument("--model", required=True, help="HF checkpoint folder, converted folder, or hub repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="repeatable: prefill the prompt once, then answer each question after it in turn (the "
                        "prompt, a blank line, the question; with --chat, both in the user message)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "seq=4,tensor=2"')
    _add_model_options(p)
    _add_sampling(p)
    _add_distributed_options(p)

    p = sub.add_parser("passkey", help="passkey retrieval: a table of length x depth, and JSON")
    p.add_argument("--model", required=True, help="HF checkpoint folder, converted folder, or hub repo id")
    p.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens, e.g. 32k,128k")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "seq=4,tensor=2"')
    p.add_argument("--seed", type=int, default=0, help="seed of the random 5-digit keys")
    p.add_argument("--json", default=None, help="write the results here")
    _add_model_options(p)
    _add_distributed_options(p)

    p = sub.add_parser("recall", help="sparse prefill's attention recall per layer and head: table, JSON, PNG")
    p.add_argument("--model", required=True, help="HF checkpoint folder, converted folder, or hub repo id")
    p.add_argument("--length", required=True, help="prompt length in tokens, e.g. 128k (passkey-style filler)")
    p.add_argument("--prompt-file", default=None, help="use this text instead (cut to --length tokens)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="auto", help=DTYPE_HELP)
    p.add_argument("--json", default=None, help="write per-head recall and the summary here")
    p.add_argument("--png", default=None, help="write a layer x head heatmap here")
    p.add_argument("--save-selections", default=None, metavar="FILE.npz",
                   help="keep every layer's sparse selections here (for python -m qwen_jax.bench.sparse --selections)")
    _add_model_options(p, sparse_threshold_default="0 here: recall measures every prompt sparse")

    p = sub.add_parser("budgets", help="per-head sparse budgets (sparse_attention_config.json) from recall runs")
    p.add_argument("runs", nargs="+", metavar="RECALL.json",
                   help="qwen-jax recall --json files of one model and prompt, each run with other budgets")
    p.add_argument("--target", type=float, default=0.95, help="per-head recall to reach (default 0.95)")
    p.add_argument("--out", required=True, help="write the sparse_attention_config.json here")

    p = sub.add_parser("plan", help="per-device memory of a prefill (weights, KV cache, activations), before allocating")
    p.add_argument("--config", required=True, help="a preset (qwen2.5-7b-1m, qwen2.5-14b-1m, ...) or a checkpoint folder")
    p.add_argument("--tokens", required=True, help="prompt length, e.g. 1m or 524288")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mesh", default=None, help='e.g. "seq=4,tensor=2" (default: one device)')
    p.add_argument("--prefill-chunk", type=int, default=32768)
    p.add_argument("--dtype", choices=MODEL_DTYPES[1:], default="bfloat16")
    p.add_argument("--dense", action="store_true", help="plan dense prefill even where the config enables sparse")
    p.add_argument("--kv-cache-dtype", default="auto", choices=CACHE_DTYPE_NAMES,
                   help="KV cache storage (auto: the model dtype)")
    p.add_argument("--attention", default="pallas", choices=("pallas", "blockwise", "reference"),
                   help="the attention path planned: pallas (the GPU/TPU kernels; default), or blockwise / reference "
                        "as a CPU runs them (float32 copies of each layer's weights and cache)")
    p.add_argument("--device-memory", type=_size, default=None,
                   help="memory per device: GiB, or with a unit (79.6GiB: what an H100 80GB reports; 80GB is "
                        "80e9 bytes, 74.5GiB); default: what the first device reports, if it does")

    p = sub.add_parser("bench", help="benchmarks: prefill and long-context decode (random-weight "
                                     "architectures), attention kernels, sparse attention, generation, compile time, "
                                     "streamed text, prefix caching")
    p.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its arguments (qwen-jax bench WHICH --help)")

    p = sub.add_parser("demo", help="offline end-to-end demo on a small random-weight checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="prompt length (default 4096)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--workdir", default=None, help="keep the demo checkpoints in this folder")
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    return _read_text(args.prompt_file, "--prompt-file")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_convert(args) -> int:
    import signal

    from convert import convert_checkpoint
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _interrupt)      # a killed conversion removes its partial folder, as Ctrl-C does
    convert_checkpoint(args.src, args.dst, to=args.to, dtype=args.dtype)
    print(f"wrote {args.dst} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _check_sampling_flags(args) -> None:
    """The sampling flags given, ``--max-new-tokens`` and ``--seed``, checked before anything loads (the errors
    named by their flags)."""
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.generation import check_generation_args
    from qwen_jax.sampling import Sampling
    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    try:
        Sampling(**given)
        check_generation_args(max_new_tokens=args.max_new_tokens, seed=args.seed)
    except QwenJaxError as e:
        message = str(e)
        name = next((n for n in (*SAMPLING_DEFAULTS, "max_new_tokens", "seed") if message.startswith(n)), None)
        if name is not None:
            message = "--" + name.replace("_", "-") + message[len(name):]
        raise QwenJaxError(message) from None


def cmd_generate(args) -> int:
    from qwen_jax.errors import QwenJaxError
    if args.system is not None and not args.chat:
        raise QwenJaxError("--system needs --chat (the system message is part of the chat template)")
    for i, question in enumerate(args.question or []):
        if not question.strip():
            raise QwenJaxError(f"--question {i + 1} is empty")
    _check_sampling_flags(args)
    main_process = _start_distributed(args)
    text = _read_prompt(args)
    model = _load(args, mesh=args.mesh)
    prompt = text
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": text}]
    sampling = dict(SAMPLING_DEFAULTS, **(model.generation_config if args.generation_config else {}))
    sampling.update({name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None})
    write = (lambda row, delta: main_process and (sys.stdout.write(delta), sys.stdout.flush()))
    t0 = time.perf_counter()
    if args.question:
        from qwen_jax.prefix import needed_room
        prefix, prompts = _split_questions(model, prompt, args.question)
        longest = max(len(model.tokenizer.encode(p)) for p in prompts)
        cached = model.cache_prefix(prefix, reserve=needed_room(longest, args.max_new_tokens),
                                    progress=_prefill_bar(main_process))
        if main_process:
            print(f"[prompt prefilled once: {cached.length} tokens, {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        for prompt in prompts:
            t0 = time.perf_counter()
            model.generate(prompt, prefix=cached, max_new_tokens=args.max_new_tokens, **sampling, seed=args.seed,
                           stop=args.stop, on_text=write)
            if main_process:
                sys.stdout.write("\n\n")
                print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        return 0
    model.generate(prompt, max_new_tokens=args.max_new_tokens, **sampling, seed=args.seed, stop=args.stop,
                   on_text=write, progress=_prefill_bar(main_process))
    if main_process:
        sys.stdout.write("\n")
        print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


QUESTION_SEPARATOR = "\n\n"


def _split_questions(model, prompt, questions: list[str]) -> tuple[str, list[str]]:
    """``generate --question``: the text every question shares (the prompt and a blank line; for a chat, the
    template rendered up to there) and what follows it for each question."""
    from qwen_jax.errors import QwenJaxError
    if isinstance(prompt, str):
        return prompt + QUESTION_SEPARATOR, list(questions)
    shared = prompt[-1]["content"] + QUESTION_SEPARATOR
    rendered = [model.tokenizer.apply_chat_template(prompt[:-1] + [{"role": "user", "content": shared + q}],
                                                    add_generation_prompt=True) for q in questions]
    cut = rendered[0].find(shared)
    if cut < 0 or any(not r.startswith(rendered[0][:cut + len(shared)]) for r in rendered):
        raise QwenJaxError("this chat template does not render the user message as written, so the prompt cannot "
                           "be prefilled once for every --question")
    cut += len(shared)
    return rendered[0][:cut], [r[cut:] for r in rendered]


def cmd_passkey(args) -> int:
    main_process = _start_distributed(args)
    from qwen_jax import passkey
    from qwen_jax.bench import environment
    from qwen_jax.errors import QwenJaxError

    lengths = list(dict.fromkeys(passkey.parse_length(x) for x in args.lengths.split(",")))   # each once, in order
    try:
        depths = list(dict.fromkeys(float(x) for x in args.depths.split(",")))
    except ValueError:
        raise QwenJaxError(f"bad --depths {args.depths!r}: expected comma-separated numbers") from None
    if any(not 0 <= d <= 1 for d in depths):
        raise QwenJaxError("depths must lie in [0, 1]")
    if main_process:
        _check_outputs(json=args.json)
    model = _load(args, mesh=args.mesh)

    def show(r):
        if not main_process:
            return
        print(f"  {r['length']:>8} tokens, depth {r['depth']:.2f}: {'found' if r['found'] else 'MISSED'} "
              f"{r['key']} in {r['answer']!r} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)

    results = passkey.evaluate(model, lengths, depths, seed=args.seed, on_result=show,
                               progress=_prefill_bar(main_process))
    if not main_process:
        return 0
    print(passkey.table(results))
    if args.json:
        dca = model.config.dual_chunk_attention_config
        passkey.write_json(args.json, results, env=environment(), model=args.model, dtype=model.dtype.name,
                           dca=None if dca is None else {"chunk_size": dca.chunk_size, "local_size": dca.local_size,
                                                         "original_max_position_embeddings":
                                                             dca.original_max_position_embeddings,
                                                         "sparse": dca.sparse_attention_enabled,
                                                         "sparse_threshold": dca.sparse_attention_threshold},
                           attention={k: v for k, v in model.attention.__dict__.items() if k != "mesh"},
                           mesh=args.mesh, prefill_chunk=model.prefill_chunk_size,
                           kv_cache_dtype=model.kv_cache_dtype.name)
    return 0


def cmd_recall(args) -> int:
    import hashlib
    import json

    import numpy as np

    from qwen_jax import passkey, recall
    from qwen_jax.attention.sparse import layer_budgets as sparse_budgets
    from qwen_jax.bench import environment
    from qwen_jax.errors import QwenJaxError

    if not args.dca and not _checkpoint_dca(args):
        raise QwenJaxError("recall measures sparse prefill, which runs on dual chunk attention: pass --dca (this "
                           "checkpoint's config.json has none)")
    args.sparse = True
    if args.sparse_threshold is None:
        args.sparse_threshold = 0
    length = passkey.parse_length(args.length)
    _check_outputs(json=args.json, png=args.png, save_selections=args.save_selections)
    text = _read_text(args.prompt_file, "--prompt-file") if args.prompt_file else None
    if text is not None and not text.strip():
        raise QwenJaxError(f"--prompt-file {args.prompt_file} is empty")
    model = _load(args)
    if text is not None:
        tokens = model.tokenizer.encode(text)[:length]
        if len(tokens) < length:
            warnings.warn(f"--prompt-file {args.prompt_file} encodes to {len(tokens)} tokens, fewer than --length "
                          f"{args.length}: measuring those {len(tokens)}", stacklevel=2)
    else:
        tokens = passkey.build_prompt(model.tokenizer.encode, length, 0.5, 71432)
    whole = len(tokens) // 64 * 64
    if args.save_selections and whole < len(tokens):
        # the kernels that time saved selections (python -m qwen_jax.bench.sparse) take whole 64-token blocks
        print(f"measuring the first {whole} of the prompt's {len(tokens)} tokens: --save-selections keeps whole "
              f"64-token blocks", file=sys.stderr)
        tokens = tokens[:whole]
    threshold = model.config.dual_chunk_attention_config.sparse_attention_threshold
    if len(tokens) <= threshold:
        raise QwenJaxError(f"the prompt's {len(tokens)} tokens are not above the sparse threshold ({threshold}): "
                           f"nothing runs sparse, so there is no recall to measure (lower --sparse-threshold)")
    t0 = time.perf_counter()
    out = recall.measure(model.params, model.config, tokens, chunk_size=model.prefill_chunk_size,
                         spec=model.attention,
                         progress=lambda n: print(f"  {n}/{len(tokens)} tokens", file=sys.stderr, flush=True),
                         selections=bool(args.save_selections), cache_dtype=model.kv_cache_dtype)
    print(recall.table(out["recall"]))
    stats = recall.summary(out["recall"])
    tile_stats = {k: v for k, v in recall.summary(out["tiles"]).items() if not k.startswith("share")}
    print(json.dumps(stats))
    print("tile share (pairs in the key tiles a sparse kernel computes / dense causal pairs):", json.dumps(tile_stats))
    dca = model.config.dual_chunk_attention_config
    print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    # the JSON first: the smallest file, and what a later step (qwen-jax budgets) reads
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "model": args.model, "tokens": len(tokens), "summary": stats,
                       "tile share summary": tile_stats,
                       "dca": {"chunk_size": dca.chunk_size, "local_size": dca.local_size,
                               "original_max_position_embeddings": dca.original_max_position_embeddings,
                               "threshold": dca.sparse_attention_threshold,
                               "budgets": "file" if dca.sparse_attention_config else "default (1000, 6096)"},
                       "prefill chunk": model.prefill_chunk_size, "kv_cache_dtype": model.kv_cache_dtype.name,
                       "dtype": model.dtype.name,
                       # the prompt itself: budgets combine only runs of one prompt (not one length)
                       "prompt sha256": hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest(),
                       "head budgets": [list(zip(*sparse_budgets(dca, layer, model.config.num_attention_heads)))
                                        for layer in range(model.config.num_hidden_layers)],
                       "recall": np.nan_to_num(out["recall"], nan=-1).tolist(),
                       "tile share": np.nan_to_num(out["tiles"], nan=-1).tolist()}, f, indent=1)
    if args.save_selections:
        recall.save_selections(args.save_selections, out["selections"], tokens=len(tokens),
                               chunk=model.prefill_chunk_size, chunk_size=dca.chunk_size, local_size=dca.local_size,
                               heads=model.config.num_attention_heads, kv_heads=model.config.num_key_value_heads,
                               model=args.model)
    if args.png:
        recall.write_png(args.png, out["recall"])
    return 0


def cmd_budgets(args) -> int:
    import json
    import os

    from qwen_jax.budgets import combine
    from qwen_jax.errors import QwenJaxError
    _check_outputs(out=args.out)
    for run in args.runs:
        if os.path.realpath(run) == os.path.realpath(args.out):
            raise QwenJaxError(f"--out {args.out} is one of the recall runs it reads: write the budgets elsewhere")
    config, report = combine(args.runs, args.target)
    with open(args.out, "w") as f:
        json.dump(config, f)
    print(json.dumps(report, indent=1))
    print(f"wrote {args.out}: mean recall {report['mean recall']:.4f}, mean tile share {report['mean tile share']:.3f}, "
          f"{report['heads below target']} of {report['heads']} heads below {args.target}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    import os

    from qwen_jax import memory
    from qwen_jax.config import QwenConfig, read_config_json
    from qwen_jax.passkey import parse_length
    from qwen_jax.presets import PRESETS, preset_config

    tokens = parse_length(args.tokens)           # refuses fewer than one token
    _positive(args, "--batch", "--prefill-chunk")
    if args.config in PRESETS:
        config = preset_config(args.config)
    elif os.path.isdir(args.config):
        config = QwenConfig.from_hf_dict(read_config_json(args.config))
    else:
        from qwen_jax.errors import QwenJaxError
        raise QwenJaxError(f"--config {args.config!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder")
    capacity = args.device_memory or memory.device_capacity()
    from qwen_jax.cache import cache_dtype
    p = memory.plan(config, tokens=tokens, batch=args.batch, mesh=args.mesh, chunk_size=args.prefill_chunk,
                    dtype=args.dtype, cache_dtype=cache_dtype(args.kv_cache_dtype, args.dtype),
                    sparse=False if args.dense else None, attention=args.attention, capacity=capacity)
    print(f"{args.config}, {tokens} tokens, batch {args.batch}, mesh {args.mesh or 'one device'}, "
          f"prefill chunk {args.prefill_chunk}, kv cache {args.kv_cache_dtype}, {args.attention} attention: "
          f"{p.describe()}")
    memory.check(p, tokens=tokens, mesh=args.mesh, chunk_size=args.prefill_chunk)
    return 0


def cmd_bench(args) -> int:
    import importlib
    from qwen_jax.errors import QwenJaxError
    sys.argv[0] = f"qwen-jax bench {args.which}"     # the benchmarks' argparse names itself after argv[0]
    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _Parser.error      # the benchmark's own parser: usage errors in one line too
    try:
        return importlib.import_module(BENCHMARKS[args.which]).main(args.rest)
    except SystemExit as e:        # a benchmark's refusal, SystemExit("message"): the CLI's one line
        if isinstance(e.code, str):
            raise QwenJaxError(f"bench {args.which}: {e.code}") from None
        raise
    finally:
        argparse.ArgumentParser.error = error


def cmd_demo(args) -> int:
    from qwen_jax.demo import run_demo
    _positive(args, "--prompt-tokens", "--new-tokens")
    return run_demo(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, workdir=args.workdir)


def main(argv=None) -> int:
    from qwen_jax.distributed import exit_now, is_multiprocess
    from qwen_jax.errors import QwenJaxError

    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kw: f"qwen-jax: warning: {message}\n"   # one line each
    from qwen_jax import compile_cache
    compile_cache.enable()   # before anything compiles; QWEN_JAX_COMPILE_CACHE=off turns it off
    try:
        commands = {"convert": cmd_convert, "generate": cmd_generate, "passkey": cmd_passkey, "recall": cmd_recall,
                    "budgets": cmd_budgets, "plan": cmd_plan, "bench": cmd_bench, "demo": cmd_demo}
        return commands[args.command](args)
    except QwenJaxError as e:
        message, code = f"error: {e}", 1
    except BrokenPipeError:       # the reader went away (generate ... | head): stop quietly, as command-line tools do
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing more reaches the closed pipe
        if is_multiprocess():
            exit_now(1)          # the other processes may wait on this one in a collective
        return 1
    except OSError as e:  # unreadable prompt file, full disk, permissions
        message, code = f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    if not is_multiprocess():
        print(f"qwen-jax: {message}", file=sys.stderr)
        return code
    import jax
    print(f"qwen-jax: process {jax.process_index()} of {jax.process_count()}: {message}", file=sys.stderr)
    exit_now(code)   # the other processes may wait on this one in a collective: leave now, don't linger


if __name__ == "__main__":
    sys.exit(main())
