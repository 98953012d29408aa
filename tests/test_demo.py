"""``qwen-jax demo`` runs the whole pipeline offline and passes its own reference check."""

from qwen_jax.demo import run_demo


def test_demo_end_to_end(tmp_path, capsys):
    assert run_demo(prompt_tokens=1000, new_tokens=8, workdir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical: OK") == 2 and "(bit-exact): OK" in out
    assert "dual chunk attention" in out and "its dense twin" in out
    assert (tmp_path / "demo-hf" / "model.safetensors").is_file()
    assert (tmp_path / "demo-qwen-jax" / "qwen_jax.json").is_file()
