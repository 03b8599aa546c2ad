"""Outlier channels: the exact stream holds the n largest coordinates of every key (vs a numpy reference), bytes by
hand, lower key error than plain codes on keys with outlier channels, scores consistent with the decoded keys,
state round trips, and bad settings refused by name."""

import mlx.core as mx
import numpy as np
import pytest

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig
from kvshard.quant.methods import make_method
from kvshard.quant.methods.outliers import OutlierChannels

H, D = 2, 64


def _keys(tokens, seed=0, loud=(3, 17, 40)):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((1, H, tokens, D)).astype(np.float32)
    keys[..., list(loud)] *= 8.0  # a few loud channels, as real keys have
    values = rng.standard_normal((1, H, tokens, D)).astype(np.float32)
    return keys, values


def test_the_exact_stream_holds_the_largest_coordinates():
    keys, _ = _keys(50)
    method = OutlierChannels(make_method("turboquant_mse", D, 3), 3)
    idx, values, inliers = method.split(mx.array(keys))
    expected = np.sort(np.argsort(-np.abs(keys), axis=-1)[..., :3], axis=-1)
    assert np.array_equal(np.sort(np.array(idx), axis=-1), expected)
    assert np.array_equal(np.array(values), np.take_along_axis(keys, np.array(idx).astype(np.int64), -1).astype(np.float16))
    inliers = np.array(inliers)
    assert np.all(np.take_along_axis(inliers, expected, -1) == 0)
    mask = np.ones_like(keys, dtype=bool)
    np.put_along_axis(mask, expected, False, -1)
    assert np.array_equal(inliers[mask], keys[mask])


def test_bytes_by_hand():
    keys, values = _keys(40)
    cache = KVCacheBuilder().with_head_dim(D).with_bit_width(inlier=3, value=2).with_outlier_channels(2).build()
    cache.append(mx.array(keys), mx.array(values))
    per_key = 64 * 3 // 8 + 2 + 2 * (1 + 2)  # 3-bit codes, fp16 norm, 2 × (uint8 index + fp16 value)
    per_value = 64 * 2 // 8 + 2
    assert cache.nbytes == H * 40 * (per_key + per_value) + H * D * 2  # + the fp16 key mean


def test_outlier_keys_are_coded_closer_and_scores_follow_the_decoded_keys():
    keys, values = _keys(200, seed=1)
    errors = {}
    for n in (0, 3):
        config = KVCacheConfig(key_bits=3, head_dim=D, outlier_channels=n)
        cache = config.make_cache(0, 1, D, H)
        cache.append(mx.array(keys), mx.array(values))
        k_hat, v_hat = cache.dequantized()
        errors[n] = float(((np.array(k_hat, dtype=np.float32) - keys) ** 2).sum())
        q = mx.array(np.random.default_rng(2).standard_normal((H, 1, D)).astype(np.float32))
        weights = mx.softmax((q[None] * D**-0.5) @ k_hat.astype(mx.float32).swapaxes(-1, -2), axis=-1)
        exact_on_decoded = weights @ v_hat.astype(mx.float32)
        assert mx.allclose(cache.attend(q), exact_on_decoded[0], atol=2e-3)
    assert errors[3] < 0.5 * errors[0]


def test_state_round_trip_keeps_the_second_stream():
    keys, values = _keys(30)
    cache = KVCacheBuilder().with_head_dim(D).with_outlier_channels(2).build()
    cache.append(mx.array(keys), mx.array(values))
    restored = CompressedKVCache()
    restored.state = cache.state
    q = mx.ones((H, 1, D))
    assert restored.outlier_channels == 2
    assert mx.array_equal(restored.attend(q), cache.attend(q))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="outlier_channels"):
        KVCacheBuilder().with_head_dim(D).with_outlier_channels(0).build()
    with pytest.raises(ValueError, match="outlier_channels"):
        KVCacheBuilder().with_head_dim(D).with_outlier_channels(D).build()
    with pytest.raises(ValueError, match="turboquant_mse"):
        KVCacheBuilder().with_method("qjl").with_head_dim(D).with_outlier_channels(2).build()
