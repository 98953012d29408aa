"""``qwen-jax demo``: the whole pipeline offline on a small random-weight Qwen2.5-architecture model.

Writes an HF-layout checkpoint (seeded random weights, a byte-level BPE tokenizer trained on the spot,
the Qwen chat template), converts it to the qwen-jax format, loads it, prefills a long prompt in
chunks, generates, and checks the result against the reference path: the KV-cached greedy
continuation must equal the argmax of a one-shot forward over prompt + continuation.
"""

from __future__ import annotations

import json
import os
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
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [rng.normal(0, 0.05, a.shape).astype(a.dtype) if "bias" in jax.tree_util.keystr(p) else a for p, a in flat]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
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


def run_demo(prompt_tokens: int = 4096, new_tokens: int = 32, workdir: str | None = None) -> int:
    import qwen_jax
    from convert import convert_checkpoint
    from qwen_jax.generation import generate_ids
    from qwen_jax.sampling import Sampling

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = workdir or tmp
        os.makedirs(root, exist_ok=True)
        hf_dir, jax_dir = os.path.join(root, "demo-hf"), os.path.join(root, "demo-qwen-jax")
        print(f"[1/5] writing a {DEMO_CONFIG['num_hidden_layers']}-layer Qwen2.5-architecture checkpoint "
              f"(random weights, seed 0) to {hf_dir}")
        if not os.path.isdir(hf_dir):
            write_hf_checkpoint(hf_dir, DEMO_CONFIG)
        print(f"[2/5] converting to {jax_dir}")
        if not os.path.isdir(jax_dir):
            convert_checkpoint(hf_dir, jax_dir, progress=False)
        print("[3/5] loading (float32)")
        model = qwen_jax.load(jax_dir, dtype="float32", prefill_chunk_size=1024)
        text = "There is an important info hidden inside a lot of irrelevant text.\n\n"
        ids = model.tokenizer.encode(text + FILLER * (prompt_tokens // 8))
        prompt = ids[:prompt_tokens]
        print(f"[4/5] prefill {len(prompt)} tokens in chunks of {model.prefill_chunk_size}, then {new_tokens} greedy tokens")
        out = generate_ids(model.params, model.config, [prompt], max_new_tokens=1, sampling=Sampling(),
                           prefill_chunk_size=model.prefill_chunk_size)  # compile
        t0 = time.perf_counter()
        generate_ids(model.params, model.config, [prompt], max_new_tokens=1, sampling=Sampling(),
                     prefill_chunk_size=model.prefill_chunk_size)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate_ids(model.params, model.config, [prompt], max_new_tokens=new_tokens, sampling=Sampling(),
                           prefill_chunk_size=model.prefill_chunk_size)[0]
        t_total = time.perf_counter() - t0
        decode_rate = max(len(out) - 1, 1) / max(t_total - t_prefill, 1e-9)
        print(f"      prefill {len(prompt) / t_prefill:,.0f} tokens/s, decode {decode_rate:,.1f} tokens/s")
        print(f"      continuation: {model.tokenizer.decode(out)!r}")
        print("[5/5] check against the reference path (one-shot forward over prompt + continuation)")
        full = np.asarray(prompt + out, np.int32)[None]
        reference = model.logits(full)[0, len(prompt) - 1:-1].argmax(-1)
        hf_model = qwen_jax.load(hf_dir, dtype="float32")
        hf_logits = hf_model.logits(full[:, :256])
        conv_logits = model.logits(full[:, :256])
        ok_decode = reference.tolist() == out
        ok_convert = np.array_equal(hf_logits, conv_logits)
        print(f"      KV-cached greedy decode == one-shot forward argmax: {'OK' if ok_decode else 'MISMATCH'}")
        print(f"      converted checkpoint logits == HF-folder logits (bit-exact): {'OK' if ok_convert else 'MISMATCH'}")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok_decode and ok_convert else 1
