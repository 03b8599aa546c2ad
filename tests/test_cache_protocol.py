"""kvshard caches speak the whole mlx_lm cache protocol of the pinned mlx-lm: each item side by side with mlx_lm's
own KVCache / BatchKVCache fed the same inputs (offsets, masks, shapes, dtypes equal; attention equal where an
fp16 window holds the tokens, within the codes' error otherwise), then through mlx_lm's real users of the
protocol: BatchGenerator / batch_generate, LRUPromptCache, save/load_prompt_cache, kv_bits."""

import copy
import json
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    LRUPromptCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from kvshard.quant import METHODS, BatchCompressedKVCache, CompressedKVCache, KVCacheBuilder, KVCacheConfig, make_method
from kvshard.quant.cache import STATE_FORMAT

H, HQ, D = 2, 4, 32
FIXTURES = Path(__file__).parent / "data"
# A window wider than any test's tokens: the cache then holds them in fp16, exactly as KVCache fed fp16 would.
EXACT = {"window": 4096}


def kv(batch: int, tokens: int, seed: int, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    shape = (batch, H, tokens, D)
    # Keys share a common direction, as real keys do (the cache subtracts their mean before coding).
    keys = rng.standard_normal(shape) + 2.0 * rng.standard_normal((1, H, 1, D))
    return mx.array(keys.astype(np.float32)).astype(dtype), mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def cache(**overrides) -> CompressedKVCache:
    return CompressedKVCache(**{"head_dim": D, "n_kv_heads": H, "key_bits": 8, "value_bits": 8, **overrides})


def held_arrays(c: CompressedKVCache) -> dict:
    """Everything a cache holds per token, as bytes: equal dicts mean the same codes, sinks, window and mean."""
    state = dict(c.state)
    meta = json.loads(state.pop("meta"))
    flat = {k: v for k, v in state.items() if isinstance(v, mx.array)}
    for group in ("key_codes", "value_codes"):
        flat.update({f"{group}.{k}": v for k, v in state.get(group, {}).items()})
    return {"offset": meta["offset"], **{k: (str(v.dtype), v.shape, np.array(v).tobytes()) for k, v in flat.items()}}


# ---- single-sequence protocol, side by side with KVCache ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_update_and_fetch_keeps_offsets_shapes_and_the_input_dtype_of_kvcache(dtype):
    ours, exact, theirs = cache(), cache(**EXACT), KVCache()
    for step, n in enumerate((5, 1, 1, 7)):
        keys, values = kv(1, n, seed=step, dtype=dtype)
        k_ref, v_ref = theirs.update_and_fetch(keys, values)
        for c in (ours, exact):
            k, v = c.update_and_fetch(keys, values)
            assert (k.shape, v.shape, k.dtype, v.dtype) == (k_ref.shape, v_ref.shape, k_ref.dtype, v_ref.dtype)
            assert c.offset == theirs.offset and c.size() == theirs.size() and c.empty() == theirs.empty()
        # Held in fp16: what KVCache returns, rounded to fp16 (exact for fp16 and bfloat16 inputs of this range).
        k, v = exact.update_and_fetch(mx.zeros((1, H, 0, D), dtype), mx.zeros((1, H, 0, D), dtype))
        assert mx.array_equal(k, k_ref.astype(mx.float16).astype(dtype)) and mx.array_equal(v, v_ref.astype(mx.float16).astype(dtype))
        k, _ = ours.update_and_fetch(mx.zeros((1, H, 0, D), dtype), mx.zeros((1, H, 0, D), dtype))
        assert float(mx.abs(k.astype(mx.float32) - k_ref.astype(mx.float32)).max()) < 0.1  # 8-bit codes


def test_make_mask_size_trim_and_empty_answer_as_kvcache_does():
    ours, theirs = cache(sink_tokens=2, window=3), KVCache()
    assert ours.empty() and theirs.empty() and ours.size() == theirs.size() == 0 and bool(ours) is bool(theirs) is True

    def same_masks():
        for n in (1, 4):
            for return_array in (False, True):
                for window_size in (None, 3):
                    a = ours.make_mask(n, return_array=return_array, window_size=window_size)
                    b = theirs.make_mask(n, return_array=return_array, window_size=window_size)
                    assert type(a) is type(b) and (a == b if not isinstance(a, mx.array) else mx.array_equal(a, b))
        assert create_attention_mask(mx.zeros((1, 4, 8)), ours) == create_attention_mask(mx.zeros((1, 4, 8)), theirs)

    same_masks()
    for step, n in enumerate((9, 1, 6)):
        keys, values = kv(1, n, seed=10 + step)
        ours.update_and_fetch(keys, values)
        theirs.update_and_fetch(keys, values)
        same_masks()
        assert (ours.offset, ours.size(), ours.empty(), ours.is_trimmable()) == (theirs.offset, theirs.size(), theirs.empty(), theirs.is_trimmable())
    assert ours.trim(4) == theirs.trim(4) and ours.offset == theirs.offset
    assert trim_prompt_cache([ours], 100) == trim_prompt_cache([theirs], 100) == 12
    assert ours.offset == theirs.offset == 0


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_keys_and_values_are_decoded_views_shaped_and_typed_as_kvcache(dtype):
    theirs, exact, coded = KVCache(), cache(**EXACT), cache(sink_tokens=1, window=2)
    assert theirs.keys is None and exact.keys is None and exact.values is None
    for step, n in enumerate((12, 1)):
        keys, values = kv(1, n, seed=20 + step, dtype=dtype)
        for c in (theirs, exact, coded):
            c.update_and_fetch(keys, values)
    k_ref, v_ref = theirs.keys[..., : theirs.offset, :], theirs.values[..., : theirs.offset, :]
    for c in (exact, coded):
        assert (c.keys.shape, c.values.shape, c.keys.dtype, c.values.dtype) == (k_ref.shape, v_ref.shape, dtype, dtype)
    assert mx.array_equal(exact.keys, k_ref.astype(mx.float16).astype(dtype))
    assert mx.array_equal(exact.values, v_ref.astype(mx.float16).astype(dtype))
    error = float(mx.abs(coded.keys.astype(mx.float32) - k_ref.astype(mx.float32)).max())
    assert 0 < error < 0.1  # decoded from 8-bit codes: close, not equal
    # The sink and window tokens are held in fp16: exact in the view too.
    assert mx.array_equal(coded.keys[:, :, :1], exact.keys[:, :, :1]) and mx.array_equal(coded.keys[:, :, -2:], exact.keys[:, :, -2:])
    k, v = exact.keys_and_values()  # what KV-sharing layers read
    assert mx.array_equal(k, exact.keys) and mx.array_equal(v, exact.values) and k.shape == theirs.keys_and_values()[0].shape
    # Pipeline-parallel models tie the cache to a send: cache.keys = mx.depends(cache.keys, h). The history stays.
    before = held_arrays(coded)
    coded.keys = mx.depends(coded.keys, mx.ones((3,)))
    assert held_arrays(coded) == before


def test_to_quantized_returns_the_cache_itself():
    c = cache(key_bits=4, value_bits=4)
    c.update_and_fetch(*kv(1, 10, seed=1))
    before = held_arrays(c)
    assert c.to_quantized(group_size=64, bits=4) is c and held_arrays(c) == before


# ---- copies and methods -------------------------------------------------------------------------------------------


def small_bits(method: str) -> int:
    return 2 if method == "turboquant_rvq" else 4  # rvq spends 2·b bits per coordinate


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_deep_copy_and_pickle(method):
    quantizer = make_method(method, D, small_bits(method))
    x = mx.array(np.random.default_rng(3).standard_normal((1, 1, 5, D)).astype(np.float32))
    for twin in (copy.deepcopy(quantizer), pickle.loads(pickle.dumps(quantizer))):
        assert twin.layout == quantizer.layout and twin.bytes_per_token() == quantizer.bytes_per_token()
        assert mx.array_equal(twin.decode(twin.encode(x)), quantizer.decode(quantizer.encode(x)))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deepcopy_is_independent_and_shares_the_quantizers(method):
    bits = small_bits(method)
    original = cache(method=method, key_bits=bits, value_bits=bits, sink_tokens=1, window=2)
    original.update_and_fetch(*kv(1, 20, seed=4))
    held = held_arrays(original)
    twin = copy.deepcopy(original)
    assert twin.key_quantizer is original.key_quantizer and twin.observers is original.observers
    q = mx.array(np.random.default_rng(5).standard_normal((1, HQ, 1, D)).astype(np.float32))
    assert mx.array_equal(twin.attention(q, D**-0.5), original.attention(q, D**-0.5))
    for step in range(3):  # appends go into the copy's own buffers, not the original's
        twin.update_and_fetch(*kv(1, 1, seed=50 + step))
    twin.trim(5)
    assert held_arrays(original) == held and twin.offset == original.offset - 2


# ---- state -----------------------------------------------------------------------------------------------------


def test_state_is_ours_versioned_and_round_trips_through_mlx_lm_files(tmp_path):
    c = cache(key_bits=4, value_bits=3, sink_tokens=2, window=4)
    c.update_and_fetch(*kv(1, 20, seed=6, dtype=mx.float16))
    assert json.loads(c.meta_state)["format"] == STATE_FORMAT == 2
    save_prompt_cache(str(tmp_path / "c.safetensors"), [c])
    (loaded,) = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert type(loaded) is CompressedKVCache and held_arrays(loaded) == held_arrays(c) and loaded.keys.dtype == mx.float16
    q = mx.array(np.random.default_rng(7).standard_normal((1, HQ, 1, D)).astype(np.float32))
    assert mx.array_equal(loaded.attention(q, 0.2), c.attention(q, 0.2))


def test_state_written_in_format_1_loads_with_the_same_codes():
    """tests/data/compressed_cache_state_v1.safetensors was written by save_prompt_cache with kvshard before state
    formats (commit 8cb9575): 20 tokens of keys mx.random.normal(key 7), values key 8, (1, 2, 20, 16) fp16,
    turboquant_mse k4/v3, 2 sinks, a 4-token window. Encoding the same tokens now must give the same bytes."""
    path = str(FIXTURES / "compressed_cache_state_v1.safetensors")
    written = json.loads("".join(chr(c) for c in mx.load(path)["0.meta"].tolist()))
    assert "format" not in written and "dtype" not in written
    (old,) = load_prompt_cache(path)
    keys = mx.random.normal((1, 2, 20, 16), key=mx.random.key(7)).astype(mx.float16)
    values = mx.random.normal((1, 2, 20, 16), key=mx.random.key(8)).astype(mx.float16)
    fresh = CompressedKVCache(head_dim=16, n_kv_heads=2, key_bits=4, value_bits=3, sink_tokens=2, window=4)
    fresh.update_and_fetch(keys, values)
    assert (old.offset, old.n_encoded) == (20, 14) and held_arrays(old) == held_arrays(fresh)
    q = mx.random.normal((1, 4, 1, 16), key=mx.random.key(9))
    assert mx.array_equal(old.attention(q, 0.25), fresh.attention(q, 0.25))


def test_from_state_takes_the_older_two_argument_call_and_refuses_newer_formats():
    c = cache(key_bits=4, value_bits=4)
    c.update_and_fetch(*kv(1, 12, seed=8))
    state = dict(c.state)
    meta = state.pop("meta")
    # mlx-lm 0.29–0.31 call from_state(state, meta_state), with the meta beside the arrays.
    assert held_arrays(CompressedKVCache.from_state(state, meta)) == held_arrays(c)
    newer = dict(c.state, meta=json.dumps(dict(json.loads(meta), format=STATE_FORMAT + 1)))
    with pytest.raises(ValueError, match="state format 3"):
        CompressedKVCache.from_state(newer)


# ---- batches: rows move, attention per row --------------------------------------------------------------------------


def rows_with_history(lengths, **config):
    rows = []
    for i, n in enumerate(lengths):
        row = cache(**config)
        if n:
            row.update_and_fetch(*kv(1, n, seed=100 + i))
        rows.append(row)
    return rows


CONFIGS = [{"key_bits": 4, "value_bits": 4}, {"key_bits": 3, "value_bits": 2, "sink_tokens": 2, "window": 3}, EXACT]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_batch_step_equals_each_row_alone_bit_for_bit(config):
    lengths = [3, 17, 40, 0]
    alone = rows_with_history(lengths, **config)
    batch = CompressedKVCache.merge(rows_with_history(lengths, **config))
    assert isinstance(batch, BatchCompressedKVCache)
    assert batch.offset.tolist() == lengths and batch.size() == 40 and not batch.empty()
    for step in range(3):
        keys, values = kv(len(lengths), 1, seed=200 + step)
        queries = mx.array(np.random.default_rng(step).standard_normal((len(lengths), HQ, 1, D)).astype(np.float32))
        batch.update_and_fetch(keys, values)
        batch.read_by_hook = True
        out = batch.attention(queries, scale=D**-0.5, mask=batch.make_mask(1))
        for i, row in enumerate(alone):
            row.update_and_fetch(keys[i : i + 1], values[i : i + 1])
            assert mx.array_equal(out[i : i + 1], row.attention(queries[i : i + 1], D**-0.5))
    assert batch.offset.tolist() == [n + 3 for n in lengths]
    for i, row in enumerate(alone):
        assert held_arrays(batch.extract(i)) == held_arrays(row)


def test_right_padded_prefill_stores_only_real_tokens_and_matches_batchkvcache():
    """BatchGenerator's prefill: prompts right-padded to one length, prepare(lengths, right_padding), chunks,
    finalize. Rows keep only their real tokens; offsets and attention of real positions agree with mlx_lm's
    BatchKVCache fed the same chunks (fp16-exact window: attention equal to float tolerance)."""
    lengths, L = [7, 2, 5], 7
    ours = BatchCompressedKVCache.merge([cache(**EXACT) for _ in lengths])
    theirs = BatchKVCache.merge([KVCache() for _ in lengths])
    for c in (ours, theirs):
        c.prepare(lengths=lengths, right_padding=[L - n for n in lengths])
    keys, values = kv(len(lengths), L, seed=9, dtype=mx.float16)
    queries = mx.array(np.random.default_rng(9).standard_normal((len(lengths), HQ, L, D)).astype(np.float32))
    outputs = []
    for start, stop in ((0, 4), (4, 7)):  # two chunks
        mask = theirs.make_mask(stop - start)
        k_all, v_all = theirs.update_and_fetch(keys[:, :, start:stop], values[:, :, start:stop])
        expected = mx.fast.scaled_dot_product_attention(queries[:, :, start:stop], k_all.astype(mx.float32),
                                                        v_all.astype(mx.float32), scale=D**-0.5, mask=mask)
        ours.update_and_fetch(keys[:, :, start:stop], values[:, :, start:stop])
        ours.read_by_hook = True
        outputs.append((start, ours.attention(queries[:, :, start:stop], scale=D**-0.5), expected))
    for c in (ours, theirs):
        c.finalize()
    assert ours.offset.tolist() == theirs.offset.tolist() == lengths
    for i, n in enumerate(lengths):
        assert ours.rows[i].offset == n and mx.array_equal(ours.rows[i].keys, keys[i : i + 1, :, :n])
        for start, got, expected in outputs:
            real = slice(0, max(0, min(n - start, got.shape[2])))
            assert mx.allclose(got[i, :, real], expected[i, :, real], atol=1e-5)
            assert not mx.any(got[i, :, real.stop :]).item()  # padded query positions: zeros
    # The next decode step of each row over its own tokens, against BatchKVCache's left-padded layout and mask.
    step_k, step_v = kv(len(lengths), 1, seed=10, dtype=mx.float16)
    q = queries[:, :, :1]
    mask = theirs.make_mask(1)
    k_all, v_all = theirs.update_and_fetch(step_k, step_v)
    expected = mx.fast.scaled_dot_product_attention(q, k_all.astype(mx.float32), v_all.astype(mx.float32), scale=D**-0.5, mask=mask)
    ours.update_and_fetch(step_k, step_v)
    assert mx.allclose(ours.attention(q, scale=D**-0.5), expected, atol=1e-5)


def test_left_padding_skips_the_leading_pad_tokens():
    ours = BatchCompressedKVCache.merge([cache(**EXACT) for _ in range(2)])
    ours.prepare(left_padding=[3, 0])
    keys, values = kv(2, 5, seed=11, dtype=mx.float16)
    for start, stop in ((0, 2), (2, 5)):  # the padding spans the first chunk and part of the second
        ours.update_and_fetch(keys[:, :, start:stop], values[:, :, start:stop])
        ours.read_by_hook = True
    assert ours.offset.tolist() == [2, 5] and mx.array_equal(ours.rows[0].keys, keys[:1, :, 3:])


def test_merge_filter_extend_extract_move_rows_without_re_encoding():
    config = {"key_bits": 3, "value_bits": 2, "sink_tokens": 1, "window": 2}
    rows = rows_with_history([9, 30, 4], **config)
    held = [held_arrays(r) for r in rows]
    batch = CompressedKVCache.merge(rows)
    assert [held_arrays(batch.extract(i)) for i in range(3)] == held
    batch.filter([2, 0])
    assert batch.offset.tolist() == [4, 9] and [held_arrays(batch.extract(i)) for i in range(2)] == [held[2], held[0]]
    other = CompressedKVCache.merge(rows_with_history([0, 12], **config))
    batch.extend(other)
    assert batch.offset.tolist() == [4, 9, 0, 12]
    # A copy of the whole batch (BatchGenerator's split deep-copies it) and an extracted row are independent.
    twin = copy.deepcopy(batch)
    extracted = batch.extract(1)
    extracted.update_and_fetch(*kv(1, 3, seed=12))
    twin.update_and_fetch(*kv(4, 1, seed=13))
    assert batch.offset.tolist() == [4, 9, 0, 12] and held_arrays(batch.extract(1)) == held[0]
    assert batch.nbytes == sum(r.nbytes for r in batch.rows) > 0
    assert batch.trim(2) == 2 and batch.offset.tolist() == [2, 7, 0, 10]
    assert [held_arrays(r) for r in rows] == held  # merge took copies: the caches handed in are as they were


def test_rows_of_different_layers_or_configs_are_refused_naming_the_difference():
    with pytest.raises(ValueError, match="key_bits"):
        CompressedKVCache.merge(rows_with_history([3], key_bits=4) + rows_with_history([3], key_bits=3))
    with pytest.raises(ValueError, match="right_padding"):
        BatchCompressedKVCache.merge(rows_with_history([0, 0])).prepare(lengths=[1, 2], right_padding=[1])


def test_a_batch_without_the_attention_hook_fails_loudly():
    batch = BatchCompressedKVCache.merge(rows_with_history([0, 0]))
    batch.update_and_fetch(*kv(2, 1, seed=14))
    with pytest.raises(RuntimeError, match="attention hook"):
        batch.update_and_fetch(*kv(2, 1, seed=15))


# ---- through mlx_lm: make_cache, generate with kv_bits, LRUPromptCache, BatchGenerator ----------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=HQ, num_key_value_heads=H, head_dim=D, rms_norm_eps=1e-5, vocab_size=256)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


class Tokens:
    """batch_generate's tokenizer needs only eos ids and decode."""

    eos_token_ids = []

    def decode(self, tokens):
        return " ".join(map(str, tokens))


TINY_CONFIG = KVCacheConfig(bit_width_inlier=4, sink_tokens=1, window=2)


def greedy(model, prompt, caches, n):
    return [(int(t), lp) for t, lp in generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=caches)]


