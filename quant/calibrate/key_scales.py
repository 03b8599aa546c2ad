"""Measure the per-channel key scales of `methods.scaled.ScaledKeys` on a model: a_j = √(σq_j / σk_j) per
KV head, from the queries and (mean-removed) keys of a few calibration prompts."""

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..builder import install_attention_hook
from .klt import QueryMomentCache
from .ratequant import DEFAULT_PROMPTS, _attention_layers

_CLIP = 16.0  # keep every scale within [1/16, 16]: a channel never seen active must not explode


def calibrate_key_scales(model, tokenizer, prompts=None, max_tokens: int = 256) -> list[mx.array]:
    """One (kv_heads, head_dim) fp32 array per attention layer (those whose own cache is a plain KVCache)."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    attention = _attention_layers(model)
    install_attention_hook(model)
    query_sums, key_sums, counts = {}, {}, 0
    for prompt in prompts:
        caches = make_prompt_cache(model)
        for i in attention:
            caches[i] = QueryMomentCache()
        tokens = mx.array(tokenizer.encode(prompt)[:max_tokens])[None]
        model(tokens, cache=caches)
        for i in attention:
            cache = caches[i]
            keys = cache.keys[..., : cache.offset, :].astype(mx.float32)[0]
            centred = keys - keys.mean(axis=1, keepdims=True)
            k_sq = (centred * centred).sum(axis=1) / keys.shape[1]
            q_sq = mx.diagonal(cache.query_moment, axis1=-2, axis2=-1) / cache.query_count
            query_sums[i] = q_sq + query_sums.get(i, 0)
            key_sums[i] = k_sq + key_sums.get(i, 0)
        counts += 1
    scales = []
    for i in attention:
        ratio = mx.sqrt(query_sums[i] / counts) / mx.maximum(mx.sqrt(key_sums[i] / counts), 1e-6)
        scale = mx.sqrt(ratio)
        # Only the ratio across channels matters (the quantizer normalises): centre the log-scale on 0.
        scale = scale / mx.exp(mx.log(mx.maximum(scale, 1e-12)).mean(axis=-1, keepdims=True))
        scales.append(mx.clip(scale, 1 / _CLIP, _CLIP))
    mx.eval(scales)
    return scales
