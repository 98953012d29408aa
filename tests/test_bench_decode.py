"""``qwen-jax bench decode`` and ``pallas_kernels.bench_decode`` on the CPU: every kernel times the same
steps over the same filled cache and agrees on the tokens; bad arguments end in one line."""

import json

import pytest

from qwen_jax.cli import main


def test_bench_decode_times_each_kernel_on_the_same_cache(tmp_path, capfd):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--config", "tiny-1m", "--random-weights", "--context", "1536,3000",
                 "--kernels", "auto,triton,xla,blockwise", "--steps", "2", "--batch", "2", "--kv-cache-dtype", "fp8",
                 "--interpret", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["context"], r["kernel"]) for r in rows] == [
        (L, k) for L in (1536, 3000) for k in ("auto", "triton", "xla", "blockwise")]
    for r in rows:
        assert r["ms/token"] > 0 and r["tokens/s"] > 0 and r["kv cache"] == "float8_e4m3fn" and r["batch"] == 2
        assert len(r["first tokens"]) == 2
    for L in (1536, 3000):      # the split-key kernel, the prefill kernel and the jnp paths pick the same tokens
        assert len({json.dumps(r["first tokens"]) for r in rows if r["context"] == L}) == 1
    assert "disagree" not in capfd.readouterr().err


def test_bench_decode_bytes_read_count_the_weights_and_the_cache_to_the_context():
    from qwen_jax.bench.decode import step_bytes
    from qwen_jax.presets import preset_config
    c = preset_config("qwen2.5-7b-1m")
    # 28 layers x K and V x 4 kv heads x 1M slots x 128 dims x 1 byte (fp8): 28 GiB, plus the weights
    assert step_bytes(c, 10, 1 << 20, 1, 1) == 10 + 28 * 2 * 4 * (1 << 20) * 128


@pytest.mark.parametrize("argv,message", [
    (["--config", "tiny-1m", "--context", "2k"], "pass --random-weights"),
    (["--config", "tiny-1m", "--random-weights", "--kernels", "auto,cutlass"], "unknown --kernels entry 'cutlass'"),
    (["--config", "tiny-1m", "--random-weights", "--steps", "0"], "--steps 0: must be at least 1"),
    (["--config", "tiny-1m", "--random-weights", "--context", "2k", "--json", "/no/such/folder/d.json"],
     "does not exist"),
])
def test_bench_decode_refuses_bad_arguments_in_one_line(argv, message, capfd):
    assert main(["bench", "decode", *argv]) == 1
    err = capfd.readouterr().err
    assert message in err and err.count("\n") == 1


def test_kernel_decode_benchmark_refuses_unknown_options():
    from pallas_kernels import bench_decode
    with pytest.raises(SystemExit, match="bad --kernels entry 'decode:64:fast'"):
        bench_decode.main(["--lengths", "1k", "--kernels", "decode:64:fast"])
    with pytest.raises(SystemExit, match="unknown kernel 'cutlass'"):
        bench_decode.main(["--lengths", "1k", "--kernels", "cutlass"])
    with pytest.raises(SystemExit, match="cudnn runs plain causal attention only"):
        bench_decode.main(["--lengths", "1k", "--kernels", "cudnn", "--dca", "1024,128"])
