"""The strict map between Hugging Face Qwen2 tensor names and the qwen-jax parameter tree.

One regex rule per tensor family, each with the HF shape it expects (from the config) and a pair of
exact, invertible transforms (transposes and reshapes only: a round trip is bit-exact). Conversion
fails, naming the key, on any tensor no rule maps, any parameter no tensor fills, two tensors for
one parameter, or a shape that disagrees with config.json.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

import numpy as np

from qwen_jax.config import QwenConfig
from qwen_jax.errors import CheckpointError

# Buffers some exporters save that carry no weights (recomputed from the config).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str                      # HF name regex; groups fill the param path template
    path: tuple[str, ...]             # param path; "{0}" etc. from the regex groups
    hf_shape: Callable[[QwenConfig], tuple[int, ...]]
    to_jax: Callable[[np.ndarray, QwenConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, QwenConfig], np.ndarray]


def _ident(x, c):
    return x


def _rules(c: QwenConfig) -> list[Rule]:
    D, F, V, N, K, H = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads, \
        c.num_key_value_heads, c.head_dim
    L = r"model\.layers\.(\d+)\."
    heads = {"q": N, "k": K, "v": K}
    rules = [
        Rule(r"model\.embed_tokens\.weight", ("embed", "embedding"), lambda c: (V, D), _ident, _ident),
        Rule(r"model\.norm\.weight", ("norm", "scale"), lambda c: (D,), _ident, _ident),
        Rule(L + r"input_layernorm\.weight", ("layers_{0}", "input_norm", "scale"), lambda c: (D,), _ident, _ident),
        Rule(L + r"post_attention_layernorm\.weight", ("layers_{0}", "post_norm", "scale"), lambda c: (D,),
             _ident, _ident),
        Rule(L + r"self_attn\.o_proj\.weight", ("layers_{0}", "attn", "o_proj", "kernel"), lambda c: (D, N * H),
             lambda x, c: x.T.reshape(N, H, D), lambda x, c: x.reshape(N * H, D).T),
    ]
    for p, n in heads.items():
        rules.append(Rule(L + rf"self_attn\.{p}_proj\.weight", ("layers_{0}", "attn", f"{p}_proj", "kernel"),
                          lambda c, n=n: (n * H, D),
                          lambda x, c, n=n: x.T.reshape(D, n, H), lambda x, c, n=n: x.reshape(D, n * H).T))
        rules.append(Rule(L + rf"self_attn\.{p}_proj\.bias", ("layers_{0}", "attn", f"{p}_proj", "bias"),
                          lambda c, n=n: (n * H,),
                          lambda x, c, n=n: x.reshape(n, H), lambda x, c, n=n: x.reshape(n * H)))
    for p, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
        rules.append(Rule(L + rf"mlp\.{p}_proj\.weight", ("layers_{0}", "mlp", f"{p}_proj", "kernel"),
                          lambda c, s=shape: s, lambda x, c: x.T, lambda x, c: x.T))
    if not c.tie_word_embeddings:
        rules.append(Rule(r"lm_head\.weight", ("lm_head", "kernel"), lambda c: (V, D), _ident, _ident))
    return rules


def _match(rules: list[Rule], key: str):
    for rule in rules:
        m = re.fullmatch(rule.pattern, key)
        if m:
            return rule, tuple(part.format(*m.groups()) for part in rule.path)
    return None, None


def plan(keys: list[str], shapes: dict[str, tuple[int, ...]], config: QwenConfig,
         expected_paths: set[tuple[str, ...]]) -> list[tuple[str, Rule, tuple[str, ...]]]:
    """Check every HF key against the rules and the expected parameter paths before reading any data.

    Returns ``(hf_key, rule, param_path)`` in checkpoint order.
    """
    rules = _rules(config)
    out, seen = [], {}
    for key in keys:
        if IGNORED.fullmatch(key):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the head is the embedding; the checked copy below makes sure they agree
        rule, path = _match(rules, key)
        if rule is None or path not in expected_paths:
            raise CheckpointError(f"unmapped key {key!r}: no Qwen2 parameter of this config has that name")
        if path in seen:
            raise CheckpointError(f"duplicated key: {key!r} and {seen[path]!r} both map to {'/'.join(path)}")
        want = rule.hf_shape(config)
        if tuple(shapes[key]) != want:
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {list(shapes[key])}, config.json "
                                  f"implies {list(want)}")
        seen[path] = key
        out.append((key, rule, path))
    missing = sorted(expected_paths - set(seen))
    if missing:
        raise CheckpointError(f"missing key {hf_name(missing[0], config)!r} (parameter {'/'.join(missing[0])})")
    return out


def for_path(path: tuple[str, ...], config: QwenConfig) -> tuple[str, Rule]:
    """The HF tensor name and rule of a parameter path (the inverse direction of ``plan``)."""
    m = re.fullmatch(r"layers_(\d+)", path[0])
    groups = (m.group(1),) if m else ()
    for rule in _rules(config):
        if ("{0}" in rule.path[0]) == bool(groups) and tuple(p.format(*groups) for p in rule.path) == path:
            return rule.pattern.replace(r"(\d+)", groups[0] if groups else "").replace("\\.", "."), rule
    raise KeyError("/".join(path))


def hf_name(path: tuple[str, ...], config: QwenConfig) -> str:
    return for_path(path, config)[0]


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k in tree:
        if isinstance(tree[k], dict):
            yield from flatten(tree[k], prefix + (k,))
        else:
            yield prefix + (k,), tree[k]


def unflatten(items) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out
