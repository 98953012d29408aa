"""Shared fixtures: tiny HF checkpoints written by transformers (the oracle), and the real 0.5B model."""

import os
import subprocess
import sys

# 8 simulated CPU devices for mesh tests; must be set before jax initialises its backends. XLA's CPU compiler at
# its lowest optimisation level and with its loop emitters instead of the fusion emitters: the suite spends most
# of its time compiling small programs it runs once, and this compiles them about 35% sooner (a sparse prefill
# test: 50 -> 32 s; `bash .ci/run` from a fresh clone on 2 cores: 47.6 -> 24.2 minutes) at some cost where the
# work is running, not compiling (a real 0.5B passkey prompt: 12 -> 36 s): test_dca_real.py and test_demo.py run
# their commands in processes of their own with XLA's defaults. The programs compute the same values, within the
# tests' tolerances; the GPU runs and the benchmarks keep XLA's defaults.


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA takes ``flag``: an unknown flag in XLA_FLAGS aborts the process at its first backend,
    and inside a test pytest has its output (jaxlib 0.11 has no ``--xla_cpu_use_fusion_emitters``: the suite ended
    after one test, printing nothing, exit status 1). Asked once, in a process of its own (~1.5 s); pytest-xdist's
    workers and the tests' subprocesses inherit the answer in XLA_FLAGS."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                          timeout=120).returncode == 0


if "XLA_FLAGS" not in os.environ:
    _emitters = "--xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
                               + (f" {_emitters}" if _xla_knows(_emitters) else ""))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the command line caches compiled programs under ~/.cache by default; tests run without (test_compile_cache.py
# turns it on in folders of its own)
os.environ.setdefault("QWEN_JAX_COMPILE_CACHE", "off")

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_MODEL_ENV = "QWEN_JAX_REAL_MODEL"


def hf_config(**overrides):
    from transformers import Qwen2Config
    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    base.update(overrides)
    return Qwen2Config(**base)


def make_hf_model(seed=0, **overrides):
    """A float32 ``Qwen2ForCausalLM`` with random weights, random non-zero biases and norm scales."""
    import torch
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    return model


def save_hf_checkpoint(model, folder, with_tokenizer=True, **save_kwargs):
    """save_pretrained as safetensors, plus the demo tokenizer and chat template."""
    from qwen_jax.demo import QWEN_CHAT_TEMPLATE, train_tokenizer
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    if with_tokenizer:
        train_tokenizer(min(model.config.vocab_size, 1024)).save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|im_end|>", "chat_template": QWEN_CHAT_TEMPLATE}, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(folder, hf_model) of a small untied GQA model saved by transformers."""
    model = make_hf_model(seed=1)
    folder = save_hf_checkpoint(model, tmp_path_factory.mktemp("tiny") / "hf")
    return folder, model


_REAL_MODEL_BUILD = {}


def _real_model_command():
    """The command that builds the real model from ../shared (idempotent: it prints the model's folder)."""
    build = os.path.join(ROOT, "..", "shared", "real_models", "build.sh")
    assert os.path.isfile(build), f"set {REAL_MODEL_ENV} or provide {build}"
    out = os.path.join(ROOT, ".cache", "real_models")
    os.makedirs(out, exist_ok=True)
    # one build at a time (pytest-xdist workers each start one): the others then find it built
    lock = ["flock", os.path.join(out, ".lock")] if shutil.which("flock") else []
    return [*lock, "bash", build, out]


def _start_real_model_build():
    """Start the build in the background (once), its output going to files: a full pipe would stall it."""
    if "proc" not in _REAL_MODEL_BUILD:
        command = _real_model_command()
        logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
        _REAL_MODEL_BUILD.update(proc=subprocess.Popen(command, stdout=logs[0], stderr=logs[1], text=True), logs=logs)


# the longest test files (about 9, 5 and 4 of the suite's 50 CPU minutes), the real model's, the TPU compilation (3.5
# minutes where libtpu is installed, as in CI), then the next longest
LONGEST_FIRST = ("test_sparse.py", "test_kernels.py", "test_mesh.py", "test_dca_real.py", "test_real_weights.py",
                 "test_tpu_compile.py", "test_demo.py", "test_cli.py", "test_prefix.py", "test_multihost.py",
                 "test_generation.py")


def pytest_configure(config):
    """Keep ``LONGEST_FIRST``'s order under ``--dist loadfile``: pytest-xdist >= 3.6 otherwise hands out the files with the
    most tests first, which left the real model's passkeys (2 tests) and the TPU compilation (1), about 3 and 3.5
    CPU minutes, to start together at the end of the run."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)               # after -k / -m deselection: only for tests that will run
def pytest_collection_modifyitems(session, config, items):
    """Start building the real model as soon as a selected test needs it (about two minutes of downloading
    and converting on a fresh checkout), so the tests that run before it hide that time. Files known to take
    longest run first (``--dist loadfile`` hands out files in this order: no long file left to run alone at the
    end), the real model's after the three longest (by then its build is done)."""
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(os.path.basename(str(item.fspath)), len(first)))   # stable: the rest as is
    if os.environ.get(REAL_MODEL_ENV):
        return
    if any("real_model_path" in getattr(item, "fixturenames", ()) for item in items):
        try:
            _start_real_model_build()
        except AssertionError:
            return                                        # the fixture reports it, for the tests that need it


@pytest.fixture(scope="session")
def real_model_path():
    """The real Qwen2.5-Coder-0.5B-Instruct folder: $QWEN_JAX_REAL_MODEL, or built from ../shared (started in
    the background at collection)."""
    path = os.environ.get(REAL_MODEL_ENV)
    if path:
        assert os.path.isfile(os.path.join(path, "model.safetensors")), f"{REAL_MODEL_ENV}={path} has no weights"
        return path
    _start_real_model_build()
    code = _REAL_MODEL_BUILD["proc"].wait()
    for log in _REAL_MODEL_BUILD["logs"]:
        log.seek(0)
    out, err = (log.read() for log in _REAL_MODEL_BUILD["logs"])
    assert code == 0, f"building the real model failed ({code}):\n{err[-3000:]}"
    return out.strip().splitlines()[-1]


def run_cli(*args, stdin=None, env=None, timeout=None):
    """``qwen-jax ARGS`` in a process of its own (``python -m qwen_jax.cli``), stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "qwen_jax.cli", *map(str, args)], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def run_cli_at_xla_defaults(*args, timeout=900):
    """``run_cli`` with XLA's default CPU flags instead of the quick-compile ones above, for the commands whose
    tests mostly run programs, not compile them (module comment at the top)."""
    return run_cli(*args, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, timeout=timeout)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(autouse=True, scope="module")
def _release_compilations_between_modules():
    """Drop JAX's compiled programs after each test module: the whole suite in one process otherwise
    keeps every module's executables (8 simulated devices, real-model graphs) alive to the end."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
