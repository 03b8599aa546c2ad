"""The native CPU kernel (quant/kernels/src/cpu_attention.c) against the portable path, on every method, bit
width, head_dim, mask and segment mix it claims; its refusals; and the fallback when no C compiler exists."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kvshard.quant import kernels
from kvshard.quant.attention import compressed_attention
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.kernels import cpu
from kvshard.quant.methods import make_method
from kvshard.quant.methods.klt import KLT, KLTPlan
from kvshard.quant.rope import rope_frequencies, rotate

pytestmark = pytest.mark.skipif(cpu.native_library() is None, reason="no C compiler to build the CPU kernel")


def _keys_values(batch, heads, tokens, head_dim, seed=0):
    mx.random.seed(seed)
    # A shared offset makes the key mean matter; a few large keys make the softmax peaky.
    keys = mx.random.normal((batch, heads, tokens, head_dim)) + 0.7 * mx.random.normal((batch, heads, 1, head_dim))
    keys = keys * (1 + 3 * (mx.random.uniform(shape=(batch, heads, tokens, 1)) > 0.98))
    return keys, mx.random.normal((batch, heads, tokens, head_dim))


def _plan(heads, head_dim, bits, norm_bits=8, rope=(None, False), seed=0):
    rng = np.random.default_rng(seed)
    analysis = np.stack([np.linalg.qr(rng.standard_normal((head_dim, head_dim)))[0] for _ in range(heads)])
    energies = np.tile(np.exp(-np.arange(head_dim) / (head_dim / 6)), (heads, 1))
    return KLTPlan(analysis, energies, bits, norm_bits, *rope)


def _klt_bits(head_dim):
    """Runs of 8, 5, 4, 3, 2, 1 and 0 bits, lengths not multiples of 8 (groups straddle bytes and runs)."""
    q = head_dim // 8
    widths = [8] * 3 + [5] * (q - 1) + [4] * (q + 2) + [3] * (2 * q - 3) + [2] * (2 * q + 1) + [1] * q
    return tuple(widths + [0] * (head_dim - len(widths)))


def _klt_value_bits(head_dim):
    q = head_dim // 8
    widths = [6] * (q + 1) + [3] * (3 * q) + [2] * (2 * q - 1) + [1] * q
    return tuple(widths + [0] * (head_dim - len(widths)))


def _rope(head_dim, traditional):
    return rope_frequencies(nn.RoPE(head_dim, traditional=traditional, base=100000.0), head_dim)


def _cache(kind, head_dim, heads):
    if kind == "tq4 scaled":
        scale = mx.array(np.random.default_rng(1).uniform(0.5, 2.0, (heads, head_dim)).astype(np.float32))
        return CompressedKVCache(head_dim, heads, key_bits=4, key_scale=scale)
    if kind.startswith("tq"):
        key_bits, value_bits = (int(b) for b in kind[2:].split("/"))
        return CompressedKVCache(head_dim, heads, key_bits=key_bits, value_bits=value_bits)
    if kind == "klt uncalibrated":
        return CompressedKVCache(head_dim, heads, method="klt", key_bits=3, value_bits=6)
    bits = _klt_bits(head_dim)
    rope = {"klt pre-rope": _rope(head_dim, True), "klt pre-rope split": _rope(head_dim, False)}.get(kind, (None, False))
    norm_bits = 16 if kind == "klt fp16 scale" else 8
    return CompressedKVCache(head_dim, heads, method="klt", key_plan=_plan(heads, head_dim, bits, norm_bits, rope),
                             value_plan=_plan(heads, head_dim, _klt_value_bits(head_dim), seed=1))


def _attend(cache, queries, backend, mask=None):
    return compressed_attention(queries, cache.segments(), n_kv_heads=cache.n_kv_heads, key_method=cache.key_quantizer,
                                value_method=cache.value_quantizer, scale=cache.head_dim**-0.5, mask=mask,
                                backend=backend)


def _max_err(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


KINDS = ["tq1/1", "tq2/4", "tq3/3", "tq4/4", "tq5/2", "tq6/7", "tq8/8", "tq4 scaled", "klt uncalibrated", "klt",
         "klt fp16 scale", "klt pre-rope", "klt pre-rope split"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_matches_portable_path(kind, head_dim):
    """One query token per head, GQA groups of 3, every method and head_dim: the kernel's output equals the
    portable loop's within float tolerance."""
    heads, tokens = 2, 333 if head_dim == 256 else 700
    cache = _cache(kind, head_dim, heads)
    cache.append(*_keys_values(1, heads, tokens, head_dim))
    queries = mx.random.normal((1, 3 * heads, 1, head_dim))
    native, portable = _attend(cache, queries, "cpu"), _attend(cache, queries, "pure")
    assert native.shape == queries.shape
    assert _max_err(native, portable) < 2e-5 * max(1.0, mx.abs(portable).max().item())


