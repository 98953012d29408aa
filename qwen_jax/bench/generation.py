"""Prefill and decode tokens/s of qwen-jax against HF transformers, same weights, same machine, same run.

    python -m qwen_jax.bench.generation (--model PATH | --config qwen2.5-7b --random-weights)
                                        [--prompt-tokens 512] [--new-tokens 32] [--dtype auto]
                                        [--transformers-static] [--float32-reference] [--json out.json]

Prefill: one forward over the prompt that fills the cache. Decode: greedy steps of one token with the cache
(qwen-jax: blocks of ``DECODE_BLOCK`` steps, ``decode_block``, as ``generate`` runs them; transformers: the model called on one token with
its ``past_key_values``, as its ``generate`` loop does; its prompt's logits at the last token only,
``logits_to_keep=1``, as its ``generate`` asks and as qwen-jax's prefill computes). Each figure is the median
of ``--repeats`` runs after a warm-up (compilation excluded). On a GPU both run there (transformers through
CUDA torch with its default attention, SDPA), one after the other in this process: JAX allocates as it goes
instead of taking most of the card up front. ``--dtype auto`` is ``qwen_jax.load``'s choice (bfloat16 on a
GPU, float32 on a CPU), and transformers runs in the same dtype. Reported too: the first greedy tokens of
each and how far apart the prompt's last-token logits are (largest difference, against the largest logit and
the top-1 margin): random weights give nearly flat logits, whose argmax bfloat16 rounding can flip.
``--transformers-static`` adds a third row: transformers' own ``generate`` with a static cache, whose decoding
step transformers compiles itself on a GPU (``torch.compile`` with CUDA graphs; prefill: a one-token
``generate``, decode: the rest of one of ``--new-tokens + 1``; three warm-up calls each).

``--model``: an HF checkpoint folder; the prompt is real text (this file) in its tokenizer. ``--config NAME
--random-weights``: an exact architecture (``qwen_jax.presets``; a DCA block is left out, as transformers has no
DCA) with random weights, drawn by transformers on the benchmark's device and written once to a temporary HF
folder that both engines load (so they run the same weights); the prompt is random token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

TOKENS_SHOWN = 8   # greedy tokens reported per engine


def bench_qwen_jax(path, dtype, prompt, new_tokens, repeats):
    """(prefill tokens/s, decode tokens/s, greedy tokens, dtype name, the prompt's last logits)."""
    import jax
    import jax.numpy as jnp

    import qwen_jax
    from qwen_jax.bench import median_time
    from qwen_jax.cache import cache_length
    from qwen_jax.generation import DECODE_BLOCK, decode_block
    from qwen_jax.sampling import Sampling

    model = qwen_jax.load(path, dtype=dtype)
    cfg, params, spec = model.config, model.params, model.attention
    tokens = jnp.asarray(prompt)[None]
    lengths = jnp.asarray([prompt.size], jnp.int32)
    blocks = -(-new_tokens // DECODE_BLOCK)
    max_len = cache_length(prompt.size, blocks * DECODE_BLOCK + 1)

    def run_prefill():
        cache = qwen_jax.init_cache(cfg, 1, max_len, model.kv_cache_dtype)
        logits, cache = qwen_jax.prefill(params, tokens, lengths, cache, cfg, spec=spec)
        jax.block_until_ready(logits)
        return logits, cache

    t_prefill = median_time(run_prefill, repeats)
    logits, cache = run_prefill()
    shown = []

    def run_decode():
        nonlocal cache
        tok, c, out = jnp.argmax(logits, -1).astype(jnp.int32), cache, []
        key, first = jax.random.key(0), np.arange(blocks, dtype=np.int32) * DECODE_BLOCK + 1
        positions = [np.asarray(lengths) + f - 1 for f in first]
        out.append(tok[None])
        for b in range(blocks):
            block, tok, c, _ = decode_block(params, tok, positions[b], c, key, first[b], cfg, spec, Sampling(),
                                            steps=DECODE_BLOCK)
            out.append(block)
        jax.block_until_ready(tok)
        row0 = np.concatenate([np.asarray(b)[:, 0] for b in out])
        shown[:] = [int(t) for t in row0[:min(TOKENS_SHOWN, new_tokens)]]
        cache = c  # the cache was donated: keep the live buffer (slots past the prompt are rewritten each run)

    t_decode = median_time(run_decode, repeats)
    return prompt.size / t_prefill, blocks * DECODE_BLOCK / t_decode, shown, model.dtype.name, np.asarray(logits[0], np.float32)


def _transformers_model(path, dtype: str, device: str):
    """transformers' ``Qwen2ForCausalLM`` of the folder ``path``, in ``dtype`` ("float32" or "bfloat16"), on
    ``device``, in inference mode."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()


def bench_transformers(path, dtype, prompt, new_tokens, repeats, device):
    """(prefill tokens/s, decode tokens/s, greedy tokens, torch version, the prompt's last logits)."""
    import torch

    from qwen_jax.bench import median_time

    model = _transformers_model(path, dtype, device)
    ids = torch.tensor(prompt, device=device)[None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shown, last = [], []

    @torch.no_grad()
    def run_prefill():
        last[:] = [model(ids, use_cache=True, logits_to_keep=1).logits[0, -1]]
        sync()

    @torch.no_grad()
    def run_decode():
        r = model(ids, use_cache=True, logits_to_keep=1)
        past, tok, out = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True), []
        for _ in range(new_tokens):
            out.append(tok)
            r = model(tok, past_key_values=past, use_cache=True)
            past, tok = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        shown[:] = [int(t[0, 0]) for t in out[:TOKENS_SHOWN]]

    t_prefill = median_time(run_prefill, repeats)
    t_total = median_time(run_decode, repeats)
    return (prompt.size / t_prefill, new_tokens / max(t_total - t_prefill, 1e-9), shown, torch.__version__,
            last[0].float().cpu().numpy())


def bench_transformers_static(path, dtype, prompt, new_tokens, repeats, device):
    """transformers' ``generate`` with a static cache (``cache_implementation="static"``), which on a GPU compiles
    its decoding step itself (``torch.compile``, CUDA graphs). Prefill: ``generate`` of one token; decode: the rest
    of ``generate`` of ``new_tokens + 1`` tokens; three warm-up calls each. (prefill tokens/s, decode tokens/s,
    greedy tokens)."""
    import torch

    from qwen_jax.bench import median_time

    model = _transformers_model(path, dtype, device)
    ids = torch.tensor(prompt, device=device)[None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}

    def run(n):
        with torch.no_grad():
            out[n] = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, top_k=None, top_p=None,
                                    temperature=None, cache_implementation="static")
        sync()

    t_one = median_time(lambda: run(1), repeats, warmup=3)
    t_all = median_time(lambda: run(new_tokens + 1), repeats, warmup=3)
    shown = out[new_tokens + 1][0, prompt.size:prompt.size + min(TOKENS_SHOWN, new_tokens)].tolist()
    return prompt.size / t_one, new_tokens / max(t_all - t_one, 1e-9), shown


def float32_logits(path, prompt, device):
    """The prompt's last-token logits from transformers in float32 (no TF32): the reference both engines'
    bfloat16 logits are compared with (``--float32-reference``)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _transformers_model(path, "float32", device)
    with torch.no_grad():
        return model(torch.tensor(prompt, device=device)[None], logits_to_keep=1).logits[0, -1].cpu().numpy()


def write_random_checkpoint(preset: str, folder: str, device: str) -> None:
    """An HF folder (config.json, model.safetensors) of ``preset``'s architecture with transformers' own random
    initialisation, drawn on ``device``, in bfloat16 (both engines cast it to the benchmark's dtype)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_jax.presets import PRESETS

    fields = {k: v for k, v in PRESETS[preset].items() if k != "dual_chunk_attention_config"}
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**fields)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def _parse(argv):
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an HF checkpoint folder")
    src.add_argument("--config", help=f"an architecture with random weights (with --random-weights): "
                                      f"{', '.join(sorted(PRESETS))}")
    p.add_argument("--random-weights", action="store_true", help="with --config: transformers' random initialisation")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: qwen_jax.load's choice (bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt (--random-weights)")
    p.add_argument("--transformers-static", action="store_true",
                   help="also time transformers' generate with a static cache (compiled by transformers on a GPU)")
    p.add_argument("--float32-reference", action="store_true",
                   help="also compare both engines' last-token logits with transformers' in float32")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if args.model is not None:
        if args.random_weights:
            raise SystemExit("--random-weights goes with --config, not --model")
        if not os.path.isdir(args.model):
            raise SystemExit(f"--model {args.model}: no such folder (give an HF checkpoint folder)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SystemExit(f"--model {args.model}: not a checkpoint folder (no config.json)")
        if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
            raise SystemExit(f"--model {args.model}: no tokenizer.json, and the prompt is text in the model's "
                             f"tokenizer (random weights: --config NAME --random-weights)")
    else:
        if args.config not in PRESETS:
            raise SystemExit(f"--config {args.config!r}: choose one of {', '.join(sorted(PRESETS))}")
        if not args.random_weights:
            raise SystemExit("--config needs --random-weights (the only weights a preset has)")
    if problem := below_one(args, "prompt_tokens", "new_tokens", "repeats") or output_problem(args.json):
        raise SystemExit(problem)
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    # two engines on one card: JAX takes memory as it needs it instead of most of the card up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch
    import transformers

    from qwen_jax.bench import environment, print_table, write_json
    from qwen_jax.tokenizer import Tokenizer

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="qwen-jax-bench-") as tmp:
        if args.model is not None:
            path = args.model
            text = open(__file__).read() * 20  # real text (this file), tokenised with the model's tokenizer
            ids = Tokenizer(path).encode(text)
            if len(ids) < args.prompt_tokens:
                raise SystemExit(f"--prompt-tokens {args.prompt_tokens}: the benchmark's text gives {len(ids)} tokens")
            prompt = np.asarray(ids[: args.prompt_tokens], np.int32)
        else:
            path = os.path.join(tmp, args.config)
            write_random_checkpoint(args.config, path, device)
            vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
            prompt = np.random.default_rng(args.seed).integers(0, vocab, args.prompt_tokens).astype(np.int32)
        ours = bench_qwen_jax(path, args.dtype, prompt, args.new_tokens, args.repeats)
        dtype = ours[3]
        hf = bench_transformers(path, dtype, prompt, args.new_tokens, args.repeats, device)
        static = (bench_transformers_static(path, dtype, prompt, args.new_tokens, args.repeats, device)
                  if args.transformers_static else None)
        reference = float32_logits(path, prompt, device) if args.float32_reference else None
    env = dict(environment(), torch=hf[3], transformers=transformers.__version__,
               torch_device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    rows = [
        {"engine": "qwen-jax", "dtype": dtype, "prefill tok/s": f"{ours[0]:.1f}", "decode tok/s": f"{ours[1]:.2f}",
         "greedy tokens": " ".join(map(str, ours[2]))},
        {"engine": "transformers", "dtype": dtype, "prefill tok/s": f"{hf[0]:.1f}", "decode tok/s": f"{hf[1]:.2f}",
         "greedy tokens": " ".join(map(str, hf[2]))},
    ]
    if static is not None:
        rows.append({"engine": "transformers generate, static cache", "dtype": dtype,
                     "prefill tok/s": f"{static[0]:.1f}", "decode tok/s": f"{static[1]:.2f}",
                     "greedy tokens": " ".join(map(str, static[2]))})
    same = sum(a == b for a, b in zip(ours[2], hf[2]))
    # the prompt's last logits: how far apart the engines are, against the logits' own scale and the top-1 margin
    diff, scale = float(np.max(np.abs(ours[4] - hf[4]))), float(np.max(np.abs(hf[4])))
    top2 = np.sort(hf[4])[-2:]
    logits = {"max abs difference": diff, "max abs logit": scale, "transformers top-1 margin": float(top2[1] - top2[0]),
              "top-1 equal": bool(np.argmax(ours[4]) == np.argmax(hf[4]))}
    if reference is not None:
        for name, got in (("qwen-jax", ours[4]), ("transformers", hf[4])):
            logits[f"{name} max abs difference from float32"] = float(np.max(np.abs(got - reference)))
        logits["float32 top-1 equal (qwen-jax, transformers)"] = [bool(np.argmax(x) == np.argmax(reference))
                                                                 for x in (ours[4], hf[4])]
    print(json.dumps(env))
    print(f"{args.model or args.config + ' (random weights)'}: prompt {prompt.size} tokens, {args.new_tokens} decode "
          f"steps, median of {args.repeats}; first {len(ours[2])} greedy tokens equal at {same}")
    print(f"last-token logits: max |qwen-jax - transformers| {diff:.3g} (largest |logit| {scale:.3g}; transformers' "
          f"top-1 margin {logits['transformers top-1 margin']:.3g}); top-1 equal: {logits['top-1 equal']}")
    if reference is not None:
        print(f"against transformers in float32: max |qwen-jax - float32| "
              f"{logits['qwen-jax max abs difference from float32']:.3g}, max |transformers - float32| "
              f"{logits['transformers max abs difference from float32']:.3g}; top-1 equal to float32's "
              f"(qwen-jax, transformers): {logits['float32 top-1 equal (qwen-jax, transformers)']}")
    print_table(rows, ["engine", "dtype", "prefill tok/s", "decode tok/s", "greedy tokens"])
    write_json(args.json, {"env": env, "model": args.model or f"{args.config} (random weights)",
                           "prompt_tokens": int(prompt.size), "new_tokens": args.new_tokens, "args": vars(args),
                           "greedy tokens equal": same, "last-token logits": logits, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
