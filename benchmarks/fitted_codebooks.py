"""What codebooks fitted to each klt run's measured law would buy, before building them into profiles.

klt codes every run of coordinates with the Lloyd-Max codebook of the sphere law (a rotated unit vector's
coordinate, near-Gaussian), which holds when a run is long enough for its random rotation to mix many
coordinates. Short runs of strong coordinates keep their own law: on Gemma 3 the value codes miss the plan's
distortion by 2x (kurtosis up to 33), on SmolLM2 by 1.24x at the median (README, "A second model"). This script
measures the idea without touching the library's formats:

1. the profile's configuration at each budget; the keys and values its quantizers are given (keys before RoPE,
   less the key mean, as the cache codes them) are recorded while the calibration texts (the profile's own,
   `calibration_texts()`, first --fit-tokens tokens each) go through the model;
2. per layer, side and run: a Lloyd-Max codebook of the run's bits fitted to the run's coordinates of z / ||z||
   (symmetrised: x and -x), where they are numerous enough (--min-samples per level), else the plan's own;
3. on kvshard eval's texts (first --tokens tokens, chunk 256, as `kvshard eval`; Gemma's after <bos>): ΔPPL against the model's fp16
   cache (eval.baseline_config) of
   the plan's codebooks and of the fitted ones (the same bytes held: codebooks would live in the profile), and
   the held-out distortion of each layer's codes, sum(energy * (z - z_hat)^2) / sum(energy * z^2), recorded on
   the same texts.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 PYTHONPATH=benchmarks \\
        python benchmarks/fitted_codebooks.py [--model smollm2-135m] [--budgets 2.5 3.5] [--texts ...]
writes fitted_codebooks_<cpu|gpu>.json (after every text).
"""

import argparse
import json
import os
import time
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from kvshard.quant import KVCacheBuilder, kernels, load_model, load_profile
from kvshard.quant.calibrate.klt import calibration_texts
from kvshard.quant.codebooks import Codebook, _symmetric, lloyd_max
from kvshard.quant.eval import TEXTS, baseline_config, load_text, perplexity
from kvshard.quant.sliding import effective_bits_vs_fp16
from kvshard.quant.methods.klt import KLT
from bench import device_info  # benchmarks/bench.py, beside this script

SIDES = ("keys", "values")


def quantizers(cache) -> dict:
    """The cache's quantizers by side: klt, or a key scale around klt (ScaledKeys)."""
    out = {}
    for side, q in (("keys", cache.key_quantizer), ("values", cache.value_quantizer)):
        if not isinstance(getattr(q, "inner", q), KLT):
            raise SystemExit(f"{side}: expected klt quantizers, got {type(q).__name__}")
        out[side] = q
    return out


def klt_of(q) -> KLT:
    return getattr(q, "inner", q)


def klt_input(q, x: mx.array) -> np.ndarray:
    """What the klt inside q codes of x: a key scale multiplies the keys first."""
    if q is not klt_of(q):
        x = x.astype(mx.float32) * q._per_head
    return np.asarray(x.astype(mx.float32))


@contextmanager
def recording():
    """(seen, watch): watch(caches) records what each of their quantizers is asked to encode, as klt sees it,
    under seen[(layer, side)] (arrays (B, H, T, d))."""
    owners, seen = {}, {}
    original = kernels.encode_pair

    def watch(caches):
        for layer, cache in enumerate(caches):
            for side, q in quantizers(cache).items():
                owners[id(q)] = (layer, side)
                seen.setdefault((layer, side), [])

    def encode_pair(key_quantizer, keys, value_quantizer, values):
        for q, x in ((key_quantizer, keys), (value_quantizer, values)):
            if id(q) in owners:
                seen[owners[id(q)]].append(klt_input(q, x))
        return original(key_quantizer, keys, value_quantizer, values)

    kernels.encode_pair = encode_pair
    try:
        yield seen, watch
    finally:
        kernels.encode_pair = original


def prefill(model, ids, caches, chunk=256):
    x = mx.array(ids)
    for start in range(0, len(ids), chunk):
        mx.eval(model(x[None, start : start + chunk], cache=caches))


def unit_rows(method: KLT, x: np.ndarray) -> np.ndarray:
    """z / ||z|| of every token of x (B, H, T, d) -> (B, H, T, m)."""
    z = np.asarray(method.to_coded(mx.array(x)))
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-30)


def fit_codebooks(method: KLT, x: np.ndarray, min_samples: int) -> tuple[list, list]:
    """(codebooks, per run: 'fitted' or 'plan') for the method's runs, fitted to the coordinates of x."""
    unit = unit_rows(method, x)
    books, kinds = [], []
    for (start, stop, bits), plan_book in zip(method.groups, method.codebooks):
        samples = unit[..., start:stop].ravel()
        if samples.size * 2 < min_samples * (1 << bits):
            books.append(plan_book)
            kinds.append("plan")
            continue
        values = np.concatenate([samples, -samples]).astype(np.float64)
        centroids = _symmetric(lloyd_max(values, np.ones_like(values), bits))
        boundaries = (centroids[1:] + centroids[:-1]) / 2
        books.append(Codebook(mx.array(centroids.astype(np.float32)), mx.array(boundaries.astype(np.float32)), bits))
        kinds.append("fitted")
    return books, kinds


