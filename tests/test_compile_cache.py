"""The command line's persistent compilation cache: where it goes, that a second run loads instead of
compiling, and that a folder it cannot use costs one warning, not the run."""

import os

import pytest
from conftest import run_cli

from qwen_jax import compile_cache


@pytest.fixture
def no_jax_dir():
    import jax
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_folder_from_env_then_jax_then_xdg(monkeypatch, tmp_path, no_jax_dir):
    import jax
    for off in ("off", "0", "False", " none "):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.resolve() is None and compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.resolve() == str(tmp_path / "mine")
    assert compile_cache.resolve(str(tmp_path / "arg")) == str(tmp_path / "arg")
    monkeypatch.setenv(compile_cache.ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == str(tmp_path / "xdg" / "qwen-jax" / "xla")
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.resolve() == str(tmp_path / "xdg" / "qwen-jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    assert compile_cache.resolve() == str(tmp_path / "jax")
    monkeypatch.setenv(compile_cache.ENV, "off")      # off wins over JAX's own setting
    assert compile_cache.enable() is None and compile_cache.state() == "off"


def test_a_folder_that_cannot_be_made_warns_once_and_stays_off(tmp_path, no_jax_dir):
    import jax
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="no compilation cache"):
        assert compile_cache.enable(str(tmp_path / "file" / "xla")) is None
    assert jax.config.jax_compilation_cache_dir is None and compile_cache.state() == "off"


def _generate(folder, cache, extra_env=None):
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **(extra_env or {}))
    env[compile_cache.ENV] = cache
    return run_cli("generate", "--model", folder, "--prompt", "The sky is", "--max-new-tokens", "6", "--dtype",
                   "float32", env=env)


def test_the_second_run_loads_what_the_first_compiled(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint[0]
    cache = tmp_path / "xla"
    first = _generate(folder, str(cache))
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_decode") or name.startswith("jit__prefill") for name in entries), entries
    mtimes = {name: (cache / name).stat().st_mtime_ns for name in entries}
    second = _generate(folder, str(cache))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    # every program the second run needed was found under the same key: nothing new, nothing rewritten
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert {name: (cache / name).stat().st_mtime_ns for name in entries} == mtimes
    off = _generate(folder, "off", {"XDG_CACHE_HOME": str(tmp_path / "home")})
    assert off.returncode == 0 and off.stdout == first.stdout
    assert not (tmp_path / "home").exists()
    (tmp_path / "file").write_text("")
    bad = _generate(folder, str(tmp_path / "file" / "xla"))
    assert bad.returncode == 0 and bad.stdout == first.stdout
    warning = [line for line in bad.stderr.splitlines() if "compilation cache" in line]
    assert warning == [warning[0]] and warning[0].startswith("qwen-jax: warning: no compilation cache"), bad.stderr


def test_compile_benchmark_reports_each_mode_and_depth(tmp_path):
    import json

    from qwen_jax.bench import compile as bench_compile
    from qwen_jax.errors import QwenJaxError
    out = tmp_path / "compile.json"
    assert bench_compile.main(["--config", "tiny-1m", "--tokens", "16k", "--prefill-chunk", "4096", "--attention",
                               "blockwise", "--layers", "1,all", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["layers"]) for r in rows] == [("sparse", 1), ("sparse", 2), ("dense", 1), ("dense", 2)]
    assert all(r["compile s"] > 0 and r["lower s"] > 0 and r["compile cache"] == "off" for r in rows)
    assert all(r["programs"] == 3 for r in rows)       # embedding, the one layer program, the final rows
    for bad in (["--layers", "0"], ["--layers", "3"], ["--modes", "sparse,fast"], ["--prefill-chunk", "100"]):
        with pytest.raises(QwenJaxError):
            bench_compile.main(["--config", "tiny-1m", "--tokens", "16k", "--attention", "blockwise", *bad])
