"""The TPU kernels and the model's TPU steps compiled for a TPU by libtpu's deviceless compiler (``tpu_compile.py``).

``jax.export(..., platforms=["tpu"])`` (test_kernels.py, test_sparse.py) proves they lower; Mosaic's own
compilation caught what lowering does not (a ``lax.cond`` returning a bool vector in the DCA kernel, an unaligned
copy offset and a squeezed tiled dimension in the sparse one). ``.ci/run`` installs libtpu, the version ``jax[tpu]``
pins, into ``.ci/libtpu`` (off the import path: only this test's subprocess sees it) and names it in
``QWEN_JAX_LIBTPU``; elsewhere: ``pip install --target .ci/libtpu "libtpu==0.0.42.*"`` (jax 0.10.2's pin).
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tpu_kernels_and_model_steps_compile_for_a_tpu():
    folder = os.environ.get("QWEN_JAX_LIBTPU")
    if folder is None:
        folder = ROOT / ".ci" / "libtpu"
        if not (folder / "libtpu").is_dir():
            pytest.skip(f"libtpu is not installed in {folder} (pip install --target {folder} libtpu, see the "
                        f"docstring)")
    assert (pathlib.Path(folder) / "libtpu").is_dir(), f"QWEN_JAX_LIBTPU={folder} holds no libtpu"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(folder)]))
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "tpu_compile.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith(("OK ", "FAIL "))]
    failures = [line for line in lines if line.startswith("FAIL")]
    assert len(lines) == 24 and not failures and run.returncode == 0, "\n".join(failures) or run.stderr[-3000:]
