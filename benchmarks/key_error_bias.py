"""Does a coded key's softmax mass want a correction? A measured negative (issue 10, "report what each buys").

With codes that satisfy the centroid condition, a key's true score is the coded one plus an error of mean zero and
variance qᵀΣq (Σ: the key error's covariance, after RoPE), so in expectation exp(score) is exp(coded score + qᵀΣq/2):
every coded key's weight is low by that factor beside the fp16 sinks (the shipped profile keeps 4 and no window;
in chunked prefill every other key is coded before it is attended). This script measures Σ per layer and KV head
from the profile's own coding of a calibration text (the first CALN tokens of calibration_texts(), none of them an
eval text), then adds alpha·qᵀΣq/2 to every coded key's score (an additive mask over the cache's own attention) and
reads chunked perplexity against an fp16 cache on eval texts, for several alpha (0: the shipped attention).

    BUDGET=2.5 TEXTS="vim_manual python_source" ALPHAS="-1 -0.5 0 0.5 1" python benchmarks/key_error_bias.py
        -> benchmarks/results/key_error_bias_cpu.json
"""
import json
import os
import sys
from pathlib import Path

os.environ["KVSHARD_ATTENTION"] = "pure"  # the portable loop, as the committed run: the CPU kernel moves ΔPPL too

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import device_info  # noqa: E402

from kvshard.quant import KVCacheBuilder, load_model, load_profile  # noqa: E402
from kvshard.quant import attention as A  # noqa: E402
from kvshard.quant import cache as C  # noqa: E402
from kvshard.quant import eval as E  # noqa: E402
from kvshard.quant.calibrate.klt import calibration_texts  # noqa: E402

BUDGET = float(os.environ.get("BUDGET", "2.5"))
TOKENS = int(os.environ.get("NTOK", "1024"))
TEXTS = os.environ.get("TEXTS", "vim_manual python_source").split()
ALPHAS = [float(a) for a in os.environ.get("ALPHAS", "-1 -0.5 0 0.5 1").split()]
CALIBRATION_TOKENS = int(os.environ.get("CALN", "2048"))
CHUNK = 256


def error_covariances(model, tokenizer, config) -> dict:
    """layer -> (H, D, D): E[e eᵀ] of the key error after RoPE (e = key − its decoded codes, mean added back), over
    the profile's own coding of the calibration tokens."""
    sums, encode = {}, C.CompressedKVCache._encode

    def recording(cache, keys, values):
        before = cache.n_encoded
        encode(cache, keys, values)
        n = cache.n_encoded - before
        rope = None if cache._key_rope is None else (*cache._key_rope, cache._codes_start() + before)
        codes = [{k: a[:, :, before: before + n] for k, a in side.items()} for side in (cache.key_codes, cache.value_codes)]
        error = keys.astype(mx.float32) - A.decode_keys(A.CodeSegment(*codes, cache.key_mean, n, rope), cache.key_quantizer)
        total, count = sums.get(cache.layer, (0.0, 0))
        sums[cache.layer] = (total + np.array(mx.einsum("bhtd,bhte->hde", error, error), np.float64),
                             count + error.shape[0] * error.shape[2])

    tokens = tokenizer.encode("".join(calibration_texts()))[:CALIBRATION_TOKENS]
    C.CompressedKVCache._encode = recording
    try:
        E.perplexity(model, tokens, lambda: tagged(model, config, 0.0, None), CHUNK, len(tokens))
    finally:
        C.CompressedKVCache._encode = encode
    return {layer: mx.array((total / count).astype(np.float32)) for layer, (total, count) in sums.items()}


def tagged(model, config, alpha: float, covariances) -> list:
    caches = KVCacheBuilder.for_model(model, config)
    for layer, cache in enumerate(caches):
        cache.layer, cache.alpha = layer, alpha
        cache.error_covariance = None if covariances is None else covariances[layer]
    return caches


def corrected_attention(cache, queries, scale, mask=None):
    """The cache's own attention with every coded key's score raised by alpha·qᵀΣq/2 (qᵀΣq: that score's error
    variance), handed over as an additive mask: the raise is one number per query row over the code segment."""
    segments = cache.segments()
    B, n_q_heads, L, D = queries.shape
    H = cache.n_kv_heads
    total = sum(s.length for s in segments)
    allowed = A._allowed(mask, L, total, 0, total)
    additive = mx.zeros((L, total)) if allowed is None else mx.where(allowed, 0.0, -mx.inf)
    q = (queries.astype(mx.float32) * scale).reshape(B, H, n_q_heads // H, L, D)
    raise_ = cache.alpha * 0.5 * ((q @ cache.error_covariance[None, :, None]) * q).sum(-1)  # (B, H, g, L)
    coded = mx.concatenate([mx.full((s.length,), float(s.is_codes)) for s in segments])
    additive = additive + raise_.reshape(B, n_q_heads, L, 1) * coded
    return A.compressed_attention(queries, segments, n_kv_heads=H, key_method=cache.key_quantizer,
                                  value_method=cache.value_quantizer, scale=scale, mask=additive)


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    profile = load_profile("smollm2-135m")
    config = profile.config(BUDGET)
    covariances = error_covariances(model, tokenizer, config)
    C.CompressedKVCache.attention = corrected_attention
    result = {"device": device_info(), "profile": f"smollm2-135m {profile.fingerprint}", "budget_bits": BUDGET,
              "tokens": TOKENS, "chunk": CHUNK, "calibration_tokens": CALIBRATION_TOKENS, "texts": {}}
    for name in TEXTS:
        tokens = tokenizer.encode(E.load_text(name))[:TOKENS]
        base = E.perplexity(model, tokens, lambda: [E.Float16KVCache() for _ in model.layers], CHUNK, len(tokens))
        row = {}
        for alpha in ALPHAS:
            run = E.perplexity(model, tokens, lambda a=alpha: tagged(model, config, a, covariances), CHUNK, len(tokens))
            row[str(alpha)] = {"delta_ppl_percent": 100 * (run["ppl"] / base["ppl"] - 1),
                               "effective_bits": E.effective_bits(model, run["caches"])}
            print(name, alpha, row[str(alpha)], flush=True)
        result["texts"][name] = row
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "key_error_bias_cpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
