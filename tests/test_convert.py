"""Conversion: bit-exact round trip, strict key map, unsafe or broken checkpoints refused cleanly."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_jax
from conftest import make_hf_model, run_cli, save_hf_checkpoint
from convert import CAST_DTYPES, convert_checkpoint, read_hf_params
from convert.safetensors_io import SafetensorsFile
from qwen_jax.cli import main
from qwen_jax.config import QwenConfig, read_config_json
from qwen_jax.errors import CheckpointError


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _assert_bit_exact(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype != torch.bool else a[key],
                           b[key].view(torch.uint8) if b[key].dtype != torch.bool else b[key]), key


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    model = make_hf_model(seed=3, num_hidden_layers=3).to(torch.bfloat16)
    return save_hf_checkpoint(model, tmp_path_factory.mktemp("bf16") / "hf")


@pytest.mark.parametrize("sharded_in,sharded_out", [(False, False), (True, True)])
def test_round_trip_is_bit_exact(tmp_path, bf16_checkpoint, sharded_in, sharded_out):
    src = bf16_checkpoint
    if sharded_in:
        model = make_hf_model(seed=4, num_hidden_layers=3).to(torch.bfloat16)
        src = save_hf_checkpoint(model, tmp_path / "sharded", max_shard_size="100KB")
        assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    assert main(["convert", src, str(tmp_path / "jax")]) == 0
    assert os.path.isfile(tmp_path / "jax" / "qwen_jax.json")
    assert os.path.isfile(tmp_path / "jax" / "tokenizer.json")
    from convert import convert_checkpoint as conv
    conv(str(tmp_path / "jax"), str(tmp_path / "back"), to="hf", max_shard_bytes=200_000 if sharded_out else 5 << 30)
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json") == sharded_out
    _assert_bit_exact(_tensors(src), _tensors(tmp_path / "back"))
    # transformers reads what we wrote
    from transformers import Qwen2ForCausalLM
    Qwen2ForCausalLM.from_pretrained(str(tmp_path / "back"))


def test_converted_and_hf_folders_load_to_identical_params(tmp_path, bf16_checkpoint):
    convert_checkpoint(bf16_checkpoint, str(tmp_path / "jax"), progress=False)
    a = qwen_jax.load(bf16_checkpoint, dtype="float32")
    b = qwen_jax.load(str(tmp_path / "jax"), dtype="float32")
    import jax
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        assert x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_directly_into_a_mesh_sharding(tmp_path, bf16_checkpoint):
    import jax
    convert_checkpoint(bf16_checkpoint, str(tmp_path / "jax"), progress=False)
    model = qwen_jax.load(str(tmp_path / "jax"), dtype="float32", mesh="tensor=2")
    q = model.params["layers_0"]["attn"]["q_proj"]["kernel"]  # [D, N, H], heads sharded over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1] // 2, q.shape[2])}
    single = qwen_jax.load(str(tmp_path / "jax"), dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 1000, (1, 40))
    np.testing.assert_allclose(model.logits(tokens), single.logits(tokens), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- refusals


def _broken(tmp_path, bf16_checkpoint, how):
    folder = tmp_path / f"broken_{how}"
    shutil.copytree(bf16_checkpoint, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
    elif how == "corrupt_header":
        data = bytearray(weights.read_bytes())
        data[8:20] = b"#not-json!!!"
        weights.write_bytes(bytes(data))
    elif how == "missing_shard":
        model = make_hf_model(seed=5).to(torch.bfloat16)
        shutil.rmtree(folder)
        save_hf_checkpoint(model, folder, max_shard_size="100KB")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        os.remove(folder / sorted(set(index["weight_map"].values()))[-1])
    elif how == "shape_mismatch":
        tensors = load_file(str(weights))
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how == "pickle_only":
        os.remove(weights)
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    elif how == "index_escape":
        outside = tmp_path / "outside.safetensors"
        shutil.copy(weights, outside)
        os.remove(weights)
        keys = list(load_file(str(outside)).keys())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {k: "../outside.safetensors" for k in keys}}))
    elif how == "overlapping":
        data = bytearray(weights.read_bytes())
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
        begin = header[first]["data_offsets"][0]
        size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [begin, begin + size]           # the second tensor on the first's bytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (n - len(text))
        assert len(text) == n
        weights.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    elif how == "bad_generation_config":
        (folder / "generation_config.json").write_text("{bad json")
    elif how == "non_utf8_chat_template":
        (folder / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    elif how == "integer_weights":
        tensors = load_file(str(weights))
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how == "complex_weights":               # a dtype this reader has no numpy type for: not a corrupt file
        tensors = load_file(str(weights))
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.complex64)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("how,message", [
    ("overlapping", "overlap"),
    ("bad_generation_config", "generation_config.json: not valid JSON"),
    ("non_utf8_chat_template", "chat_template.jinja: not UTF-8 text"),
    ("integer_weights", "model.norm.weight: stored as int32; model weights must be float16"),
    ("complex_weights", "'model.norm.weight' is stored as C64, which qwen-jax cannot read (model weights must be"),
    ("truncated", "truncated file"),
    ("corrupt_header", "corrupt header"),
    ("missing_shard", "missing shard"),
    ("shape_mismatch", "shape mismatch for 'model.layers.1.mlp.up_proj.weight'"),
    ("pickle_only", "pickle checkpoints are refused"),
    ("index_escape", "points outside the checkpoint folder"),
])
def test_bad_checkpoint_gives_one_line_error_and_no_output(tmp_path, bf16_checkpoint, how, message):
    src = _broken(tmp_path, bf16_checkpoint, how)
    dst = tmp_path / "out"
    result = run_cli("convert", src, dst)
    err = result.stderr.strip()
    assert result.returncode == 1
    assert len(err.splitlines()) == 1 and err.startswith("qwen-jax: error:") and message in err, err
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary leftovers


def _edited(tmp_path, bf16_checkpoint, edit):
    folder = tmp_path / "edited"
    shutil.copytree(bf16_checkpoint, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}), "unmapped key 'model.layers.0.mlp.extra.weight'"),
    (lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"), "missing key 'model.layers.2.self_attn.k_proj.bias'"),
    (lambda t: t.update({"model.layers.7.input_layernorm.weight": torch.zeros(64)}), "unmapped key 'model.layers.7"),
])
def test_strict_key_map_names_the_key(tmp_path, bf16_checkpoint, edit, message):
    folder = _edited(tmp_path, bf16_checkpoint, edit)
    config = QwenConfig.from_hf_dict(read_config_json(folder))
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("(", r"\(")):
        read_hf_params(folder, config, progress=False)


def test_duplicated_key_across_files_is_refused(tmp_path, bf16_checkpoint):
    folder = tmp_path / "dup"
    shutil.copytree(bf16_checkpoint, folder)
    os.rename(folder / "model.safetensors", folder / "weights.safetensors")     # no model.safetensors: every file
    tensors = load_file(str(folder / "weights.safetensors"))
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(folder / "extra.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="duplicated key 'model.norm.weight'"):
        read_hf_params(str(folder), QwenConfig.from_hf_dict(read_config_json(str(folder))), progress=False)


def test_existing_destination_is_never_touched(tmp_path, bf16_checkpoint, capsys):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", bf16_checkpoint, str(dst)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"]


@pytest.mark.parametrize("renameat2", [True, False])
@pytest.mark.parametrize("made", ["empty folder", "folder", "file", "another conversion"])
def test_a_destination_made_while_converting_is_kept_and_the_conversion_refused_in_one_line(
        tmp_path, bf16_checkpoint, monkeypatch, capsys, made, renameat2):
    """The destination is checked first and the finished folder renamed to it last: one made in between (by another
    conversion to it, or by hand) was replaced if empty (a mix, if its maker writes into it) and otherwise failed the
    rename with a bare OSError. Now it is kept as it is, the conversion refused in one line, nothing left behind
    (with Linux's renameat2, and without: the check just before a plain rename)."""
    import convert as convert_module
    from convert import converted as converted_module
    if not renameat2:
        monkeypatch.setattr(converted_module, "_renameat2", lambda: None)
    elif converted_module._renameat2() is None:
        pytest.skip("no renameat2 here")
    dst = tmp_path / "out"
    copy_metadata = convert_module.copy_metadata

    def meanwhile(*args):             # one of the conversion's own writing steps: the destination appears now
        monkeypatch.setattr(convert_module, "copy_metadata", copy_metadata)
        if made == "another conversion":
            convert_checkpoint(bf16_checkpoint, str(dst), progress=False)
        elif made == "file":
            dst.write_text("theirs")
        else:
            dst.mkdir()
            if made == "folder":
                (dst / "theirs.txt").write_text("theirs")
        copy_metadata(*args)

    monkeypatch.setattr(convert_module, "copy_metadata", meanwhile)
    capsys.readouterr()
    assert main(["convert", bf16_checkpoint, str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"qwen-jax: error: {dst}: created by someone else"), err
    if made == "file":
        assert dst.read_text() == "theirs"
    elif made == "another conversion":
        assert qwen_jax.load(str(dst), dtype="float32").config.num_hidden_layers == 3
    else:
        assert os.listdir(dst) == ([] if made == "empty folder" else ["theirs.txt"])
    assert os.listdir(tmp_path) == ["out"]          # the refused conversion's temporary folder is gone


def test_reader_matches_the_safetensors_library(bf16_checkpoint):
    ours = SafetensorsFile(os.path.join(bf16_checkpoint, "model.safetensors"))
    theirs = load_file(os.path.join(bf16_checkpoint, "model.safetensors"))
    assert sorted(ours.keys()) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours.read(key).view(np.uint16), value.view(torch.int16).numpy().view(np.uint16))


# ----------------------------------------------------------------------------- converted folders, damaged


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bf16_checkpoint):
    dst = tmp_path_factory.mktemp("converted") / "jax"
    convert_checkpoint(bf16_checkpoint, str(dst), progress=False)
    return dst


