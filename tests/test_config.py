"""config.json parsing for Qwen2 / Qwen2.5 sizes, overrides, and refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax.config import QwenConfig, read_config_json
from qwen_jax.errors import ConfigError
from qwen_jax.rope import Rope

QWEN25_7B_1M = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_theta": 10000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 1010000,
    "use_sliding_window": False, "sliding_window": 32768, "hidden_act": "silu", "eos_token_id": 151645,
    "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144},
}


def test_qwen25_7b_1m_config():
    c = QwenConfig.from_hf_dict(QWEN25_7B_1M)
    assert (c.head_dim, c.num_groups, c.rope_theta, c.rms_norm_eps) == (128, 7, 1e7, 1e-5)
    assert not c.tie_word_embeddings and c.eos_token_ids == (151645,)
    dca = c.dual_chunk_attention_config
    assert (dca.chunk_size, dca.local_size, dca.original_max_position_embeddings, dca.chunk_len) == \
        (262144, 8192, 262144, 253952)
    assert dca.sparse_attention_threshold == 32768 and dca.sparse_attention_last_q == 64
    hash(c)  # static under jit


def test_dca_defaults_follow_qwens_code():
    dca = QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, dual_chunk_attention_config={"local_size": 512})
                                  ).dual_chunk_attention_config
    assert (dca.chunk_size, dca.local_size, dca.original_max_position_embeddings) == (8192, 512, 0)
    from qwen_jax.attention.dca import yarn_scale
    import jax.numpy as jnp
    assert float(yarn_scale(jnp.asarray([10 ** 6]), dca)[0]) == 1.0  # no original length: no scaling


def test_rope_theta_inside_rope_parameters_and_explicit_head_dim():
    raw = dict(QWEN25_7B_1M, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del raw["rope_theta"]
    c = QwenConfig.from_hf_dict(raw)
    assert c.rope_theta == 5e5 and c.head_dim == 64 and c.rope_scaling is None


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_yarn_128k_recipe(where):
    block = {"type" if where == "rope_scaling" else "rope_type": "yarn", "factor": 4.0,
             "original_max_position_embeddings": 32768}
    raw = dict(QWEN25_7B_1M, rope_theta=1e6, **{where: block})
    del raw["dual_chunk_attention_config"]                 # the 128K models' recipe: YaRN without DCA
    c = QwenConfig.from_hf_dict(raw)
    assert c.rope_scaling.factor == 4.0 and c.rope_scaling.original_max_position_embeddings == 32768
    rope = Rope.from_config(c)
    assert rope.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
    plain = Rope.from_config(c.replace(rope_scaling=None))
    ratio = np.asarray(rope.inv_freq) / np.asarray(plain.inv_freq)
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(0.25)  # fast dims kept, slow dims / 4


def test_yarn_is_ignored_with_a_warning_under_dca():
    """Qwen's vLLM builds DCA's rotary embedding (plain RoPE) and never reads rope_scaling when DCA is on; a
    Qwen2.5 128K config.json given a DCA block must not rotate with YaRN's frequencies on top of DCA."""
    block = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.warns(UserWarning, match="rope_scaling .YaRN. is ignored with dual_chunk_attention_config"):
        c = QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, rope_scaling=block))
    plain = QwenConfig.from_hf_dict(QWEN25_7B_1M)
    assert c == plain and c.rope_scaling is None and c.dual_chunk_attention_config is not None
    assert Rope.from_config(c) == Rope.from_config(plain)
    # a config built in code is refused instead (it rotated with YaRN's frequencies and attention factor)
    yarn = QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, rope_scaling=block, dual_chunk_attention_config=None))
    assert yarn.rope_scaling is not None
    with pytest.raises(ConfigError, match="rope_scaling cannot be combined with dual_chunk_attention_config"):
        yarn.replace(dual_chunk_attention_config=plain.dual_chunk_attention_config)


