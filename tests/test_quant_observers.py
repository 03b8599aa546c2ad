"""Observers against direct computation on the same cache: distortion from dequantized K/V, key norms from the
keys, bytes from nbytes, latency counts and bounds; and unobserved caches making no observer calls."""

import time

import mlx.core as mx
import numpy as np
import pytest

from kvshard.quant import (CompressedKVCache, DistortionObserver, KeyNormObserver, KVCacheBuilder, KVCacheConfig,
                           LatencyObserver, MemoryObserver)
from kvshard.quant import observers as observers_module

H, D = 2, 64


def _kv(tokens, seed):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((1, H, tokens, D)).astype(np.float16) + 2.0  # a shared direction, as real keys have
    values = rng.standard_normal((1, H, tokens, D)).astype(np.float16)
    return mx.array(keys), mx.array(values)


def test_distortion_matches_the_dequantized_cache():
    observer = DistortionObserver()
    cache = KVCacheBuilder().with_head_dim(D).with_bit_width(inlier=3, value=2).with_observers(observer).build()
    keys, values = _kv(200, 0)
    for start in range(0, 200, 50):
        cache.append(keys[:, :, start : start + 50], values[:, :, start : start + 50])
    k_hat, v_hat = cache.dequantized()
    k, v = keys.astype(mx.float32), values.astype(mx.float32)
    centred = k - cache.key_mean.astype(mx.float32)
    direct_key = (((k - k_hat.astype(mx.float32)) ** 2).sum() / (centred**2).sum()).item()
    direct_value = (((v - v_hat.astype(mx.float32)) ** 2).sum() / (v**2).sum()).item()
    assert observer.sums[0]["tokens"] == cache.n_encoded == 200
    # k̂ comes back through fp16 in dequantized(): agreement to fp16 rounding, not bit for bit.
    assert observer.key_relative_mse() == pytest.approx(direct_key, rel=2e-3)
    assert observer.value_relative_mse() == pytest.approx(direct_value, rel=2e-3)
    assert 0.0345 / 4 < observer.key_relative_mse() < 0.0345  # 3-bit TurboQuant distortion (DESIGN.md)


def test_key_norms_match_the_keys_per_cache_and_head():
    observer = KeyNormObserver()
    config = KVCacheConfig(bit_width_inlier=4, head_dim=D, observers=[observer])
    caches = [config.make_cache(layer, 2, D, H) for layer in range(2)]
    batches = [_kv(30, 1), _kv(30, 2)]
    for layer, cache in enumerate(caches):
        for part in range(3):
            k, v = batches[layer]
            cache.append(k[:, :, part * 10 : (part + 1) * 10] * (layer + 1), v[:, :, part * 10 : (part + 1) * 10])
    for layer in range(2):
        norms = np.linalg.norm(np.array(batches[layer][0], dtype=np.float32) * (layer + 1), axis=-1)[0]  # (H, T)
        assert np.allclose(observer.mean_norm(layer), norms.mean(axis=1), rtol=1e-3)
        assert np.allclose(observer.mean_square_norm(layer), (norms**2).mean(axis=1), rtol=1e-3)
        assert np.allclose(observer.max_norm(layer), norms.max(axis=1), rtol=1e-3)


def test_memory_follows_nbytes_and_keeps_the_peak():
    observer = MemoryObserver()
    cache = KVCacheBuilder().with_head_dim(D).with_window(16).with_observers(observer).build()
    keys, values = _kv(64, 3)
    seen = []
    for t in range(0, 64, 8):
        cache.append(keys[:, :, t : t + 8], values[:, :, t : t + 8])
        seen.append(cache.nbytes)
        assert observer.bytes == [cache.nbytes]
    cache.trim(40)
    cache.append(keys[:, :, :1], values[:, :, :1])
    assert observer.total_bytes == cache.nbytes
    assert observer.peak_bytes == max(seen + [cache.nbytes])


