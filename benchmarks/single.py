"""One cache configuration, measured alone (the seed's `benchmark` command): bytes and effective bits, key/value
distortion, attention error against exact attention on the same fp16 K/V, append and attend times.

    python benchmarks/single.py --method turboquant_rvq --head_dim 128 --bits 2 --seq_len 1000
    kvshard bench --single --method turboquant_rvq --head_dim 128 --bits 2 --seq_len 1000   (same, from a checkout)

K/V are seeded Gaussians with a shared offset on the keys (real keys share a mean direction); `--json FILE` also
writes the numbers. Times are medians of repeated calls on this machine (noisy when it is shared).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from kvshard.quant import METHODS, KVCacheBuilder


def _median_s(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative(error: mx.array, reference: mx.array) -> float:
    return ((error.astype(mx.float32) ** 2).sum() / (reference.astype(mx.float32) ** 2).sum()).item()


def measure(method: str, head_dim: int, bits: int, seq_len: int, value_bits=None, kv_heads: int = 1,
            query_heads: int | None = None, seed: int = 42, repeats: int = 20) -> dict:
    query_heads = query_heads or kv_heads
    rng = np.random.default_rng(seed)
    keys = mx.array((rng.standard_normal((1, kv_heads, seq_len, head_dim)) + 1.0).astype(np.float16))
    values = mx.array(rng.standard_normal((1, kv_heads, seq_len, head_dim)).astype(np.float16))
    queries = mx.array(rng.standard_normal((1, query_heads, 1, head_dim)).astype(np.float32))

    def build():
        return (KVCacheBuilder().with_method(method).with_head_dim(head_dim).with_kv_heads(kv_heads)
                .with_bit_width(inlier=bits, value=value_bits).with_seed(seed).build())

    def fill():
        cache = build()
        cache.append(keys, values)
        return cache

    append_s = _median_s(lambda: fill()._arrays(), max(3, repeats // 4))
    cache = fill()
    step_s = statistics.median(_step_times(cache, keys, values, repeats))
    cache = fill()
    attend_s = _median_s(lambda: cache.attend(queries), repeats)

    k_hat, v_hat = cache.dequantized()
    k, v = keys.astype(mx.float32), values.astype(mx.float32)
    centred = k - (0 if cache.key_mean is None else cache.key_mean.astype(mx.float32))
    scale = head_dim**-0.5
    group = query_heads // kv_heads
    exact_keys, exact_values = (mx.repeat(a, group, axis=1) for a in (k, v))
    weights = mx.softmax((queries * scale) @ exact_keys.swapaxes(-1, -2), axis=-1)
    exact = weights @ exact_values
    output = cache.attend(queries)
    cosine = ((k * k_hat).sum(-1) / (mx.linalg.norm(k, axis=-1) * mx.linalg.norm(k_hat.astype(mx.float32), axis=-1)))
    elements = 2 * kv_heads * seq_len * head_dim
    return {
        "method": method, "head_dim": head_dim, "key_bits": bits, "value_bits": value_bits or bits,
        "seq_len": seq_len, "kv_heads": kv_heads, "query_heads": query_heads, "seed": seed,
        "bytes": cache.nbytes, "fp16_bytes": 2 * elements, "compression": 2 * elements / cache.nbytes,
        "effective_bits": 8 * cache.nbytes / elements,
        "key_relative_mse": _relative(k - k_hat, centred),  # of what is coded: the key mean is held exactly
        "key_cosine_mean": cosine.mean().item(),
        "value_relative_mse": _relative(v - v_hat, v),
        "attention_relative_error": _relative(output - exact, exact),
        "append_all_ms": 1e3 * append_s, "append_tokens_per_s": seq_len / append_s,
        "append_one_token_ms": 1e3 * step_s, "attend_ms": 1e3 * attend_s,
    }


def _step_times(cache, keys, values, repeats: int) -> list:
    times = []
    for i in range(repeats):
        k, v = keys[:, :, i : i + 1], values[:, :, i : i + 1]
        start = time.perf_counter()
        cache.append(k, v)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/single.py", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(m for m in METHODS if m != "klt"))
    parser.add_argument("--head_dim", "--head-dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4, help="key bits")
    parser.add_argument("--value_bits", "--value-bits", type=int, default=None, help="value bits (default: --bits)")
    parser.add_argument("--seq_len", "--seq-len", type=int, default=1000)
    parser.add_argument("--kv_heads", "--kv-heads", type=int, default=1)
    parser.add_argument("--query_heads", "--query-heads", type=int, default=None, help="default: --kv_heads")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    for name in ("head_dim", "seq_len", "kv_heads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.query_heads is not None and args.query_heads % args.kv_heads:
        parser.error(f"--query_heads ({args.query_heads}) must be a multiple of --kv_heads ({args.kv_heads})")
    try:
        row = measure(args.method, args.head_dim, args.bits, args.seq_len, args.value_bits, args.kv_heads,
                      args.query_heads, args.seed, args.repeats)
    except ValueError as err:
        parser.error(str(err))
    row["machine"] = {"platform": platform.platform(), "device": str(mx.default_device()), "mlx": mx.__version__}
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
