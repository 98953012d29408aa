"""``qwen-jax bench prefill`` on a tiny random-weight architecture: both modes run (each in a process of
its own), report, and agree where the sparse budgets cover every key."""

import json

from qwen_jax.cli import main


def test_bench_prefill_reports_both_modes(tmp_path, capfd):
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--config", "tiny-1m", "--random-weights", "--tokens", "2048",
                 "--prefill-chunk", "1024", "--attention", "blockwise", "--dtype", "float32", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sparse", "dense"}
    for r in rows.values():
        assert r["tokens"] == 2048 and r["TTFT s"] > 0 and r["tokens/s"] > 0 and r["planned GiB"] > 0
        assert r["compilations in the timed prefill"] == 0       # the compile chunk's program serves every chunk
    assert rows["sparse"]["next token"] == rows["dense"]["next token"]   # default budgets cover 2048 keys
    captured = capfd.readouterr()               # the modes' own processes write to the same files
    assert "sparse prefill [" in captured.err and "2048/2048 tokens" in captured.err
    assert "sparse over dense" in captured.out
    assert main(["bench", "prefill", "--config", "tiny-1m", "--tokens", "2048"]) == 1   # no --random-weights
    assert "pass --random-weights" in capfd.readouterr().err
    assert main(["bench", "prefill", "--config", "tiny-1m", "--random-weights", "--tokens", "2048",
                 "--modes", "dense,fast"]) == 1             # refused before any mode runs
    captured = capfd.readouterr()
    assert "unknown mode 'fast'" in captured.err and "dense prefill [" not in captured.err


def test_each_mode_runs_with_every_option_given():
    from qwen_jax.bench.prefill import _child_argv, _parser
    given = ["--config", "qwen2.5-7b-1m", "--random-weights", "--tokens", "1m", "--modes", "sparse,dense",
             "--prefill-chunk", "16384", "--attention", "blockwise", "--dtype", "float32", "--mesh", "seq=2",
             "--kv-cache-dtype", "fp8", "--peak-tflops", "700", "--device-memory", "79.5", "--json", "all.json"]
    args = _parser().parse_args(given)
    child = _child_argv(args, "dense", "/tmp/dense.json")
    assert child[:2] == ["bench", "prefill"]
    assert vars(_parser().parse_args(child[2:])) == {**vars(args), "modes": "dense", "json": "/tmp/dense.json"}


def test_a_mode_the_planner_refuses_ends_the_run_with_its_reason(tmp_path, capfd):
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--config", "tiny-1m", "--random-weights", "--tokens", "2048",
                 "--attention", "blockwise", "--device-memory", "0.5", "--json", str(out)]) == 1
    err = capfd.readouterr().err
    assert "qwen-jax: error: prefill of 2048 tokens needs" in err and "GiB short" in err
    assert "sparse prefill [" not in err and not out.exists()      # refused before running; no partial report


def test_several_modes_leave_the_devices_to_their_processes():
    """The parent process never starts a JAX backend: on a GPU it would hold the memory its modes'
    processes need."""
    import subprocess
    import sys
    code = ("import sys; from qwen_jax.cli import main; from jax._src import xla_bridge\n"
            "assert main(['bench', 'prefill', '--config', 'tiny-1m', '--random-weights', '--tokens', '1024', "
            "'--prefill-chunk', '512', '--attention', 'blockwise', '--dtype', 'float32']) == 0\n"
            "print('backend started:', xla_bridge.backends_are_initialized(), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparse over dense" in done.stdout and "backend started: False" in done.stderr