def assert_same_greedy_tokens(alone, batched, tolerance):
    """Token for token up to the first difference, which may only come where the lone run's top two log-probs
    are within `tolerance` (the batched forward pass rounds differently). Returns the number of differing steps."""
    for step, ((token, logprobs), got) in enumerate(zip(alone, batched)):
        if token != got:
            top = mx.sort(logprobs)
            margin = float(top[-1] - top[-2])
            assert margin < tolerance, f"step {step}: {got} instead of {token} with a top-2 margin of {margin:.3f}"
            return len(alone) - step
    assert len(alone) == len(batched)
    return 0


def test_for_model_inside_make_cache_does_not_recurse(tiny_model):
    class CompressedLlama(llama.Model):
        def make_cache(self):
            return KVCacheBuilder.for_model(self, TINY_CONFIG)

    subclassed = CompressedLlama(tiny_model.args)
    subclassed.update(tiny_model.parameters())
    assert {type(c) for c in make_prompt_cache(subclassed)} == {CompressedKVCache}
    tiny_model.make_cache = lambda: KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    try:
        caches = make_prompt_cache(tiny_model)
        assert {type(c) for c in caches} == {CompressedKVCache}
        assert [t for t, _ in greedy(subclassed, [1, 2, 3], None, 4)] == [t for t, _ in greedy(tiny_model, [1, 2, 3], caches, 4)]
    finally:
        del tiny_model.make_cache


