"""Sequence-parallel prefill and decode on 8 simulated CPU devices equal the single-device model.

DCA and sparse prefill on, per-head budgets that differ between heads (so each device must pick its
own heads' budgets), prompt lengths that do not divide over the mesh.
"""

import numpy as np
import pytest

from tests.conftest import make_hf_model, save_hf_checkpoint

MESHES = ["seq=8", "seq=4,tensor=2", "data=2,seq=2,tensor=2"]
DCA = {"chunk_size": 192, "local_size": 64}                       # DCA chunks of 128 tokens


def budgets(layers, heads):
    """Head h keeps (30, 50) when even, (130, 200) when odd: small enough to be sparse at 400 tokens."""
    return [{str(h): ["vertical_and_slash", 30 + 100 * (h % 2), 50 + 150 * (h % 2), 0.9] for h in range(heads)}
            for _ in range(layers)]


@pytest.fixture(scope="module")
def mesh_checkpoint(tmp_path_factory):
    """8 query heads over 2 kv heads: splits over 8 attention shards (each kv head stored 4 times)."""
    model = make_hf_model(seed=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    return save_hf_checkpoint(model, tmp_path_factory.mktemp("mesh") / "hf")


def load(folder, mesh=None, **overrides):
    import qwen_jax
    cfg = dict(DCA, sparse_attention_enabled=True, sparse_attention_threshold=0,
               sparse_attention_config=budgets(2, 8))
    return qwen_jax.load(folder, dtype="float32", mesh=mesh, dual_chunk_attention_config=cfg,
                         prefill_chunk_size=128, **overrides)


@pytest.fixture(scope="module")
def single(mesh_checkpoint):
    """Single-device logits for a 389-token prompt batch, and greedy continuations of uneven prompts."""
    from qwen_jax.generation import generate_ids
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 1000, (2, 389))
    prompts = [list(rng.integers(0, 1000, 389)), list(rng.integers(0, 1000, 203))]
    model = load(mesh_checkpoint)
    ids = generate_ids(model.params, model.config, prompts, max_new_tokens=6, spec=model.attention,
                       prefill_chunk_size=128)
    return tokens, model.logits(tokens), prompts, ids


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_prefill_and_greedy_decode_equal_one_device(mesh_checkpoint, single, mesh):
    import jax
    from qwen_jax.generation import generate_ids
    tokens, ref, prompts, ids = single
    model = load(mesh_checkpoint, mesh=mesh)
    assert model.config.dual_chunk_attention_config.sparse_attention_enabled
    got = model.logits(tokens)                      # chunks of 128, 128, 128 and a 5-token tail
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    out = generate_ids(model.params, model.config, prompts, max_new_tokens=6, spec=model.attention,
                       prefill_chunk_size=128)
    assert out == ids
    assert len(jax.devices()) == 8


def test_sharded_sparse_prefill_is_not_dense(mesh_checkpoint, single):
    """The budgets above do cut keys (else the equality test would not test the per-head budgets)."""
    import qwen_jax
    tokens, ref, _, _ = single
    dense = qwen_jax.load(mesh_checkpoint, dtype="float32", mesh="seq=4,tensor=2", dual_chunk_attention_config=DCA,
                          prefill_chunk_size=128).logits(tokens)
    assert np.abs(dense - ref).max() > 1e-3 * np.abs(ref).max()


