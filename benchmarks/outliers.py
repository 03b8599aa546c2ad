"""Outlier channels against the same budget spent by klt and by RateQuant (the tuned recipe), on the embedded
model, side by side in one run of quant/eval.py's harness: chunked perplexity of the shipped texts, ΔPPL against an
fp16 KV cache, effective bits from the bytes held.

Outlier configurations are turboquant_mse with b-bit keys and values plus n exact key channels per token
(n · 24 bits per key); plain turboquant_mse at the same b shows what the exact channels buy.

    python benchmarks/outliers.py [--tokens 512] [--texts NAME ...] [--out benchmarks/results]
writes outliers_cpu.json.
"""

import argparse
import functools
import json
import os
import platform
import time

import mlx.core as mx

from kvshard.quant import KVCacheBuilder, KVCacheConfig
from kvshard.quant.eval import EvalConfig, calibrate, klt_config, run_eval, TEXTS, tuned_config
from kvshard.quant.models import load_model

OUTLIERS = ((4, 1), (3, 1), (2, 1))  # (bits, channels): 24 bits a key, inside the budgets below
BUDGETS = (4.5, 3.5, 2.5)


def configs(model, tokenizer, tokens: int) -> list:
    def caches(config):
        return lambda: KVCacheBuilder.for_model(model, config)

    rows = []
    for bits in (4, 3, 2):
        rows.append(EvalConfig(f"turboquant_mse {bits}-bit", "turboquant_mse", caches(KVCacheConfig(key_bits=bits))))
    for bits, n in OUTLIERS:
        config = KVCacheConfig(key_bits=bits, outlier_channels=n)
        rows.append(EvalConfig(f"turboquant_mse {bits}-bit + {n} outlier channel(s)", "outlier channels", caches(config)))
    calibration = functools.cache(lambda: calibrate(model, tokenizer))
    for budget in BUDGETS:
        rows.append(EvalConfig(f"kvshard klt <= {budget} bits", "kvshard klt",
                               lambda budget=budget: KVCacheBuilder.for_model(model, klt_config(model, budget, calibration(), tokens))))
        rows.append(EvalConfig(f"kvshard tuned (RateQuant) <= {budget} bits", "kvshard tuned",
                               lambda budget=budget: KVCacheBuilder.for_model(model, tuned_config(model, tokenizer, budget, calibration(), tokens))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--texts", nargs="+", choices=list(TEXTS), default=list(TEXTS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    model, tokenizer = load_model("smollm2-135m")
    result = run_eval(model, tokenizer, args.texts, args.tokens, args.chunk, configs(model, tokenizer, args.tokens))
    for row in result["mean"]:
        print(f"{row['label']:<44} bits {row['effective_bits']:6.3f}  ΔPPL {row['delta_ppl_pct']:+8.2f}%", flush=True)
    report = {"benchmark": "outliers", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
                          "device": str(mx.default_device())},
              "model": "SmolLM2-135M-Instruct (embedded GGUF, dense fp32 weights)", "tokens": args.tokens,
              "chunk": args.chunk, "texts": args.texts, **result}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "outliers_cpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