def test_generate_with_kv_bits_keeps_kvshard_caches(tiny_model):
    plain = KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    quantized = KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    tokens = [int(t) for t, _ in generate_step(mx.array([5, 6, 7, 8]), tiny_model, max_tokens=6, prompt_cache=quantized,
                                               kv_bits=4, quantized_kv_start=0)]
    assert {type(c) for c in quantized} == {CompressedKVCache}
    assert tokens == [t for t, _ in greedy(tiny_model, [5, 6, 7, 8], plain, 6)]


def test_lru_prompt_cache_round_trip(tiny_model):
    prompt = list(range(1, 13))
    caches = KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    tiny_model(mx.array([prompt]), cache=caches)
    held = [held_arrays(c) for c in caches]
    lru = LRUPromptCache(max_size=4)
    lru.insert_cache("tiny", prompt, caches)
    assert lru.nbytes == sum(c.nbytes for c in caches) > 0

    exact, rest = lru.fetch_nearest_cache("tiny", prompt)
    assert rest == [] and [held_arrays(c) for c in exact] == held
    longer, rest = lru.fetch_nearest_cache("tiny", prompt + [40, 41])
    assert rest == [40, 41] and [c.offset for c in longer] == [12, 12]
    shorter, rest = lru.fetch_nearest_cache("tiny", prompt[:8])  # the longer entry, trimmed to the common prefix
    assert rest == prompt[7:8] and [c.offset for c in shorter] == [7, 7]
    # Continuing a fetched copy changes neither the stored entry nor the other copies.
    continued = [t for t, _ in greedy(tiny_model, [40, 41], longer, 5)]
    fresh = KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    tiny_model(mx.array([prompt]), cache=fresh)
    assert continued == [t for t, _ in greedy(tiny_model, [40, 41], fresh, 5)]
    again, _ = lru.fetch_nearest_cache("tiny", prompt)
    assert [held_arrays(c) for c in again] == held == [held_arrays(c) for c in exact]


