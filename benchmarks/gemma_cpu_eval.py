"""Gemma 3 270M on this CPU with the installed model: chunked perplexity (quant/eval.py: perplexity, chunk 256) of
<bos> + 1,023 tokens of each text, one text at a time, fp16 against the all-layer profile at 4.5 / 3.5 / 2.5 bits
and turboquant_mse at 4 / 3 / 2 bits, each with its sliding layers in a compressed window ("all layers") and in
an fp16 rotating window ("sliding fp16"); effective bits against the fp16 cache at that length.

    python benchmarks/gemma_cpu_eval.py --out FILE.json [--texts pride_and_prejudice vim_manual]
        [--profile DIR] [--recipes klt turboquant_mse] [--sliding compressed fp16] [--value-weights 0.25 4]
        [--sliding-values rotation klt]

--value-weights F...: klt rows whose profile has its value sensitivities times F, which moves bits between keys and
values (is the calibration's key/value balance right?).

Another revision's code runs it through PYTHONPATH pointing at a kvshard/ folder of symlinks (as
benchmarks/run_gpu.sh does), so before and after are measured by the same script. FILE is rewritten after each row.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import mlx.core as mx

from kvshard.quant import KVCacheBuilder, KVCacheConfig, load_profile
from kvshard.quant import eval as quality
from kvshard.quant.calibrate.profile import Profile
from kvshard.quant.models import load_model
from kvshard.quant.sliding import effective_bits_vs_fp16

PROFILE = os.path.join(os.path.dirname(__file__), "results", "gemma3-270m", "gemma3-270m-all-layers")


def value_weighted(profile: Profile, factor: float) -> Profile:
    return Profile(profile.name, profile.model_fingerprint, profile.moments, profile.key_weights,
                   [w * factor for w in profile.value_weights], dict(profile.meta))


def only_coded(config, side: str):
    """`config` with the other side's plans at 8 bits a coordinate (distortion ~4e-5: near exact)."""
    other = "value_plans" if side == "keys" else "key_plans"
    exact = [dataclasses.replace(p, coordinate_bits=(8,) * len(p.coordinate_bits)) for p in getattr(config, other)]
    return dataclasses.replace(config, **{other: exact})


def unpriced(profile: Profile) -> Profile:
    meta = {k: v for k, v in profile.meta.items() if k != "sliding_window"}
    return Profile(profile.name, profile.model_fingerprint, profile.moments, profile.key_weights, profile.value_weights, meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--texts", nargs="+", default=list(quality.TEXTS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.5, 3.5, 2.5])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--profile", default=PROFILE, help="an all-layer profile folder of this model")
    parser.add_argument("--recipes", nargs="+", default=["klt"], choices=["klt", "klt-unpriced", "klt-keys", "klt-values", "turboquant_mse"],
                        help="klt-unpriced: the profile's plans as before 2026-12-02, every layer counted as holding all "
                             "the tokens (the profile without its sliding_window); klt-keys / klt-values: the klt plans "
                             "with the other side at 8 bits a coordinate (where the error is)")
    parser.add_argument("--sliding", nargs="+", default=["compressed"], choices=["compressed", "fp16"])
    parser.add_argument("--value-weights", type=float, nargs="+", default=[1.0])
    parser.add_argument("--sliding-values", nargs="+", default=["rotation"], choices=["rotation", "klt"],
                        help="klt rows: how the coded sliding layers code values (Profile.config's sliding_values; "
                             "klt: the calibrated transform, the recipe before 2026-12-04)")
    args = parser.parse_args(argv)
    model, tokenizer = load_model("gemma3-270m")
    profile = load_profile(args.profile)
    configs = [("fp16", quality.baseline_config(model).make_caches)]
    for recipe in args.recipes:
        for sliding in args.sliding:
            layers = "all layers" if sliding == "compressed" else "global, sliding fp16"
            for b in args.budgets:
                if recipe == "turboquant_mse":
                    bits = int(b)  # 4.5 -> 4: its norms and sinks bring it near the budget
                    rows = [(f"turboquant_mse {bits}-bit, {layers}",
                             KVCacheConfig(method="turboquant_mse", key_bits=bits, seed=42, sliding=sliding))]
                elif recipe in ("klt-keys", "klt-values"):
                    side = recipe.split("-")[1]
                    rows = [(f"klt {layers} <= {b} bits, {side} only", only_coded(profile.config(b, sliding=sliding), side))]
                elif recipe == "klt-unpriced":
                    rows = [(f"klt {layers} <= {b} bits, unpriced", unpriced(profile).config(b, sliding=sliding))]
                else:
                    rows = [(f"klt {layers} <= {b} bits" + ("" if f == 1 else f", value sensitivities x{f:g}")
                             + ("" if v == "rotation" or sliding == "fp16" else ", sliding values klt"),
                             value_weighted(profile, f).config(b, sliding=sliding, sliding_values=v))
                            for f in args.value_weights for v in args.sliding_values if v == "rotation" or sliding != "fp16"]
                configs += [(label, lambda config=config: KVCacheBuilder.for_model(model, config)) for label, config in rows]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} on {mx.default_device()}",
              "model": "gemma3-270m", "tokens": args.tokens, "chunk": 256, "profile": os.path.relpath(args.profile),
              "per_text": {}}
    for name in args.texts:
        ids = mx.array([tokenizer.bos_token_id] + tokenizer.encode(quality.load_text(name), add_special_tokens=False)
                       [: args.tokens - 1])
        rows, base = report["per_text"].setdefault(name, []), None
        for label, make in configs:
            start = time.perf_counter()
            run = quality.perplexity(model, ids, make, 256, args.tokens)
            base = base or run
            rows.append({"label": label, "ppl": run["ppl"], "delta_ppl_pct": 100 * (run["ppl"] / base["ppl"] - 1),
                         "effective_bits": effective_bits_vs_fp16(model, run["caches"], args.tokens - 1),
                         "seconds": time.perf_counter() - start})
            report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
            print(f"{name} {label}: {rows[-1]['delta_ppl_pct']:+.3f}% at {rows[-1]['effective_bits']:.2f} bits", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
