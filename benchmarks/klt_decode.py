"""One decode step of attention over one layer, `klt` with keys coded before vs after RoPE beside TurboQuant-MSE at
equal code bits (and fp16 SDPA), at several context lengths, in one run.

One layer of SmolLM2-135M's shape (9 query / 3 KV heads, head_dim 64), one query token, random K/V. Pairs at equal
bits: turboquant_mse k4/v4 and k2/v2 (fp16 scale per token) against klt plans with every coordinate at 4 or 2 bits
(8-bit scale per token), and a calibrated layer of the shipped smollm2-135m profile at its 3.5-bit budget (mixed
bits per coordinate; keys before RoPE, as the profile codes them, and the same plans coding keys after RoPE: what
the pre-RoPE synthesis costs). The uniform klt plans are synthetic (a random
orthonormal analysis): what is timed is the decode work, which depends on the bit layout and on RoPE, not on
calibration. The series run interleaved, rounds in alternating order; each row gives the median wall time and the
median CPU time of the process (all threads), the steadier of the two on a shared machine, and the ratios to its
turboquant_mse partner are of CPU times.

    python benchmarks/klt_decode.py [--tokens 8192 32768] [--rounds 9] [--out benchmarks/results]
writes klt_decode_<cpu|gpu>.json; on the CPU also the split of one decode step of the recommended layer (its append
and attention, native kernel calls apart from the Python/MLX/numpy around them).
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bench import device_info  # benchmarks/bench.py, beside this script
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.kernels import cpu
from kvshard.quant.calibrate.profile import load_profile
from kvshard.quant.methods.klt import KLTPlan
from kvshard.quant.rope import rope_frequencies

N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 9, 3, 64
PROFILE_LAYER = 12  # a middle layer of the profile: 64 coded key coordinates, 3.25 / 4.0 mean bits


def _plan(bits: int, rope=(None, False)) -> KLTPlan:
    rng = np.random.default_rng(0)
    analysis = np.stack([np.linalg.qr(rng.standard_normal((HEAD_DIM, HEAD_DIM)))[0] for _ in range(N_KV_HEADS)])
    energies = np.tile(np.exp(-np.arange(HEAD_DIM) / 10), (N_KV_HEADS, 1))
    return KLTPlan(analysis, energies, (bits,) * HEAD_DIM, 8, *rope)


def _caches() -> dict:
    """name -> (cache, name of the turboquant_mse series it is compared with, or None)."""
    rope = rope_frequencies(nn.RoPE(HEAD_DIM, traditional=True, base=100000.0), HEAD_DIM)  # SmolLM2's RoPE
    caches = {}
    for bits in (4, 2):
        tq = f"turboquant_mse k{bits}/v{bits}"
        caches[tq] = (CompressedKVCache(HEAD_DIM, N_KV_HEADS, key_bits=bits, value_bits=bits), None)
        for where, key_rope in (("after", (None, False)), ("before", rope)):
            cache = CompressedKVCache(HEAD_DIM, N_KV_HEADS, method="klt", key_plan=_plan(bits, key_rope),
                                      value_plan=_plan(bits))
            caches[f"klt {bits}-bit, keys {where} RoPE"] = (cache, tq)
    config = load_profile("smollm2-135m").config(budget_bits=3.5)
    key_plan, value_plan = config.key_plans[PROFILE_LAYER], config.value_plans[PROFILE_LAYER]
    name = f"klt profile layer {PROFILE_LAYER} at 3.5 bits ({key_plan.mean_bits:.2f}/{value_plan.mean_bits:.2f} code bits)"
    caches[f"{name}, keys before RoPE"] = (
        CompressedKVCache(HEAD_DIM, N_KV_HEADS, method="klt", key_plan=key_plan, value_plan=value_plan), "turboquant_mse k4/v4")
    caches[f"{name}, keys after RoPE (speed only)"] = (
        CompressedKVCache(HEAD_DIM, N_KV_HEADS, method="klt", key_plan=dataclasses.replace(key_plan, rope_frequencies=None),
                          value_plan=value_plan), "turboquant_mse k4/v4")
    return caches


def _measure(tokens: int, rounds: int) -> list:
    mx.random.seed(0)
    shape = (1, N_KV_HEADS, tokens, HEAD_DIM)
    keys, values = mx.random.normal(shape).astype(mx.float16), mx.random.normal(shape).astype(mx.float16)
    queries = mx.random.normal((1, N_Q_HEADS, 1, HEAD_DIM)).astype(mx.float16)
    scale, elements = HEAD_DIM**-0.5, 2 * keys.size
    series = {"fp16 SDPA": (lambda: mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale),
                            keys.nbytes + values.nbytes, None)}
    for name, (cache, partner) in _caches().items():
        cache.append(keys, values)
        series[name] = (lambda cache=cache: cache.attention(queries, scale), cache.nbytes, partner)
    wall, cpu = {name: [] for name in series}, {name: [] for name in series}
    names = list(series)
    for round_ in range(rounds + 1):  # round 0 warms up
        for name in names if round_ % 2 else names[::-1]:
            fn = series[name][0]
            started, started_cpu = time.perf_counter(), time.process_time()
            mx.eval(fn())
            if round_:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    rows = []
    for name in names:
        _, nbytes, partner = series[name]
        cpu_ms = 1e3 * statistics.median(cpu[name])
        row = {"series": name, "tokens": tokens, "ms": 1e3 * statistics.median(wall[name]), "cpu_ms": cpu_ms,
               "bytes": nbytes, "effective_bits": 8 * nbytes / elements}
        if partner:
            row["vs"] = partner
            row["cpu_ratio"] = cpu_ms / (1e3 * statistics.median(cpu[partner]))
        rows.append(row)
        print(f"{tokens:6d} {name:70s} {row['ms']:8.2f} ms  cpu {cpu_ms:8.2f} ms  {row['effective_bits']:5.2f} bits"
              + (f"  {row['cpu_ratio']:.2f}x {partner}" if partner else ""), flush=True)
    return rows


def _step_split(tokens: int, rounds: int) -> dict:
    """Where one decode step of the recommended configuration's layer goes on the CPU (process CPU time, medians):
    the one-token append and the attention call, each split into its native kernel calls (src/cpu_encode.c,
    src/cpu_attention.c) and the Python/MLX/numpy work around them. The layer as the service holds it: the
    profile's plans, keys before RoPE, 4 fp16 sinks."""
    config = load_profile("smollm2-135m").config(budget_bits=3.5)
    cache = CompressedKVCache(HEAD_DIM, N_KV_HEADS, method="klt", key_plan=config.key_plans[PROFILE_LAYER],
                              value_plan=config.value_plans[PROFILE_LAYER], sink_tokens=config.sink_tokens)
    mx.random.seed(1)
    cache.append(mx.random.normal((1, N_KV_HEADS, tokens, HEAD_DIM)), mx.random.normal((1, N_KV_HEADS, tokens, HEAD_DIM)))
    cache.read_by_hook = True  # as under the model's attention hook: appends hand back only the new token
    library, native = cpu.native_library(), {"kvshard_attend": [], "kvshard_encode": []}

    def timed(name, function):
        def call(*args):
            started = time.process_time()
            status = function(*args)
            native[name][-1] += time.process_time() - started
            return status
        return call

    for name in native:
        setattr(library, name, timed(name, getattr(library, name)))
    append, attend, native_append, native_attend = [], [], [], []
    try:
        for _ in range(rounds):
            token = mx.random.normal((1, N_KV_HEADS, 1, HEAD_DIM))
            query = mx.random.normal((1, N_Q_HEADS, 1, HEAD_DIM))
            mx.eval(token, query)
            for side in native.values():
                side.append(0.0)
            started = time.process_time()
            mx.eval(cache.update_and_fetch(token, token))
            append.append(time.process_time() - started)
            native_append.append(native["kvshard_encode"][-1])
            started = time.process_time()
            mx.eval(cache.attention(query, HEAD_DIM**-0.5))
            attend.append(time.process_time() - started)
            native_attend.append(native["kvshard_attend"][-1])
    finally:
        for name in native:
            delattr(library, name)
    ms = lambda v: 1e3 * statistics.median(v)  # noqa: E731
    split = {"tokens": tokens, "layer": PROFILE_LAYER, "steps": rounds, "append_ms": ms(append),
             "append_native_encode_ms": ms(native_append), "attention_ms": ms(attend),
             "attention_native_kernel_ms": ms(native_attend),
             "glue_ms": ms([a + b - c - d for a, b, c, d in zip(append, attend, native_append, native_attend)])}
    print("step split", {k: round(v, 3) if isinstance(v, float) else v for k, v in split.items()}, flush=True)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [row for tokens in args.tokens for row in _measure(tokens, args.rounds)]
    tag = "gpu" if mx.default_device() == mx.gpu else "cpu"
    split = _step_split(args.tokens[0], 8 * args.rounds) if tag == "cpu" else None
    result = {"device": device_info(), "query_tokens": 1, "rounds": args.rounds,
              "shape": {"n_q_heads": N_Q_HEADS, "n_kv_heads": N_KV_HEADS, "head_dim": HEAD_DIM},
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows,
              "recommended_layer_step_split": split}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"klt_decode_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
