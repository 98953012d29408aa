"""``qwen-jax budgets``: per-head budgets refined from recall runs (Qwen's sparse_attention_config.json)."""

import json

import numpy as np
import pytest

from qwen_jax.budgets import Run, combine, refine
from qwen_jax.errors import QwenJaxError


def _run(recall, tiles, v, s):
    recall = np.asarray(recall, np.float64)
    return Run("r", recall, np.asarray(tiles, np.float64),
               np.stack([np.full(recall.shape, v), np.full(recall.shape, s)], -1))


def test_refine_takes_the_cheapest_run_that_reaches_the_target():
    small = _run([[0.97, 0.80, 0.50]], [[0.2, 0.2, 0.2]], 1000, 6096)
    mid = _run([[0.99, 0.93, 0.60]], [[0.4, 0.4, 0.4]], 2000, 12192)
    big = _run([[1.00, 0.99, 0.70]], [[0.7, 0.7, 0.7]], 4000, 24384)
    config, choice = refine([big, small, mid], target=0.9)     # the order of the runs does not matter
    assert choice.tolist() == [[1, 2, 0]]      # reached by the small run; by mid; by none: the highest recall
    assert config == [{"0": ["vertical_and_slash", 1000, 6096, 0.97], "1": ["vertical_and_slash", 2000, 12192, 0.93],
                       "2": ["vertical_and_slash", 4000, 24384, 0.7]}]
    with pytest.raises(QwenJaxError, match="--target"):
        refine([small], target=1.5)


def _write(path, recall, tiles, budgets=None, tokens=384, chunk_size=192):
    d = {"tokens": tokens, "prefill chunk": 128, "recall": recall, "tile share": tiles,
         "dca": {"chunk_size": chunk_size, "local_size": 64, "original_max_position_embeddings": 128,
                 "budgets": "file" if budgets is not None else "default (1000, 6096)"}}
    if budgets is not None:
        d["head budgets"] = budgets
    path.write_text(json.dumps(d))
    return str(path)


def test_combine_checks_the_runs_agree(tmp_path):
    a = _write(tmp_path / "a.json", [[0.9, 0.95]], [[0.3, 0.3]])                         # defaults: derived
    b = _write(tmp_path / "b.json", [[0.99, 0.99]], [[0.5, 0.5]], [[[2000, 12192], [2000, 12192]]])
    config, report = combine([a, b], 0.95)
    assert [config[0][h][1:3] for h in "01"] == [[2000, 12192], [1000, 6096]]
    assert report["mean recall"] == pytest.approx(0.97) and report["mean tile share"] == pytest.approx(0.4)
    assert report["heads per run"] == {a: 1, b: 1} and report["heads below target"] == 0
    other = _write(tmp_path / "c.json", [[0.99, 0.99]], [[0.5, 0.5]], [[[1, 2], [1, 2]]], tokens=512)
    with pytest.raises(QwenJaxError, match="tokens"):
        combine([a, other], 0.95)
    old = _write(tmp_path / "d.json", [[0.99, 0.99]], [[0.5, 0.5]], [[[1, 2], [1, 2]]])
    d = json.loads((tmp_path / "d.json").read_text())
    del d["head budgets"]
    (tmp_path / "d.json").write_text(json.dumps(d))
    with pytest.raises(QwenJaxError, match="per-head budgets"):
        combine([a, old], 0.95)
    (tmp_path / "e.json").write_text("{")
    with pytest.raises(QwenJaxError, match="not a recall file"):
        combine([str(tmp_path / "e.json")], 0.95)


