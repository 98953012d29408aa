"""``qwen-jax demo``: the whole pipeline offline on a small random-weight Qwen2.5-architecture model.

Writes an HF-layout checkpoint (seeded random weights, a byte-level BPE tokenizer trained on the spot,
the Qwen chat template), converts it to the qwen-jax format, loads it, prefills a long prompt in
chunks, generates, and checks the result against the reference path: the KV-cached greedy
continuation must equal the argmax of a one-shot forward over prompt + continuation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

DEMO_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    "use_sliding_window": False, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE (Qwen's tokenizer family) trained on a little built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [FILLER * 4, "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
              "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.",
              "What is the pass key? The pass key is 71432. Remember it."] * 8
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_hf_checkpoint(folder: str, config: dict, seed: int = 0, dtype="bfloat16") -> str:
    """Write a Qwen2 checkpoint in Hugging Face layout with seeded random weights (non-zero biases)."""
    from convert import write_hf_safetensors
    from qwen_jax.config import QwenConfig
    from qwen_jax.model import init_params

    os.makedirs(folder, exist_ok=True)
    cfg = QwenConfig.from_hf_dict(config)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        # Unit-scale activations: embeddings ~ N(0, 1), matrices ~ N(0, 1/fan_in), small biases.
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return a
        if "bias" in name:
            std = 0.05
        elif "embed" in name:
            std = 1.0
        elif "lm_head" in name:               # [V, D]
            std = a.shape[1] ** -0.5
        elif "o_proj" in name:                # [N, H, D]
            std = (a.shape[0] * a.shape[1]) ** -0.5
        else:                                 # [D, ...] and [F, D]: input dimension first
            std = a.shape[0] ** -0.5
        return rng.normal(0, std, a.shape).astype(a.dtype)

    params = jax.tree_util.tree_map_with_path(draw, params)
    write_hf_safetensors(folder, params, cfg, dtype=np.dtype(jax.numpy.dtype(dtype)), progress=False)
    tok = train_tokenizer(min(cfg.vocab_size, 1024))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                   "chat_template": QWEN_CHAT_TEMPLATE}, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}, f)
    return folder


def _generate_and_check(model, prompt: list[int], new_tokens: int) -> bool:
    """Generate greedily, time prefill and decode, and check the KV-cached path against a one-shot forward:
    the logits of the chunked prefill and of every decode step against the full-sequence logits."""
    import jax.numpy as jnp

    import qwen_jax
    from qwen_jax.cache import cache_length, padded_prompt_length
    from qwen_jax.generation import generate_ids

    cfg, params = model.config, model.params
    out = generate_ids(params, cfg, [prompt], max_new_tokens=new_tokens, spec=model.attention,
                       prefill_chunk_size=model.prefill_chunk_size)[0]
    tokens = np.asarray(prompt + out, np.int32)
    padded = padded_prompt_length(len(prompt))
    for _ in range(2):  # the first pass compiles, the second is timed
        cache = qwen_jax.init_cache(cfg, 1, cache_length(padded, new_tokens), jnp.float32)
        t0 = time.perf_counter()
        first, cache = qwen_jax.prefill(params, np.pad(tokens[: len(prompt)], (0, padded - len(prompt)))[None],
                                        np.asarray([len(prompt)]), cache, cfg, chunk_size=model.prefill_chunk_size,
                                        spec=model.attention)
        jax.block_until_ready(first)
        t_prefill = time.perf_counter() - t0
        steps, t0 = [first], time.perf_counter()
        for i in range(len(out) - 1):
            logits, cache = qwen_jax.decode_step(params, jnp.asarray(tokens[len(prompt) + i: len(prompt) + i + 1]),
                                                 jnp.asarray([len(prompt) + i], jnp.int32), cache, cfg,
                                                 spec=model.attention)
            steps.append(logits)
        jax.block_until_ready(steps[-1])
        t_decode = time.perf_counter() - t0
    cached = np.concatenate([np.asarray(x) for x in steps])
    one_shot = model.logits(tokens[None])[0, len(prompt) - 1: len(tokens) - 1]
    err = float(np.abs(cached - one_shot).max() / np.abs(one_shot).max())
    ok = err <= 1e-5 and one_shot.argmax(-1).tolist() == out
    print(f"      prefill {len(prompt) / t_prefill:,.0f} tokens/s, decode {max(len(out) - 1, 1) / t_decode:,.1f} "
          f"tokens/s; continuation {model.tokenizer.decode(out)!r}")
    print(f"      KV-cached logits vs one-shot forward: max error {err:.1e} of the logits' scale, greedy tokens "
          f"{'identical' if ok else 'DIFFERENT'}: {'OK' if ok else 'MISMATCH'}")
    return ok


# What a finished checkpoint of each kind holds (convert writes its marker last)
_HF_FILES = ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json", "generation_config.json")
_JAX_FILES = ("qwen_jax.json",)


def _reusable(folder: str, files: tuple[str, ...]) -> bool:
    """Whether the demo can reuse ``folder`` (it holds ``files``) or must write it (absent, or an empty folder).
    A folder with other contents is the user's, or a checkpoint cut short: refuse rather than delete it."""
    from qwen_jax.errors import QwenJaxError
    if not os.path.lexists(folder):
        return False
    if os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, n)) for n in files):
        return True
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
        return False
    missing = next((n for n in files if not os.path.isfile(os.path.join(folder, n))), files[0])
    raise QwenJaxError(f"{folder} exists but is not a complete demo checkpoint (no {missing}): remove it, or give "
                       "another --workdir")


