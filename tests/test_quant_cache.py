"""CompressedKVCache: honest bytes, state round trips through mlx_lm, trimming, attention read from codes
against exact references, and bad input that must leave the cache untouched."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import create_causal_mask, load_prompt_cache, save_prompt_cache, trim_prompt_cache

import kvshard.quant.attention as attention_module
from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig
from kvshard.quant.attention import ExactSegment

METHODS = ["turboquant_mse", "turboquant_prod", "turboquant_rvq", "polar", "qjl"]
# A key bit width and a value bit width each method accepts (prod needs >= 2; rvq <= 4).
BITS = {"turboquant_mse": (3, 2), "turboquant_prod": (3, 2), "turboquant_rvq": (2, 1), "polar": (4, 2), "qjl": (2, 1)}


def bytes_per_token_by_hand(method: str, d: int, bits: int) -> int:
    """Packed codes plus fp16 scalars of one token of one head, counted from each method's definition."""
    if method == "turboquant_mse":
        return math.ceil(d * bits / 8) + 2  # b-bit indices + fp16 norm
    if method == "turboquant_prod":
        return math.ceil(d * (bits - 1) / 8) + math.ceil(d / 8) + 2 + 2  # (b−1)-bit idx, signs, 2 norms
    if method == "turboquant_rvq":
        return 2 * math.ceil(d * bits / 8) + 2  # two b-bit stages + fp16 norm
    if method == "polar":
        level_bits = [bits] + [max(1, bits // 2)] * 3
        return sum(math.ceil((d >> level) * b / 8) for level, b in zip(range(1, 5), level_bits)) + 2 * (d // 16)
    if method == "qjl":
        return math.ceil(bits * d / 8) + 2  # sketch of bits·d signs + fp16 norm
    raise AssertionError(method)


def keys_and_values(batch, heads, tokens, d, seed=0, dtype=mx.float16):
    """Keys with a large shared direction and a few outlier channels (as real keys have); Gaussian values."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((1, heads, 1, d)) * 2.0
    keys = mean + rng.standard_normal((batch, heads, tokens, d))
    keys[..., 3] *= 6.0
    values = rng.standard_normal((batch, heads, tokens, d))
    return mx.array(keys.astype(np.float32)).astype(dtype), mx.array(values.astype(np.float32)).astype(dtype)


def make(method, key_bits=None, value_bits=None, head_dim=64, heads=2, **kw):
    kb, vb = BITS[method]
    return CompressedKVCache(
        head_dim=head_dim,
        n_kv_heads=heads,
        method=method,
        key_bits=kb if key_bits is None else key_bits,
        value_bits=vb if value_bits is None else value_bits,
        **kw,
    )


def feed(cache, keys, values, chunks):
    """Append through mlx_lm's entry point in chunks of the given sizes (prefill, then decode steps)."""
    start = 0
    for n in chunks:
        cache.update_and_fetch(keys[:, :, start : start + n], values[:, :, start : start + n])
        start += n
    assert start == keys.shape[2]


def snapshot(cache) -> dict:
    """Everything the cache holds, as bytes: a before/after comparison is bit-exact."""
    from mlx.utils import tree_flatten

    out = {"offset": cache.offset, "nbytes": cache.nbytes}
    for name, value in tree_flatten(cache.state):
        out[name] = value if isinstance(value, str) else (value.dtype, tuple(value.shape), np.array(value).tobytes())
    return out


def decoded_fp32(cache):
    """The K and V the cache stands for, decoded in fp32 from its segments (codes + key mean, fp16 parts)."""
    keys, values = [], []
    for segment in cache.segments():
        if isinstance(segment, ExactSegment):
            keys.append(segment.keys.astype(mx.float32))
            values.append(segment.values.astype(mx.float32))
        else:
            k = cache.key_quantizer.decode(segment.key_codes)
            if segment.key_mean is not None:
                k = k + segment.key_mean.astype(mx.float32)
            keys.append(k)
            values.append(cache.value_quantizer.decode(segment.value_codes))
    return np.array(mx.concatenate(keys, axis=2), np.float64), np.array(mx.concatenate(values, axis=2), np.float64)


def reference_attention(queries, keys, values, scale, mask=None):
    """Plain float64 softmax attention with GQA (query head h reads kv head h // group)."""
    q = np.array(queries.astype(mx.float32), np.float64)
    keys, values = np.asarray(keys, np.float64), np.asarray(values, np.float64)
    group = q.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    scores = q @ keys.swapaxes(-1, -2) * scale
    L, T = q.shape[2], keys.shape[2]
    if isinstance(mask, str):
        assert mask == "causal"
        mask = np.arange(T - L, T)[:, None] >= np.arange(T)[None]
    if mask is not None:
        mask = np.array(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True) @ values


# ---- honest bytes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sinks,window", [(0, 0), (3, 5)])
def test_nbytes_equals_a_hand_count(method, sinks, window):
    d, heads, tokens = 64, 2, 41
    kb, vb = BITS[method]
    cache = make(method, sink_tokens=sinks, window=window)
    keys, values = keys_and_values(1, heads, tokens, d)
    feed(cache, keys, values, [17] + [1] * 24)
    encoded = tokens - sinks - window
    fp16_tokens = sinks + window
    expected = (
        heads * encoded * (bytes_per_token_by_hand(method, d, kb) + bytes_per_token_by_hand(method, d, vb))
        + 2 * heads * fp16_tokens * d * 2  # fp16 K and V of sinks and window
        + heads * d * 2  # the fp16 key mean
    )
    assert cache.nbytes == cache.memory_bytes() == expected
    expected_keys = heads * encoded * bytes_per_token_by_hand(method, d, kb) + heads * fp16_tokens * d * 2 + heads * d * 2
    assert cache.compressed_key_bytes == expected_keys
    assert cache.fp16_key_bytes == heads * tokens * d * 2


def test_nbytes_without_key_centering_and_before_the_mean_exists():
    d, heads = 64, 2
    keys, values = keys_and_values(1, heads, 30, d)
    plain = make("turboquant_mse", key_bits=4, value_bits=4, center_keys=False)
    feed(plain, keys, values, [30])
    assert plain.nbytes == heads * 30 * 2 * (d * 4 // 8 + 2)
    # Fewer tokens than the key mean needs: they wait in fp16 (and are counted as such).
    early = make("turboquant_mse", key_bits=4, value_bits=4)
    feed(early, keys[:, :, :5], values[:, :, :5], [5])
    assert early.nbytes == 2 * heads * 5 * d * 2


def test_effective_bits_are_far_below_fp16():
    cache = make("turboquant_mse", key_bits=4, value_bits=4)
    keys, values = keys_and_values(1, 2, 512, 64)
    feed(cache, keys, values, [512])
    elements = 2 * keys.size
    # 4 bits + an fp16 norm per 64 coordinates, plus the fp16 key mean of each head spread over all tokens.
    assert 8 * cache.nbytes / elements == 4 + 16 / 64 + 8 * (2 * 64 * 2) / elements


# ---- state round trip, offset, trim --------------------------------------------------------------------


def test_state_round_trip_through_mlx_lm_prompt_cache_files(tmp_path):
    caches = [
        make("turboquant_mse", sink_tokens=2, window=4),
        make("turboquant_prod", heads=2),
        make("polar", center_keys=False),
        make("qjl", window=3),
        make("turboquant_rvq"),
    ]
    keys, values = keys_and_values(1, 2, 37, 64, seed=1)
    for cache in caches:
        feed(cache, keys, values, [30, 1, 1, 5])
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, caches, metadata={"model": "test"})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"model": "test"}
    q = mx.array(np.random.default_rng(2).standard_normal((1, 4, 3, 64)).astype(np.float32))
    more_k, more_v = keys_and_values(1, 2, 9, 64, seed=3)
    for original, restored in zip(caches, loaded):
        assert type(restored) is CompressedKVCache
        assert snapshot(restored) == snapshot(original)
        assert len(restored) == restored.offset == 37
        a, b = original.attention(q, scale=0.125), restored.attention(q, scale=0.125)
        assert np.array_equal(np.array(a), np.array(b))
        # Both go on identically after the round trip.
        for cache in (original, restored):
            feed(cache, more_k, more_v, [4, 1, 4])
        assert snapshot(restored) == snapshot(original)


def test_offset_len_and_empty():
    cache = make("turboquant_mse", sink_tokens=2, window=3)
    assert cache.empty() and len(cache) == 0 and cache.offset == 0 and cache.nbytes == 0
    keys, values = keys_and_values(1, 2, 20, 64)
    for n, total in ((7, 7), (1, 8), (12, 20)):
        start = total - n
        cache.update_and_fetch(keys[:, :, start:total], values[:, :, start:total])
        assert len(cache) == cache.offset == cache.size() == total
        assert not cache.empty()
    k, v = cache.dequantized()
    assert k.shape == v.shape == (1, 2, 20, 64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sinks,window", [(0, 0), (3, 4)])
def test_trim_then_reappend_is_bit_identical_to_never_trimming(method, sinks, window):
    keys, values = keys_and_values(1, 2, 40, 64, seed=5)
    # The key mean is estimated once, from the first chunk: both caches see the same first chunk.
    straight = make(method, sink_tokens=sinks, window=window)
    feed(straight, keys, values, [33, 7])
    trimmed = make(method, sink_tokens=sinks, window=window)
    feed(trimmed, keys, values, [33, 1, 1, 5])
    assert trimmed.trim(9) == 9 and len(trimmed) == trimmed.offset == 31
    cut_k, cut_v = trimmed.dequantized()
    assert cut_k.shape[2] == cut_v.shape[2] == 31
    feed(trimmed, keys[:, :, 31:], values[:, :, 31:], [9])
    assert snapshot(trimmed) == snapshot(straight)
    # Trimming more than is held drops everything held, and says so.
    assert trimmed.trim(100) == 40 and len(trimmed) == 0 and trimmed.nbytes <= 2 * 64 * 2


def test_trim_through_mlx_lm_helper_reaches_into_the_sinks():
    cache = make("turboquant_mse", sink_tokens=4, window=2)
    keys, values = keys_and_values(1, 2, 12, 64)
    feed(cache, keys, values, [12])
    assert trim_prompt_cache([cache], 10) == 10
    k, v = cache.dequantized()
    assert np.array_equal(np.array(k), np.array(keys[:, :, :2])) and np.array_equal(np.array(v), np.array(values[:, :, :2]))
    with pytest.raises(ValueError, match="n"):
        cache.trim(-1)


# ---- attention from codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sinks,window,batch", [(0, 0, 1), (2, 3, 2)])
def test_attention_from_codes_equals_attention_on_decoded_kv(method, sinks, window, batch, monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK_TOKENS", 7)  # several blocks: exercises the online softmax
    cache = make(method, sink_tokens=sinks, window=window)
    keys, values = keys_and_values(batch, 2, 45, 64, seed=11)
    feed(cache, keys, values, [40, 1, 4])
    queries = mx.array(np.random.default_rng(4).standard_normal((batch, 6, 3, 64)).astype(np.float32)) * 2  # GQA 3:1
    out = np.array(cache.attention(queries, scale=64**-0.5))
    k, v = decoded_fp32(cache)
    np.testing.assert_allclose(out, reference_attention(queries, k, v, 64**-0.5), rtol=1e-4, atol=1e-5)
    # dequantized() (what a generic attention would read) is the same K/V, to fp16 precision.
    fp16_k, fp16_v = cache.dequantized()
    np.testing.assert_allclose(np.array(fp16_k.astype(mx.float32)), k, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.array(fp16_v.astype(mx.float32)), v, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "per_batch"])
def test_causal_prefill_attention_matches_reference(method, mask_kind, monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK_TOKENS", 5)
    cache = make(method, sink_tokens=2, window=3)
    keys, values = keys_and_values(2, 2, 29, 64, seed=12)
    feed(cache, keys[:, :, :20], values[:, :, :20], [20])
    cache.update_and_fetch(keys[:, :, 20:], values[:, :, 20:])  # a 9-token prefill on top of 20 held
    queries = mx.array(np.random.default_rng(6).standard_normal((2, 4, 9, 64)).astype(np.float32)) * 2
    mask = {
        "causal": "causal",
        "bool": create_causal_mask(9, 20),
        "additive": mx.where(create_causal_mask(9, 20), 0.0, -1e9),
        "per_batch": mx.broadcast_to(create_causal_mask(9, 20)[None, None], (2, 1, 9, 29)),
    }[mask_kind]
    out = np.array(cache.attention(queries, scale=0.125, mask=mask))
    k, v = decoded_fp32(cache)
    expected = reference_attention(queries, k, v, 0.125, mask if isinstance(mask, str) else np.array(mask))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # The mask must matter: the first query sees 21 of 29 tokens.
    unmasked = reference_attention(queries, k, v, 0.125)
    assert np.abs(unmasked[:, :, 0] - expected[:, :, 0]).max() > 1e-2


def test_attend_public_api_and_shapes():
    cache = KVCacheBuilder().with_method("turboquant_rvq").with_head_dim(128).with_bit_width(inlier=2).with_seed(42).build()
    rng = np.random.default_rng(0)
    for _ in range(40):
        cache.append(mx.array(rng.standard_normal(128).astype(np.float16)), mx.array(rng.standard_normal(128).astype(np.float16)))
    assert len(cache) == 40
    q = mx.array(rng.standard_normal(128).astype(np.float16))
    out = cache.attend(q)
    assert out.shape == (128,) and out.dtype == mx.float16
    k, v = decoded_fp32(cache)
    expected = reference_attention(q.reshape(1, 1, 1, 128), k, v, 128**-0.5).reshape(128)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=2e-3)
    assert cache.memory_bytes() == 40 * (2 * (2 * 128 * 2 // 8 + 2)) + 128 * 2


@pytest.mark.parametrize("method", ["turboquant_mse", "turboquant_rvq", "polar"])
def test_attention_error_against_original_kv_falls_with_bits(method):
    keys, values = keys_and_values(1, 2, 256, 64, seed=21, dtype=mx.float32)
    rng = np.random.default_rng(8)
    # Queries aligned with some keys, so the softmax is peaked as in real attention.
    queries = mx.array(np.array(keys)[:, :, rng.integers(0, 256, 8)].repeat(2, axis=1) * 0.5 + rng.standard_normal((1, 4, 8, 64)))
    exact = reference_attention(queries, np.array(keys), np.array(values), 0.125)
    errors = []
    for bits in (1, 2, 3, 4):
        cache = make(method, key_bits=bits, value_bits=bits)
        feed(cache, keys, values, [256])
        out = np.array(cache.attention(queries, scale=0.125))
        errors.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
    # Measured (mse, rvq, polar): 0.87→0.23, 0.64→0.026, 0.99→0.27 from 1 to 4 bits.
    assert all(later < 0.98 * earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0] and errors[-1] < 0.3, errors


# ---- bad input ------------------------------------------------------------------------------------------------


def _held_cache():
    cache = make("turboquant_mse", sink_tokens=2, window=3)
    keys, values = keys_and_values(1, 2, 20, 64)
    feed(cache, keys, values, [20])
    return cache


@pytest.mark.parametrize(
    "field,keys,values",
    [
        ("head_dim", mx.zeros((1, 2, 3, 32)), mx.zeros((1, 2, 3, 32))),
        ("kv_heads", mx.zeros((1, 3, 3, 64)), mx.zeros((1, 3, 3, 64))),
        ("values shape", mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 4, 64))),
        ("batch", mx.zeros((2, 2, 3, 64)), mx.zeros((2, 2, 3, 64))),
        ("keys", mx.full((1, 2, 3, 64), math.nan), mx.zeros((1, 2, 3, 64))),
        ("keys", mx.full((1, 2, 3, 64), math.inf), mx.zeros((1, 2, 3, 64))),
        ("values", mx.zeros((1, 2, 3, 64)), mx.concatenate([mx.zeros((1, 2, 2, 64)), mx.full((1, 2, 1, 64), -math.inf)], axis=2)),
        ("floating", mx.zeros((1, 2, 3, 64), dtype=mx.int32), mx.zeros((1, 2, 3, 64), dtype=mx.int32)),
    ],
)
def test_bad_append_raises_naming_the_field_and_leaves_cache_untouched(field, keys, values):
    cache = _held_cache()
    before = snapshot(cache)
    with pytest.raises(ValueError, match=field):
        cache.append(keys, values)
    assert snapshot(cache) == before
    if field not in ("keys", "values"):  # mlx_lm's path skips the NaN scan for speed, but checks shapes
        with pytest.raises(ValueError, match=field):
            cache.update_and_fetch(keys, values)
        assert snapshot(cache) == before


@pytest.mark.parametrize(
    "method,key_bits,value_bits",
    [
        ("turboquant_mse", 0, 4),
        ("turboquant_mse", 9, 4),
        ("turboquant_mse", 4, 9),
        ("turboquant_prod", 1, 4),
        ("turboquant_rvq", 5, 2),
        ("polar", 4, 0),
        ("qjl", 2.5, 1),
        ("qjl", True, 1),
    ],
)
def test_bits_out_of_range_are_refused_at_construction(method, key_bits, value_bits):
    with pytest.raises(ValueError, match="bits"):
        CompressedKVCache(head_dim=64, method=method, key_bits=key_bits, value_bits=value_bits)
    with pytest.raises(ValueError, match="bits"):
        KVCacheConfig(method=method, bit_width_inlier=key_bits, bit_width_value=value_bits).make_cache()


def test_other_bad_configuration_names_the_field():
    with pytest.raises(ValueError, match="method"):
        CompressedKVCache(head_dim=64, method="turboquant")
    with pytest.raises(ValueError, match="head_dim"):
        CompressedKVCache(head_dim=72, method="polar")  # polar works in groups of 16
    with pytest.raises(ValueError, match="sink_tokens"):
        CompressedKVCache(head_dim=64, sink_tokens=-1)
    with pytest.raises(ValueError, match="window"):
        CompressedKVCache(head_dim=64, window=1.5)
    with pytest.raises(ValueError, match="key_bits"):
        KVCacheConfig(bit_width_inlier=[4, 4]).make_cache(layer=0, n_layers=3)


def test_bad_queries_raise_and_leave_cache_untouched():
    cache = _held_cache()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="head_dim"):
        cache.attend(mx.zeros((4, 1, 32)))
    with pytest.raises(ValueError, match="kv_heads"):
        cache.attend(mx.zeros((3, 1, 64)))
    assert snapshot(cache) == before
    with pytest.raises(ValueError, match="empty"):
        make("turboquant_mse").attend(mx.zeros((64,)))
