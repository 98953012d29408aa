"""Multi-process jobs: 2 processes x 4 CPU devices on localhost (gloo collectives) give the single-device
logits and greedy tokens with DCA and sparse prefill, and a process that dies stops the other within seconds."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests import multihost_worker as worker
from tests.conftest import ROOT

# Global meshes over the 8 devices of the two processes (the outer axis spans them: data, one batch row per
# process, or seq, the all-to-alls crossing processes, as the README's one-prompt pod recipes do); every one is
# checked in the same job.
MESHES = ["data=2,tensor=4", "data=2,seq=2,tensor=2", "seq=2,tensor=4"]
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(*args, log, out=None):
    """A worker process with 4 CPU devices; stderr (and stdout, unless ``out`` is given) to ``log``."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]   # conftest's others
    env = dict(os.environ, XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=4"]),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, stdout=out or log, stderr=log)


def finish(procs, timeout):
    """Wait for every process (killing all at the deadline); return their exit codes and seconds taken."""
    start, codes, seconds = time.monotonic(), [None] * len(procs), [None] * len(procs)
    while any(c is None for c in codes) and time.monotonic() - start < timeout:
        for i, p in enumerate(procs):
            if codes[i] is None and p.poll() is not None:
                codes[i], seconds[i] = p.returncode, time.monotonic() - start
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if codes[i] is None:
            p.kill()
            p.wait()
    return codes, seconds


def test_two_processes_equal_one_device(tiny_checkpoint, tmp_path):
    import qwen_jax
    folder = tiny_checkpoint[0]
    (tmp_path / "budgets.json").write_text(json.dumps(worker.BUDGETS))
    port = free_port()
    logs, outs = ([open(tmp_path / f"{name}_{i}.txt", "w") for i in range(2)] for name in ("log", "out"))
    procs = [launch("run", port, i, folder, tmp_path, *MESHES, log=logs[i], out=outs[i]) for i in range(2)]
    # the single-device oracle, computed while the job runs
    model = qwen_jax.load(folder, dtype="float32", dual_chunk_attention_config=worker.DCA,
                          prefill_chunk_size=worker.PREFILL_CHUNK)
    ref_logits, ref_ids = worker.results(model)
    ref_text = model.generate(worker.CLI_PROMPT, max_new_tokens=worker.NEW_TOKENS)[0]
    codes, _ = finish(procs, timeout=240)
    for i in range(2):
        logs[i].close()
        outs[i].close()
        assert codes[i] == 0, f"process {i} exited {codes[i]}:\n" + (tmp_path / f"log_{i}.txt").read_text()[-3000:]
    assert ref_text.strip() and (tmp_path / "out_0.txt").read_text() == ref_text + "\n"
    assert (tmp_path / "out_1.txt").read_text() == ""                # only process 0 prints, nothing else does
    logits, ids = np.load(tmp_path / "logits.npz"), json.loads((tmp_path / "ids.json").read_text())
    scale = np.abs(ref_logits).max()
    for mesh in MESHES:
        print(f"{mesh}: logits within {np.abs(logits[mesh] - ref_logits).max() / scale:.2g} of their scale")
        assert np.abs(logits[mesh] - ref_logits).max() <= 1e-5 * scale, mesh
        assert ids[mesh] == ref_ids, mesh


def test_a_dead_process_stops_the_other_within_seconds(tiny_checkpoint, tmp_path):
    """Three jobs at once. Process 1 dies after a first collective: the survivor's next collective fails
    and it exits with one line (or, if that collective waits, the heartbeat timeout stops it, naming
    process 1). Process 0, the coordinator, dies after a first collective: the
    coordination service's loss stops the survivor at once. Process 1 dies right after joining: the
    coordinator declares it dead after the 10 s heartbeat timeout, names it, and stops."""
    cases = [("collective", 1), ("collective", 0), ("init", 1)]
    procs, paths = [], []
    for when, victim in cases:
        port = free_port()
        for i in range(2):
            paths.append(tmp_path / f"{when}_{victim}_{i}.txt")
            with open(paths[-1], "w") as log:
                procs.append(launch("die", port, i, tiny_checkpoint[0], when, victim, log=log))
    codes, seconds = finish(procs, timeout=90)
    for k, (when, victim) in enumerate(cases):
        survivor = 2 * k + 1 - victim
        log = paths[survivor].read_text()
        where = f"{when}/{victim}: exit {codes[survivor]} after {seconds[survivor]} s\n{log[-3000:]}"
        if None not in (seconds[survivor], seconds[2 * k + victim]):
            print(f"{when}/{victim}: the survivor exits {codes[survivor]} "
                  f"{seconds[survivor] - seconds[2 * k + victim]:.1f} s after process {victim} died")
        assert codes[2 * k + victim] == 3, where
        assert codes[survivor] not in (None, 0), where
        assert seconds[survivor] < 45, where
        assert "survivor: no error" not in log, where
        heartbeat = (codes[survivor] == -signal.SIGABRT
                     and "The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in log)
        if (when, victim) == ("collective", 1) and not heartbeat:
            # an exception in Python: one line, exit 1 (on a loaded machine the collective can instead wait
            # until the heartbeat timeout declares process 1 dead: the abort below, which names it)
            assert codes[survivor] == 1, where
            assert "qwen-jax: error: process 0 of 2: a computation across processes failed, most likely because " \
                   "another process of the job died" in log, where
        else:                                          # the coordination service aborts the process
            assert codes[survivor] == -signal.SIGABRT, where
            assert "Terminating process because the JAX distributed service detected fatal errors" in log, where
        if when == "init":
            assert heartbeat, where


def test_a_job_that_cannot_be_joined_is_refused_in_one_line():
    """``--coordinator auto`` where JAX detects no cluster (it raised 'ValueError: coordinator_address should be
    defined.' with a traceback), a process count of the environment's that int() refuses ('²' passed str.isdigit), a
    job of no processes: one line and exit 1, before any JAX backend starts."""
    detected = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "CLOUD_TPU", "KUBERNETES_", "JAX_COORDINATOR",
                "QWEN_JAX_COORDINATOR", "QWEN_JAX_NUM_PROCESSES", "QWEN_JAX_PROCESS_ID")
    base = {k: v for k, v in os.environ.items() if not k.startswith(detected)}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cases = [([], {"QWEN_JAX_COORDINATOR": "auto"},       # (JAX's own words in the middle: ".+")
              re.escape("cannot join a multi-process job: ") + ".+" + re.escape(
                  " (with coordinator auto, JAX detects TPU pods, SLURM and Open MPI jobs only; elsewhere give process "
                  "0's HOST:PORT, the number of processes and this process's id)")),
             (["--coordinator", "localhost:1"], {"QWEN_JAX_NUM_PROCESSES": "\u00b2", "QWEN_JAX_PROCESS_ID": "0"},
              re.escape("QWEN_JAX_NUM_PROCESSES='\u00b2' is not a non-negative integer")),
             (["--coordinator", "localhost:1", "--num-processes", "0", "--process-id", "0"], {},
              "the number of processes must be at least 1, got 0")]
    for flags, env, message in cases:
        done = subprocess.run([sys.executable, "-m", "qwen_jax", "generate", "--model", "unused", "--prompt", "hi",
                               *flags], env=dict(base, **env), capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, (flags, env, done.stderr[-2000:])
        assert re.fullmatch(f"qwen-jax: error: {message}\n", done.stderr), done.stderr[-2000:]
