"""Compressed caches inside mlx_lm: generation on a tiny random llama for every method, and on the embedded
SmolLM2-135M."""

import time

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig

METHODS = ["turboquant_mse", "turboquant_prod", "turboquant_rvq", "polar", "qjl", "klt"]
WORDS = "the a of and to in is was he she it that for on with as his her they at by this had from but not are".split()


@pytest.fixture(scope="module")
def tiny_model():
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=32,
        rms_norm_eps=1e-5,
        vocab_size=256,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer wrapped for mlx_lm, so that mlx_lm.generate runs end to end on the tiny model."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), 256)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>"), eos_token_ids=[])


def greedy_tokens(model, prompt, caches, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=caches)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_generates_inside_mlx_lm(tiny_model, word_tokenizer, method):
    caches = KVCacheBuilder.for_model(tiny_model, KVCacheConfig(method=method, bit_width_inlier=4, sink_tokens=1, window=2))
    assert len(caches) == 2 and all(isinstance(c, CompressedKVCache) for c in caches)
    prompt = "the man was at the door and she had not seen him for a long"
    text = mlx_lm.generate(tiny_model, word_tokenizer, prompt, max_tokens=8, prompt_cache=caches)
    assert len(text.split()) == 8
    # Prompt + the generated tokens fed back (mlx_lm computes one step ahead, so the 8th may be fed too);
    # K/V live as codes, not fp16.
    n_prompt = len(word_tokenizer.encode(prompt))
    for cache in caches:
        assert n_prompt + 7 <= len(cache) <= n_prompt + 8
        assert cache.n_encoded == len(cache) - 3
        assert cache.nbytes < 0.7 * 2 * cache.fp16_key_bytes  # well below fp16 K and V, even this short


def test_logit_error_falls_with_bits_and_vanishes_at_8(tiny_model):
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 40)))
    reference = tiny_model(tokens, cache=make_prompt_cache(tiny_model))
    errors, agreement = [], []
    for bits in (2, 4, 8):
        caches = KVCacheBuilder.for_model(tiny_model, KVCacheConfig(method="turboquant_mse", bit_width_inlier=bits))
        logits = tiny_model(tokens, cache=caches)
        errors.append(mx.abs(logits - reference).max().item())
        agreement.append((logits.argmax(-1) == reference.argmax(-1)).mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1 * reference.std().item(), errors
    assert agreement[2] == 1.0, agreement


def test_8bit_greedy_continuation_matches_fp16_on_tiny_model(tiny_model):
    prompt = np.random.default_rng(2).integers(0, 256, 12).tolist()
    reference = greedy_tokens(tiny_model, prompt, make_prompt_cache(tiny_model), 12)
    caches = KVCacheBuilder.for_model(tiny_model, KVCacheConfig(method="turboquant_mse", bit_width_inlier=8))
    assert greedy_tokens(tiny_model, prompt, caches, 12) == reference


def test_per_layer_bits_reach_the_caches(tiny_model):
    caches = KVCacheBuilder.for_model(
        tiny_model, KVCacheConfig(method="turboquant_rvq", bit_width_inlier=[1, 3], bit_width_value=[2, 4])
    )
    assert [(c.key_bits, c.value_bits) for c in caches] == [(1, 2), (3, 4)]
    with pytest.raises(ValueError, match="key_bits"):
        KVCacheBuilder.for_model(tiny_model, KVCacheConfig(bit_width_inlier=[4, 4, 4]))


# ---- the embedded real model -------------------------------------------------------------------------------


def test_real_model_next_token_at_8_bits_matches_fp16(smollm):
    """One short forward pass (the quantized GGUF matmuls run ~0.3 s per token on CPU): 8-bit codes in every
    layer leave the next-token distribution of the real model nearly unchanged."""
    model, tokenizer = smollm
    tokens = mx.array([tokenizer.encode("The capital of Italy is")])
    reference = model(tokens, cache=make_prompt_cache(model))[0, -1].astype(mx.float32)
    caches = KVCacheBuilder.for_model(model, KVCacheConfig(method="turboquant_mse", bit_width_inlier=8))
    logits = model(tokens, cache=caches)[0, -1].astype(mx.float32)
    assert logits.argmax().item() == reference.argmax().item()
    log_p, log_q = (x - mx.logsumexp(x) for x in (reference, logits))
    assert (mx.exp(log_p) * (log_p - log_q)).sum().item() < 1e-3  # KL(fp16 ‖ 8-bit)


@pytest.mark.slow
def test_real_model_greedy_generation_with_every_method(smollm):
    model, tokenizer = smollm
    prompt = tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    started = time.perf_counter()
    reference = greedy_tokens(model, prompt, make_prompt_cache(model), 8)
    assert "Rome" in tokenizer.decode(reference)
    near_exact = greedy_tokens(model, prompt, KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=8)), 8)
    assert near_exact[:4] == reference[:4], (tokenizer.decode(near_exact), tokenizer.decode(reference))
    for method in METHODS:
        caches = KVCacheBuilder.for_model(model, KVCacheConfig(method=method, bit_width_inlier=4))
        tokens = greedy_tokens(model, prompt, caches, 8)
        text = tokenizer.decode(tokens)
        assert len(tokens) == 8 and text.strip(), (method, text)
    print(f"real-model sweep: {time.perf_counter() - started:.1f}s")
