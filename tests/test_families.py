"""Every mlx_lm attention family users run, as tiny random-weight models built from their mlx_lm configs:
for_model + generation run, each compressed cache's attention equals SDPA over what it decodes, the caches
survive a save/load round trip, sliding-window layers hold only their window, and a family that cannot work is
refused naming why."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.utils import _get_classes

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig
from kvshard.quant.attention import compressed_attention
from kvshard.quant.sliding import Float16RotatingKVCache, SlidingCompressedKVCache

WINDOW = 16
COMMON = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, rms_norm_eps=1e-5, vocab_size=256)
FAMILIES = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    # Mistral-style hybrid: mlx_lm's llama with layer_types mixing sliding and full attention.
    "llama-hybrid": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # q/k norms
                  max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6),
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2),  # fused qkv projection
    # Gemma 3's shape: head_dim 256, one KV head for four query heads, sliding layers between global ones.
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=256),
    "olmo3": dict(model_type="olmo3", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  sliding_window=WINDOW, rope_theta=1e4),
}
PROMPT = 40  # longer than the sliding window, prefilled in chunks of 8
STEPS = 6


def build(name):
    config = dict(COMMON, **FAMILIES[name])
    model_class, args_class = _get_classes(config)
    mx.random.seed(1)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def prompt_tokens():
    return mx.array([(7 * i + 3) % 256 for i in range(PROMPT)])


def run(model, caches, steps=STEPS):
    tokens = [t for t, _ in generate_step(prompt_tokens(), model, prompt_cache=caches, max_tokens=steps,
                                          prefill_step_size=8)]
    return tokens


def compressed(caches):
    return [c for c in caches if isinstance(c, CompressedKVCache)]


@pytest.mark.parametrize("sliding", ["fp16", "compressed"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_generates_and_attends_from_codes(family, sliding):
    model = build(family)
    caches = KVCacheBuilder.for_model(model, KVCacheConfig(method="turboquant_mse", bit_width_inlier=4, sliding=sliding))
    tokens = run(model, caches)
    assert len(tokens) == STEPS and all(0 <= t < 256 for t in tokens)
    coded = compressed(caches)
    assert coded, "every family has full-attention layers to compress"
    held_tokens = PROMPT + STEPS  # generate_step computes one token ahead
    for layer, (cache, plain) in enumerate(zip(caches, make_prompt_cache(model))):
        if isinstance(plain, RotatingKVCache):
            kind = SlidingCompressedKVCache if sliding == "compressed" else Float16RotatingKVCache
            assert type(cache) is kind, f"layer {layer}"
            if kind is SlidingCompressedKVCache:
                # Only the window the next query sees is held, and nbytes counts exactly that.
                assert cache.held == WINDOW and cache.offset == held_tokens
                assert cache.nbytes == cache_holding(WINDOW, cache).nbytes
        else:
            assert type(cache) is CompressedKVCache and cache.offset == held_tokens
    for cache in coded:
        keys, values = cache.dequantized()
        q = mx.random.normal((1, 4, 1, cache.head_dim), key=mx.random.key(3))
        scale = cache.head_dim**-0.5
        expected = mx.fast.scaled_dot_product_attention(q, keys.astype(mx.float32), values.astype(mx.float32), scale=scale)
        # dequantized() rounds K̂/V̂ to fp16, the attention does not: agreement to fp16 precision.
        assert mx.allclose(cache.attention(q, scale=scale), expected, atol=1e-3, rtol=1e-3)


def cache_holding(tokens, like):
    """A plain CompressedKVCache of the same shape and bits holding `tokens` tokens."""
    cache = CompressedKVCache(head_dim=like.head_dim, n_kv_heads=like.n_kv_heads, key_bits=like.key_bits)
    shape = (1, like.n_kv_heads, tokens, like.head_dim)
    cache.append(mx.random.normal(shape), mx.random.normal(shape))
    return cache


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("family", ["gemma3", "llama-hybrid", "olmo3"])
def test_sliding_layers_match_mlx_lm_when_nothing_is_coded(family, sinks):
    """With an fp16 window wider than the prompt nothing is coded: a compressed sliding layer is then a rotating
    fp16 window, and the model's logits must match mlx_lm's own caches over a prompt longer than the window,
    prefilled in chunks (which checks the masks and what is dropped when; fp16 sinks must leave the window too)."""
    model = build(family)
    ours = KVCacheBuilder.for_model(model, KVCacheConfig(window=4 * PROMPT, sink_tokens=sinks, sliding="compressed"))
    theirs = make_prompt_cache(model)
    tokens = prompt_tokens()
    for start in range(0, PROMPT, 8):
        chunk = tokens[None, start : start + 8]
        a, b = model(chunk, cache=ours), model(chunk, cache=theirs)
        assert mx.allclose(a, b, atol=2e-2, rtol=1e-2), f"{family}: logits differ at tokens {start}..{start + 7}"
    for step in range(3):
        token = mx.array([[step + 5]])
        assert mx.allclose(model(token, cache=ours), model(token, cache=theirs), atol=2e-2, rtol=1e-2)
    assert all(c.sink_keys is None for c in ours if isinstance(c, SlidingCompressedKVCache))


def test_sliding_sinks_leave_with_their_window_and_coded_tokens_keep_their_positions():
    """Gemma's shape: 4 fp16 sinks stay exact while the window holds them, the oldest tokens leave in order
    (sinks, codes, window), and attention equals SDPA over what the cache decodes at every step."""
    model = build("gemma3")
    caches = KVCacheBuilder.for_model(model, KVCacheConfig(key_bits=4, sink_tokens=4, sliding="compressed"))
    sliding = [c for c in caches if isinstance(c, SlidingCompressedKVCache)]
    tokens = prompt_tokens()
    for start in range(0, PROMPT, 4):
        model(tokens[None, start : start + 4], cache=caches)
        for cache in sliding:
            assert cache.held <= WINDOW - 1 + 4 and cache.offset == start + 4
            held_sinks = 0 if cache.sink_keys is None else cache.sink_keys.shape[2]
            assert held_sinks == max(0, 4 - cache.n_dropped) and cache.sink_tokens == held_sinks
            keys, values = cache.dequantized()
            assert keys.shape[2] == cache.held
            q = mx.random.normal((1, 4, 1, cache.head_dim), key=mx.random.key(start))
            expected = mx.fast.scaled_dot_product_attention(q, keys.astype(mx.float32), values.astype(mx.float32),
                                                            scale=cache.head_dim**-0.5)
            # dequantized() rounds K̂/V̂ to fp16, the attention does not: ~1e-3 apart with or without sinks.
            assert mx.allclose(cache.attention(q, scale=cache.head_dim**-0.5), expected, atol=3e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "llama-hybrid"])
def test_state_round_trip(tmp_path, family):
    model = build(family)
    caches = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4, sliding="compressed"))
    run(model, caches, steps=2)
    path = str(tmp_path / "caches.safetensors")
    save_prompt_cache(path, caches)
    restored = load_prompt_cache(path)
    assert [type(c) for c in restored] == [type(c) for c in caches]
    token = mx.array([[11]])
    assert mx.array_equal(model(token, cache=restored), model(token, cache=caches))
    for a, b in zip(compressed(restored), compressed(caches)):
        assert a.offset == b.offset and a.nbytes == b.nbytes


def test_gemma2_is_refused_naming_why():
    model = build_gemma2()
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        KVCacheBuilder.for_model(model, KVCacheConfig())


def build_gemma2():
    config = dict(COMMON, model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def test_for_model_from_inside_make_cache():
    """mlx_lm's generate makes its caches with model.make_cache(): replacing it by for_model must not recurse."""
    model = build("gemma3")
    model.make_cache = lambda: KVCacheBuilder.for_model(model, KVCacheConfig(sliding="compressed"))
    caches = make_prompt_cache(model)
    assert sum(isinstance(c, SlidingCompressedKVCache) for c in caches) == 2
    assert sum(type(c) is CompressedKVCache for c in caches) == 2