def run_demo(prompt_tokens: int = 4096, new_tokens: int = 32, workdir: str | None = None) -> int:
    import qwen_jax
    from convert import convert_checkpoint
    from qwen_jax.errors import QwenJaxError

    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QwenJaxError(f"{name} must be a positive integer, got {value!r}")
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise QwenJaxError(f"workdir {workdir}: not a folder")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = workdir or tmp
        os.makedirs(root, exist_ok=True)
        hf_dir, jax_dir = os.path.join(root, "demo-hf"), os.path.join(root, "demo-qwen-jax")
        reuse_hf, reuse_jax = _reusable(hf_dir, _HF_FILES), _reusable(jax_dir, _JAX_FILES)
        print(f"[1/6] writing a {DEMO_CONFIG['num_hidden_layers']}-layer Qwen2.5-architecture checkpoint "
              f"(random weights, seed 0) to {hf_dir}")
        if not reuse_hf:    # written next to its place and renamed once complete: never found half-written
            partial = f"{hf_dir}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                write_hf_checkpoint(partial, DEMO_CONFIG)
                os.rename(partial, hf_dir)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        print(f"[2/6] converting to {jax_dir}; loading both (float32)")
        if not reuse_jax:
            convert_checkpoint(hf_dir, jax_dir, progress=False)
        model = qwen_jax.load(jax_dir, dtype="float32", prefill_chunk_size=1024)
        probe = np.arange(256, dtype=np.int32)[None] % DEMO_CONFIG["vocab_size"]
        ok_convert = np.array_equal(qwen_jax.load(hf_dir, dtype="float32").logits(probe), model.logits(probe))
        print(f"      converted checkpoint logits == HF-folder logits (bit-exact): {'OK' if ok_convert else 'MISMATCH'}")
        text = "There is an important info hidden inside a lot of irrelevant text.\n\n"
        prompt = model.tokenizer.encode(text + FILLER * (prompt_tokens // 8))[:prompt_tokens]
        print(f"[3/6] plain attention: prefill {len(prompt)} tokens in chunks of {model.prefill_chunk_size}, "
              f"then {new_tokens} greedy tokens")
        ok_plain = _generate_and_check(model, prompt, new_tokens)
        dca_block = {"chunk_size": 1024, "local_size": 128}
        dca = qwen_jax.load(jax_dir, dtype="float32", prefill_chunk_size=1024, dual_chunk_attention_config=dca_block)
        print(f"[4/6] dual chunk attention {dca_block}: the prompt spans "
              f"{-(-len(prompt) // dca.config.dual_chunk_attention_config.chunk_len)} DCA chunks")
        ok_dca = _generate_and_check(dca, prompt, new_tokens)
        head = np.asarray(prompt[:2048], np.int32)[None]
        print(f"[5/6] blockwise DCA (memory-linear) against its dense twin, first {head.shape[1]} tokens")
        dense = qwen_jax.Model(dca.config, dca.params, attn_implementation="reference").logits(head)
        err = float(np.abs(dca.logits(head) - dense).max() / np.abs(dense).max())
        ok_twin = err <= 1e-5
        print(f"      max error relative to the logits' scale: {err:.1e} ({'OK' if ok_twin else 'MISMATCH'})")
        ok_sparse = _sparse_prefill(jax_dir, dca_block, prompt)
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok_convert and ok_plain and ok_dca and ok_twin and ok_sparse else 1


def _sparse_prefill(jax_dir: str, dca_block: dict, prompt: list[int]) -> bool:
    """Sparse prefill (vertical-slash, small budgets so the mask really is sparse at demo lengths): its
    attention recall, and the memory-linear path against the dense-masked twin."""
    import qwen_jax
    from qwen_jax import recall

    layers, heads = DEMO_CONFIG["num_hidden_layers"], DEMO_CONFIG["num_attention_heads"]
    budgets = [{str(h): ["vertical_and_slash", 64, 256, 1.0] for h in range(heads)} for _ in range(layers)]
    block = dict(dca_block, sparse_attention_enabled=True, sparse_attention_threshold=0,
                 sparse_attention_config=budgets)
    model = qwen_jax.load(jax_dir, dtype="float32", prefill_chunk_size=1024, dual_chunk_attention_config=block)
    head = prompt[:2048]
    print(f"[6/6] sparse prefill (vertical-slash on DCA, budgets 64 columns / 256 diagonals per head), "
          f"first {len(head)} tokens")
    r = recall.measure(model.params, model.config, head, chunk_size=1024, spec=model.attention)["recall"]
    print(f"      attention recall (softmax mass the mask keeps): mean {np.nanmean(r):.3f}, "
          f"min {np.nanmin(r):.3f} over {r.size} heads")
    tokens = np.asarray(head[:1024], np.int32)[None]
    dense_twin = qwen_jax.Model(model.config, model.params, attn_implementation="reference",
                                prefill_chunk_size=1024).logits(tokens)
    err = float(np.abs(model.logits(tokens) - dense_twin).max() / np.abs(dense_twin).max())
    ok = err <= 1e-5 and 0 < np.nanmin(r) and np.nanmax(r) <= 1 + 1e-6
    print(f"      memory-linear sparse path vs its dense-masked twin: max error {err:.1e} of the logits' scale "
          f"({'OK' if ok else 'MISMATCH'})")
    return ok