def test_a_run_named_twice_counts_once(tmp_path):
    rng = np.random.default_rng()
    recall_a, recall_b = rng.uniform(0.5, 1, (3, 4)), rng.uniform(0.5, 1, (3, 4))
    a = _write(tmp_path / "a.json", recall_a.tolist(), np.full((3, 4), 0.2).tolist())
    b = _write(tmp_path / "b.json", recall_b.tolist(), np.full((3, 4), 0.6).tolist(), np.full((3, 4, 2), 3000).tolist())
    config, report = combine([a, b, a], 0.8)
    want = np.where(recall_a >= 0.8, 0, np.where(recall_b >= 0.8, 1, np.argmax([recall_a, recall_b], 0)))
    assert report["heads per run"] == {a: int((want == 0).sum()), b: int((want == 1).sum())}
    assert sum(report["heads per run"].values()) == report["heads"] == 12
    for layer in range(3):
        for head in range(4):
            v, s, r = (1000, 6096, recall_a) if want[layer, head] == 0 else (3000, 3000, recall_b)
            assert config[layer][str(head)] == ["vertical_and_slash", v, s, round(float(r[layer, head]), 4)]


def test_refined_budgets_keep_each_heads_recall(tiny_checkpoint, tmp_path, capsys):
    """Dense attention drives a recall run, so a head's recall depends on its own budgets only: the file
    ``qwen-jax budgets`` writes, measured again, gives every head the recall of the run it came from."""
    from qwen_jax.cli import main
    words = np.random.default_rng(7).choice(["def", "x", "=", "(", ")", "return", "alpha", "beta", "for"], 3000)
    (tmp_path / "p.txt").write_text(" ".join(words))
    common = ["recall", "--model", tiny_checkpoint[0], "--dca", "chunk_size=192,local_size=64", "--prefill-chunk",
              "128", "--dtype", "float32", "--prompt-file", str(tmp_path / "p.txt"), "--length", "384"]
    runs = []
    for name, v, s in [("small", 30, 50), ("mid", 60, 100)]:
        budgets = [{str(h): ["vertical_and_slash", v, s, 0.0] for h in range(4)} for _ in range(2)]
        (tmp_path / f"{name}_budgets.json").write_text(json.dumps(budgets))
        runs.append(str(tmp_path / f"{name}.json"))
        assert main(common + ["--sparse-config", str(tmp_path / f"{name}_budgets.json"), "--json", runs[-1]]) == 0
    small, mid = (np.asarray(json.loads(open(r).read())["recall"]) for r in runs)
    # not monotone: a phase that gets picks loses Qwen's fallback columns and diagonals, which can hold more
    assert np.abs(mid - small).max() > 1e-3
    target = float(np.median(small))        # about half the heads reach it with the small budgets
    capsys.readouterr()
    assert main(["budgets", *runs, "--target", str(target), "--out", str(tmp_path / "refined.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["heads per run"][runs[0]] < 8
    from qwen_jax import recall
    refined = json.loads((tmp_path / "refined.json").read_text())
    kinds = len({tuple(tuple(layer[str(h)][1:3]) for h in range(4)) for layer in refined})   # distinct layer budgets
    compiled = recall._layer._cache_size()
    assert main(common + ["--sparse-config", str(tmp_path / "refined.json"), "--json", str(tmp_path / "check.json")]) == 0
    assert recall._layer._cache_size() == compiled + kinds    # three equal chunks: one program per layer kind
    check = json.loads((tmp_path / "check.json").read_text())
    chosen = np.where(np.asarray([[refined[layer][str(h)][1] for h in range(4)] for layer in range(2)]) == 30, small, mid)
    np.testing.assert_allclose(np.asarray(check["recall"]), chosen, atol=1e-6)
    assert np.asarray(check["recall"]).mean() == pytest.approx(report["mean recall"], abs=1e-6)
    assert check["head budgets"] == [[[refined[layer][str(h)][1], refined[layer][str(h)][2]] for h in range(4)]
                                     for layer in range(2)]
    assert main(["budgets", runs[0], "--target", "2", "--out", str(tmp_path / "x.json")]) == 1     # one-line error
    assert "--target" in capsys.readouterr().err


def test_selections_of_layers_with_different_budgets_are_saved(tiny_checkpoint, tmp_path, capsys):
    """``--save-selections`` stacks the layers: a layer with smaller budgets is padded with unused slots."""
    from qwen_jax.cli import main
    from qwen_jax.recall import load_selections
    budgets = [{str(h): ["vertical_and_slash", v, s, 0.0] for h in range(4)} for v, s in [(40, 50), (60, 100)]]
    (tmp_path / "b.json").write_text(json.dumps(budgets))
    assert main(["recall", "--model", tiny_checkpoint[0], "--dca", "chunk_size=192,local_size=64", "--prefill-chunk",
                 "128", "--dtype", "float32", "--length", "384", "--sparse-config", str(tmp_path / "b.json"),
                 "--save-selections", str(tmp_path / "s.npz")]) == 0
    chunks, meta = load_selections(str(tmp_path / "s.npz"))
    # the passkey-style prompt of 384 tokens at most (381 here), cut to whole 64-token blocks: the sparse
    # benchmark's kernels, which time saved selections, refused the file
    assert len(chunks) == 3 and meta["tokens"] == 320
    assert "measuring the first 320 of the prompt's 381 tokens" in capsys.readouterr().err
    for _, sel in chunks:
        assert sel.dist.shape[0] == 2 and sel.dist.shape[-1] >= 100 and sel.cols.shape[-1] >= 60
        assert (sel.dist_count[0] <= 50).all() and (sel.col_count[0] <= 40).all()       # layer 0's budgets
        width = np.arange(sel.dist.shape[-1])
        assert (sel.dist[0][..., width >= 50] == 2 ** 30).all()                          # padding: unused slots


def test_combine_refuses_runs_of_different_models(tmp_path):
    def run(name, model):
        path = _write(tmp_path / name, [[0.9, 0.95]], [[0.3, 0.3]])
        d = json.loads(open(path).read())
        (tmp_path / name).write_text(json.dumps(d | {"model": model}))
        return path
    (tmp_path / "ckpt").mkdir()
    a, b = run("a.json", str(tmp_path / "ckpt")), run("b.json", str(tmp_path / "ckpt") + "/")
    combine([a, b], 0.95)                                   # one model spelled two ways
    with pytest.raises(QwenJaxError, match="different models"):
        combine([a, run("c.json", str(tmp_path / "ckpt2"))], 0.95)


def test_budgets_out_must_not_be_one_of_the_runs(tmp_path, capsys):
    from qwen_jax.cli import main
    a = _write(tmp_path / "a.json", [[0.9, 0.95]], [[0.3, 0.3]])
    before = (tmp_path / "a.json").read_text()
    assert main(["budgets", a, "--out", str(tmp_path / "." / "a.json")]) == 1
    assert "one of the recall runs" in capsys.readouterr().err
    assert (tmp_path / "a.json").read_text() == before
    assert main(["budgets", a, "--out", str(tmp_path / "nodir" / "o.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["budgets", a, "--out", str(tmp_path / "o.json")]) == 0


def test_recall_png_draws_unmeasured_heads_grey_and_the_scale_from_vmin_to_one(tmp_path):
    import struct
    import zlib

    from qwen_jax import recall

    values = np.array([[np.nan, 0.5, 1.0], [0.75, np.nan, 0.2]])
    path = tmp_path / "r.png"
    recall.write_png(str(path), values, vmin=0.5, cell=4)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (n,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        chunks[kind] = data[at + 8:at + 8 + n]
        at += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert (w, h) == (12, 8)
    rows = zlib.decompress(chunks[b"IDAT"])
    pixels = np.frombuffer(rows, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)
    cells = pixels[::4, ::4]
    assert (pixels == np.repeat(np.repeat(cells, 4, 0), 4, 1)).all()
    grey, purple, yellow = recall.UNMEASURED, tuple(recall._ANCHORS[0]), tuple(recall._ANCHORS[-1])
    assert tuple(cells[0, 0]) == grey and tuple(cells[1, 1]) == grey
    assert tuple(cells[0, 1]) == purple and tuple(cells[1, 2]) == purple        # vmin and below
    assert tuple(cells[0, 2]) == yellow
    assert tuple(cells[1, 0]) == tuple(recall._ANCHORS[2])                      # halfway: the middle anchor
    assert grey not in {tuple(c) for c in recall._ANCHORS}
