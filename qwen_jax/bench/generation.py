"""Prefill and decode tokens/s of qwen-jax against HF transformers, same model, same machine, same run.

    python -m qwen_jax.bench.generation --model PATH [--prompt-tokens 512] [--new-tokens 32] [--dtype float32]

Prefill: one forward over the prompt that fills the cache. Decode: greedy steps of one token with
the cache. Each figure is the median of ``--repeats`` runs after a warm-up (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def bench_qwen_jax(path, dtype, prompt, new_tokens, repeats):
    import jax
    import jax.numpy as jnp

    import qwen_jax
    from qwen_jax.bench import median_time
    from qwen_jax.cache import cache_length
    from qwen_jax.generation import decode_and_sample
    from qwen_jax.sampling import Sampling

    model = qwen_jax.load(path, dtype=dtype)
    cfg, params = model.config, model.params
    tokens = jnp.asarray(prompt)[None]
    lengths = jnp.asarray([prompt.size], jnp.int32)
    max_len = cache_length(prompt.size, new_tokens + 1)

    def run_prefill():
        cache = qwen_jax.init_cache(cfg, 1, max_len, jnp.dtype(dtype))
        logits, cache = qwen_jax.prefill(params, tokens, lengths, cache, cfg)
        jax.block_until_ready(logits)
        return logits, cache

    t_prefill = median_time(run_prefill, repeats)
    logits, cache = run_prefill()

    def run_decode():
        nonlocal cache
        tok, pos, c = jnp.argmax(logits, -1).astype(jnp.int32), lengths, cache
        for i in range(new_tokens):
            tok, c, _ = decode_and_sample(params, tok, pos + i, c, jax.random.key(0), cfg, model.attention,
                                          Sampling())
        jax.block_until_ready(tok)
        cache = c  # the cache was donated: keep the live buffer (slots past the prompt are rewritten each run)

    t_decode = median_time(run_decode, repeats)
    return prompt.size / t_prefill, new_tokens / t_decode


def bench_transformers(path, dtype, prompt, new_tokens, repeats):
    import torch
    from transformers import Qwen2ForCausalLM

    from qwen_jax.bench import median_time

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    ids = torch.tensor(prompt)[None]
    out = {}

    @torch.no_grad()
    def run_prefill():
        out["r"] = model(ids, use_cache=True)

    @torch.no_grad()
    def run_decode():
        r = model(ids, use_cache=True)
        past, tok = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            r = model(tok, past_key_values=past, use_cache=True)
            past, tok = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)

    t_prefill = median_time(run_prefill, repeats)
    t_total = median_time(run_decode, repeats)
    return prompt.size / t_prefill, new_tokens / max(t_total - t_prefill, 1e-9), torch.__version__


def main(argv=None) -> int:
    import os

    from qwen_jax.bench import environment, print_table, write_json
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: no such folder (give an HF checkpoint folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"--model {args.model}: not a checkpoint folder (no config.json)")
    if problem := below_one(args, "prompt_tokens", "new_tokens", "repeats") or output_problem(args.json):
        raise SystemExit(problem)

    text = open(__file__).read() * 20  # real text (this file), tokenised with the model's tokenizer
    prompt = np.asarray(Tokenizer(args.model).encode(text)[: args.prompt_tokens], np.int32)
    ours = bench_qwen_jax(args.model, args.dtype, prompt, args.new_tokens, args.repeats)
    hf_prefill, hf_decode, torch_version = bench_transformers(args.model, args.dtype, prompt, args.new_tokens,
                                                              args.repeats)
    env = dict(environment(), torch=torch_version)
    rows = [
        {"engine": "qwen-jax", "dtype": args.dtype, "prefill tok/s": f"{ours[0]:.1f}", "decode tok/s": f"{ours[1]:.2f}"},
        {"engine": "transformers", "dtype": args.dtype, "prefill tok/s": f"{hf_prefill:.1f}",
         "decode tok/s": f"{hf_decode:.2f}"},
    ]
    print(json.dumps(env))
    print(f"prompt {prompt.size} tokens, {args.new_tokens} decode steps, median of {args.repeats}")
    print_table(rows, ["engine", "dtype", "prefill tok/s", "decode tok/s"])
    write_json(args.json, {"env": env, "prompt_tokens": int(prompt.size), "new_tokens": args.new_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