def test_plans_for_other_layers_are_refused_naming_the_field():
    model = build("gemma3")  # 2 global layers, 2 sliding ones
    scales = [mx.ones((1, 256))] * 2
    KVCacheBuilder.for_model(model, KVCacheConfig(key_scales=scales))
    with pytest.raises(ValueError, match="key_scales has 2 entries but the model has 4 compressed layers"):
        KVCacheBuilder.for_model(model, KVCacheConfig(key_scales=scales, sliding="compressed"))


def test_bad_sliding_choice_names_the_field():
    with pytest.raises(ValueError, match="sliding"):
        KVCacheBuilder.for_model(build("llama"), KVCacheConfig(sliding="rotating"))


@pytest.mark.parametrize("bits", [2, 4])
def test_head_dim_256_one_kv_head_cpu_fast_path_and_portable_path(bits):
    """Gemma 3's attention shape (head_dim 256, GQA 4:1) on the CPU fast path and the portable path, against
    SDPA over the decoded K/V."""
    cache = CompressedKVCache(head_dim=256, n_kv_heads=1, key_bits=bits)
    shape = (1, 1, 300, 256)
    cache.append(mx.random.normal(shape, key=mx.random.key(0)), mx.random.normal(shape, key=mx.random.key(1)))
    q = mx.random.normal((1, 4, 1, 256), key=mx.random.key(2))
    keys, values = cache.dequantized()
    expected = mx.fast.scaled_dot_product_attention(q, keys.astype(mx.float32), values.astype(mx.float32), scale=1 / 16)
    for backend in ("cpu", "pure"):
        out = compressed_attention(q, cache.segments(), n_kv_heads=1, key_method=cache.key_quantizer,
                                   value_method=cache.value_quantizer, scale=1 / 16, backend=backend)
        assert mx.allclose(out, expected, atol=2e-4, rtol=2e-3), backend
