"""The qwen-jax command line: streaming generation and one-line errors."""

import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen_jax.cli", *args], capture_output=True, text=True, input=stdin)


def test_generate_streams_the_same_text_as_the_api(tiny_checkpoint, tmp_path):
    import qwen_jax
    folder = tiny_checkpoint[0]
    expected = qwen_jax.load(folder, dtype="float32").generate("The sky is", max_new_tokens=10)[0]
    result = run("generate", "--model", folder, "--prompt", "The sky is", "--max-new-tokens", "10", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    (tmp_path / "p.txt").write_text("The sky is")
    from_file = run("generate", "--model", folder, "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "10",
                    "--dtype", "float32")
    assert from_file.stdout == result.stdout
    chat = run("generate", "--model", folder, "--prompt", "hi", "--chat", "--max-new-tokens", "4", "--dtype", "float32")
    assert chat.returncode == 0, chat.stderr


def test_user_errors_are_one_line_and_non_zero(tiny_checkpoint, tmp_path):
    cases = [
        ("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"),
        ("generate", "--model", tiny_checkpoint[0], "--prompt-file", str(tmp_path / "missing.txt")),
        ("generate", "--model", tiny_checkpoint[0], "--prompt", "x", "--top-p", "0"),
        ("generate", "--model", tiny_checkpoint[0], "--prompt", "x", "--mesh", "seq=64"),
        ("convert", str(tmp_path / "nope"), str(tmp_path / "out")),
    ]
    for args in cases:
        result = run(*args)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen-jax: error:"), (args, result.stderr)
    usage = run("generate", "--model", tiny_checkpoint[0], "--prompt", "a", "--prompt-file", "b")
    assert usage.returncode == 2 and "not allowed with" in usage.stderr


def test_passkey_command_prints_a_table_and_writes_json(tiny_checkpoint, tmp_path):
    import json
    out = tmp_path / "pk.json"
    result = run("passkey", "--model", tiny_checkpoint[0], "--lengths", "300", "--depths", "0.2,0.8", "--dtype",
                 "float32", "--dca", "chunk_size=96,local_size=32", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["length", "0.2", "0.8"]
    data = json.loads(out.read_text())
    assert data["dca"]["chunk_size"] == 96 and len(data["results"]) == 2
    assert all(250 < r["tokens"] <= 300 and isinstance(r["found"], bool) for r in data["results"])
    bad = run("passkey", "--model", tiny_checkpoint[0], "--lengths", "300", "--dca", "chunk_size=big")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("qwen-jax: error: bad --dca")
