"""``qwen-jax bench decode`` and ``pallas_kernels.bench_decode`` on the CPU: every kernel times the same
steps over the same filled cache and agrees on the tokens; bad arguments end in one line."""

import json

import pytest

from qwen_jax.cli import main


def test_bench_decode_times_each_kernel_on_the_same_cache(tmp_path, capfd):
    # one context (each compiles its own cache fill and four kernels' decode steps: 94 s with a second, 1536), past
    # the DCA chunk's 1792 keys and not a whole number of key blocks
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--config", "tiny-1m", "--random-weights", "--context", "3000",
                 "--kernels", "auto,triton,xla,blockwise", "--steps", "2", "--batch", "2", "--kv-cache-dtype", "fp8",
                 "--interpret", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["context"], r["kernel"]) for r in rows] == [
        (3000, k) for k in ("auto", "triton", "xla", "blockwise")]
    for r in rows:
        assert r["ms/token"] > 0 and r["tokens/s"] > 0 and r["kv cache"] == "float8_e4m3fn" and r["batch"] == 2
        # a step reads the weights but of the untied [1024, 128] bf16 embedding table only its batch's 2 rows (it
        # counted the whole table), and K and V of 2 layers x [batch 2, 2 kv heads, L slots, 32 dims] in fp8
        assert r["bytes read per device"] == (report["params bytes"] - (1024 - 2) * 128 * 2
                                              + 2 * 2 * (2 * 2 * r["context"] * 32))
        assert len(r["first tokens"]) == 2
    # the split-key kernel, the prefill kernel and the jnp paths pick the same tokens
    assert len({json.dumps(r["first tokens"]) for r in rows}) == 1
    assert "disagree" not in capfd.readouterr().err


def test_bench_decode_refuses_what_a_device_cannot_hold(capfd, monkeypatch):
    from qwen_jax import memory
    monkeypatch.setattr(memory, "device_capacity", lambda: 2 * memory.GiB)
    assert main(["bench", "decode", "--config", "qwen2.5-7b-1m", "--random-weights", "--context", "1m"]) == 1
    err = capfd.readouterr().err            # the 7B's weights alone are 14 GiB: refused before allocating them
    assert "decode after 1048576 tokens needs at least" in err and "of 2.0: use a shorter --context" in err


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


def test_the_cudnn_baseline_times_attention_not_a_copy_of_the_cache(monkeypatch, capsys):
    """cuDNN reads a [B, L, K, H] cache: the benchmark lays the cache out so before timing (it transposed the whole
    cache inside the timed call, which made the baseline slower than the attention it stands for)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import MaskSpec, bench_decode
    seen = []

    def fake_cudnn(q, k, v, *, scale, key_value_seq_lengths, implementation):     # cuDNN does not run on a CPU
        seen.append((tuple(k.shape), implementation))
        return q
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    assert bench_decode.main(["--lengths", "1k", "--kernels", "cudnn", "--batch", "1", "--heads", "4",
                              "--kv-heads", "2", "--head-dim", "32", "--repeats", "1"]) == 0
    assert seen and all(s == ((1, 1024, 2, 32), "cudnn") for s in seen)
    run = bench_decode._kernel("cudnn", MaskSpec())
    q = jnp.zeros((1, 1, 4, 32), jnp.bfloat16)
    k = run.layout(jnp.zeros((1, 2, 1024, 32), jnp.bfloat16))
    text = jax.jit(run).lower((q,), k, k, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), jnp.ones(1)).as_text()
    assert "transpose" not in text


def test_median_time_warms_up_for_the_time_asked_after_the_compiling_call(monkeypatch):
    """``bench_decode`` times sub-millisecond kernels: two warm-up calls left the card cold (an H200's first 128K
    decode timings 0.283 ms a call, 0.174 warm). ``warmup_s`` keeps calling for that long after the first call.
    On a clock of the test's own (a busy machine's real clock made the bounds race)."""
    import qwen_jax.bench
    from qwen_jax.bench import median_time
    clock, ends = [0.0], []
    monkeypatch.setattr(qwen_jax.bench.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += 100.0 if not ends else 0.25     # the first call compiles
        ends.append(clock[0])

    median_time(fn, repeats=3, warmup=2, warmup_s=1.0)
    warm = len(ends) - 3                             # calls before the timed ones
    assert warm >= 2 and ends[warm - 1] - ends[0] >= 1.0 and ends[warm - 2] - ends[0] < 1.0
    assert warm == 5                                 # the first, then 4 x 0.25 s
    ends.clear()
    median_time(fn, repeats=2, warmup=0, warmup_s=0.5)
    assert ends[-3] - ends[0] >= 0.5 and len(ends) == 3 + 2
