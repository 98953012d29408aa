"""One process of the 2-process localhost jobs in test_multihost.py (run as a script, 4 CPU devices each).

``run PORT PID CHECKPOINT OUT MESH...``: the CLI's greedy generation on the first mesh (on stdout; the
worker's own messages go to stderr), then for every mesh the prefill logits and greedy token ids,
written by process 0 (on the first mesh also: inputs that differ between the processes are refused).
``die PORT PID CHECKPOINT WHEN VICTIM``: process VICTIM exits abruptly (right after joining the job, or
after one collective with the other); the other one enters collectives and must be stopped.
(Not tested: the coordinator dying right after joining. Its ``initialize`` can return before the
other process has registered, which then waits for ``initialization_timeout_s`` before it aborts.)
"""

import json
import os
import sys
import time

import numpy as np

LAYERS, HEADS = 2, 4
BUDGETS = [{str(h): ["vertical_and_slash", 30, 50, 0.95] for h in range(HEADS)} for _ in range(LAYERS)]
# S = chunk_size - local_size = 64: 256-token prompts span four DCA chunks and two prefill chunks of one
# shape (one compilation). Small budgets make the sparse selection matter (it differs from dense DCA),
# and threshold 0 sends every prompt through it.
DCA = {"chunk_size": 128, "local_size": 64, "sparse_attention_enabled": True, "sparse_attention_threshold": 0,
       "sparse_attention_config": BUDGETS}
PREFILL_CHUNK = 128
LOGITS_TOKENS = np.random.default_rng(0).integers(0, 1000, (2, 256))
# One prompt of random ids for greedy decoding, and the CLI's text prompt: both 193..256 tokens long,
# so both pad to 256 and share the prefill and decode compilations.
PROMPT = [int(t) for t in np.random.default_rng(1).integers(0, 1000, 240)]
CLI_PROMPT = "Qwen " * 60
NEW_TOKENS = 8


def cli_args(checkpoint, budgets_file, mesh):
    return ["generate", "--model", checkpoint, "--prompt", CLI_PROMPT, "--max-new-tokens", str(NEW_TOKENS),
            "--dtype", "float32", "--dca", f"chunk_size={DCA['chunk_size']},local_size={DCA['local_size']}",
            "--sparse-threshold", "0", "--sparse-config", budgets_file, "--prefill-chunk", str(PREFILL_CHUNK),
            *(["--mesh", mesh] if mesh else [])]


def results(model):
    """(logits [2, 256, V], greedy ids of PROMPT) through the public entry points."""
    from qwen_jax.generation import generate_ids
    ids = generate_ids(model.params, model.config, [PROMPT], max_new_tokens=NEW_TOKENS, spec=model.attention,
                       prefill_chunk_size=model.prefill_chunk_size)[0]
    return model.logits(LOGITS_TOKENS), ids


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(port, pid, checkpoint, out, *meshes):
    import pytest

    import qwen_jax
    from qwen_jax import cli, distributed
    from qwen_jax.errors import ConfigError

    budgets_file = os.path.join(out, "budgets.json")
    job = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]
    if pid == 1:   # the same job through the environment
        os.environ.update({distributed.ENV_COORDINATOR: f"localhost:{port}", distributed.ENV_NUM_PROCESSES: "2",
                           distributed.ENV_PROCESS_ID: "1"})
        job = []
    # The CLI joins the job itself, as `qwen-jax generate` would; its output is this process's stdout.
    code = cli.main([*cli_args(checkpoint, budgets_file, meshes[0]), *job])
    assert code == 0, code
    log("CLI done")
    for mesh, message in [(None, "2-process job: pass a mesh over all 8 devices"),
                          ("data=2,tensor=2", "uses 4 of the 8 devices of this 2-process job")]:
        with pytest.raises(ConfigError, match=message):      # refused before any weight is read
            qwen_jax.load(checkpoint, mesh=mesh)
    logits, ids = {}, {}
    for mesh in meshes:
        model = qwen_jax.load(checkpoint, dtype="float32", mesh=mesh, dual_chunk_attention_config=DCA,
                              prefill_chunk_size=PREFILL_CHUNK)
        logits[mesh], ids[mesh] = results(model)
        log(f"{mesh} done")
        if mesh == meshes[0]:
            refuse_other_inputs(model, pid)
    if pid == 0:
        np.savez(os.path.join(out, "logits.npz"), **logits)
        with open(os.path.join(out, "ids.json"), "w") as f:
            json.dump(ids, f)


def refuse_other_inputs(model, pid):
    """Ids that differ between the processes, of the same length (the same programs): each process fed its own
    into the one computation, with no error (over data=2,tensor=4 each process even computed its own prompt, and
    process 0 printed its answer); in other shapes the collectives of the two do not match. Now one line on both."""
    import pytest

    from qwen_jax.errors import ConfigError
    from qwen_jax.generation import generate_ids
    first = r" differ between the processes of this job \(process\(es\) \[1\] have others than process 0\)"
    with pytest.raises(ConfigError, match="^the prompts or generation settings" + first):
        generate_ids(model.params, model.config, [PROMPT[pid:pid + 50]], max_new_tokens=2, spec=model.attention)
    with pytest.raises(ConfigError, match="^the prompts or generation settings" + first):
        generate_ids(model.params, model.config, [PROMPT[:50]], max_new_tokens=2, seed=pid, spec=model.attention)
    with pytest.raises(ConfigError, match="^the tokens" + first):
        model.logits(LOGITS_TOKENS + pid)
    with pytest.raises(ConfigError, match="^the prefix's ids" + first):
        model.cache_prefix(PROMPT[pid:pid + 50])
    log("other inputs refused")


def die(port, pid, checkpoint, when, victim):
    import jax

    import qwen_jax
    from jax.experimental import multihost_utils
    from qwen_jax import distributed

    distributed.initialize(f"localhost:{port}", 2, pid)
    if when == "collective":
        multihost_utils.process_allgather(np.arange(4) + pid)
    if pid == victim:
        os._exit(3)
    model = qwen_jax.load(checkpoint, dtype="float32", mesh="data=2,tensor=4")   # a batch row per process
    log(f"survivor {jax.process_index()}: entering collectives")
    for _ in range(20):
        model.logits(LOGITS_TOKENS[:, :64])       # gathers the rows' logits from both processes
        time.sleep(0.5)
    log("survivor: no error")


if __name__ == "__main__":
    mode, port, pid, *rest = sys.argv[1:]
    if mode == "run":
        run(int(port), int(pid), *rest)
    else:
        checkpoint, when, victim = rest
        die(int(port), int(pid), checkpoint, when, int(victim))