def test_sliding_window_is_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match="use_sliding_window: true is not supported"):
        QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, use_sliding_window=True, max_window_layers=20))
    # no layer at or past max_window_layers: nothing slides (transformers attends fully there too)
    full = QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, use_sliding_window=True, max_window_layers=28))
    assert full == QwenConfig.from_hf_dict(QWEN25_7B_1M)


def test_sliding_layers_follow_transformers_layer_types():
    """transformers 5 writes ``layer_types`` into config.json and slides the layers it marks, whatever
    max_window_layers says (this config gave dense attention's logits where transformers slid layer 0)."""
    sliding = ["sliding_attention"] + ["full_attention"] * 27
    with pytest.raises(ConfigError, match="use_sliding_window: true is not supported"):
        QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, use_sliding_window=True, sliding_window=4096,
                                     max_window_layers=28, layer_types=sliding))
    plain = QwenConfig.from_hf_dict(QWEN25_7B_1M)
    for nothing_slides in (dict(max_window_layers=20, layer_types=["full_attention"] * 28),
                           dict(max_window_layers=20, sliding_window=None),
                           dict(layer_types=sliding, use_sliding_window=False)):
        assert QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, **{"use_sliding_window": True, **nothing_slides})) == plain


def test_num_key_value_heads_null_means_one_per_query_head():
    assert QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, num_key_value_heads=None)).num_key_value_heads == 28
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, num_key_value_heads=0))


@pytest.mark.parametrize("bad,message", [
    (dict(model_type="llama"), "model_type 'llama' is not supported"),
    (dict(num_key_value_heads=5), "multiple of num_key_value_heads"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling type 'linear'"),
    (dict(dual_chunk_attention_config={"chunk_size": 100, "local_size": 200}), "local_size < chunk_size"),
    (dict(dual_chunk_attention_config={"chunk_sise": 100}), "unknown keys"),
    (dict(hidden_size=None), "malformed"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, **bad))


def test_overrides_replace_fields_like_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_1M))
    raw = read_config_json(str(tmp_path), {"dual_chunk_attention_config": {"chunk_size": 2048, "local_size": 256},
                                           "rope_theta": 1e6})
    c = QwenConfig.from_hf_dict(raw)
    assert c.dual_chunk_attention_config.chunk_size == 2048 and c.rope_theta == 1e6
    with pytest.raises(ConfigError, match="unknown config field 'chunk_sise'"):
        read_config_json(str(tmp_path), {"chunk_sise": 3})


@pytest.mark.parametrize("block", [{"rope_type": "default", "rope_theta": 1e6},
                                   {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
                                   {"rope_type": "yarn", "factor": 2.0, "rope_theta": 5e5}])
def test_a_rope_parameters_override_replaces_the_files_legacy_rope_fields(tmp_path, block):
    """As transformers 5 reads ``from_pretrained(rope_parameters=...)``: the block alone sets the rotary embedding,
    over the file's legacy ``rope_scaling`` and ``rope_theta`` (the file's YaRN factor 4 was kept, and a new
    rope_theta refused as "two rope_theta values" in config.json)."""
    from transformers import Qwen2Config
    raw = dict(QWEN25_7B_1M, dual_chunk_attention_config=None, max_position_embeddings=32768, rope_theta=5e5,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = QwenConfig.from_hf_dict(read_config_json(str(tmp_path), {"rope_parameters": block}))
    hf = Qwen2Config.from_dict(raw, rope_parameters=dict(block)).rope_parameters
    assert ours.rope_theta == hf["rope_theta"] == block["rope_theta"]
    assert (ours.rope_scaling and ours.rope_scaling.factor) == hf.get("factor") == block.get("factor")
    if ours.rope_scaling is not None:        # transformers' YaRN falls back on max_position_embeddings, as here
        assert ours.rope_scaling.original_max_position_embeddings == 32768


def test_sparse_attention_config_json_is_read_next_to_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_1M))
    layers = [{str(h): ["vertical_and_slash", 1000 + h, 6096, 0.9] for h in range(28)} for _ in range(28)]
    (tmp_path / "sparse_attention_config.json").write_text(json.dumps(layers))
    dca = QwenConfig.from_hf_dict(read_config_json(str(tmp_path))).dual_chunk_attention_config
    assert dca.sparse_attention_enabled and dca.sparse_attention_config is not None
    from qwen_jax.attention.sparse import layer_budgets
    assert layer_budgets(dca, 27, 28).vertical[:3] == (1000, 1001, 1002)


