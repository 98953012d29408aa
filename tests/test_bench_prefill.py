"""``qwen-jax bench prefill`` on a tiny random-weight architecture: both modes run, report, and agree
where the sparse budgets cover every key."""

import json

from qwen_jax.cli import main


def test_bench_prefill_reports_both_modes(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--config", "tiny-1m", "--random-weights", "--tokens", "2048",
                 "--prefill-chunk", "1024", "--attention", "blockwise", "--dtype", "float32", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sparse", "dense"}
    for r in rows.values():
        assert r["tokens"] == 2048 and r["TTFT s"] > 0 and r["tokens/s"] > 0 and r["planned GiB"] > 0
        assert r["compilations in the timed prefill"] == 0       # the compile chunk's program serves every chunk
    assert rows["sparse"]["next token"] == rows["dense"]["next token"]   # default budgets cover 2048 keys
    captured = capsys.readouterr()
    assert "sparse prefill [" in captured.err and "2048/2048 tokens" in captured.err
    assert "sparse over dense" in captured.out
    assert main(["bench", "prefill", "--config", "tiny-1m", "--tokens", "2048"]) == 1   # no --random-weights
    assert "pass --random-weights" in capsys.readouterr().err
