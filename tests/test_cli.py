"""The qwen-jax command line: streaming generation and one-line errors."""

import json
import subprocess
import sys

import jax
import pytest
from conftest import run_cli as run


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


def test_help_and_the_package_do_not_import_jax_until_used():
    """``import qwen_jax`` and ``qwen-jax --help`` stay off JAX (~2.5 s to import on 2 cores); every public name and
    submodule still resolves on use, and a name that is not one is an AttributeError."""
    code = (
        "import sys, contextlib, io\n"
        "import qwen_jax, qwen_jax.errors, qwen_jax.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    qwen_jax.cli.main(['--help'])\n"
        "assert 'usage: qwen-jax' in out.getvalue() and 'jax' not in sys.modules and 'flax' not in sys.modules\n"
        "assert set(qwen_jax.__all__) <= set(dir(qwen_jax))\n"
        "names = {n: getattr(qwen_jax, n) for n in qwen_jax.__all__}\n"
        "assert names['enable_compile_cache'].__module__ == 'qwen_jax.compile_cache'\n"
        "assert qwen_jax.generation.generate_ids and qwen_jax.attention.AttentionSpec and 'jax' in sys.modules\n"
        "try:\n"
        "    qwen_jax.no_such_name\n"
        "except AttributeError as e:\n"
        "    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "refused: module 'qwen_jax' has no attribute 'no_such_name'\n", result.stdout


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


def test_usage_errors_name_the_commands_own_help_and_bench_has_one(capsys):
    from qwen_jax.cli import main
    for argv, command in ((["generate", "--model", "m", "--prompt", "x", "--bogus", "1"], "generate"),
                          (["plan", "--config", "tiny", "--tokens", "1k", "--zzz"], "plan")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == (f"qwen-jax: error: {command}: unrecognized arguments: "
                                             f"{' '.join(argv[-2 if command == 'generate' else -1:])} "
                                             f"(see qwen-jax {command} --help)\n"), err
    with pytest.raises(SystemExit) as e:       # the help an error points to exists (it was refused as a usage error)
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: qwen-jax bench [-h]") and "prefill" in out
    with pytest.raises(SystemExit) as e:       # and a benchmark's own --help is still its own
        main(["bench", "prefill", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: qwen-jax bench prefill")


def test_bench_stream_names_a_missing_model_folder(tmp_path):
    from qwen_jax.bench import stream
    from qwen_jax.errors import CheckpointError
    with pytest.raises(CheckpointError, match="nope: no such folder"):      # (it said: no tokenizer.json)
        stream.main(["--model", str(tmp_path / "nope"), "--tokens", "64"])


def test_passkey_command_prints_a_table_and_writes_json(tiny_checkpoint, tmp_path):
    import json
    out = tmp_path / "pk.json"
    result = run("passkey", "--model", tiny_checkpoint[0], "--lengths", "300", "--depths", "0.2,0.8", "--dtype",
                 "float32", "--dca", "chunk_size=96,local_size=32", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["length", "0.2", "0.8"]
    data = json.loads(out.read_text())
    assert data["dca"]["chunk_size"] == 96 and len(data["results"]) == 2 and data["kv_cache_dtype"] == "float32"
    assert all(250 < r["tokens"] <= 300 and isinstance(r["found"], bool) for r in data["results"])
    bad = run("passkey", "--model", tiny_checkpoint[0], "--lengths", "300", "--dca", "chunk_size=big")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("qwen-jax: error: bad --dca")


def _one_line_error(result, code=1):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("qwen-jax: error:"), result.stderr
    return lines[0]


def test_usage_errors_are_one_line_with_exit_code_2(tiny_checkpoint):
    for args in [(), ("generate", "--model", tiny_checkpoint[0]), ("plan", "--config", "x", "--tokens", "1", "--batch", "y"),
                 ("bench", "prefill", "--tokens", "1k"),      # a benchmark's own parser: one line as well
                 ("generate", "--model", tiny_checkpoint[0], "--prompt", "a", "--prompt-file", "b")]:
        line = _one_line_error(run(*args), code=2)
        assert "--help" in line, line
    assert "generate: argument --prompt-file: not allowed with" in line


def test_output_paths_are_checked_before_the_model_loads(tmp_path):
    """A --json/--png/--save-selections/--out that cannot be written is refused before the long run (here
    the model does not even exist: the output path is what the error names)."""
    missing = str(tmp_path / "nodir" / "x.json")
    model = str(tmp_path / "no-model")
    assert missing in _one_line_error(run("passkey", "--model", model, "--lengths", "300", "--json", missing))
    recall = ("recall", "--model", model, "--length", "300", "--dca", "chunk_size=96,local_size=32")
    ok = tmp_path / "ok.json"
    for flag in ("--png", "--save-selections"):
        line = _one_line_error(run(*recall, flag, str(tmp_path / "nodir" / "r"), "--json", str(ok)))
        assert flag in line and "does not exist" in line, line
    assert "is a folder" in _one_line_error(run(*recall, "--json", str(tmp_path)))
    assert "same file" in _one_line_error(run(*recall, "--json", str(ok), "--png", str(ok)))
    assert not ok.exists()


def test_recall_writes_its_json_before_the_png(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from qwen_jax import recall
    from qwen_jax.cli import main

    def fail(path, values):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(recall, "write_png", fail)
    out = tmp_path / "r.json"
    assert main(["recall", "--model", tiny_checkpoint[0], "--dca", "chunk_size=192,local_size=64", "--prefill-chunk",
                 "128", "--dtype", "float32", "--length", "384", "--json", str(out), "--png", str(tmp_path / "r.png")]) == 1
    assert "No space left" in capsys.readouterr().err
    assert out.is_file() and "recall" in json.loads(out.read_text())


def test_a_prompt_file_that_is_not_utf8_is_a_one_line_error(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00 binary")
    for args in [("generate", "--model", tiny_checkpoint[0], "--prompt-file", str(bad)),
                 ("recall", "--model", tiny_checkpoint[0], "--length", "300", "--dca", "chunk_size=96,local_size=32",
                  "--prompt-file", str(bad))]:
        line = _one_line_error(run(*args))
        assert str(bad) in line and "not UTF-8" in line, line


def _overrides(*argv):
    from qwen_jax.cli import _model_overrides, build_parser
    return _model_overrides(build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", *argv]))


def test_model_options_below_one_are_refused_not_dropped():
    from qwen_jax.errors import QwenJaxError
    for flag in ("--window", "--prefill-chunk", "--block-q", "--block-k"):
        for value in ("0", "-1"):
            with pytest.raises(QwenJaxError, match=f"{flag} must be a positive integer"):
                _overrides(flag, value)
    spec = _overrides("--window", "5", "--block-q", "16")["attn_implementation"]
    assert (spec.window, spec.block_q, spec.block_k) == (5, 16, None)
    assert _overrides("--prefill-chunk", "64") == {"prefill_chunk_size": 64}


def test_sparse_config_content_errors_name_the_file(tiny_checkpoint, tmp_path):
    from qwen_jax.cli import _load, build_parser
    from qwen_jax.errors import QwenJaxError
    entry = ["vertical_and_slash", 100, 200, 0.9]
    cases = {"obj": {"a": 1}, "empty": [], "int": [{"0": 5}], "lists": [[1, 2]], "short": [{"0": ["vertical_and_slash"]}],
             "str": [{"0": ["vertical_and_slash", "x", 6096, 0.9]}], "neg": [{"0": ["vertical_and_slash", -5, 1, 0.9]}],
             "key": [{"head": entry}], "layers": [{str(h): entry for h in range(4)}] * 3}
    for name, content in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        args = build_parser().parse_args(["generate", "--model", tiny_checkpoint[0], "--prompt", "x", "--dca",
                                          "chunk_size=192,local_size=64", "--sparse-config", str(path)])
        with pytest.raises(QwenJaxError) as e:
            _load(args)
        assert str(e.value).startswith(f"--sparse-config {path}:") and "config.json" not in str(e.value), str(e.value)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU has no native Pallas kernel")
def test_pallas_on_a_cpu_names_the_attention_choices_that_work():
    from qwen_jax.errors import QwenJaxError
    with pytest.raises(QwenJaxError, match="--attention pallas needs a GPU or TPU.*--attention blockwise") as e:
        _overrides("--attention", "pallas")
    assert "impl=" not in str(e.value)


def test_tile_sizes_for_reference_attention_are_refused(tmp_path):
    line = _one_line_error(run("generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--attention",
                               "reference", "--block-q", "64"))
    assert "reference attention is dense and has none" in line


def test_system_needs_chat(tmp_path):
    line = _one_line_error(run("generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--system", "be brief"))
    assert "--system needs --chat" in line


def test_plan_refuses_sizes_below_one():
    for flag, value in [("--tokens", "-5"), ("--tokens", "0"), ("--batch", "-1"), ("--prefill-chunk", "-5"),
                        ("--batch", "0")]:
        args = {"--tokens": "1k", "--batch": "1", "--prefill-chunk": "256"} | {flag: value}
        result = run("plan", "--config", "qwen2.5-7b-1m", *[x for kv in args.items() for x in kv])
        line = _one_line_error(result)
        assert result.stdout == "" and (flag in line or flag == "--tokens" and "length" in line), line


def test_the_prefill_bar_follows_each_long_prompt(monkeypatch):
    """``generate`` / ``passkey`` show the prefill of each long prompt as a bar of its own (stderr)."""
    import tqdm.auto

    from qwen_jax.cli import _prefill_bar
    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    assert _prefill_bar(False) is None                  # not the job's main process: no bar
    report = _prefill_bar(True)
    for done in (16, 32, 40):
        report(done, 40)
    for done in (16, 20):                               # the next prompt
        report(done, 20)
    assert [(b.total, b.n, b.closed) for b in bars] == [(40, 40, True), (20, 20, True)]


def test_version_and_python_dash_m_entry_point():
    import qwen_jax
    for entry in (["-m", "qwen_jax.cli"], ["-m", "qwen_jax"]):
        result = subprocess.run([sys.executable, *entry, "--version"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"qwen-jax {qwen_jax.__version__}"
    usage = subprocess.run([sys.executable, "-m", "qwen_jax", "plan", "--tokens", "0", "--config", "qwen2.5-7b-1m"],
                           capture_output=True, text=True)
    assert usage.returncode == 1 and usage.stderr.count("\n") == 1 and "error" in usage.stderr


def test_passkey_on_a_mesh_writes_its_json(tiny_checkpoint, tmp_path):
    """The JSON of a mesh run records the mesh as given (it held the Mesh object, which json cannot write: the
    run ended in a traceback and a half-written file). Without ``--dtype`` the CLI loads as ``qwen_jax.load`` does
    ("auto": float32 on a CPU), and the JSON records the dtype that ran, not "auto"."""
    out = tmp_path / "pk.json"
    result = run("passkey", "--model", tiny_checkpoint[0], "--lengths", "200", "--depths", "0.5",
                 "--mesh", "tensor=2", "--prefill-chunk", "128", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["mesh"] == "tensor=2" and data["prefill_chunk"] == 128 and "mesh" not in data["attention"]
    assert data["dtype"] == "float32" and data["kv_cache_dtype"] == "float32"
    assert len(data["results"]) == 1


def test_recall_runs_with_the_models_kv_cache_dtype(tiny_checkpoint, tmp_path, monkeypatch):
    """``qwen-jax recall --kv-cache-dtype fp8`` measures an fp8 cache (it prefilled the parameters' dtype) and
    says so in its JSON."""
    import jax.numpy as jnp

    from qwen_jax import recall
    from qwen_jax.cli import main
    used = []
    real = recall.init_cache
    monkeypatch.setattr(recall, "init_cache", lambda *a, **k: used.append(a[3]) or real(*a, **k))
    out = tmp_path / "r.json"
    assert main(["recall", "--model", tiny_checkpoint[0], "--dca", "chunk_size=192,local_size=64", "--prefill-chunk",
                 "128", "--dtype", "float32", "--length", "256", "--kv-cache-dtype", "fp8", "--json", str(out)]) == 0
    assert used and all(jnp.dtype(d) == jnp.float8_e4m3fn for d in used)
    assert json.loads(out.read_text())["kv_cache_dtype"] == "float8_e4m3fn"


def test_an_empty_system_message_is_sent_as_given(tiny_checkpoint, monkeypatch):
    """``--system ""`` is an empty system message, not none (Qwen's template would put its default one in)."""
    import qwen_jax
    from qwen_jax.cli import main
    prompts = []
    monkeypatch.setattr(qwen_jax.Model, "generate", lambda self, prompt, **kw: prompts.append(prompt) or [""])
    assert main(["generate", "--model", tiny_checkpoint[0], "--prompt", "hi", "--chat", "--system", "",
                 "--max-new-tokens", "1", "--dtype", "float32"]) == 0
    assert prompts == [[{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]]


def test_dca_flags_edit_the_checkpoints_own_block(tiny_checkpoint, tmp_path, monkeypatch):
    """--dca K=V and the sparse flags change those keys of a DCA checkpoint's block and keep the rest (they
    replaced it: original_max_position_embeddings fell to 0 and the budgets file to the defaults); the sparse
    flags need no --dca where config.json has a block."""
    import shutil

    from qwen_jax.attention.sparse import layer_budgets
    from qwen_jax.cli import _load, build_parser
    from qwen_jax.errors import QwenJaxError
    folder = tmp_path / "dca"
    shutil.copytree(tiny_checkpoint[0], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["dual_chunk_attention_config"] = {"chunk_size": 256, "local_size": 64, "original_max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(raw))
    heads = raw["num_attention_heads"]
    layers = [{str(h): ["vertical_and_slash", 40 + h, 300, 0.9] for h in range(heads)}] * raw["num_hidden_layers"]
    (folder / "sparse_attention_config.json").write_text(json.dumps(layers))

    def dca(*flags):
        args = build_parser().parse_args(["generate", "--model", str(folder), "--prompt", "x", "--dtype", "float32",
                                          *flags])
        return _load(args).config.dual_chunk_attention_config

    edited = dca("--dca", "chunk_size=512", "--sparse-threshold", "0")
    assert (edited.chunk_size, edited.local_size, edited.original_max_position_embeddings) == (512, 64, 128)
    assert edited.sparse_attention_enabled and edited.sparse_attention_threshold == 0
    assert layer_budgets(edited, 1, heads).vertical[:2] == (40, 41)
    assert dca("--sparse-threshold", "100").sparse_attention_threshold == 100       # no --dca needed here
    # a hub repo id: its (downloaded) folder's block is the one edited, not a block of defaults
    import qwen_jax.api
    resolve = qwen_jax.api.resolve_checkpoint
    monkeypatch.setattr(qwen_jax.api, "resolve_checkpoint", lambda p: str(folder) if p == "acme/dca" else resolve(p))
    args = build_parser().parse_args(["generate", "--model", "acme/dca", "--prompt", "x", "--dtype", "float32",
                                      "--dca", "chunk_size=320", "--sparse"])
    hub = _load(args).config.dual_chunk_attention_config
    assert (hub.chunk_size, hub.local_size, hub.original_max_position_embeddings) == (320, 64, 128)
    args = build_parser().parse_args(["generate", "--model", tiny_checkpoint[0], "--prompt", "x", "--sparse"])
    with pytest.raises(QwenJaxError, match="pass --dca too"):
        _load(args)


@pytest.mark.parametrize("chat", [False, True])
def test_questions_after_one_prefill_answer_as_the_api_does(tiny_checkpoint, monkeypatch, capsys, chat):
    """``--question`` (twice): the prompt is prefilled once (the library's prefix cache), each answer printed in
    turn, as ``generate(..., prefix=...)`` gives it; with --chat the template is split where the questions begin."""
    import qwen_jax
    from qwen_jax.cli import main
    folder, prompt, questions = tiny_checkpoint[0], "The sky is blue. " * 30, ["Why?", "And the sea?"]
    model = qwen_jax.load(folder, dtype="float32")
    if chat:
        rendered = [model.tokenizer.apply_chat_template([{"role": "user", "content": prompt + "\n\n" + q}],
                                                        add_generation_prompt=True) for q in questions]
        shared = rendered[0][:rendered[0].index(prompt) + len(prompt) + 2]
        rests = [r[len(shared):] for r in rendered]
        assert all(r.startswith(shared) for r in rendered) and rests[0].startswith("Why?")
    else:
        shared, rests = prompt + "\n\n", questions
    cached = model.cache_prefix(shared, reserve=128)
    expected = [model.generate(r, prefix=cached, max_new_tokens=6)[0] for r in rests]
    calls, original, asked, generate = [], qwen_jax.Model.cache_prefix, [], qwen_jax.Model.generate
    monkeypatch.setattr(qwen_jax.Model, "cache_prefix", lambda self, text, **kw: calls.append(text) or original(
        self, text, **kw))
    monkeypatch.setattr(qwen_jax.Model, "generate", lambda self, prompt, **kw: asked.append(
        (prompt, kw["prefix"].length)) or generate(self, prompt, **kw))
    args = ["generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", "6", "--dtype", "float32",
            "--question", questions[0], "--question", questions[1]] + (["--chat"] if chat else [])
    assert main(args) == 0
    assert calls == [shared]
    assert asked == [(rest, len(model.tokenizer.encode(shared))) for rest in rests]
    assert capsys.readouterr().out == "".join(e + "\n\n" for e in expected)


def test_refusals_come_before_the_weights_load(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Sampling flags (named as flags), an empty --question or --dca, a checkpoint without tokenizer.json
    (generate, passkey, recall), an empty recall prompt file and a benchmark's own refusal: one line each, exit 1,
    and no weight read."""
    import shutil

    import qwen_jax
    from qwen_jax.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(qwen_jax, "load", no_load)
    notok = tmp_path / "notok"
    shutil.copytree(tiny_checkpoint[0], notok)
    (notok / "tokenizer.json").unlink()
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    model, dca = tiny_checkpoint[0], ["--dca", "chunk_size=96,local_size=32"]
    cases = [
        (["generate", "--model", model, "--prompt", "x", "--temperature", "-1"], "error: --temperature must be"),
        (["generate", "--model", model, "--prompt", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be"),
        (["generate", "--model", model, "--prompt", "x", "--seed", "-3"], "error: --seed must be"),
        (["generate", "--model", model, "--prompt", "x", "--question", "a", "--question", ""], "--question 2 is empty"),
        (["generate", "--model", model, "--prompt", "x", "--dca", ""], "--dca is empty"),
        (["generate", "--model", str(notok), "--prompt", "x"], "no tokenizer.json"),
        (["passkey", "--model", str(notok), "--lengths", "300"], "no tokenizer.json"),
        (["recall", "--model", str(notok), "--length", "300", *dca], "no tokenizer.json"),
        (["recall", "--model", model, "--length", "300", "--prompt-file", str(empty), *dca], f"{empty} is empty"),
        (["bench", "generation", "--model", str(notok)], "error: bench generation: --model"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qwen-jax: error:") and message in err[0], (argv, err)


def test_passkey_lengths_shorter_than_the_prompt_itself_are_refused(tiny_checkpoint, capsys):
    """A 10-token passkey prompt cannot be made (the task, one filler group, the needle and the question take more):
    refused, where it ran a longer prompt and reported it under length 10."""
    from qwen_jax import passkey
    from qwen_jax.cli import main
    from qwen_jax.tokenizer import Tokenizer
    floor = passkey.shortest(Tokenizer(tiny_checkpoint[0]).encode)
    assert 30 < floor < 200
    assert main(["passkey", "--model", tiny_checkpoint[0], "--lengths", f"{floor - 1},300", "--dtype", "float32"]) == 1
    assert f"at least {floor} tokens" in capsys.readouterr().err


def test_the_commands_take_every_dtype_load_takes(tiny_checkpoint):
    """``qwen_jax.load(dtype="float16")`` and ``kv_cache_dtype="float16"`` work, but ``generate``, ``passkey``,
    ``recall`` and ``plan`` refused float16 as an invalid choice; generate's float16 text is the API's."""
    import qwen_jax
    from qwen_jax.cli import build_parser
    folder = tiny_checkpoint[0]
    parser = build_parser()
    for command in (["passkey", "--model", folder, "--lengths", "300"], ["recall", "--model", folder, "--length", "384"]):
        args = parser.parse_args([*command, "--dtype", "float16", "--kv-cache-dtype", "float16"])
        assert (args.dtype, args.kv_cache_dtype) == ("float16", "float16")
    plan = run("plan", "--config", "qwen2.5-0.5b", "--tokens", "4k", "--dtype", "float16", "--kv-cache-dtype", "float16")
    assert plan.returncode == 0, plan.stderr
    expected = qwen_jax.load(folder, dtype="float16").generate("The sky is", max_new_tokens=6)[0]
    result = run("generate", "--model", folder, "--prompt", "The sky is", "--max-new-tokens", "6", "--dtype", "float16",
                 "--kv-cache-dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_non_utf8_standard_input_prompt_is_a_one_line_error(tiny_checkpoint):
    # text=True decodes with surrogateescape in a C/UTF-8 locale's stdin, so no UnicodeDecodeError ever came
    result = subprocess.run([sys.executable, "-m", "qwen_jax.cli", "generate", "--model", tiny_checkpoint[0],
                             "--prompt-file", "-", "--max-new-tokens", "2"], capture_output=True,
                            input=b"hi \xff\xfe binary")
    err = result.stderr.decode()
    assert result.returncode != 0
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert "standard input" in err and "not UTF-8" in err, err


def test_sparse_threshold_help_states_each_commands_default():
    """recall measures every prompt sparse (threshold 0 unless given); its --help said Qwen's 32768, as generate's."""
    import argparse

    from qwen_jax.cli import build_parser
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))

    def threshold_help(command):
        return subparsers.choices[command]._option_string_actions["--sparse-threshold"].help

    assert "(default 0" in threshold_help("recall") and "32768" not in threshold_help("recall")
    for command in ("generate", "passkey"):
        assert "(default 32768" in threshold_help(command)