def test_batch_generate_gives_each_prompt_its_lone_greedy_tokens(tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 30], [42]]
    options = dict(max_tokens=8, return_token_ids=True, prefill_step_size=8, return_prompt_caches=True)
    reference = batch_generate(tiny_model, Tokens(), prompts, **options)  # mlx_lm's own caches
    tiny_model.make_cache = lambda: KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)
    try:
        result = batch_generate(tiny_model, Tokens(), prompts, **options)
    finally:
        del tiny_model.make_cache
    for prompt, got, caches, theirs in zip(prompts, result.token_ids, result.caches, reference.caches):
        alone = greedy(tiny_model, prompt, KVCacheBuilder.for_model(tiny_model, TINY_CONFIG), 8)
        assert_same_greedy_tokens(alone, got, tolerance=0.05)
        # The returned caches are the rows, extracted, holding what mlx_lm's own extracted caches hold.
        assert {type(c) for c in caches} == {CompressedKVCache} and [c.offset for c in caches] == [c.offset for c in theirs]


def test_batch_generator_continues_caches_with_history(tiny_model):
    """Caches that already hold different histories join one batch (merge) and continue as each would alone; a
    sequence removed mid-way hands back its cache (extract), holding what mlx_lm's own cache holds then."""
    histories, turns = [list(range(3, 20)), [7, 8, 9], [1, 2, 3, 4, 5]], [[50, 51], [60, 61, 62, 63], [70, 71, 72]]

    def prefilled(history, make):
        caches = make()
        tiny_model(mx.array([history]), cache=caches)
        return caches

    def run(make):
        generator = BatchGenerator(tiny_model, max_tokens=6, prefill_step_size=4)
        given = [prefilled(h, make) for h in histories]
        uids = generator.insert(turns, caches=given)
        tokens, removed = {uid: [] for uid in uids}, None
        while responses := generator.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
            if removed is None and len(tokens[uids[2]]) == 2:
                ((removed, _),) = generator.remove([uids[2]], return_prompt_caches=True).values()
        generator.close()
        # As with mlx_lm's own caches, the caches handed in are not changed by the generation.
        assert [c.offset for c in given[0]] == [len(histories[0])] * len(given[0])
        return [tokens[uid] for uid in uids], removed

    ours = lambda: KVCacheBuilder.for_model(tiny_model, TINY_CONFIG)  # noqa: E731
    tokens, removed = run(ours)
    _, reference = run(lambda: make_prompt_cache(tiny_model))
    assert {type(c) for c in removed} == {CompressedKVCache} and [c.offset for c in removed] == [c.offset for c in reference]
    assert len(tokens[2]) == 2
    for history, turn, got in zip(histories[:2], turns[:2], tokens[:2]):
        assert assert_same_greedy_tokens(greedy(tiny_model, turn, prefilled(history, ours), 6), got, tolerance=0.05) == 0