def test_latency_counts_every_encode_and_attention_and_fits_in_the_wall_clock():
    observer = LatencyObserver()
    cache = KVCacheBuilder().with_head_dim(D).with_observers(observer).build()
    keys, values = _kv(96, 4)
    start = time.perf_counter()
    cache.append(keys[:, :, :4], values[:, :, :4])  # fewer than the key mean needs: waits in fp16, no encode
    assert observer.count["encode"] == 0
    for t in range(4, 96, 23):
        cache.append(keys[:, :, t : t + 23], values[:, :, t : t + 23])
    for _ in range(3):
        cache.attend(mx.ones((2 * H, 1, D)))
    wall = time.perf_counter() - start
    assert observer.count == {"encode": 4, "attend": 3}
    assert 0 < observer.total_s["encode"] + observer.total_s["attend"] < wall
    assert 0 < observer.median_s("attend") <= max(observer.recent["attend"])


def test_callbacks_receive_each_measurement():
    received = []
    observer = DistortionObserver(callback=lambda **m: received.append(m))
    cache = KVCacheBuilder().with_head_dim(D).with_observers(observer).build()
    keys, values = _kv(40, 5)
    cache.append(keys[:, :, :20], values[:, :, :20])
    cache.append(keys[:, :, 20:], values[:, :, 20:])
    assert [m["tokens"] for m in received] == [20, 20]
    assert all(0 < m["key_relative_mse"] < 0.02 for m in received)  # 4 bits: ~0.0095 on average


def test_unobserved_caches_do_no_observer_work(monkeypatch):
    class CountingMx:  # quant/observers.py's view of mlx.core, counting the evaluations it asks for
        calls = 0

        def __getattr__(self, name):
            return getattr(mx, name)

        def eval(self, *arrays):
            CountingMx.calls += 1
            return mx.eval(*arrays)

    monkeypatch.setattr(observers_module, "mx", CountingMx())
    keys, values = _kv(40, 7)
    for observers in ([], [LatencyObserver()]):
        CountingMx.calls = 0
        cache = CompressedKVCache(head_dim=D, n_kv_heads=H, observers=observers)
        cache.append(keys, values)
        cache.attend(mx.ones((H, 1, D)))
        assert (CountingMx.calls > 0) == bool(observers)


def test_observers_survive_a_state_round_trip():
    observer = MemoryObserver()
    cache = KVCacheBuilder().with_head_dim(D).with_observers(observer).build()
    keys, values = _kv(20, 6)
    cache.append(keys, values)
    cache.state = cache.state
    assert cache.observers == [observer]


def test_model_caches_share_observers_by_layer(smollm):
    model, tokenizer = smollm
    observer = KeyNormObserver()
    caches = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4, observers=[observer]))
    tokens = mx.array(tokenizer.encode("The quick brown fox jumps over the lazy dog, twice over.")[:12])
    model(tokens[None], cache=caches)
    assert len(observer.stats) == len(caches) == 30
    assert all(observer.stats[layer]["count"] == tokens.size for layer in range(30))


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def test_the_service_feeds_the_same_measurements_to_prometheus(tmp_path):
    import urllib.request

    from conftest import ShardProcess, free_port
    from kvshard.client import Client

    metrics_port = free_port()
    shard = ShardProcess(tmp_path, "--model", "none", "--metrics-port", str(metrics_port), "--observe-caches").start()
    try:
        keys, values = _kv(40, 8)
        local_observer = DistortionObserver()
        local = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=3, value_bits=4, observers=[local_observer])
        local.append(keys, values)
        with Client(shard.target) as client:
            remote = client.create_cache(head_dim=D, n_kv_heads=H, key_bits=3, value_bits=4)
            remote.append(np.array(keys[0]), np.array(values[0]))
            remote.attend(np.ones((H, 1, D), dtype=np.float32))
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        assert shard.stop() == 0, shard.log()
    assert _metric(text, 'kvshard_cache_relative_mse_count{side="keys"}') == 1
    assert _metric(text, 'kvshard_cache_relative_mse_sum{side="keys"}') == pytest.approx(local_observer.key_relative_mse(), rel=1e-6)
    assert _metric(text, 'kvshard_cache_relative_mse_sum{side="values"}') == pytest.approx(local_observer.value_relative_mse(), rel=1e-6)
    assert _metric(text, 'kvshard_cache_seconds_count{event="encode"}') == 1
    assert _metric(text, 'kvshard_cache_seconds_count{event="attend"}') == 1
    norms = np.linalg.norm(np.array(keys, dtype=np.float32), axis=-1)
    assert _metric(text, "kvshard_cache_key_norm_sum") == pytest.approx(norms.mean(), rel=1e-4)