@pytest.mark.parametrize("kind", ["klt", "klt pre-rope", "klt pre-rope split"])
@pytest.mark.parametrize("head_dim", [40, 72])
def test_head_dims_off_the_vector_width(kind, head_dim):
    """head_dim not a multiple of 16 (pre-RoPE keys are synthesized in tiles of 32 outputs and a last one of 16,
    RoPE's halves are not whole vectors): still the portable path's output. 257 tokens: blocks of 64 and one."""
    heads = 3
    cache = _cache(kind, head_dim, heads)
    cache.append(*_keys_values(1, heads, 257, head_dim))
    queries = mx.random.normal((1, 2 * heads, 1, head_dim))
    native, portable = _attend(cache, queries, "cpu"), _attend(cache, queries, "pure")
    assert _max_err(native, portable) < 2e-5 * max(1.0, mx.abs(portable).max().item())


@pytest.mark.parametrize("kind", ["tq4/4", "klt pre-rope"])
@pytest.mark.parametrize("head_dim", [64, 36])
def test_decode_with_sinks_and_window(kind, head_dim):
    """A decode step over fp16 sinks, codes and an fp16 window: the fp16 tokens go through the kernel's fp16
    layout (head_dim 36: a tail of 4 past whole vectors) and merge with the codes as the portable path does."""
    heads = 2
    cache = _cache(kind, head_dim, heads)
    cache.sink_tokens, cache.window = 4, 21
    cache.append(*_keys_values(1, heads, 500, head_dim))
    assert [s.is_codes for s in cache.segments()] == [False, True, False]
    queries = mx.random.normal((1, 3 * heads, 1, head_dim))
    native, portable = _attend(cache, queries, "cpu"), _attend(cache, queries, "pure")
    assert _max_err(native, portable) < 2e-5 * max(1.0, mx.abs(portable).max().item())


@pytest.mark.parametrize("kind", ["tq4/4", "tq3/5", "klt", "klt pre-rope"])
@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_prefill_masks_batches_and_segments(kind, mask):
    """Many query tokens under a mask, a batch of 2, fp16 sinks and a recent window beside the codes."""
    heads, head_dim, tokens, L = 2, 64, 600, 5
    cache = _cache(kind, head_dim, heads)
    cache.sink_tokens, cache.window = 4, 16
    cache.append(*_keys_values(2, heads, tokens, head_dim))
    queries = mx.random.normal((2, 2 * heads, L, head_dim))
    total = len(cache)
    allowed = mx.arange(total)[None] <= mx.arange(total - L, total)[:, None]  # causal, with a hole per row
    allowed = allowed & (mx.arange(total)[None] % 7 != mx.arange(L)[:, None])
    masks = {"causal": "causal", "bool": allowed,
             "additive": mx.where(allowed, 0.0, -mx.inf)[None, None] + mx.random.normal((2, 1, L, total)) * 0.5}
    native, portable = _attend(cache, queries, "cpu", masks[mask]), _attend(cache, queries, "pure", masks[mask])
    assert _max_err(native, portable) < 2e-5 * max(1.0, mx.abs(portable).max().item())


def test_auto_takes_the_kernel_for_long_contexts():
    cache = _cache("klt pre-rope", 64, 3)
    cache.append(*_keys_values(1, 3, kernels.CPU_MIN_TOKENS + 10, 64))
    assert kernels.cpu_supported(cache.key_quantizer, cache.value_quantizer, len(cache))
    assert not kernels.cpu_supported(cache.key_quantizer, cache.value_quantizer, kernels.CPU_MIN_TOKENS - 1)
    queries = mx.random.normal((1, 9, 1, 64))
    assert _max_err(_attend(cache, queries, None), _attend(cache, queries, "pure")) < 2e-5