@pytest.mark.parametrize("how,message", [
    ("truncated_data", "params/ is damaged and cannot be read"),
    ("no_metadata_data", "params/ is damaged (its parameter metadata cannot be read)"),
])
def test_damaged_converted_checkpoint_gives_one_line_error(tmp_path, converted, how, message):
    folder = tmp_path / "damaged"
    shutil.copytree(converted, folder)
    if how == "truncated_data":
        data = folder / "params" / "ocdbt.process_0" / "d"
        for path in data.iterdir():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        shutil.rmtree(folder / "params" / "d")
    result = run_cli("convert", str(folder), str(tmp_path / "out"), "--to", "hf")
    err = result.stderr.strip()
    assert result.returncode == 1
    assert len(err.splitlines()) == 1 and err.startswith(f"qwen-jax: error: {folder}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def _orphaned_read(path, kind):
    """A read of ``path`` that failed in an event loop closed before its error was retrieved (a ``Task``, or the
    ``Future`` TensorStore resolves): asyncio logs it whenever it is collected."""
    import asyncio
    error = ValueError(f'OUT_OF_RANGE: Error reading "w" in OCDBT database at local file "{path}/"')
    loop = asyncio.new_event_loop()
    if kind == "Task":
        async def read():
            raise error
        task = loop.create_task(read())
        loop.run_until_complete(asyncio.sleep(0))
        assert task.done()
    else:
        loop.create_future().set_exception(error)
    loop.close()


def test_failed_metadata_reads_of_a_damaged_checkpoint_are_not_logged_later(tmp_path, converted, caplog):
    """The flaky ``[no_metadata_data]`` case above: orbax reads every array's metadata at once and, when one fails,
    returns none with its event loop closed on the sibling reads that failed too; asyncio logged each of those
    ("Task exception was never retrieved", ~70 lines) when it was collected, after the one-line error, or not, as the
    reads' timing fell. Only failed array reads were kept out of the log; failed metadata reads are now too."""
    import gc

    import jax.numpy as jnp

    from convert import converted as converted_module
    from qwen_jax.model import abstract_params
    folder = tmp_path / "damaged"
    shutil.copytree(converted, folder)
    shutil.rmtree(folder / "params" / "d")
    config = QwenConfig.from_hf_dict(read_config_json(str(folder)))
    logger = logging.getLogger("asyncio")
    before = list(logger.filters)
    try:
        with pytest.raises(CheckpointError, match="its parameter metadata cannot be read"):
            converted_module.restore_params(str(folder), abstract_params(config, jnp.bfloat16))
        gc.collect()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for kind in ("Task", "Future"):       # (the real ones are collected when they are: made here, for sure)
                _orphaned_read(str(folder / "params"), kind)
            gc.collect()
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    finally:
        logger.filters[:] = before


def test_failed_sibling_reads_of_a_damaged_checkpoint_are_not_logged_later(tmp_path, caplog):
    # one failed read fails the restore; its sibling reads fail too, and asyncio logs each one whose loop closed
    # before the exception was retrieved ("Task exception was never retrieved", or "Future exception ..." for
    # the future TensorStore resolves, failed in the loop's last pass) whenever it is collected: after the
    # one-line error
    import gc

    from convert import converted as converted_module

    damaged, other = str(tmp_path / "damaged" / "params"), str(tmp_path / "other" / "params")
    orphan = _orphaned_read

    logger = logging.getLogger("asyncio")
    before = list(logger.filters)
    try:
        with pytest.raises(CheckpointError, match="params/ is damaged and cannot be read"):
            with converted_module._damaged(str(tmp_path / "damaged"), damaged):
                raise ValueError("read failed")
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for kind in ("Task", "Future"):
                orphan(damaged, kind)
                orphan(other, kind)
            gc.collect()
        logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
        assert sorted(m.split("\n")[0] for m in logged) == ["Future exception was never retrieved",
                                                             "Task exception was never retrieved"], logged
        assert all(other in m and damaged not in m for m in logged), logged
    finally:
        logger.filters[:] = before


def test_an_interrupted_write_waits_for_the_threads_its_threads_start_and_logs_none_of_their_errors(tmp_path, caplog):
    # orbax's writer threads start a commit thread of their own; after an interrupt that commit can no longer
    # finish and logs a 17-line traceback at ERROR level (seen between a killed `qwen-jax convert`'s output and
    # its "qwen-jax: interrupted"): the folder must outlive it, and its log must not reach the user
    import threading
    import time

    from absl import logging as absl_logging

    from convert.converted import atomic_folder

    seen = []

    def commit(folder):
        time.sleep(0.3)
        seen.append(os.path.isdir(folder))
        try:
            raise RuntimeError("cannot schedule new futures after shutdown")
        except RuntimeError:
            absl_logging.error("Failed to run the commit callback in background save thread", exc_info=True)

    def writer(folder):
        time.sleep(0.1)
        threading.Thread(target=commit, args=(folder,), name="test_commit").start()

    dst = str(tmp_path / "out")
    with caplog.at_level(logging.INFO):
        with pytest.raises(KeyboardInterrupt):
            with atomic_folder(dst) as tmp:
                threading.Thread(target=writer, args=(tmp,), name="test_writer").start()
                raise KeyboardInterrupt
        for thread in threading.enumerate():
            if thread.name == "test_commit":
                thread.join()
    assert seen == [True]
    assert not os.path.exists(tmp) and not os.path.exists(dst)
    assert not [r for r in caplog.records if r.name == "absl"], caplog.text


def test_corrupt_marker_of_a_converted_checkpoint_is_refused(tmp_path, converted):
    folder = tmp_path / "marker"
    shutil.copytree(converted, folder)
    (folder / "qwen_jax.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable qwen_jax.json"):
        qwen_jax.load(str(folder), dtype="float32")


# ----------------------------------------------------------------------------- destinations


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_destination_inside_or_equal_to_the_source_is_refused(tmp_path, bf16_checkpoint, converted, capsys):
    src = tmp_path / "hf"
    shutil.copytree(bf16_checkpoint, src)
    before = _listing(src), _listing(converted)
    for argv, message in [
        (["convert", str(src), str(src / "sub")], "inside the source folder"),
        (["convert", str(src), str(src) + "/"], "is the source folder"),
        (["convert", str(tmp_path / "." / "hf"), str(src / "a" / "b")], "inside the source folder"),
        (["convert", str(converted), str(converted / "params" / "out"), "--to", "hf"], "inside the source folder"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert (_listing(src), _listing(converted)) == before


def test_empty_destination_is_refused(tmp_path, bf16_checkpoint, capsys):
    assert main(["convert", bf16_checkpoint, ""]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "qwen-jax: error: the destination folder is an empty name; give a new folder's path"
    assert not [p for p in os.listdir(os.path.dirname(bf16_checkpoint)) if ".partial-" in p]


def test_a_cast_is_recorded_in_config_json(tmp_path, tiny_checkpoint):
    """convert --dtype writes the new dtype into config.json, so HF's dtype="auto" loads what is stored."""
    from transformers import Qwen2ForCausalLM
    src = tiny_checkpoint[0]
    before = json.loads(open(os.path.join(src, "config.json")).read())
    stored = before.get("dtype", before.get("torch_dtype"))
    assert stored == "float32"
    assert main(["convert", src, str(tmp_path / "jax"), "--dtype", "bfloat16"]) == 0
    assert main(["convert", str(tmp_path / "jax"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    after = json.loads(open(tmp_path / "hf" / "config.json").read())
    assert {k: after[k] for k in ("dtype", "torch_dtype") if k in after} == \
        {k: "bfloat16" for k in ("dtype", "torch_dtype") if k in before}
    assert {k: v for k, v in after.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in before.items() if k not in ("dtype", "torch_dtype")}
    assert Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto").dtype == torch.bfloat16
    assert main(["convert", src, str(tmp_path / "kept")]) == 0                  # no cast: config.json as it was
    assert json.loads(open(tmp_path / "kept" / "config.json").read()) == before


@pytest.mark.parametrize("name", sorted(CAST_DTYPES))
def test_convert_dtype_on_the_command_line_takes_every_cast_the_function_takes(tmp_path, tiny_checkpoint, name):
    """``qwen-jax convert --dtype`` offered bfloat16 and float32 only, while ``convert_checkpoint`` also casts to
    float16: the command now takes each cast, writes it (HF -> qwen-jax -> HF) and records it in config.json."""
    from transformers import Qwen2ForCausalLM
    src = tiny_checkpoint[0]
    assert main(["convert", src, str(tmp_path / "jax"), "--dtype", name]) == 0
    assert main(["convert", str(tmp_path / "jax"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    want = getattr(torch, name)
    original, written = _tensors(src), _tensors(tmp_path / "hf")
    assert sorted(written) == sorted(original)
    for key, tensor in written.items():
        assert tensor.dtype == want and torch.equal(tensor, original[key].to(want)), key
    assert Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto").dtype == want


def test_a_hub_cache_snapshot_of_shards_loads_and_converts(tmp_path):
    """huggingface_hub's cache, what a repo id resolves to: each file of snapshots/<rev>/ is a relative link to
    ../../blobs/<hash>, outside the snapshot folder (sharded folders were refused as pointing outside it)."""
    model = make_hf_model(seed=6)
    plain = save_hf_checkpoint(model, tmp_path / "plain", max_shard_size="100KB")
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(plain))):
        shutil.copy(os.path.join(plain, name), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    assert os.path.isfile(snapshot / "model.safetensors.index.json")
    want = qwen_jax.load(plain, dtype="float32").logits(np.arange(1, 9)[None])
    got = qwen_jax.load(str(snapshot), dtype="float32").logits(np.arange(1, 9)[None])
    assert np.array_equal(got, want)
    assert main(["convert", str(snapshot), str(tmp_path / "jax")]) == 0


def test_model_safetensors_wins_over_an_index_beside_it_as_in_transformers(tmp_path):
    sharded = save_hf_checkpoint(make_hf_model(seed=7), tmp_path / "both", max_shard_size="100KB")
    single = save_hf_checkpoint(make_hf_model(seed=8), tmp_path / "single")
    shutil.copy(os.path.join(single, "model.safetensors"), os.path.join(sharded, "model.safetensors"))
    from transformers import Qwen2ForCausalLM
    hf = Qwen2ForCausalLM.from_pretrained(sharded).model.embed_tokens.weight.detach().numpy()
    ours = np.asarray(qwen_jax.load(sharded, dtype="float32").params["embed"]["embedding"])
    assert np.array_equal(ours, hf)
    assert np.array_equal(ours, np.asarray(qwen_jax.load(single, dtype="float32").params["embed"]["embedding"]))


def test_casts_are_checked_first_and_outputs_follow_the_umask(tmp_path, bf16_checkpoint):
    for bad in ("int8", np.complex64, "bf17"):
        with pytest.raises(CheckpointError, match="cannot cast weights to .*: use None .keep., bfloat16, float32, float16"):
            convert_checkpoint(bf16_checkpoint, str(tmp_path / "x"), dtype=bad)
    assert not os.listdir(tmp_path)
    old = os.umask(0o022)
    try:
        convert_checkpoint(bf16_checkpoint, str(tmp_path / "f16"), dtype=np.float16, progress=False)
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f16").st_mode & 0o777) == 0o755           # not mkdtemp's 0700
    config = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