def test_real_model_batch_generate_gives_each_prompt_its_lone_greedy_tokens(smollm):
    """The embedded SmolLM2-135M, four prompts of 5–19 tokens in one batch_generate with 8-bit kvshard caches
    (near-lossless: the batched forward pass rounds differently from a lone one, and at 4 bits a flipped code is
    a knife edge). Each prompt's greedy tokens equal its lone run's, except after a step whose top two
    log-probs are within 0.5 (counted)."""
    model, tokenizer = smollm
    config = KVCacheConfig(bit_width_inlier=8)
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an old fisherman who",
             "def fibonacci(n):\n    ", "Water boils at a temperature of"]
    prompts = [tokenizer.encode(t) for t in texts]
    model.make_cache = lambda: KVCacheBuilder.for_model(model, config)
    try:
        result = batch_generate(model, tokenizer, prompts, max_tokens=10, return_token_ids=True)
    finally:
        del model.make_cache
    differing = [assert_same_greedy_tokens(greedy(model, p, KVCacheBuilder.for_model(model, config), 10), got, 0.5)
                 for p, got in zip(prompts, result.token_ids)]
    print(f"steps after a knife-edge difference, per prompt: {differing}")


@pytest.mark.parametrize("sliding", ["fp16", "compressed", "full"])
def test_batch_generate_on_a_hybrid_sliding_window_model(sliding):
    """Sliding-window layers in a batch: fp16 windows batch as mlx_lm's BatchRotatingKVCache, compressed ones as rows
    that drop what leaves their window, "full" ones as rows under each row's own window mask."""
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                           num_attention_heads=HQ, num_key_value_heads=H, head_dim=D, rms_norm_eps=1e-5, vocab_size=256,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    mx.random.seed(1)
    model = llama.Model(args)
    config = KVCacheConfig(bit_width_inlier=8, sliding=sliding)
    prompts = [[(7 * i + 3) % 256 for i in range(n)] for n in (21, 4, 13)]  # longer and shorter than the window
    model.make_cache = lambda: KVCacheBuilder.for_model(model, config)
    # Prefill chunks longer than the window: the first one already needs the window mask.
    result = batch_generate(model, Tokens(), prompts, max_tokens=6, return_token_ids=True, prefill_step_size=16)
    for prompt, got in zip(prompts, result.token_ids):
        assert_same_greedy_tokens(greedy(model, prompt, KVCacheBuilder.for_model(model, config), 6), got, tolerance=0.05)
