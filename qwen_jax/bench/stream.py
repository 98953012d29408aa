"""Host time per generated token of the streamed text and stop-string checks, with a checkpoint's tokenizer.

    qwen-jax bench stream --model PATH [--tokens 512,2048,8192] [--stop "<stop>"] [--json out.json]

``generate`` turns each row's tokens into text as they come (for ``on_text`` and stop strings). Timed here, on
the host alone, for rows of each length (real text: this package's source, tokenized): ``StopChecker.push`` a
token at a time (decoding only the tokens since the last whole character; what ``generate`` runs), against
decoding the whole row at every token and cutting it at the stop string (what it ran before). Reported: ms
per token over the row, and over its last 64 tokens.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


def _per_token_ms(push, ids) -> tuple[float, float]:
    """(mean ms a token over the row, mean over its last 64 tokens) of ``push(i)`` for i = 1..len(ids)."""
    marks = [time.perf_counter()]
    for i in range(1, len(ids) + 1):
        push(i)
        marks.append(time.perf_counter())
    tail = min(64, len(ids))
    return (marks[-1] - marks[0]) / len(ids) * 1e3, (marks[-1] - marks[-1 - tail]) / tail * 1e3


def main(argv=None) -> int:
    from qwen_jax.api import resolve_checkpoint
    from qwen_jax.bench import output_problem, report
    from qwen_jax.generation import StopChecker, truncate_at_stop
    from qwen_jax.passkey import parse_length
    from qwen_jax.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="qwen-jax bench stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint folder with tokenizer.json")
    p.add_argument("--tokens", default="512,2048,8192", help="row lengths, comma-separated")
    p.add_argument("--stop", default="<stop>", help="a stop string (one that the text does not hold)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    lengths = [parse_length(x) for x in args.tokens.split(",")]
    if problem := output_problem(args.json):
        raise SystemExit(problem)
    tok = Tokenizer(resolve_checkpoint(args.model))      # a missing folder: "no such folder", not "no tokenizer.json"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "".join(open(f).read() for f in sorted(glob.glob(os.path.join(here, "*.py"))))
    ids = tok.encode(text)
    while len(ids) < max(lengths):
        ids = ids + ids
    rows = []
    for n in lengths:
        row = ids[:n]
        checker = StopChecker(tok.decode, [args.stop])
        inc = _per_token_ms(lambda i, row=row, checker=checker: checker.push(row[i - 1]), row)
        whole = _per_token_ms(lambda i, row=row: truncate_at_stop(tok.decode(row[:i]), [args.stop]), row)
        rows.append({"tokens": n, "incremental ms/token": round(inc[0], 4), "last 64": round(inc[1], 4),
                     "whole-row ms/token": round(whole[0], 4), "whole-row last 64": round(whole[1], 4)})
        print(json.dumps(rows[-1]), flush=True)
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