@pytest.fixture(scope="module")
def uneven_checkpoint(tmp_path_factory):
    """6 query heads over 2 kv heads (groups of 3, as the 7B's 28 / 4 are groups of 7): 8 shards do not
    split them, so attention pads each group to 4 heads."""
    model = make_hf_model(seed=5, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    return save_hf_checkpoint(model, tmp_path_factory.mktemp("uneven") / "hf")


def _run_uneven(checkpoint, mesh=None):
    """(model, logits of a 389-token prompt, 6 greedy tokens after a 203-token one), DCA and sparse prefill."""
    import qwen_jax
    from qwen_jax.generation import generate_ids
    rng = np.random.default_rng(13)
    tokens, prompt = rng.integers(0, 1000, (1, 389)), [list(rng.integers(0, 1000, 203))]
    cfg = dict(DCA, sparse_attention_enabled=True, sparse_attention_threshold=0, sparse_attention_config=budgets(2, 6))
    model = qwen_jax.load(checkpoint, dtype="float32", mesh=mesh, dual_chunk_attention_config=cfg,
                          prefill_chunk_size=128)
    ids = generate_ids(model.params, model.config, prompt, max_new_tokens=6, spec=model.attention,
                       prefill_chunk_size=128)
    return model, model.logits(tokens), ids


@pytest.fixture(scope="module")
def uneven_reference(uneven_checkpoint):
    """The one-device run, once for both meshes."""
    return _run_uneven(uneven_checkpoint)[1:]


@pytest.mark.parametrize("mesh", ["seq=8", "seq=4,tensor=2"])
def test_heads_that_do_not_split_are_padded_and_equal_one_device(uneven_checkpoint, uneven_reference, mesh):
    from qwen_jax.attention.parallel import attention_heads, pad_per_head
    ref, ref_ids = uneven_reference
    with pytest.warns(UserWarning, match=r"6 attention heads do not split over tensor x seq = 8 devices: attention "
                                         r"runs 8 heads, zero heads padding each kv group \(33% more attention work\)"):
        model, got, ids = _run_uneven(uneven_checkpoint, mesh)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert ids == ref_ids
    assert attention_heads(model.config, model.attention.mesh) == 8
    # padded heads sit at the end of each group, with the least budgets; the real heads keep theirs
    assert pad_per_head((0, 1, 2, 3, 4, 5), model.config, model.attention.mesh, -1) == (0, 1, 2, -1, 3, 4, 5, -1)


def test_sharded_prefill_and_decode_compile_their_steps_once(mesh_checkpoint):
    """A step over a mesh hands its carried state back with equivalent shardings spelled differently
    (``P(None, 'seq')`` for ``P(None, 'seq', None, None)``, ``P(None, None)`` for ``P()``); jit keys its
    programs by those spellings, so before the state was relabelled each step (prefill, all-logits
    prefill, decode) compiled twice."""
    import jax.numpy as jnp
    import qwen_jax
    from qwen_jax import generation, model as model_fns
    from qwen_jax.cache import cache_length, init_cache
    model = load(mesh_checkpoint, mesh="seq=4,tensor=2")
    mesh = model.attention.mesh
    tokens = np.random.default_rng(11).integers(0, 1000, (1, 384))              # three equal chunks of 128
    before = model_fns.prefill_programs()
    for _ in range(2):                                                          # a second prompt: no compilation
        cache = init_cache(model.config, 1, cache_length(384), jnp.float32, mesh=mesh)
        logits, cache = qwen_jax.prefill(model.params, tokens, np.array([384]), cache, model.config, chunk_size=128,
                                         spec=model.attention)
    assert model_fns.prefill_programs() == before + 3              # embedding, one program for every layer, final
    before = model_fns.prefill_programs()
    qwen_jax.prefill_logits(model.params, tokens, model.config, chunk_size=128, spec=model.attention)
    assert model_fns.prefill_programs() == before + 1                # the all-logits variant: its final step, once
    before = generation.decode_block._cache_size()
    ids = generation.generate_ids(model.params, model.config, [list(tokens[0, :200])], max_new_tokens=17,
                                  spec=model.attention, prefill_chunk_size=128)     # two blocks of decode steps
    assert len(ids[0]) == 17
    assert generation.decode_block._cache_size() == before + 1


def test_decode_over_a_data_axis_compiles_its_step_once(mesh_checkpoint):
    """The first sampled tokens and every decode step's tokens are laid out alike (whole on every device), so
    one compiled step serves the whole generation on a mesh with a ``data`` axis too (the first step's tokens
    came replicated and went back split over ``data``: a second compilation)."""
    from qwen_jax import generation
    from qwen_jax.sampling import Sampling
    model = load(mesh_checkpoint, mesh="data=2,seq=2,tensor=2")
    prompts = [list(np.random.default_rng(12).integers(0, 1000, n)) for n in (150, 97)]
    for sampling in (Sampling(), Sampling(repetition_penalty=1.3)):
        before = generation.decode_block._cache_size()
        ids = generation.generate_ids(model.params, model.config, prompts, max_new_tokens=17, spec=model.attention,
                                      prefill_chunk_size=128, sampling=sampling)   # two blocks of decode steps
        assert [len(row) for row in ids] == [17, 17]
        assert generation.decode_block._cache_size() == before + 1


def test_mesh_strings_are_checked_and_a_mesh_missing_axes_gets_them(mesh_checkpoint, single):
    """A repeated axis, a non-ASCII digit: one-line refusals (the last repeat won; int('²') escaped as a
    ValueError). A jax Mesh naming only some axes runs with the others of size 1 (it loaded, then failed inside jit
    on the unbound axis)."""
    import jax

    import qwen_jax
    from qwen_jax.sharding import parse_mesh
    for bad, message in (("seq=4,seq=2", "axis seq given twice"), ("seq=\u00b2", "bad mesh"), ("seq=0", "bad mesh")):
        with pytest.raises(qwen_jax.QwenJaxError, match=message):
            parse_mesh(bad)
    assert parse_mesh("seq = 4, tensor=2") == {"data": 1, "seq": 4, "tensor": 2}
    model = load(mesh_checkpoint, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("tensor",)))
    assert dict(model.mesh.shape) == {"data": 1, "seq": 1, "tensor": 2}
    tokens, want = single[0], single[1]
    got = model.logits(tokens)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_cache_made_for_another_mesh_is_refused_in_one_line(mesh_checkpoint):
    """Over ``data=2,seq=4`` attention reads 4 kv heads (each of the 2 stored twice). A cache of 2 (made for
    ``data=8``, or for no mesh) or 8 (``tensor=8``) kv heads ran without an error and gave wrong logits (each device
    read and wrote other heads' slots); a cache made for another mesh with the same heads runs as it should."""
    import jax.numpy as jnp
    import qwen_jax
    from qwen_jax.sharding import make_mesh
    tokens = np.random.default_rng(21).integers(0, 1000, (1, 128))
    lengths = np.array([128])
    ref = load(mesh_checkpoint)
    want, _ = qwen_jax.prefill(ref.params, tokens, lengths, qwen_jax.init_cache(ref.config, 1, 256, jnp.float32),
                               ref.config, chunk_size=128, spec=ref.attention)
    model = load(mesh_checkpoint, mesh="data=2,seq=4")
    for other, heads in (("data=8", 2), ("tensor=8", 8), (None, 2)):
        cache = qwen_jax.init_cache(model.config, 1, 256, jnp.float32, mesh=other and make_mesh(other))
        with pytest.raises(qwen_jax.ConfigError, match=rf"^the KV cache holds {heads} kv heads, attention over this "
                                                       rf"mesh needs 4: make it with init_cache\("):
            qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, chunk_size=128, spec=model.attention)
    with pytest.raises(qwen_jax.ConfigError, match="the KV cache holds 8 kv heads, attention without a mesh needs 2"):
        qwen_jax.decode_step(ref.params, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                             qwen_jax.init_cache(ref.config, 1, 128, jnp.float32, mesh=make_mesh("tensor=8")),
                             ref.config, spec=ref.attention)
    # (init_cache and Model take a mesh string as load does: they failed with an AttributeError)
    cache = qwen_jax.init_cache(model.config, 1, 256, jnp.float32, mesh="data=2,seq=2,tensor=2")
    got, _ = qwen_jax.prefill(model.params, tokens, lengths, cache, model.config, chunk_size=128, spec=model.attention)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(np.asarray(want)).max())
    again = qwen_jax.Model(model.config, model.params, model.tokenizer, mesh="data=2,seq=4",
                           attn_implementation=model.attention, kv_cache_dtype=model.kv_cache_dtype)
    assert again.mesh == model.mesh
    from qwen_jax.attention import AttentionSpec
    assert AttentionSpec(mesh="data=2,seq=4").mesh == model.mesh
    np.testing.assert_allclose(again.logits(tokens), model.logits(tokens), rtol=0, atol=0)
