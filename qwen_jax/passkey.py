"""Passkey retrieval, the standard long-context check (format of ../reference qwen25_1m.md section 5).

The prompt is a task line and a blank line, the filler group repeated to the target length with the
needle ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` inserted at a depth (fraction
of the filler), then a blank line and ``What is the pass key? The pass key is``. Greedy decoding of
8 tokens must contain the key.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable, Sequence

import numpy as np

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def parse_length(text: str) -> int:
    """"32k" -> 32768, "1m" -> 1048576, "5000" -> 5000; refuses lengths below one token and a fraction
    of a token without a suffix ("1.5" was taken as 1)."""
    from qwen_jax.errors import QwenJaxError
    t = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        number = float(t[:-1] if scale > 1 else t)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number * scale < 1 or (scale == 1 and number != int(number)):
        raise QwenJaxError(f"bad length {text!r}: use a number of tokens >= 1 (a whole one without a k or m suffix; "
                           f"e.g. 5000, 32k, 1.5k, 1m)")
    return int(number * scale)


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens (within one filler group of it)."""
    head = encode(TASK + "\n\n")
    tail = encode("\n\n" + QUESTION)
    needle = encode(NEEDLE.format(key=key))
    group = encode(FILLER + " ")
    n_groups = max((length - len(head) - len(tail) - len(needle)) // len(group), 1)
    before = int(round(n_groups * depth))
    return head + group * before + needle + group * (n_groups - before) + tail


def shortest(encode: Callable[[str], list[int]]) -> int:
    """The fewest tokens a passkey prompt takes: the task, one filler group, the needle (its longest key) and the
    question."""
    return len(build_prompt(encode, 0, 0.5, 99999))


def evaluate(model, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS, *, seed: int = 0,
             max_new_tokens: int = 8, on_result: Callable[[dict], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Run every (length, depth) prompt through ``model`` (a ``qwen_jax.Model``, its KV cache dtype included);
    one result dict each. ``progress(done, total)``: each prompt's prefill (``generate_ids``)."""
    from qwen_jax.errors import QwenJaxError
    from qwen_jax.generation import generate_ids

    if min(lengths) < (floor := shortest(model.tokenizer.encode)):
        raise QwenJaxError(f"a passkey prompt takes at least {floor} tokens with this tokenizer (the task, one filler "
                           f"group, the needle and the question); asked {min(lengths)}")
    rng = np.random.default_rng(seed)
    results = []
    for length in lengths:
        for depth in depths:
            key = int(rng.integers(10000, 100000))
            prompt = build_prompt(model.tokenizer.encode, length, depth, key)
            t0 = time.perf_counter()
            ids = generate_ids(model.params, model.config, [prompt], max_new_tokens=max_new_tokens,
                               eos_ids=model.eos_token_ids, spec=model.attention,
                               prefill_chunk_size=model.prefill_chunk_size, cache_dtype=model.kv_cache_dtype,
                               progress=progress)[0]
            seconds = time.perf_counter() - t0
            answer = model.tokenizer.decode(ids)
            result = {"length": length, "tokens": len(prompt), "depth": depth, "key": key, "answer": answer,
                      "found": str(key) in answer, "seconds": round(seconds, 3)}
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def table(results: list[dict]) -> str:
    """Length x depth grid of found / missed, with a score and the mean seconds per prompt per length."""
    lengths = list(dict.fromkeys(r["length"] for r in results))
    depths = list(dict.fromkeys(r["depth"] for r in results))
    lines = ["length   " + " ".join(f"{d:>5}" for d in depths) + "   score   s/prompt"]
    for length in lengths:
        row = {r["depth"]: r for r in results if r["length"] == length}
        score = sum(r["found"] for r in row.values())
        secs = np.mean([r["seconds"] for r in row.values()])
        lines.append(f"{length:<8} " + " ".join(f"{'ok' if row[d]['found'] else 'MISS':>5}" for d in depths)
                     + f"   {score}/{len(row)}     {secs:.1f}")
    return "\n".join(lines)


def write_json(path: str, results: list[dict], **info) -> None:
    text = json.dumps({**info, "results": results}, indent=2)    # whole before the file opens: nothing half-written
    with open(path, "w") as f:
        f.write(text)
