"""Device time of every kernel of a few decode steps, for one cache series: run under Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \\
        python3 benchmarks/profile_step.py --series fp16 > fp16.csv
    python3 benchmarks/profile_step.py --summarise fp16.csv ours.csv      # kernels per step, µs per kernel name

A 2-layer model of the Llama-3.2-1B layer shape with caches of --tokens random tokens: what one layer's decode
step launches and how long each launch runs on the device, apart from host time (decode_speed.py's build/eval).
--kernel runs only one layer's attention (--head-dim 64: Llama-3.2-1B, 128: Llama-3.1-8B; --batch), fp16 SDPA
beside it, for Nsight's per-kernel sections (occupancy, stall reasons, achieved bandwidth).
"""

import argparse
import csv
import ctypes
import json
import sys

import mlx.core as mx
from mlx_lm.models import llama

from decode_speed import LLAMA_1B, RECOMMENDED, RECOMMENDED_BARE, cache_series, fill, step_fn  # benchmarks/, beside this script
from kvshard.quant import install_attention_hook
from kvshard.quant.cache import CompressedKVCache

SERIES = {"fp16": "mlx_lm KVCache fp16", "ours": "ours turboquant_mse k4/v4",
          "klt": "ours klt calibrated-shape plan, 4 bits/coord, fp16 scale", "recommended": RECOMMENDED,
          "bare": RECOMMENDED_BARE}


def run(series: str, tokens: int, steps: int) -> None:
    config = dict(LLAMA_1B, num_hidden_layers=2)
    model = llama.Model(llama.ModelArgs(**config))
    model.set_dtype(mx.float16)
    install_attention_hook(model)
    make = cache_series(config["num_key_value_heads"], config["head_dim"], 2)[SERIES[series]]
    caches = [make(i) for i in range(2)]
    for c in caches:
        fill(c, config["num_key_value_heads"], config["head_dim"], tokens)
    step = step_fn(model, caches)
    y = step(mx.array([[1]]))
    y.item()
    mx.synchronize()
    driver = ctypes.CDLL("libcuda.so.1")  # ncu --profile-from-start off records between these two calls
    driver.cuProfilerStart()
    for _ in range(steps):
        y = step(y)
        y.item()
    mx.synchronize()
    driver.cuProfilerStop()


def run_kernel(head_dim: int, tokens: int, batch: int, steps: int) -> None:
    n_q, n_kv = 32, 8
    cache = CompressedKVCache(head_dim=head_dim, n_kv_heads=n_kv, key_bits=4, value_bits=4)
    k = mx.random.normal((batch, n_kv, tokens, head_dim)).astype(mx.float16)
    v = mx.random.normal((batch, n_kv, tokens, head_dim)).astype(mx.float16)
    for start in range(0, tokens, 8192):
        cache.update_and_fetch(k[:, :, start:start + 8192], v[:, :, start:start + 8192])
        mx.eval(cache.state)
    q = mx.random.normal((batch, n_q, 1, head_dim)).astype(mx.float16)
    scale = head_dim**-0.5
    calls = [lambda: cache.attention(q, scale), lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)]
    mx.eval([c() for c in calls])
    mx.synchronize()
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuProfilerStart()
    for _ in range(steps):
        for c in calls:
            mx.eval(c())
    mx.synchronize()
    driver.cuProfilerStop()


def summarise(paths: list) -> dict:
    out = {}
    for path in paths:
        rows = [r for r in csv.DictReader(line for line in open(path) if line.startswith('"'))
                if r.get("Metric Name") == "gpu__time_duration.sum" or "gpu__time_duration.sum" in r]
        kernels = {}
        for r in rows:
            name = r.get("Kernel Name", "?")[:80]
            value = r.get("Metric Value") or r.get("gpu__time_duration.sum")
            try:
                ns = float(str(value).replace(",", ""))
            except ValueError:
                continue
            k = kernels.setdefault(name, [0, 0.0])
            k[0] += 1
            k[1] += ns
        out[path] = {"kernels": sum(v[0] for v in kernels.values()), "total_us": sum(v[1] for v in kernels.values()) / 1e3,
                     "by_kernel": {n: {"launches": c, "us_each": t / c / 1e3} for n, (c, t) in
                                   sorted(kernels.items(), key=lambda kv: -kv[1][1])}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", choices=sorted(SERIES))
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--summarise", nargs="*")
    parser.add_argument("--kernel", action="store_true")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if args.summarise:
        print(json.dumps(summarise(args.summarise), indent=1))
    elif args.kernel:
        run_kernel(args.head_dim, args.tokens, args.batch, args.steps)
    else:
        run(args.series, args.tokens, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