def test_load_refuses_missing_folder_and_bad_dtype(tiny_checkpoint):
    with pytest.raises(qwen_jax.CheckpointError, match="no such folder"):
        qwen_jax.load("/nonexistent/qwen")
    with pytest.raises(ConfigError, match="unknown dtype"):
        qwen_jax.load(tiny_checkpoint[0], dtype="int3")


@pytest.mark.parametrize("bad,message", [
    (dict(hidden_size=64.5), "hidden_size must be a positive integer, got 64.5"),
    (dict(num_hidden_layers="28"), "num_hidden_layers must be a positive integer, got '28'"),
    (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number >= 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(pad_token_id="x"), "pad_token_id must be an integer >= 0, got 'x'"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id must be an integer >= 0, got 'x'"),
    (dict(rope_scaling="yarn"), "rope_scaling must be a mapping"),
    (dict(rope_parameters="yarn"), "rope_parameters must be a mapping"),
    (dict(rope_scaling={"type": "yarn", "factor": 0, "original_max_position_embeddings": 32768}),
     r"rope_scaling.factor must be a finite number > 0, got 0"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -1}),
     r"rope_parameters.original_max_position_embeddings must be a positive integer, got -1"),
    (dict(dual_chunk_attention_config={"chunk_size": 8192, "local_size": 1024, "original_max_position_embeddings": -1}),
     r"dual_chunk_attention_config.original_max_position_embeddings must be an integer >= 0, got -1"),
    (dict(dual_chunk_attention_config={"chunk_size": 8192.5}), r"dual_chunk_attention_config.chunk_size must be"),
    (dict(dual_chunk_attention_config={"sparse_attention_threshold": -5}),
     r"dual_chunk_attention_config.sparse_attention_threshold must be an integer >= 0, got -5"),
    (dict(dual_chunk_attention_config={"sparse_attention_config": [{"0": ["vertical_and_slash", -5, 6096, 0.9]}]}),
     r"sparse_attention_config: layer 0 head 0: vertical_size must be an integer >= 0, got -5"),
    (dict(dual_chunk_attention_config={"sparse_attention_config": [[1, 2], [3]]}),
     r"sparse_attention_config: expected a list with one \{head index"),
])
def test_malformed_fields_are_refused_naming_the_field(bad, message):
    """Wrong types and ranges are refused, not truncated (64.5 -> 64) or left to make NaNs (rope_theta 0)."""
    with pytest.raises(ConfigError, match=message):
        QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, **bad))


