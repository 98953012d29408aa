"""``qwen-jax bench prefill`` on a tiny random-weight architecture: both modes run (each in a process of
its own), report, and agree where the sparse budgets cover every key."""

import json
import sys

import pytest

from qwen_jax.cli import main


def test_bench_prefill_reports_both_modes(tmp_path, capfd):
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--config", "tiny-1m", "--random-weights", "--tokens", "2048",
                 "--prefill-chunk", "1024", "--dtype", "float32", "--json", str(out)]) == 0
    # (no --attention: auto, blockwise on a CPU; the default was pallas, and the dense mode failed here)
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
    code = ("import sys; from qwen_jax.cli import main; from jax._src import xla_bridge\n"
            "assert main(['bench', 'prefill', '--config', 'tiny-1m', '--random-weights', '--tokens', '1024', "
            "'--prefill-chunk', '512', '--attention', 'blockwise', '--dtype', 'float32']) == 0\n"
            "print('backend started:', xla_bridge.backends_are_initialized(), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparse over dense" in done.stdout and "backend started: False" in done.stderr


# ----------------------------------------------------------------------------- refusals before any work


def _refusal(module: str, argv: list[str]) -> str:
    """A benchmark's one-line refusal of ``argv``: its SystemExit message or QwenJaxError."""
    import importlib

    from qwen_jax.errors import QwenJaxError
    with pytest.raises((SystemExit, QwenJaxError)) as caught:
        importlib.import_module(module).main(argv)
    error = caught.value
    return str(error.code if isinstance(error, SystemExit) else error)


def _no_work(monkeypatch):
    """Make every benchmark's first piece of real work fail the test."""
    import subprocess

    import qwen_jax.bench
    import qwen_jax.bench.compile
    import qwen_jax.bench.generation
    import qwen_jax.bench.sparse
    import qwen_jax.model

    def work(*args, **kwargs):
        raise AssertionError("a refused benchmark started its work")

    monkeypatch.setattr(subprocess, "call", work)                       # prefill: the modes' processes
    monkeypatch.setattr(qwen_jax.model, "init_params", work)            # prefill: one mode
    monkeypatch.setattr(qwen_jax.bench.compile, "step_times", work)
    monkeypatch.setattr(qwen_jax.bench.sparse, "_inputs", work)
    monkeypatch.setattr(qwen_jax.bench.generation, "bench_qwen_jax", work)
    monkeypatch.setattr(qwen_jax.bench.generation, "write_random_checkpoint", work)
    monkeypatch.setattr(qwen_jax.bench, "median_time", work)            # attention


PREFILL = ["--config", "tiny-1m", "--random-weights", "--tokens", "2048"]
COMPILE = ["--config", "tiny-1m", "--tokens", "2048"]
ATTENTION = ["--lengths", "64", "--no-cudnn", "--kernels", "triton:64:64:1"]


def _bad_arguments(tmp_path, hf_folder):
    import jax
    missing = str(tmp_path / "no" / "such" / "folder" / "out.json")
    return [
        ("pallas_kernels.bench", [*ATTENTION, "--dca", "chunk_size=256,local_size=64"], "--dca 262144,8192"),
        ("pallas_kernels.bench", [*ATTENTION, "--repeats", "0"], "--repeats 0: must be at least 1"),
        ("pallas_kernels.bench", [*ATTENTION, "--json", missing], "does not exist"),
        ("qwen_jax.bench.sparse", ["--dca", "chunk_size=256,local_size=64"], "--dca 262144,8192"),
        ("qwen_jax.bench.sparse", ["--dca", "256,256"], "local_size < chunk_size"),
        ("qwen_jax.bench.sparse", ["--budgets", "x"], "bad --budgets 'x'"),
        ("qwen_jax.bench.sparse", ["--chunk", "0"], "--chunk 0: must be at least 1"),
        ("qwen_jax.bench.sparse", ["--json", missing], "does not exist"),
        *([("qwen_jax.bench.sparse", ["--lengths", "1k"], "pass --no-dense"),       # a CPU: no cuDNN, no kernels
           ("qwen_jax.bench.sparse", ["--lengths", "1k", "--no-dense"], "pass --interpret --kernels triton")]
          if jax.default_backend() != "gpu" else []),
        ("qwen_jax.bench.sparse", ["--selections", missing, "--lengths", "1m", "--chunk", "131072"],
         "--selections takes the lengths, prefill chunk, DCA and inputs from its file: drop --lengths, --chunk"),
        ("qwen_jax.bench.prefill", [*PREFILL, "--json", missing], "does not exist"),
        ("qwen_jax.bench.prefill", [*PREFILL, "--modes", "dense", "--json", str(tmp_path)], "is a folder"),
        ("qwen_jax.bench.prefill", [*PREFILL[:-1], "0"], "bad length '0'"),
        ("qwen_jax.bench.prefill", [*PREFILL[:-1], "-5"], "bad length '-5'"),
        ("qwen_jax.bench.prefill", [*PREFILL, "--prefill-chunk", "0"], "--prefill-chunk 0: must be at least 1"),
        ("qwen_jax.bench.compile", [*COMPILE, "--json", missing], "does not exist"),
        ("qwen_jax.bench.generation", ["--model", str(tmp_path / "nonexistent")], "no such folder"),
        ("qwen_jax.bench.generation", ["--model", str(tmp_path)], "not a checkpoint folder"),
        ("qwen_jax.bench.generation", ["--model", str(tmp_path / "no_tokenizer")], "no tokenizer.json"),
        ("qwen_jax.bench.generation", ["--model", hf_folder, "--prompt-tokens", "0"], "--prompt-tokens 0: must be"),
        ("qwen_jax.bench.generation", ["--model", hf_folder, "--repeats", "0"], "--repeats 0: must be at least 1"),
        ("qwen_jax.bench.generation", ["--model", hf_folder, "--json", missing], "does not exist"),
        ("qwen_jax.bench.generation", ["--config", "qwen2.5-7b"], "--config needs --random-weights"),
        ("qwen_jax.bench.generation", ["--config", "qwen3", "--random-weights"], "--config 'qwen3': choose one of"),
        ("qwen_jax.bench.generation", ["--model", hf_folder, "--random-weights"],
         "--random-weights goes with --config"),
    ]


def test_bad_benchmark_arguments_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
    _no_work(monkeypatch)
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    (hf_folder / "tokenizer.json").write_text("{}")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
    for module, argv, message in _bad_arguments(tmp_path, str(hf_folder)):
        refusal = _refusal(module, argv)
        assert message in refusal and "\n" not in refusal, (module, argv, refusal)


def test_kv_cache_dtype_takes_the_choices_of_generate():
    from qwen_jax.bench import compile as bench_compile
    from qwen_jax.bench import prefill as bench_prefill
    for parser, argv in ((bench_prefill._parser(), PREFILL), (bench_compile._parser(), COMPILE)):
        assert parser.parse_args([*argv, "--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--kv-cache-dtype", "fp9"])


def _children(pid: int) -> list[int]:
    import os
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and relies on PR_SET_PDEATHSIG")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_killed_run_leaves_no_mode_process_behind(signal_name):
    """`timeout`, a scheduler or kill -9 stops the parent: its mode's process (which holds the accelerator
    on a GPU) must stop with it instead of running its prefill to the end."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "QWEN_JAX_COMPILE_CACHE": "off"}
    parent = subprocess.Popen([sys.executable, "-m", "qwen_jax.cli", "bench", "prefill", "--config", "tiny-1m",
                               "--random-weights", "--tokens", "256k", "--prefill-chunk", "4096", "--attention",
                               "blockwise", "--modes", "dense,sparse"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.monotonic() + 60
        while not (children := _children(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children, "the dense mode's process never started"
        time.sleep(3)                                          # inside its prefill (256K tokens take minutes here)
        assert parent.poll() is None and all(os.path.exists(f"/proc/{c}") for c in children)
        parent.send_signal(getattr(signal, signal_name))
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{c}") and "Z" not in _state(c) for c in children) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if os.path.exists(f"/proc/{c}") and "Z" not in _state(c)]
    finally:                              # the children found above: a failed run must not leave them running
        if parent.poll() is None:
            parent.kill()
        for c in children:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_generation_benchmark_runs_both_engines_on_the_same_random_weights(tmp_path):
    """``--config --random-weights``: transformers draws the weights, both engines load that folder, so on a CPU
    (float32, ``--dtype auto``) their greedy tokens agree step for step."""
    from qwen_jax.bench import generation
    out = tmp_path / "gen.json"
    assert generation.main(["--config", "tiny-1m", "--random-weights", "--prompt-tokens", "40", "--new-tokens", "5",
                            "--repeats", "1", "--transformers-static", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["engine"] for r in data["rows"]] == ["qwen-jax", "transformers", "transformers generate, static cache"]
    assert {r["dtype"] for r in data["rows"]} == {"float32"} and data["prompt_tokens"] == 40
    ours, theirs, static = (r["greedy tokens"].split() for r in data["rows"])
    assert len(ours) == 5 and ours == theirs == static and data["greedy tokens equal"] == 5
    assert data["last-token logits"]["max abs difference"] < 1e-4 * data["last-token logits"]["max abs logit"]
    assert all(float(r["prefill tok/s"]) > 0 and float(r["decode tok/s"]) > 0 for r in data["rows"])
    import jaxlib
    import transformers
    env = data["env"]        # what the README's results table quotes: the versions of both engines, the repeats
    assert (env["jaxlib"], env["transformers"], data["args"]["repeats"]) == (jaxlib.__version__,
                                                                              transformers.__version__, 1)
    assert env["commit"] is None or len(env["commit"].rstrip("+")) >= 7


def test_the_progress_bar_draws_on_the_stderr_of_the_moment(monkeypatch):
    # it took sys.stderr as a default argument, fixed when the module was first imported: under pytest that stream
    # is an earlier test's capture, closed since ("I/O operation on closed file" in test_prefix's benchmark test
    # when this file ran first); a program that redirects sys.stderr later lost the bar the same way
    import io

    from qwen_jax.bench.prefill import progress_bar
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(4, "prefill")
    bar(2)
    bar(4)
    text = stream.getvalue()
    assert text.startswith("\rprefill [###############...............] 2/4 tokens") and text.endswith("ETA 0 s\n"), text
