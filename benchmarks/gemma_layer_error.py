"""Where Gemma 3's coded-cache error is, layer by layer: the model's own queries, keys and values on one text (fp16
pass), each layer's K/V then coded alone by a configuration's cache for that layer, and the error of what its
attention computes: RMS attention-logit error over the query-key pairs the layer forms (causal, and within the
window on sliding layers), and the relative error of the attention output with coded keys (values exact) and with
coded values (keys exact). Effective bits: 8 · bytes the layer's cache holds / its K+V elements.

    python benchmarks/gemma_layer_error.py --out FILE.json [--text pride_and_prejudice] [--tokens 1024]
"""

import argparse
import json
import os

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from kvshard.quant import KVCacheBuilder, KVCacheConfig, load_profile
from kvshard.quant.builder import install_attention_hook
from kvshard.quant.eval import load_text
from kvshard.quant.models import load_model
from kvshard.quant.sliding import sliding_windows

PROFILE = os.path.join(os.path.dirname(__file__), "results", "gemma3-270m", "gemma3-270m-all-layers")


class CapturingCache(KVCache):
    """fp16 attention that keeps the queries it was asked (and the scale)."""

    def attention(self, queries, scale, mask=None):
        self.queries, self.scale = queries, scale
        keys, values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def capture(model, ids):
    install_attention_hook(model)
    caches = [CapturingCache() for _ in model.layers]
    model(ids[None], cache=caches)
    return [(c.queries.astype(mx.float32), c.keys[..., : c.offset, :].astype(mx.float32),
             c.values[..., : c.offset, :].astype(mx.float32), c.scale) for c in caches]


def coded(cache, keys, values, chunk=256):
    for start in range(0, keys.shape[2], chunk):
        cache.update_and_fetch(keys[:, :, start : start + chunk], values[:, :, start : start + chunk])
    return cache.keys.astype(mx.float32), cache.values.astype(mx.float32), cache.nbytes


def attend(q, k, v, scale, allowed):
    g = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, g, axis=1), mx.repeat(v, g, axis=1)
    scores = mx.where(allowed, scale * (q @ k.swapaxes(-1, -2)), -mx.inf)
    return mx.softmax(scores, axis=-1) @ v, scores


def layer_errors(q, k, v, scale, window, k_hat, v_hat):
    t = k.shape[2]
    pos = mx.arange(t)
    allowed = pos[:, None] >= pos[None]
    if window is not None:
        allowed = allowed & (pos[:, None] < pos[None] + window)
    out, scores = attend(q, k, v, scale, allowed)
    out_k, scores_k = attend(q, k_hat, v, scale, allowed)
    out_v, _ = attend(q, k, v_hat, scale, allowed)
    diff = mx.where(allowed, scores_k - scores, 0.0)
    pairs = allowed.sum().item() * q.shape[1]
    norm = mx.sqrt((out * out).sum()).item()
    return {"logit_rms": float(np.sqrt((diff * diff).sum().item() / pairs)),
            "out_err_keys": mx.sqrt(((out_k - out) ** 2).sum()).item() / norm,
            "out_err_values": mx.sqrt(((out_v - out) ** 2).sum()).item() / norm}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--text", default="pride_and_prejudice")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--profile", default=PROFILE)
    parser.add_argument("--budget", type=float, default=3.5)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("gemma3-270m")
    profile = load_profile(args.profile)
    ids = mx.array([tokenizer.bos_token_id] + tokenizer.encode(load_text(args.text), add_special_tokens=False)[: args.tokens - 1])
    captured = capture(model, ids)
    windows = sliding_windows(model)
    recipes = {f"klt <= {args.budget}": profile.config(args.budget, sliding="full")}
    for bits in (3, 4):
        recipes[f"turboquant_mse {bits}-bit"] = KVCacheConfig(method="turboquant_mse", key_bits=bits, seed=42, sliding="full")
    report = {"model": "gemma3-270m", "text": args.text, "tokens": args.tokens, "profile": os.path.relpath(args.profile),
              "key_weights": list(map(float, profile.key_weights)), "layers": []}
    for i, (q, k, v, scale) in enumerate(captured):
        row = {"layer": i, "window": windows[i]}
        for label, config in recipes.items():
            cache = KVCacheBuilder.for_model(model, config)[i]
            k_hat, v_hat, nbytes = coded(cache, k, v)
            plan = getattr(cache, "key_plan", None)
            row[label] = dict(layer_errors(q, k, v, scale, windows[i], k_hat, v_hat),
                              bits=8 * nbytes / (2 * k.size),
                              key_plan_bits=None if plan is None else float(np.mean(plan.coordinate_bits)))
        report["layers"].append(row)
        print(i, windows[i], {l: {m: round(x, 4) for m, x in r.items() if x is not None} for l, r in row.items() if isinstance(r, dict)},
              flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
