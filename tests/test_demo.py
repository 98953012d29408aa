"""``qwen-jax demo`` runs the whole pipeline offline and passes its own reference check."""

from conftest import run_cli_at_xla_defaults

from qwen_jax.demo import run_demo


def test_demo_end_to_end(tmp_path):
    """The command itself, in a process of its own with XLA's default CPU flags: its 1000-token prompts run more
    than they compile (conftest's quick-compile flags: 82 s, these 65 s on two cores)."""
    run = run_cli_at_xla_defaults("demo", "--prompt-tokens", 1000, "--new-tokens", 8, "--workdir", tmp_path)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert out.count("greedy tokens identical: OK") == 2 and "(bit-exact): OK" in out, out
    assert "dual chunk attention" in out and "its dense twin, first 1000 tokens" in out    # the prompt's, not 2048
    assert (tmp_path / "demo-hf" / "model.safetensors").is_file()
    assert (tmp_path / "demo-qwen-jax" / "qwen_jax.json").is_file()


def test_demo_refuses_bad_sizes_before_writing_anything(tmp_path):
    import pytest

    from qwen_jax.errors import QwenJaxError
    for kw in ({"prompt_tokens": 0}, {"new_tokens": 0}, {"prompt_tokens": -5}, {"new_tokens": -1}):
        with pytest.raises(QwenJaxError, match="must be a positive integer"):
            run_demo(workdir=str(tmp_path / "w"), **kw)
    assert not (tmp_path / "w").exists()


def test_demo_rebuilds_an_empty_checkpoint_folder_and_keeps_a_foreign_one(tmp_path):
    """An empty demo-hf (``mkdir -p W/demo-hf``) is written afresh; one with other contents is refused, not
    reused half-written (``no config.json``) nor deleted."""
    import pytest

    from qwen_jax.demo import _HF_FILES, _reusable
    from qwen_jax.errors import QwenJaxError
    empty = tmp_path / "demo-hf"
    empty.mkdir()
    assert _reusable(str(empty), _HF_FILES) is False and not empty.exists()
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QwenJaxError, match="not a complete demo checkpoint"):
        _reusable(str(foreign), _HF_FILES)
    assert (foreign / "notes.txt").read_text() == "mine"
    for name in _HF_FILES:
        (foreign / name).write_text("")
    assert _reusable(str(foreign), _HF_FILES) is True