@pytest.mark.parametrize("method", ["polar", "qjl", "turboquant_prod", "turboquant_rvq"])
def test_methods_it_does_not_cover_are_refused(method):
    """Forcing the CPU path onto codes it cannot read is a ValueError naming the path; auto falls back."""
    key_method = make_method(method, 64, 3)
    assert not kernels.cpu_supported(key_method, make_method("turboquant_mse", 64, 4))
    cache = CompressedKVCache(64, 2, method=method, key_bits=3)
    cache.append(*_keys_values(1, 2, 300, 64))
    queries = mx.random.normal((1, 4, 1, 64))
    with pytest.raises(ValueError, match="backend 'cpu'"):
        _attend(cache, queries, "cpu")
    assert _max_err(_attend(cache, queries, None), _attend(cache, queries, "pure")) == 0


def test_thread_count_is_checked(monkeypatch):
    cache = _cache("tq4/4", 64, 2)
    cache.append(*_keys_values(1, 2, 300, 64))
    queries = mx.random.normal((1, 4, 1, 64))
    monkeypatch.setenv(cpu.ENV_THREADS, "1")
    one = _attend(cache, queries, "cpu")
    monkeypatch.setenv(cpu.ENV_THREADS, "2")
    assert _max_err(one, _attend(cache, queries, "cpu")) < 1e-6
    monkeypatch.setenv(cpu.ENV_THREADS, "zero")
    with pytest.raises(ValueError, match=cpu.ENV_THREADS):
        _attend(cache, queries, "cpu")


def test_large_calls_use_the_cores_and_agree_with_one_thread(monkeypatch):
    """Unset, the thread count follows a call's work: a pre-RoPE klt layer over 4K tokens and 4 KV heads (~6 x 10^7
    multiply-adds, most of them synthesis) goes parallel, the same tokens of turboquant_mse codes (~6 x 10^6) stay
    on one thread; the parallel output equals the one-thread output."""
    monkeypatch.delenv(cpu.ENV_THREADS, raising=False)
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    assert cpu._threads(cpu.PARALLEL_WORK - 1) == 1 and cpu._threads(cpu.PARALLEL_WORK) == 2
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    assert cpu._threads(0) == 3 and cpu._threads(10 * cpu.PARALLEL_WORK) == 3
    queries = mx.random.normal((1, 12, 1, 64))
    chosen = []
    real = cpu._threads
    monkeypatch.setattr(cpu, "_threads", lambda work=0, *limit: chosen.append(real(work, *limit)) or chosen[-1])
    for kind, expected in (("klt pre-rope split", 2), ("tq4/4", 1)):
        cache = _cache(kind, 64, 4)
        cache.append(*_keys_values(1, 4, 4096, 64))
        monkeypatch.delenv(cpu.ENV_THREADS, raising=False)
        chosen.clear()
        auto = _attend(cache, queries, "cpu")
        assert chosen == [expected], kind
        monkeypatch.setenv(cpu.ENV_THREADS, "1")
        assert _max_err(auto, _attend(cache, queries, "cpu")) < 1e-5, kind


