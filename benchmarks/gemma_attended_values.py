"""Where Gemma 3's sliding layers lose accuracy past their window: each coded sliding layer's attention error on
the inputs the coded model itself computes (not an fp16 pass), split into keys and values, and the tokens the
attention weighs most with their value error.

One 4,096-token passkey prompt (gemma_quality.passkey_batch, key at depth 0.3) is prefilled in 2,048-token chunks;
global layers keep fp16 caches, the sliding layers take each configuration's caches. Every coded sliding layer's
attention of the last chunk is compared with exact attention over the K/V it was given (window mask): with the
cache's decoded keys and exact values ("keys only"), the reverse ("values only"), both ("kernel", what the cache
returns). Also per layer: the median relative value error per token, and the three most attended held tokens
(mean attention mass over heads and queries), their value error and their value norm against the median's.

    python benchmarks/gemma_attended_values.py --out FILE.json [--length 4096]
"""

import argparse
import json
import random
import sys

import mlx.core as mx
import numpy as np

from gemma_passkey_logprob import PROFILE, mixed
from gemma_quality import PREFILL_CHUNK, _machine, _now, passkey_batch, sliding_layers
from kvshard.quant import KVCacheConfig, load_profile
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.models import load_model


class Recorder:
    """Wraps CompressedKVCache so that each coded layer keeps the exact K/V it was given and, at each attention
    call, the errors described above."""

    def __init__(self):
        self.given, self.rows = {}, {}
        self._update, self._attention = CompressedKVCache.update_and_fetch, CompressedKVCache.attention

    def __enter__(self):
        recorder = self

        def update_and_fetch(cache, keys, values):
            recorder.given.setdefault(id(cache), []).append((keys, values))
            return recorder._update(cache, keys, values)

        def attention(cache, queries, scale, mask=None):
            out = recorder._attention(cache, queries, scale, mask)
            recorder.rows[cache.layer_index] = measure(cache, recorder.given[id(cache)], queries, scale, out)
            return out

        CompressedKVCache.update_and_fetch, CompressedKVCache.attention = update_and_fetch, attention
        return self

    def __exit__(self, *_):
        CompressedKVCache.update_and_fetch, CompressedKVCache.attention = self._update, self._attention


def measure(cache, given, queries, scale, out) -> dict:
    keys = mx.concatenate([k for k, _ in given], axis=2).astype(mx.float32)
    values = mx.concatenate([v for _, v in given], axis=2).astype(mx.float32)
    k_hat, v_hat = cache.keys.astype(mx.float32), cache.values.astype(mx.float32)
    n, total, L = k_hat.shape[2], keys.shape[2], queries.shape[2]
    keys, values = keys[:, :, total - n :], values[:, :, total - n :]
    q = queries.astype(mx.float32)
    group = q.shape[1] // keys.shape[1]
    positions = mx.arange(total - n, total)
    query_positions = mx.arange(total - L, total)[:, None]
    allowed = (query_positions >= positions[None]) & (query_positions < positions[None] + cache.max_size)

    def weights(k):
        return mx.softmax(mx.where(allowed, scale * (q @ mx.repeat(k, group, 1).swapaxes(-1, -2)), -mx.inf), -1)

    def attend(k, v):
        return weights(k) @ mx.repeat(v, group, 1)

    exact = attend(keys, values)

    def error(o) -> float:
        d = o.astype(mx.float32) - exact
        return float(np.median(np.array(mx.sqrt((d * d).sum(-1) / (exact * exact).sum(-1)))))

    per_token = np.array(mx.sqrt(((v_hat - values) ** 2).sum(-1) / (values**2).sum(-1))[0].mean(0))
    norms = np.array(mx.sqrt((values**2).sum(-1))[0].mean(0))
    mass = np.array(weights(keys)[0].mean(axis=(0, 1)))
    top = np.argsort(mass)[::-1][:3]
    return {"held": n, "value_error_per_token_median": float(np.median(per_token)),
            "kernel": error(out), "keys_only": error(attend(k_hat, values)), "values_only": error(attend(keys, v_hat)),
            "most_attended": [{"held_index": int(t), "mass": round(float(mass[t]), 4),
                               "value_error": round(float(per_token[t]), 4),
                               "norm_vs_median": round(float(norms[t] / np.median(norms)), 3)} for t in top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--profile", default=PROFILE)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("gemma3-270m")
    profile = load_profile(args.profile)
    ids = mx.array(passkey_batch(tokenizer, args.length, [(random.Random(0).randrange(10000, 100000), 0.3)]))
    sliding = set(sliding_layers(model))
    configs = {"klt 5.5, sliding values klt": profile.config(5.5, sliding_values="klt"),
               "klt 5.5 (sliding values: rotation)": profile.config(5.5),
               "turboquant_mse 4-bit": KVCacheConfig(method="turboquant_mse", key_bits=4, seed=42, sliding="compressed")}
    report = {"date": _now(), "machine": _machine(), "length": args.length, "prefill_chunk": PREFILL_CHUNK,
              "layers": "sliding layers coded, global layers fp16", "results": {}}
    for label, config in configs.items():
        caches = mixed(model, config, sliding)()
        for i in sliding:
            caches[i].layer_index = i
        with Recorder() as recorder:
            for start in range(0, ids.shape[1], PREFILL_CHUNK):
                mx.eval(model.model(ids[:, start : start + PREFILL_CHUNK], cache=caches))
        report["results"][label] = {str(i): row for i, row in sorted(recorder.rows.items())}
        print(label, {i: round(r["values_only"], 3) for i, r in sorted(recorder.rows.items())}, file=sys.stderr, flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
