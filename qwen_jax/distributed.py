"""Multi-process (multi-host) runs: one Python process per host, or per GPU, all running the same program.

``initialize()`` must run before anything touches a JAX backend. It wraps ``jax.distributed.initialize``
with three changes that matter for long jobs:

- the job's layout comes from arguments, else ``QWEN_JAX_COORDINATOR`` / ``QWEN_JAX_NUM_PROCESSES`` /
  ``QWEN_JAX_PROCESS_ID``, else JAX's own cluster detection (TPU pods, SLURM, Open MPI);
- bounded failure: a process that stops sending heartbeats for ``heartbeat_timeout_s`` (10 s, JAX's
  default is 100) is declared dead and every other process is stopped by the coordination service;
- an uncaught exception exits the process at once (``exit_on_error``) instead of waiting at JAX's
  shutdown barrier for peers that may be stuck in a collective waiting for this process.

What a peer's death looks like, measured with jax 0.10.2 on CPU (2 processes, gloo collectives;
tests/test_multihost.py):

- a survivor inside a cross-process collective gets an exception within about a second ("Gloo
  AllGather failed: ... Connection closed by peer"); with ``exit_on_error`` it prints one line,
  ``qwen-jax: error: process 0 of 2: a computation across processes failed, most likely because another
  process of the job died ...``, and exits 1 (2 s after the death, in the test);
- if the dead process was the coordinator (process 0), the coordination service's loss aborts every
  other process at once (SIGABRT, "Terminating process because the JAX distributed service detected
  fatal errors. This most likely indicates that another task died"; 0.3 s);
- a survivor that is idle, computing, or waiting for a peer that never joins a collective (NCCL
  collectives do not notice a dead peer) is aborted the same way once the coordinator has missed the
  dead process's heartbeats for ``heartbeat_timeout_s``; the coordinator's log names it ("The following
  tasks are unhealthy (stopped sending heartbeats): 1"; 10.5 s);
- a process whose peers do not all join within ``initialization_timeout_s`` aborts the same way
  ("DEADLINE_EXCEEDED ... RegisterTask"), which is also the bound when the coordinator dies while the
  others are still joining.

The aborts come from JAX's C++ runtime; Python cannot intercept them or shorten their message.
"""

from __future__ import annotations

import os
import re
import sys

from qwen_jax.errors import ConfigError

ENV_COORDINATOR = "QWEN_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "QWEN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "QWEN_JAX_PROCESS_ID"
AUTO = "auto"   # as the coordinator: let JAX detect the cluster (TPU pod, SLURM, Open MPI)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, heartbeat_timeout_s: int = 10,
               initialization_timeout_s: int = 120, shutdown_timeout_s: int = 30, exit_on_error: bool = True) -> None:
    """Join a multi-process job. Call once per process, before any other JAX call.

    ``coordinator_address`` is ``"host:port"`` of process 0 (which also serves the coordination service
    there), or ``"auto"``/``None`` for JAX's cluster detection; each argument left out is read from
    ``QWEN_JAX_COORDINATOR``, ``QWEN_JAX_NUM_PROCESSES`` and ``QWEN_JAX_PROCESS_ID``. Every process then
    sees every device (``jax.devices()``) and owns its local ones; a mesh must span all of them.
    """
    import jax

    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if coordinator_address == AUTO:
        coordinator_address = None
    num_processes = _int_or_env(num_processes, ENV_NUM_PROCESSES)
    process_id = _int_or_env(process_id, ENV_PROCESS_ID)
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ConfigError(f"with coordinator {coordinator_address} also give the number of processes and this "
                          f"process's id (--num-processes/--process-id or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"the number of processes must be at least 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    # gloo is what CPU processes exchange data through (the default since jax 0.5; older versions had none);
    # the setting only configures the CPU client, so it is harmless on GPU and TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   shutdown_timeout_seconds=shutdown_timeout_s)
    except (ValueError, RuntimeError) as e:   # no cluster detected, a second call, a port that cannot be served
        raise ConfigError(_join_failure(coordinator_address, e)) from None
    if exit_on_error:
        sys.excepthook = _exit_at_once


def is_multiprocess() -> bool:
    """True once this process has joined a job of more than one process."""
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def exit_now(code: int) -> None:
    """End this process with ``code`` without JAX's shutdown barrier (flushing stdout and stderr first).

    In a multi-process job a failing process must not wait at that barrier: the others may be blocked
    in a collective that needs it, and only its disappearance makes them fail instead of hang.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Words in an XLA runtime error that mean a peer went away (gloo on CPUs, NCCL on GPUs, the coordinator).
_PEER_LOST = ("closed by peer", "reset by peer", "connection refused", "gloo", "nccl", "coordination service")


def peer_failure(error: BaseException) -> str | None:
    """One line for a runtime error caused by losing another process of the job, else None."""
    import jax
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if not isinstance(error, jax.errors.JaxRuntimeError) or not any(w in text.lower() for w in _PEER_LOST):
        return None
    return (f"process {jax.process_index()} of {jax.process_count()}: a computation across processes failed, "
            f"most likely because another process of the job died (see its log): {first}")


def _exit_at_once(kind, error, tb) -> None:
    message = peer_failure(error) if is_multiprocess() else None
    if message:
        print(f"qwen-jax: error: {message}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, tb)
    exit_now(1)


def _join_failure(coordinator_address: str | None, error: BaseException) -> str:
    """One line for ``jax.distributed.initialize`` refusing to start (before any other process is involved)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if coordinator_address is None:
        return (f"cannot join a multi-process job: {first} (with coordinator auto, JAX detects TPU pods, SLURM and "
                f"Open MPI jobs only; elsewhere give process 0's HOST:PORT, the number of processes and this "
                f"process's id)")
    return f"cannot join the multi-process job at {coordinator_address}: {first}"


def _int_or_env(value: int | None, name: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"[0-9]+", raw):      # (str.isdigit also takes '²', which int() refuses)
        raise ConfigError(f"{name}={raw!r} is not a non-negative integer")
    return int(raw)