def test_without_a_compiler_the_portable_path_runs(tmp_path):
    """No gcc/cc on PATH, no $CC, an empty kernel cache: one warning, the kernel is not offered, appends encode
    with the methods' own MLX ops, and attention still answers (the portable path) with what the portable path
    gives."""
    script = textwrap.dedent("""
        import warnings
        import mlx.core as mx
        from kvshard.quant import kernels
        from kvshard.quant.attention import compressed_attention
        from kvshard.quant.cache import CompressedKVCache
        cache = CompressedKVCache(64, 2, key_bits=4)
        mx.random.seed(0)
        with warnings.catch_warnings(record=True) as caught:  # the first append looks for the native encode
            warnings.simplefilter("always")
            cache.append(mx.random.normal((1, 2, 400, 64)), mx.random.normal((1, 2, 400, 64)))
            supported = kernels.cpu_supported(cache.key_quantizer, cache.value_quantizer)
        q = mx.random.normal((1, 4, 1, 64))
        attend = lambda backend: compressed_attention(q, cache.segments(), n_kv_heads=2, key_method=cache.key_quantizer,
                                                      value_method=cache.value_quantizer, scale=0.125, backend=backend)
        assert not supported
        assert any("no C compiler" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert mx.array_equal(attend(None), attend("pure"))
        try:
            attend("cpu")
        except ValueError as err:
            assert "C compiler" in str(err)
        else:
            raise AssertionError("backend 'cpu' ran without a kernel")
        print("fallback ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env.update(PATH=str(tmp_path), **{cpu.ENV_CACHE: str(tmp_path / "kernels")})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fallback ok" in result.stdout
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_kernel_is_built_once_per_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu.ENV_CACHE, str(tmp_path))
    first = cpu._build(cpu._compiler())
    stamp = first.stat().st_mtime_ns
    assert cpu._build(cpu._compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


@pytest.mark.parametrize("tokens", [700, 5])
@pytest.mark.parametrize("kind", ["mixed bits, 8-bit scale", "mixed bits, fp16 scale", "uncalibrated", "head_dim 40"])
def test_klt_encode_matches_the_method(kind, tokens):
    """The native klt encode (src/cpu_encode.c) against method.encode: the same codes and scales on all but
    values within float rounding of a boundary (its sums run in another order); packing order, nearest-centroid
    search, the two scale refits and both scale formats would each change most tokens if wrong. 5 tokens: a
    decode step's append, whose transform runs in numpy."""
    assert 5 <= cpu.SMALL_APPEND_TOKENS < 700
    head_dim = 40 if kind == "head_dim 40" else 64
    plan = None if kind == "uncalibrated" else _plan(3, head_dim, _klt_bits(head_dim), 16 if "fp16" in kind else 8)
    method = KLT(head_dim, 3, plan=plan)
    x, _ = _keys_values(2, 3, tokens, head_dim)
    expected, native = method.encode(x), cpu.native_encode(method, x)
    assert native["idx"].dtype == expected["idx"].dtype and native["norm"].dtype == expected["norm"].dtype
    codes_a, codes_b = np.asarray(expected["idx"]), np.asarray(native["idx"])
    norm_a, norm_b = np.asarray(expected["norm"], np.float64), np.asarray(native["norm"], np.float64)
    assert codes_a.shape == codes_b.shape and norm_a.shape == norm_b.shape
    differ = (codes_a != codes_b).any(-1) | (norm_a != norm_b).any(-1)
    assert differ.sum() <= 3, f"{differ.sum()} of {differ.size} tokens differ"
    step = 1 if expected["norm"].dtype == mx.uint8 else 1e-3 * np.abs(norm_a).max()
    assert np.abs(norm_a - norm_b).max() <= step


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_turboquant_encode_is_the_methods_bit_for_bit(bits, head_dim):
    method = make_method("turboquant_mse", head_dim, bits)
    x, _ = _keys_values(2, 3, 300, head_dim)
    expected, native = method.encode(x), cpu.native_encode(method, x)
    assert mx.array_equal(native["idx"], expected["idx"]) and mx.array_equal(native["norm"], expected["norm"])


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("inverse", [True, False])
def test_rotate_rows_is_ropes_rotate(traditional, inverse):
    """A decode step's RoPE in numpy (kernels.rotate_rows) against quant/rope.py's mx.fast.rope: one swapped
    sign or pair layout would be off by the keys' size. At position ~8K, mx.fast.rope's float32 angles are off
    by up to ~5e-4 rad (ours are float64), hence the looser bound there."""
    x = mx.random.normal((2, 3, 4, 64))
    frequencies, _ = _rope(64, traditional)
    for offset, bound in ((3, 2e-5), (8189, 3e-3)):
        ours = kernels.rotate_rows(x, offset, frequencies, traditional, inverse=inverse)
        assert _max_err(ours, rotate(x, offset, frequencies, traditional, inverse=inverse)) < bound


def test_klt_cache_appends_through_the_native_encode(monkeypatch):
    """A decode step's one-token appends of a klt cache go through the native encode and read back as the
    method's own encode of the same tokens would."""
    calls = []
    native = kernels.native_encode
    monkeypatch.setattr(kernels, "native_encode", lambda *args: calls.append(1) or native(*args))
    cache = _cache("klt pre-rope", 64, 3)
    keys, values = _keys_values(1, 3, 40, 64)
    for t in range(40):
        cache.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    assert len(calls) == 2 * 33  # keys and values of each token past the 8 that wait for the key mean
    reference = _cache("klt pre-rope", 64, 3)
    os.environ[kernels.ENV_BACKEND] = "pure"
    try:
        reference.append(keys[:, :, :8], values[:, :, :8])  # the key mean is estimated from the first 8 tokens
        reference.append(keys[:, :, 8:], values[:, :, 8:])
    finally:
        del os.environ[kernels.ENV_BACKEND]
    for ours, theirs in zip(cache.dequantized(), reference.dequantized()):
        assert _max_err(ours, theirs) < 1e-3
