"""Real pretrained weights (Qwen2.5-Coder-0.5B-Instruct from ../shared/real_models) against transformers."""

import numpy as np
import pytest
import torch

import qwen_jax
from conftest import run_cli

TEXT = """The history of computing is longer than the history of computing hardware and modern computing
technology and includes the history of methods intended for pen and paper or for chalk and slate, with or
without the aid of tables. Digital computing is intimately tied to the representation of numbers. But long
before abstractions like the number arose, there were mathematical concepts to serve the purposes of
civilization. These concepts are implicit in concrete practices such as one-to-one correspondence, the basis
of counting, comparison to a standard, used for measurement, and the 3-4-5 right triangle, a device for
assuring a right angle.
"""
CODE = '''import heapq
from collections import defaultdict


def dijkstra(graph, source):
    """Shortest distances from source in a graph given as {node: [(neighbour, weight), ...]}."""
    dist = defaultdict(lambda: float("inf"))
    dist[source] = 0
    queue = [(0, source)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > dist[node]:
            continue
        for neighbour, weight in graph.get(node, []):
            candidate = d + weight
            if candidate < dist[neighbour]:
                dist[neighbour] = candidate
                heapq.heappush(queue, (candidate, neighbour))
    return dict(dist)


class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items = {}

    def get(self, key):
        if key not in self.items:
            return -1
        value = self.items.pop(key)
        self.items[key] = value
        return value
'''


@pytest.fixture(scope="module")
def hf_model(real_model_path):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens(real_model_path):
    from qwen_jax.tokenizer import Tokenizer
    ids = Tokenizer(real_model_path).encode(TEXT + "\n" + CODE)
    assert 300 <= len(ids) <= 600
    return np.asarray(ids)[None]


@pytest.fixture(scope="module")
def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.numpy()


def test_float32_logits_within_2e3_of_transformers(real_model_path, tokens, hf_logits):
    model = qwen_jax.load(real_model_path, dtype="float32")
    ours = model.logits(tokens)
    err = np.abs(ours - hf_logits).max()
    print(f"\nfloat32 max |logit difference| over {tokens.shape[1]} tokens: {err:.2e}")
    assert err <= 2e-3


def test_bfloat16_top1_agreement_at_least_95_percent(real_model_path, tokens, hf_logits):
    model = qwen_jax.load(real_model_path, dtype="bfloat16")
    ours = model.logits(tokens)
    agreement = float(np.mean(ours.argmax(-1) == hf_logits.argmax(-1)))
    print(f"\nbfloat16 top-1 agreement with transformers float32 over {tokens.shape[1]} tokens: {agreement:.4f}")
    assert agreement >= 0.95


def test_fp8_kv_cache_halves_the_cache_at_a_measured_accuracy_cost(real_model_path, tokens, hf_logits):
    """The fp8 (e4m3) cache's cost on real weights, against the float32 oracle: KL and top-1 agreement
    (measured at 512 tokens of project source: KL 0.018, 91.6% vs 99.4% for a bf16 cache)."""
    from qwen_jax.cache import init_cache
    model = qwen_jax.load(real_model_path, dtype="float32", kv_cache_dtype="fp8")
    assert init_cache(model.config, 1, 128, model.kv_cache_dtype).k[0].dtype.itemsize == 1
    ours = model.logits(tokens)
    assert np.isfinite(ours).all()
    lp = hf_logits - hf_logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = ours - ours.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    agreement = float(np.mean(ours.argmax(-1) == hf_logits.argmax(-1)))
    print(f"\nfp8 KV cache over {tokens.shape[1]} tokens: KL {kl:.4f} nats, top-1 agreement {agreement:.4f}")
    assert kl < 0.05 and agreement >= 0.85


def test_tokenizer_and_chat_template_match_transformers(real_model_path):
    from transformers import AutoTokenizer
    from qwen_jax.tokenizer import Tokenizer
    ours, theirs = Tokenizer(real_model_path), AutoTokenizer.from_pretrained(real_model_path)
    for text in (TEXT, CODE, "héllo wörld 你好 🙂 <|im_end|>"):
        assert ours.encode(text) == theirs.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write fizzbuzz."}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)


def test_streamed_text_grows_as_qwens_tokenizer_decodes_the_whole_row(real_model_path):
    # generation decodes a short window a token (StopChecker); Qwen's byte-level tokens split characters
    from qwen_jax.generation import StopChecker, truncate_at_stop
    from qwen_jax.tokenizer import Tokenizer
    tok = Tokenizer(real_model_path)
    rng = np.random.default_rng(0)
    text_ids = tok.encode("héllo wörld 你好 🙂 " + CODE)
    ids = np.concatenate([text_ids, rng.integers(0, 151643, 300), text_ids[::-1]]).tolist()
    ids += [i for i in range(151643) if "\ufffd" in tok.decode([i])][:200]       # byte pieces of characters
    rng.shuffle(ids[len(text_ids):])
    for stop in ([], ["\n\n"], ["你好"]):
        checker, streamed = StopChecker(tok.decode, stop), []
        for t in ids:
            streamed.append(checker.push(t))
            if checker.stopped:
                break
        streamed.append(checker.flush())
        assert "".join(streamed) == truncate_at_stop(tok.decode(checker.tokens), stop)[0]
        assert checker.stopped == bool(stop)        # each stop string is in the text


def test_cli_generate_writes_the_transformers_greedy_continuation(real_model_path, hf_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(real_model_path)
    prompt = "def fibonacci(n):"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=48, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result = run_cli("generate", "--model", real_model_path, "--prompt", prompt, "--max-new-tokens", "48",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    print(f"\n{prompt}{result.stdout}")
    assert result.stdout == expected + "\n"