def install(method: KLT, books: list) -> None:
    """The method codes with `books` from now on (before any encode or attention has derived its tables)."""
    method.codebooks = list(books)
    method._fused = method._fused_spec()


def distortion(method: KLT, x: np.ndarray) -> float:
    """Energy-weighted relative squared error of the codes of x in z's coordinates."""
    xm = mx.array(x)
    z = method.to_coded(xm)
    z_hat = method.decode_rotated(method.encode(xm))
    err = (method._energy * (z - z_hat) ** 2).sum()
    return float(err / (method._energy * z * z).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", help="profile name or folder (default: the model's)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.5])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--fit-tokens", type=int, default=1024, help="tokens of each calibration text fitted on")
    parser.add_argument("--min-samples", type=int, default=32, help="samples per codebook level to fit a run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dequantize=True)
    # Gemma's texts start with <bos>, as benchmarks/gemma_cpu_eval.py and its calibration feed them.
    prefix = [tokenizer.bos_token_id] if args.model.startswith("gemma") else []
    profile = load_profile(args.profile or args.model)
    report = {"what": __doc__.split("\n\n")[0], "machine": device_info(), "model": args.model,
              "profile": {"name": profile.name, "fingerprint": profile.fingerprint}, "tokens": args.tokens,
              "fit_tokens": args.fit_tokens, "min_samples": args.min_samples, "budgets": {}, "texts": {}}
    path = os.path.join(args.out, f"fitted_codebooks_{'gpu' if mx.default_device() == mx.gpu else 'cpu'}.json")
    fitted = {}
    for budget in args.budgets:
        config = profile.config(budget)
        started = time.perf_counter()
        with recording() as (seen, watch):
            for text in calibration_texts():
                ids = (prefix + tokenizer.encode(text, add_special_tokens=False))[: args.fit_tokens]
                caches = KVCacheBuilder.for_model(model, config)
                watch(caches)
                prefill(model, ids, caches)
        books, kinds = {}, {}
        for layer, cache in enumerate(caches):
            for side, q in quantizers(cache).items():
                x = np.concatenate(seen[(layer, side)], axis=2)
                books[(layer, side)], kinds[(layer, side)] = fit_codebooks(klt_of(q), x, args.min_samples)
        fitted[budget] = books
        runs = [k for ks in kinds.values() for k in ks]
        report["budgets"][str(budget)] = {"fit_seconds": time.perf_counter() - started, "runs": len(runs),
                                          "runs_fitted": runs.count("fitted")}
        print(f"{budget} bits: {runs.count('fitted')} of {len(runs)} runs fitted", flush=True)

    def build(budget, fit):
        caches = KVCacheBuilder.for_model(model, profile.config(budget))
        if fit:
            for layer, cache in enumerate(caches):
                for side, q in quantizers(cache).items():
                    install(klt_of(q), fitted[budget][(layer, side)])
        return caches

    for name in args.texts:
        ids = (prefix + tokenizer.encode(load_text(name), add_special_tokens=False))[: args.tokens]
        base = perplexity(model, ids, baseline_config(model).make_caches)
        rows = {}
        for budget in args.budgets:
            for fit in (False, True):
                label = f"<= {budget} bits, {'fitted' if fit else 'plan'} codebooks"
                caches = build(budget, fit)
                with recording() as (seen, watch):
                    watch(caches)
                    run = perplexity(model, ids, lambda: caches)
                errors = {}
                for layer, cache in enumerate(caches):
                    for side, q in quantizers(cache).items():
                        errors[f"{layer}:{side}"] = distortion(klt_of(q), np.concatenate(seen[(layer, side)], axis=2))
                rows[label] = {"delta_ppl_pct": 100 * (run["ppl"] / base["ppl"] - 1),
                               "effective_bits": round(effective_bits_vs_fp16(model, run["caches"], len(ids) - 1), 4),
                               "distortion": errors,
                               "distortion_mean": {s: float(np.mean([v for k, v in errors.items() if k.endswith(s)]))
                                                   for s in SIDES}}
                r = rows[label]
                print(f"{name:<22} {label:<34} {r['delta_ppl_pct']:+7.2f}%  bits {r['effective_bits']:.3f}  "
                      f"distortion k {r['distortion_mean']['keys']:.4f} v {r['distortion_mean']['values']:.4f}",
                      flush=True)
        report["texts"][name] = {"fp16_ppl": base["ppl"], "rows": rows}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
