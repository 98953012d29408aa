"""Prefix caching benchmark: questions after one long document, the document prefilled once (``qwen_jax.prefix``)
against each question prefilled together with the whole document (the baseline), same model, same run.

    qwen-jax bench prefix --config qwen2.5-7b-1m --random-weights --tokens 128k [--questions 3]
                          [--question-tokens 64] [--new-tokens 32] [--mode sparse|dense] [--kv-cache-dtype fp8]
                          [--prefill-chunk 32768] [--json out.json]

Random token ids: the document, then the questions. The document's prefill is timed once (with a progress bar).
Then each way runs one question to compile and ``--questions`` more (the whole-prompt way after the prefix's cache
is freed, and ``--baseline-questions`` of them: 0 leaves that way out where two runs of the whole prompt cost too
much time), timed: the time to the first new token (the
question's prefill, or the whole prompt's, and the first pick, as ``generate`` runs them) and to all
``--new-tokens`` (EOS ignored), as medians. Each question's greedy tokens are compared between the two ways:
dense prefill gives the same tokens; sparse estimates the question's mask from its own chunk (``qwen_jax.prefix``),
so they may differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _parser() -> argparse.ArgumentParser:
    from qwen_jax.cache import CACHE_DTYPES
    p = argparse.ArgumentParser(prog="qwen-jax bench prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="architecture preset, e.g. qwen2.5-7b-1m")
    p.add_argument("--random-weights", action="store_true", help="required: the weights are random")
    p.add_argument("--tokens", default="128k", help="the document's length, e.g. 128k or 1m")
    p.add_argument("--questions", type=int, default=3, help="timed questions each way (one more compiles)")
    p.add_argument("--baseline-questions", type=int, default=None,
                   help="timed questions with the whole prompt (default: --questions; 0: that way is not run)")
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--mode", default="sparse", choices=["sparse", "dense"],
                   help="prefill with sparse attention on (every length) or off; needs a preset with DCA")
    p.add_argument("--prefill-chunk", type=int, default=32768)
    p.add_argument("--attention", default="auto", help="pallas (default on GPUs and TPUs), blockwise or reference")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto", choices=sorted(CACHE_DTYPES))
    p.add_argument("--json", help="write the results here")
    return p


def main(argv=None) -> int:
    from qwen_jax.bench import below_one, output_problem
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.passkey import parse_length

    args = _parser().parse_args(argv)
    if not args.random_weights:
        raise QwenJaxError("bench prefix runs an architecture with random weights: pass --random-weights")
    T = parse_length(args.tokens)
    if problem := (below_one(args, "questions", "question_tokens", "new_tokens", "prefill_chunk")
                   or output_problem(args.json)):
        raise QwenJaxError(problem)
    baseline = args.questions if args.baseline_questions is None else args.baseline_questions
    if baseline < 0:
        raise QwenJaxError(f"--baseline-questions {baseline}: must be at least 0")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen_jax.attention import AttentionSpec
    from qwen_jax.bench import environment, report
    from qwen_jax.bench.prefill import mode_config, progress_bar
    from qwen_jax.cache import cache_dtype
    from qwen_jax.generation import generate_ids
    from qwen_jax.model import init_params
    from qwen_jax.prefix import cache_prefix, needed_room
    from qwen_jax.presets import preset_config

    config = preset_config(args.config)
    if config.dual_chunk_attention_config is not None:
        config = mode_config(config, args.mode)
    elif args.mode == "sparse":
        raise QwenJaxError(f"{args.config} has no dual_chunk_attention_config, so no sparse prefill: pass --mode dense")
    dtype = jnp.dtype(args.dtype)
    kv_dtype = cache_dtype(args.kv_cache_dtype, dtype)
    spec = AttentionSpec.of(args.attention)
    params = init_params(config, jax.random.key(0), dtype=dtype)
    rng = np.random.default_rng(0)
    document = rng.integers(0, config.vocab_size, T).tolist()
    questions = [rng.integers(0, config.vocab_size, args.question_tokens).tolist()
                 for _ in range(max(args.questions, baseline) + 1)]

    bar = progress_bar(T, f"{args.mode} prefill of the document")
    t0 = time.perf_counter()
    prefix = cache_prefix(params, config, document, reserve=needed_room(args.question_tokens, args.new_tokens),
                          spec=spec, prefill_chunk_size=args.prefill_chunk, cache_dtype=kv_dtype,
                          progress=lambda done, total: bar(min(done, T)))
    jax.block_until_ready(prefix.cache)
    prefix_s = time.perf_counter() - t0

    def ask(question, cached: bool):
        """(seconds to the first new token, to the last, the tokens)."""
        marks = []
        t0 = time.perf_counter()
        ids = generate_ids(params, config, [question if cached else document + question],
                           max_new_tokens=args.new_tokens, decode=lambda ids: "x" * len(ids),
                           on_text=lambda row, text: marks.append(time.perf_counter()), spec=spec,
                           prefill_chunk_size=args.prefill_chunk, cache_dtype=kv_dtype,
                           prefix=prefix if cached else None)[0]
        return marks[0] - t0, time.perf_counter() - t0, ids

    rows, tokens = [], {}
    for way, cached, n in (("prefix cached once", True, args.questions), ("whole prompt each time", False, baseline)):
        if not n:
            continue
        if not cached:
            prefix = None                # its cache freed: the whole prompt's cache is as large
        ask(questions[0], cached)                                     # compiles
        runs = [ask(q, cached) for q in questions[1:n + 1]]
        tokens[way] = [r[2] for r in runs]
        rows.append({"way": way, "document tokens": T, "question tokens": args.question_tokens,
                     "new tokens": args.new_tokens, "mode": args.mode, "kv cache": str(kv_dtype),
                     "TTFT s": round(statistics.median(r[0] for r in runs), 3),
                     "answer s": round(statistics.median(r[1] for r in runs), 3),
                     "document prefill s": round(prefix_s, 2) if cached else None})
        print(json.dumps(rows[-1]), flush=True)
    if len(tokens) == 2:
        same = [a == b for a, b in zip(*tokens.values())]
        for row in rows:
            row["same tokens"] = f"{sum(same)}/{len(same)}"
    report(args, rows, environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
