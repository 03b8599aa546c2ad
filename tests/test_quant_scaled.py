"""Query-aware key scales (methods/scaled.py, calibrate/key_scales.py): exact bookkeeping, and a real gain where
queries and keys put their energy in different channels."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig, calibrate_key_scales

H, D = 2, 64


def _anisotropic(seed: int, tokens: int):
    """Queries strong where keys are weak and the other way round (per channel spreads 4 : 0.25)."""
    rng = np.random.default_rng(seed)
    strong = np.where(np.arange(D) < D // 2, 4.0, 0.25)
    k = rng.standard_normal((1, H, tokens, D)) * strong[::-1]
    q = rng.standard_normal((1, H, 8, D)) * strong
    return mx.array(q.astype(np.float32)), mx.array(k.astype(np.float32))


def _optimal_scale() -> mx.array:
    # a_j = sqrt(σq_j / σk_j): 4 on the queries' strong half, 1/4 on the other.
    return mx.array(np.tile(np.where(np.arange(D) < D // 2, 4.0, 0.25), (H, 1)).astype(np.float32))


def _score_error(cache: CompressedKVCache, q: mx.array, k: mx.array) -> float:
    keys, _ = cache.dequantized()
    exact = q @ k.swapaxes(-1, -2)
    return mx.mean((q @ keys.astype(mx.float32).swapaxes(-1, -2) - exact) ** 2).item() / mx.mean(exact**2).item()


def test_scaled_keys_lower_the_score_error_when_queries_and_keys_differ():
    q, k = _anisotropic(0, 512)
    plain = CompressedKVCache(D, H, key_bits=3, center_keys=False)
    scaled = CompressedKVCache(D, H, key_bits=3, center_keys=False, key_scale=_optimal_scale())
    for cache in (plain, scaled):
        cache.append(k, k)
    # Cauchy-Schwarz predicts (Σ σq σk)² / (Σ σq² Σ σk²) = 1 / (16 + 1/16)² · 4 ≈ 0.0155 of the plain error.
    assert _score_error(scaled, q, k) < 0.05 * _score_error(plain, q, k)


def test_scaled_attention_from_codes_matches_attention_on_decoded_keys():
    q, k = _anisotropic(1, 300)
    cache = CompressedKVCache(D, H, key_bits=4, value_bits=4, sink_tokens=2, window=8, key_scale=_optimal_scale())
    cache.append(k, k * 0.5)
    keys, values = cache.dequantized()
    ref = mx.fast.scaled_dot_product_attention(q, keys.astype(mx.float32), values.astype(mx.float32), scale=D**-0.5)
    assert mx.allclose(cache.attend(q), ref, rtol=2e-3, atol=2e-3).item()


def test_key_scale_round_trips_through_state_and_is_counted_in_nbytes():
    q, k = _anisotropic(2, 40)
    cache = CompressedKVCache(D, H, key_bits=3, key_scale=_optimal_scale())
    before = cache.nbytes
    cache.append(k, k)
    restored = CompressedKVCache.from_state(cache.state)
    assert mx.array_equal(restored.key_scale, cache.key_scale).item()
    assert mx.array_equal(restored.attend(q), cache.attend(q)).item()
    assert before == H * D * 2  # an empty cache holds only its fp16 scale
    unscaled = CompressedKVCache(D, H, key_bits=3)
    unscaled.append(k, k)
    assert cache.nbytes - unscaled.nbytes == H * D * 2


def test_a_key_scale_of_the_wrong_shape_is_refused_by_name():
    with pytest.raises(ValueError, match="key_scale"):
        CompressedKVCache(D, H, key_scale=mx.ones((H + 1, D)))


def test_calibrated_scales_are_one_per_attention_layer_and_normalised():
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, head_dim=16,
    )
    mx.random.seed(0)
    model = llama.Model(args)

    class Tokens:
        def encode(self, text):
            return [ord(c) % 64 for c in text]

    scales = calibrate_key_scales(model, Tokens(), prompts=["the quick brown fox jumps", "over the lazy dog"])
    assert len(scales) == 3
    for scale in scales:
        assert scale.shape == (2, 16) and mx.all(scale > 0).item()
        assert mx.allclose(mx.log(scale).mean(axis=-1), mx.zeros((2,)), atol=1e-4).item()
    config = KVCacheConfig(bit_width_inlier=4, key_scales=scales)
    caches = KVCacheBuilder.for_model(model, config)
    out = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=caches)
    assert mx.isfinite(out).all().item() and caches[0].key_scale is not None


def test_a_large_append_after_a_trim_fits_in_the_grown_buffer():
    rng = np.random.default_rng(3)
    k = mx.array(rng.standard_normal((1, H, 600, D)).astype(np.float32))
    # No key centring: its mean would come from a different first chunk in the two caches.
    cache = CompressedKVCache(D, H, key_bits=3, center_keys=False)
    cache.append(k[:, :, :512], k[:, :, :512])
    cache.trim(412)  # 100 tokens kept, capacity 512 left behind
    cache.append(k[:, :, 100:600], k[:, :, 100:600])
    reference = CompressedKVCache(D, H, key_bits=3, center_keys=False)
    reference.append(k[:, :, :100], k[:, :, :100])
    reference.append(k[:, :, 100:600], k[:, :, 100:600])
    assert len(cache) == 600
    for name, codes in cache.state["key_codes"].items():
        assert mx.array_equal(codes, reference.state["key_codes"][name]).item()
