"""One decode step of the `klt` method's attention, keys coded before vs after RoPE, beside fp16 SDPA, mlx_lm's
4-bit QuantizedKVCache and TurboQuant-MSE k4/v4 (its CPU fast path), in one run.

One layer of SmolLM2-135M's shape (9 query / 3 KV heads, head_dim 64), one query token, random K/V. The klt
plans are synthetic (a random orthonormal analysis, energies e^(−i/10), 1.875 code bits per coordinate: 2.0 effective bits with the scale bytes):
what is timed is the decode work, which depends on the bit layout and on RoPE, not on calibration.

    python benchmarks/klt_decode.py [--tokens 32768] [--repeats 7] [--out benchmarks/results]
writes klt_decode_<cpu|gpu>.json (medians in ms).
"""

import argparse
import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from bench import _mlx_lm_quantized, _tree_nbytes, device_info, time_call  # benchmarks/bench.py, beside this script
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.methods.klt import KLTPlan
from kvshard.quant.rope import rope_frequencies

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 9, 3, 64
BITS = (4,) * 8 + (3,) * 16 + (2,) * 16 + (1,) * 8 + (0,) * 16


def _plans(rope):
    rng = np.random.default_rng(0)
    analysis = np.stack([np.linalg.qr(rng.standard_normal((HEAD_DIM, HEAD_DIM)))[0] for _ in range(N_KV_HEADS)])
    energies = np.tile(np.exp(-np.arange(HEAD_DIM) / 10), (N_KV_HEADS, 1))
    return KLTPlan(analysis, energies, BITS, 8, *rope), KLTPlan(analysis, energies, BITS, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    mx.random.seed(0)
    shape = (1, N_KV_HEADS, args.tokens, HEAD_DIM)
    keys, values = mx.random.normal(shape).astype(mx.float16), mx.random.normal(shape).astype(mx.float16)
    queries = mx.random.normal((1, N_Q_HEADS, 1, HEAD_DIM)).astype(mx.float16)
    scale = HEAD_DIM**-0.5
    elements = 2 * keys.size
    rope = rope_frequencies(nn.RoPE(HEAD_DIM, traditional=True, base=100000.0), HEAD_DIM)  # SmolLM2's RoPE

    series = {"fp16 SDPA": (lambda: mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale),
                            keys.nbytes + values.nbytes)}
    _, qk, qv = _mlx_lm_quantized(keys, values, 4)
    series["mlx_lm QuantizedKVCache 4-bit"] = (
        lambda: quantized_scaled_dot_product_attention(queries, qk, qv, scale=scale, mask=None, group_size=64, bits=4),
        _tree_nbytes(qk) + _tree_nbytes(qv))
    caches = {"turboquant_mse k4/v4": CompressedKVCache(HEAD_DIM, N_KV_HEADS, key_bits=4, value_bits=4)}
    for name, key_rope in (("klt, keys after RoPE", (None, False)), ("klt, keys before RoPE", rope)):
        key_plan, value_plan = _plans(key_rope)
        caches[name] = CompressedKVCache(HEAD_DIM, N_KV_HEADS, method="klt", sink_tokens=4, key_plan=key_plan,
                                         value_plan=value_plan)
    for name, cache in caches.items():
        cache.append(keys, values)
        series[name] = (lambda cache=cache: cache.attention(queries, scale), cache.nbytes)

    rows = []
    for name, (fn, nbytes) in series.items():
        timing = time_call(fn, repeats=args.repeats, warmup=1)
        rows.append({"series": name, "ms": timing["ms"], "min_ms": timing["min_ms"], "bytes": nbytes,
                     "effective_bits": 8 * nbytes / elements})
        print(f"{name:32s} {timing['ms']:9.1f} ms  {8 * nbytes / elements:5.2f} bits", flush=True)
    tag = "gpu" if mx.default_device() == mx.gpu else "cpu"
    result = {"device": device_info(), "tokens": args.tokens, "query_tokens": 1, "repeats": args.repeats,
              "shape": {"n_q_heads": N_Q_HEADS, "n_kv_heads": N_KV_HEADS, "head_dim": HEAD_DIM}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"klt_decode_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