def test_integral_floats_and_legacy_fields_still_parse():
    c = QwenConfig.from_hf_dict(dict(QWEN25_7B_1M, hidden_size=3584.0, pad_token_id=151643, rope_theta=1e6,
                                     eos_token_id=[151645, 151643]))
    assert c.hidden_size == 3584 and isinstance(c.hidden_size, int) and c.pad_token_id == 151643
    assert c.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize("content,message", [
    ("{bad", "sparse_attention_config.json: not valid JSON"),
    ('[{"0": ["vertical_and_slash", 1000]}]', r"sparse_attention_config.json: layer 0 head 0: expected \[pattern"),
    ('[{"0": ["vertical_and_slash", 1000, -1, 0.9]}]', "sparse_attention_config.json: layer 0 head 0: slash_size"),
])
def test_a_malformed_sparse_attention_config_json_is_named(tmp_path, content, message):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_1M))
    (tmp_path / "sparse_attention_config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_config_json(str(tmp_path))


def test_load_names_the_accepted_dtypes_and_refuses_non_float_ones(tiny_checkpoint):
    folder = tiny_checkpoint[0]
    with pytest.raises(ConfigError, match="unknown dtype 'int8'; use auto, one of bfloat16, bf16, float32, f32, "
                                          "float16"):
        qwen_jax.load(folder, dtype="int8")
    with pytest.raises(ConfigError, match="dtype int32 is not supported"):
        qwen_jax.load(folder, dtype=np.int32)
    with pytest.raises(ConfigError, match="unknown dtype <object"):
        qwen_jax.load(folder, dtype=object())
    with pytest.raises(ConfigError, match="prefill_chunk_size must be a positive integer.*got 'abc'"):
        qwen_jax.load(folder, prefill_chunk_size="abc")
    with pytest.raises(ConfigError, match="rope_scaling must be a mapping"):
        qwen_jax.load(folder, rope_scaling="yarn")


def test_errors_in_keywords_given_to_load_do_not_blame_config_json(tiny_checkpoint):
    folder = tiny_checkpoint[0]
    for kw, message in ((dict(rope_theta="x"), r"^rope_theta must be a finite number > 0, got 'x' \(as given to load"),
                        (dict(dual_chunk_attention_config={"chunk_size": -5, "local_size": 3}),
                         r"^dual_chunk_attention_config.chunk_size must be a positive integer, got -5 \(as given"),
                        (dict(dual_chunk_attention_config={"chunk_size": 192}),
                         "got local_size 1024 .the default. and chunk_size 192$"),
                        (dict(trust_remote_code=True), "trust_remote_code= is a keyword of HF's from_pretrained"),
                        (dict(device_map="auto"), "device_map= is a keyword of HF's from_pretrained")):
        with pytest.raises(ConfigError, match=message):
            qwen_jax.load(folder, **kw)


def test_auto_dtype_is_float32_on_a_cpu_unless_the_host_cannot_hold_it(tiny_checkpoint, monkeypatch):
    """On CPUs XLA converts bfloat16 weights to float32 at every step (the 0.5B decodes 8x slower): "auto" (the
    default) takes float32 there, and bfloat16 where float32 weights would fill more than half the host (or where a
    device is not a CPU)."""
    from qwen_jax import api, memory
    folder = tiny_checkpoint[0]
    for dtype in (None, "auto"):
        model = qwen_jax.load(folder, **({} if dtype is None else {"dtype": dtype}))
        assert model.dtype == np.float32 and model.kv_cache_dtype == np.float32
        assert "float32, float32 cache" in repr(model)
    assert qwen_jax.load(folder, dtype="bf16").dtype == jnp.bfloat16             # a choice is kept
    weights = memory.plan(model.config, tokens=1, dtype=np.float32).weights
    monkeypatch.setattr(memory, "host_memory", lambda: 2 * weights)               # exactly half: float32
    assert qwen_jax.load(folder).dtype == np.float32
    monkeypatch.setattr(memory, "host_memory", lambda: 2 * weights - 2)
    assert qwen_jax.load(folder).dtype == jnp.bfloat16
    monkeypatch.setattr(memory, "host_memory", lambda: None)                      # unknown: float32
    assert api.default_dtype(model.config) == np.float32
    # on a mesh every simulated device's share lives in the host: 8 replicas need 8 times the memory
    monkeypatch.setattr(memory, "host_memory", lambda: 2 * weights * 4)
    assert qwen_jax.load(folder, mesh="data=4").dtype == np.float32
    assert qwen_jax.load(folder, mesh="data=8").dtype == jnp.bfloat16

    class Gpu:
        platform, process_index = "gpu", 0
    monkeypatch.setattr(api.jax, "devices", lambda *a: [Gpu()])
    assert api.default_dtype(model.config) == jnp.bfloat16


def _copy_checkpoint(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("content,message", [
    ("{bad", "generation_config.json: not valid JSON"),
    ("[1]", "generation_config.json: expected a JSON object, got list"),
    ('{"eos_token_id": "x"}', "generation_config.json: eos_token_id must be a token id or a list of token ids"),
    ('{"eos_token_id": [2, null]}', "generation_config.json: eos_token_id must be"),
])
def test_a_malformed_generation_config_json_is_named(tiny_checkpoint, tmp_path, content, message):
    folder = _copy_checkpoint(tiny_checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(content)
    with pytest.raises(qwen_jax.CheckpointError, match=message):
        qwen_jax.load(folder)


def test_generation_config_eos_ids_are_read(tiny_checkpoint, tmp_path):
    folder = _copy_checkpoint(tiny_checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    model = qwen_jax.load(folder, dtype="float32")
    assert model.eos_token_ids[:2] == (7, 9)


def test_an_overriding_dca_block_keeps_the_folders_budgets_file(tmp_path):
    """Qwen's rule: sparse_attention_config.json fills the DCA block's budgets, also when the block is given as
    an override (it was dropped for the default budgets), unless the override names its own."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_1M))
    layers = [{str(h): ["vertical_and_slash", 1000 + h, 6096, 0.9] for h in range(28)} for _ in range(28)]
    (tmp_path / "sparse_attention_config.json").write_text(json.dumps(layers))
    from qwen_jax.attention.sparse import layer_budgets
    block = {"chunk_size": 32768, "local_size": 2048, "sparse_attention_enabled": True}
    dca = QwenConfig.from_hf_dict(read_config_json(str(tmp_path), {"dual_chunk_attention_config": block}))
    assert dca.dual_chunk_attention_config.chunk_size == 32768
    assert layer_budgets(dca.dual_chunk_attention_config, 5, 28).vertical[:2] == (1000, 1001)
    own = [{str(h): ["vertical_and_slash", 7, 60, 0.9] for h in range(28)}] * 28
    dca = QwenConfig.from_hf_dict(read_config_json(str(tmp_path), {"dual_chunk_attention_config": {
        **block, "sparse_attention_config": own}})).dual_chunk_attention_config
    assert layer_budgets(dca, 5, 28).vertical[:2] == (7, 7)
    off = QwenConfig.from_hf_dict(read_config_json(str(tmp_path), {"dual_chunk_attention_config": None}))
    assert off.dual_chunk_attention_config is None
    inline = dict(QWEN25_7B_1M, dual_chunk_attention_config={**QWEN25_7B_1M["dual_chunk_attention_config"],
                                                             "sparse_attention_config": own})
    (tmp_path / "config.json").write_text(json.dumps(inline))       # the file beats config.json's own key
    dca = QwenConfig.from_hf_dict(read_config_json(str(tmp_path))).dual_chunk_attention_config
    assert layer_budgets(dca, 5, 28).vertical[:2] == (1000, 1001)


@pytest.mark.parametrize("override,message", [
    (dict(torch_dtype="float32"), "torch_dtype='float32': qwen-jax takes the parameters' dtype as "
                                  r"qwen_jax.load\(path, dtype=...\)"),
    (dict(output_hidden_states=True), "output_hidden_states=True: qwen-jax returns logits only"),
    (dict(output_attentions=True), "output_attentions=True: qwen-jax returns logits only"),
    (dict(use_cache=False), "use_cache=False: qwen-jax always prefills into and decodes from a KV cache"),
])
def test_hf_keywords_that_would_be_ignored_are_refused(tmp_path, override, message):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B_1M))
    with pytest.raises(ConfigError, match=message):
        read_config_json(str(tmp_path), override)
    harmless = {k: (not v if isinstance(v, bool) else None) for k, v in override.items() if k != "torch_dtype"}
    if harmless:                       # asking for what qwen-jax does anyway stays accepted
        read_config_json(str(tmp_path), harmless)


@pytest.mark.parametrize("name,error", [("config.json", ConfigError), ("tokenizer_config.json", qwen_jax.CheckpointError)])
@pytest.mark.parametrize("content", [b"{bad", b'{"a": "\xff"}'])
def test_a_checkpoint_file_that_is_not_json_is_named_in_one_line(tiny_checkpoint, tmp_path, name, error, content):
    folder = _copy_checkpoint(tiny_checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / name).write_bytes(content)           # broken JSON, then JSON that is not UTF-8
    with pytest.raises(error, match=f"{name}: not valid JSON") as info:
        qwen_jax.load(folder)
    assert "\n" not in str(info.value)
