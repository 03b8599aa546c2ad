"""`kvshard bench` (benchmarks/bench.py): side-by-side speed of mlx_lm's caches and kvshard's compressed caches, in one process.

Sections (each writes JSON, most a PNG, under --out, suffixed with the device tag):
  attention  one decode step of attention at 1K..128K tokens: fp16 SDPA (mlx_lm KVCache), mlx_lm
             QuantizedKVCache 4/8-bit, kvshard per method and bit budget; on a GPU the fused kernel is also
             checked against the portable path and against exact attention on the dequantized K/V.
  append     quantize-on-append throughput for a full layer: a 4096-token chunk, and single-token steps.
  decode     end-to-end greedy decode tokens/s and peak memory of the embedded model (SmolLM2-135M shape),
             short and long context.
  service    Generate over gRPC vs in-process generation, Attend latency, resume-from-store vs re-prefill.

Timing: warm-up first, then the median of many `mx.eval` + `mx.synchronize()` calls ("latency"); on a GPU also
the median per call of groups of calls evaluated together ("throughput": launch gaps overlap, closer to the
kernel time). Slow cases are skipped when the previous context says one call would take too long; the JSON
says so and gives the estimate.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import mlx.core as mx

from kvshard.quant.attention import CodeSegment
from kvshard.quant.cache import CompressedKVCache

SHAPES = {
    "llama-3.1-8b": {"n_q_heads": 32, "n_kv_heads": 8, "head_dim": 128},
    "smollm2-135m": {"n_q_heads": 9, "n_kv_heads": 3, "head_dim": 64},
}
CONTEXTS = (1024, 4096, 16384, 32768, 131072)
QUICK_CONTEXTS = (1024, 4096, 32768)
# kvshard series: (label, key method, key bits, value bits). Only turboquant_mse has fused kernels; the other
# methods run the portable path and are measured at the shorter contexts.
OURS = (
    ("turboquant_mse k4/v4", "turboquant_mse", 4, 4),
    ("turboquant_mse k4/v2", "turboquant_mse", 4, 2),
    ("turboquant_mse k2/v2", "turboquant_mse", 2, 2),
    ("turboquant_prod k4/v4", "turboquant_prod", 4, 4),
    ("turboquant_rvq k2/v2", "turboquant_rvq", 2, 2),
    ("polar k4/v4", "polar", 4, 4),
    ("qjl k4/v4", "qjl", 4, 4),
)
FP16_SERIES = "fp16 SDPA (mx.fast, contiguous K/V)"
SPEC_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s, vendor figures


# ---- timing -------------------------------------------------------------------------------------------


def _sync():
    mx.synchronize()


def time_call(fn, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of `mx.eval(fn())`, in ms."""
    for _ in range(warmup):
        mx.eval(fn())
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        _sync()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def time_grouped(fn, groups: int, per_group: int) -> float:
    """Median per-call ms of `per_group` calls built lazily and evaluated together."""
    times = []
    for i in range(groups + 1):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(per_group)])
        _sync()
        if i:  # the first group is a warm-up
            times.append((time.perf_counter() - start) / per_group)
    return 1e3 * statistics.median(times)


def _graph_build_us(fn, calls: int = 50) -> float:
    """Host time to build one call's lazy graph (Python + MLX op construction), no evaluation."""
    start = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    built = time.perf_counter() - start
    mx.eval(outs)
    return 1e6 * built / calls


def _repeats_for(first_ms: float, budget_ms: float, low: int, high: int) -> int:
    return int(min(high, max(low, budget_ms // max(first_ms, 1e-3))))


def device_info() -> dict:
    info = {"mlx": mx.__version__, "device": str(mx.default_device()), "platform": platform.platform()}
    if mx.default_device() == mx.gpu:
        try:
            info.update({k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))})
        except Exception:  # noqa: BLE001 (device_info differs across MLX versions and backends)
            pass
        info["gpu"] = _gpu_name()
    else:
        info["cpu"] = _cpu_name()
        info["cpu_count"] = os.cpu_count()
        info["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    return info


def revision() -> str:
    """The git commit of the code under test (this checkout's HEAD, "+dirty" with uncommitted changes)."""
    import subprocess  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def _gpu_name() -> str:
    try:
        import subprocess  # noqa: PLC0415

        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return str(mx.device_info().get("device_name", "gpu")) if hasattr(mx, "device_info") else "gpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def copy_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write counted), measured here: the bandwidth floor's yardstick."""
    n = 256 * 1024 * 1024 if mx.default_device() == mx.gpu else 32 * 1024 * 1024
    x = mx.zeros((n,), dtype=mx.float16)
    mx.eval(x)
    t = time_call(lambda: x + 1, repeats=20 if mx.default_device() == mx.gpu else 5)
    return 2 * x.nbytes / (t["ms"] * 1e-3)


# ---- attention ----------------------------------------------------------------------------------------


def _mlx_lm_quantized(keys, values, bits):
    from mlx_lm.models.cache import QuantizedKVCache  # noqa: PLC0415

    cache = QuantizedKVCache(group_size=64, bits=bits)
    qk, qv = cache.update_and_fetch(keys, values)
    mx.eval(qk, qv)
    return cache, qk, qv


def _tree_nbytes(tree) -> int:
    if isinstance(tree, (tuple, list)):
        return sum(_tree_nbytes(t) for t in tree)
    return tree.nbytes


def attention_case(shape: dict, tokens: int, series: list, skip: dict, check: bool, budget_ms: float, grouped: bool):
    """Time every series at one context length. Returns rows and, on a GPU, error checks."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: PLC0415

    Hq, Hkv, D = shape["n_q_heads"], shape["n_kv_heads"], shape["head_dim"]
    scale = D**-0.5
    mx.random.seed(tokens)
    keys = (mx.random.normal((1, Hkv, tokens, D)) + 0.3 * mx.random.normal((1, Hkv, 1, D))).astype(mx.float16)
    values = mx.random.normal((1, Hkv, tokens, D)).astype(mx.float16)
    queries = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    mx.eval(keys, values, queries)
    rows, checks = [], []

    def record(name, fn, nbytes, bits, extra=None):
        estimate = skip.get(name)
        if estimate is not None and estimate * tokens / skip[name + "@tokens"] > _max_call_ms():
            rows.append({"series": name, "tokens": tokens, "skipped": True,
                         "estimated_ms": estimate * tokens / skip[name + "@tokens"]})
            return
        try:
            start = time.perf_counter()
            mx.eval(fn())
            _sync()
            first = 1e3 * (time.perf_counter() - start)
            t = time_call(fn, repeats=_repeats_for(first, budget_ms, 2 if first > 5000 else 3, 200),
                          warmup=1 if first > 1000 else 3)
            row = {"series": name, "tokens": tokens, "ms": t["ms"], "min_ms": t["min_ms"], "repeats": t["repeats"],
                   "bytes": nbytes, "effective_bits": bits}
            if grouped and t["ms"] < 50:
                row["throughput_ms"] = time_grouped(fn, groups=5, per_group=20)
                row["graph_build_us"] = _graph_build_us(fn)
            row.update(extra or {})
            rows.append(row)
            skip[name], skip[name + "@tokens"] = t["ms"], tokens
            print(f"  {name:34s} {tokens:>7d}  {t['ms']:10.3f} ms", flush=True)
        except Exception as err:  # noqa: BLE001 (one failing series must not stop the others)
            rows.append({"series": name, "tokens": tokens, "error": f"{type(err).__name__}: {err}"})
            print(f"  {name:34s} {tokens:>7d}  ERROR {err}", flush=True)

    elements = 2 * Hkv * tokens * D
    if "fp16" in series:
        record(FP16_SERIES, lambda: mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale),
               keys.nbytes + values.nbytes, 16.0)
        # As in generation: mlx_lm's KVCache hands SDPA slices of its step-preallocated buffers.
        from mlx_lm.models.cache import KVCache  # noqa: PLC0415

        held = KVCache()
        held.update_and_fetch(keys, values)
        record("mlx_lm KVCache fp16 SDPA (as in generation)",
               lambda: mx.fast.scaled_dot_product_attention(
                   queries, held.keys[..., : held.offset, :], held.values[..., : held.offset, :], scale=scale),
               keys.nbytes + values.nbytes, 16.0)
        del held
    for bits in (4, 8):
        if f"q{bits}" not in series:
            continue
        _, qk, qv = _mlx_lm_quantized(keys, values, bits)
        nbytes = _tree_nbytes(qk) + _tree_nbytes(qv)
        record(f"mlx_lm QuantizedKVCache {bits}-bit",
               lambda qk=qk, qv=qv, bits=bits: quantized_scaled_dot_product_attention(
                   queries, qk, qv, scale=scale, mask=None, group_size=64, bits=bits),
               nbytes, 8 * nbytes / elements)
        del qk, qv
    for label, method, key_bits, value_bits in OURS:
        if label not in series:
            continue
        cache = CompressedKVCache(head_dim=D, n_kv_heads=Hkv, method=method, key_bits=key_bits, value_bits=value_bits)
        cache.append(keys, values)
        nbytes = cache.nbytes
        bits = 8 * nbytes / elements
        backend = _path_name(cache, queries)
        record(f"kvshard {label}", lambda cache=cache: cache.attention(queries, scale=scale), nbytes, bits,
               {"path": backend})
        if method == "turboquant_mse" and backend != "pure" and f"kvshard {label} (pure path)" in series:
            record(f"kvshard {label} (pure path)",
                   lambda cache=cache: _attention(cache, queries, scale, "pure"), nbytes, bits, {"path": "pure"})
        if check and method == "turboquant_mse":
            checks.append(_check(cache, queries, scale, label, tokens))
        del cache
    return rows, checks


def _attention(cache, queries, scale, backend):
    from kvshard.quant.attention import compressed_attention  # noqa: PLC0415

    return compressed_attention(queries, cache.segments(), n_kv_heads=cache.n_kv_heads, key_method=cache.key_quantizer,
                                value_method=cache.value_quantizer, scale=scale, backend=backend)


def _path_name(cache, queries) -> str:
    from kvshard.quant.kernels import dispatch  # noqa: PLC0415

    return dispatch.choose("auto", queries, cache.segments(), cache.key_quantizer, cache.value_quantizer, None)


def _check(cache, queries, scale, label, tokens) -> dict:
    """Max |fast − pure| and |fast − exact attention on the dequantized K/V| for one case."""
    fast = _attention(cache, queries, scale, "auto").astype(mx.float32)
    pure = _attention(cache, queries, scale, "pure").astype(mx.float32)
    k, v = cache.dequantized()
    exact = mx.fast.scaled_dot_product_attention(queries.astype(mx.float32), k.astype(mx.float32),
                                                 v.astype(mx.float32), scale=scale)
    out = {
        "series": f"kvshard {label}",
        "tokens": tokens,
        "path": _path_name(cache, queries),
        "max_abs_err_vs_pure": float(mx.abs(fast - pure).max()),
        "max_abs_err_vs_exact_dequantized": float(mx.abs(fast - exact).max()),
        "pure_max_abs_err_vs_exact_dequantized": float(mx.abs(pure - exact).max()),
        "output_max_abs": float(mx.abs(exact).max()),
    }
    print(f"  check {label} {tokens}: fast-pure {out['max_abs_err_vs_pure']:.2e}  "
          f"fast-exact {out['max_abs_err_vs_exact_dequantized']:.2e}", flush=True)
    return out


def _max_call_ms() -> float:
    return float(os.environ.get("KVSHARD_BENCH_MAX_CALL_MS", "30000"))


def bench_attention(args, tag: str) -> dict:
    gpu = mx.default_device() == mx.gpu
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    bandwidth = copy_bandwidth()
    info = device_info()
    spec = next((v for k, v in SPEC_BANDWIDTH.items() if k in info.get("gpu", "")), None)
    from kvshard.quant import kernels  # noqa: PLC0415
    from kvshard.quant.kernels import gpu  # noqa: PLC0415

    result = {"section": "attention", "device": info, "copy_bandwidth_bytes_per_s": bandwidth,
              "gpu_kernel_config": {"coords_per_lane": gpu.GPU_COORDS or "auto", "unroll": gpu.GPU_UNROLL,
                                    "target_blocks": gpu.GPU_TARGET_BLOCKS, "warps": gpu.GPU_WARPS,
                                    "single_launch": gpu.GPU_SINGLE_LAUNCH},
              "spec_bandwidth_bytes_per_s": spec, "batch": 1, "query_tokens": 1, "shapes": {}, "checks": []}
    fused_pure = [f"kvshard {label} (pure path)" for label, method, *_ in OURS if method == "turboquant_mse"]
    for name, shape in SHAPES.items():
        print(f"attention: {name} {shape}", flush=True)
        skip, rows = {}, []
        for tokens in contexts:
            series = ["fp16", "q4", "q8"] + fused_pure
            # Methods without fused kernels run the portable path: measured up to 32K (4K on a CPU, where each
            # costs minutes per context).
            longest_other = 32768 if gpu else 4096
            series += [label for label, method, *_ in OURS if method == "turboquant_mse" or tokens <= longest_other]
            r, c = attention_case(shape, tokens, series, skip, check=gpu or tokens <= 4096,
                                  budget_ms=args.budget_ms, grouped=gpu)
            rows += r
            result["checks"] += [dict(x, shape=name) for x in c]
        for row in rows:
            if "bytes" in row:
                row["bandwidth_floor_ms"] = 1e3 * row["bytes"] / bandwidth
                if spec:
                    row["spec_bandwidth_floor_ms"] = 1e3 * row["bytes"] / spec
        result["shapes"][name] = {"shape": shape, "rows": rows, "summary": _attention_summary(rows, contexts)}
    _write(args.out, f"attention_{tag}", result)
    _plot_attention(args.out, f"attention_{tag}", result)
    return result


def _attention_summary(rows, contexts) -> list:
    """Per context: ours (k4/v4) against fp16 SDPA and mlx_lm 4-bit, as ratios, with the bandwidth floor."""
    by = {(r["series"], r["tokens"]): r for r in rows if "ms" in r}
    out = []
    for tokens in contexts:
        ours = by.get(("kvshard turboquant_mse k4/v4", tokens))
        fp16 = by.get((FP16_SERIES, tokens))
        q4 = by.get(("mlx_lm QuantizedKVCache 4-bit", tokens))
        if not ours:
            continue
        entry = {"tokens": tokens, "ours_ms": ours["ms"], "ours_effective_bits": ours["effective_bits"],
                 "ours_path": ours.get("path"), "bandwidth_floor_ms": ours.get("bandwidth_floor_ms"),
                 "spec_bandwidth_floor_ms": ours.get("spec_bandwidth_floor_ms")}
        for key in ("throughput_ms",):
            if key in ours:
                entry["ours_" + key] = ours[key]
        if fp16:
            entry["fp16_sdpa_ms"] = fp16["ms"]
            entry["ours_over_fp16"] = ours["ms"] / fp16["ms"]
            if "throughput_ms" in ours and "throughput_ms" in fp16:
                entry["ours_over_fp16_throughput"] = ours["throughput_ms"] / fp16["throughput_ms"]
        if q4:
            entry["mlx_lm_q4_ms"] = q4["ms"]
            entry["speedup_vs_mlx_lm_q4"] = q4["ms"] / ours["ms"]
        if ours.get("bandwidth_floor_ms"):
            entry["ours_over_floor"] = ours["ms"] / ours["bandwidth_floor_ms"]
            if "throughput_ms" in ours:
                entry["ours_throughput_over_floor"] = ours["throughput_ms"] / ours["bandwidth_floor_ms"]
        out.append(entry)
    return out


def bench_tune(args, tag: str) -> dict:
    """GPU only: sweep the split kernel's launch shape at the Llama shape; the JSON lists every configuration."""
    from kvshard.quant import kernels  # noqa: PLC0415
    from kvshard.quant.kernels import gpu  # noqa: PLC0415

    shape = SHAPES["llama-3.1-8b"]
    Hq, Hkv, D = shape["n_q_heads"], shape["n_kv_heads"], shape["head_dim"]
    defaults = (gpu.GPU_COORDS, gpu.GPU_UNROLL, gpu.GPU_TARGET_BLOCKS, gpu.GPU_SINGLE_LAUNCH)
    result = {"section": "tune", "device": device_info(), "shape": shape, "rows": []}
    for tokens in (32768, 131072):
        mx.random.seed(3)
        keys = mx.random.normal((1, Hkv, tokens, D)).astype(mx.float16)
        values = mx.random.normal((1, Hkv, tokens, D)).astype(mx.float16)
        queries = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
        cache = CompressedKVCache(head_dim=D, n_kv_heads=Hkv, key_bits=4, value_bits=4)
        cache.append(keys, values)
        pure = _attention(cache, queries, D**-0.5, "pure").astype(mx.float32)
        for single in (True, False):
            for unroll in (2, 4):
                for blocks in (256, 512, 1024):
                    coords = 16
                    gpu.GPU_COORDS, gpu.GPU_UNROLL, gpu.GPU_TARGET_BLOCKS = coords, unroll, blocks
                    gpu.GPU_SINGLE_LAUNCH = single
                    try:
                        fn = lambda: cache.attention(queries, scale=D**-0.5)  # noqa: E731
                        err = float(mx.abs(fn().astype(mx.float32) - pure).max())
                        t = time_call(fn, repeats=50, warmup=3)
                        row = {"tokens": tokens, "coords": coords, "unroll": unroll, "target_blocks": blocks,
                               "single_launch": single, "ms": t["ms"], "throughput_ms": time_grouped(fn, 5, 20), "max_abs_err_vs_pure": err}
                    except Exception as e:  # noqa: BLE001
                        row = {"tokens": tokens, "coords": coords, "unroll": unroll, "target_blocks": blocks,
                               "single_launch": single, "error": f"{type(e).__name__}: {e}"}
                    result["rows"].append(row)
                    print("tune", row, flush=True)
        del cache, keys, values
    gpu.GPU_COORDS, gpu.GPU_UNROLL, gpu.GPU_TARGET_BLOCKS, gpu.GPU_SINGLE_LAUNCH = defaults
    ok = [r for r in result["rows"] if r["tokens"] == 131072 and "ms" in r and r["max_abs_err_vs_pure"] < 1e-2]
    if ok:
        best = min(ok, key=lambda r: r["throughput_ms"])
        result["best"] = best
        if args.apply_tune:
            gpu.GPU_COORDS, gpu.GPU_UNROLL, gpu.GPU_TARGET_BLOCKS, gpu.GPU_SINGLE_LAUNCH = (
                best["coords"], best["unroll"], best["target_blocks"], best["single_launch"])
            print(f"tune: using {best} for the sections that follow", flush=True)
    _write(args.out, f"tune_{tag}", result)
    return result


def bench_overhead(args, tag: str) -> dict:
    """GPU only: what a launch costs through MLX, to read the attention numbers against (builtin op, custom
    kernel, two chained custom kernels, our one- and two-launch attention at 1K tokens)."""
    from kvshard.quant import kernels  # noqa: PLC0415
    from kvshard.quant.kernels import gpu  # noqa: PLC0415

    x = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    copy = mx.fast.cuda_kernel(name="kvshard_copy", input_names=["inp"], output_names=["out"],
                               source="const int i = blockIdx.x * blockDim.x + threadIdx.x;"
                                      " if (i < inp_size) out[i] = inp[i];".replace("inp_size", str(x.size)))

    def custom(a):
        return copy(inputs=[a], grid=(a.size, 1, 1), threadgroup=(128, 1, 1), output_shapes=[a.shape],
                    output_dtypes=[a.dtype])[0]

    shape = SHAPES["llama-3.1-8b"]
    cache = CompressedKVCache(head_dim=128, n_kv_heads=8)
    cache.append(mx.random.normal((1, 8, 1024, 128)), mx.random.normal((1, 8, 1024, 128)))
    queries = mx.random.normal((1, shape["n_q_heads"], 1, 128)).astype(mx.float16)
    one = mx.random.normal((1, 8, 1, 128)).astype(mx.float16)
    cases = {
        "builtin op (x + 1)": lambda: x + 1,
        "custom kernel (copy)": lambda: custom(x),
        "two chained custom kernels": lambda: custom(custom(x)),
        "kvshard encode_pair, 1 token, 8 kv heads": lambda: kernels.encode_pair(
            cache.key_quantizer, one, cache.value_quantizer, one),
    }
    rows = []
    for single in (True, False):
        gpu.GPU_SINGLE_LAUNCH = single
        cases[f"kvshard attention 1K, {'one launch' if single else 'two launches'}"] = (
            lambda: cache.attention(queries, scale=128**-0.5))
        for name, fn in list(cases.items()):
            if any(r["case"] == name for r in rows):
                continue
            t = time_call(fn, repeats=200, warmup=5)
            rows.append({"case": name, "ms": t["ms"], "throughput_ms": time_grouped(fn, 10, 50),
                         "graph_build_us": _graph_build_us(fn)})
            print("overhead", rows[-1], flush=True)
    gpu.GPU_SINGLE_LAUNCH = True
    result = {"section": "overhead", "device": device_info(), "rows": rows}
    _write(args.out, f"overhead_{tag}", result)
    return result


# ---- append -------------------------------------------------------------------------------------------


def bench_append(args, tag: str) -> dict:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache  # noqa: PLC0415

    result = {"section": "append", "device": device_info(), "shapes": {}}
    chunk = 1024 if args.quick else 4096
    steps = 16 if args.quick else 64
    for name, shape in SHAPES.items():
        Hkv, D = shape["n_kv_heads"], shape["head_dim"]
        mx.random.seed(1)
        keys = mx.random.normal((1, Hkv, chunk, D)).astype(mx.float16)
        values = mx.random.normal((1, Hkv, chunk, D)).astype(mx.float16)
        one_k = keys[:, :, :1]
        one_v = values[:, :, :1]
        mx.eval(keys, values, one_k, one_v)
        makers = {
            "mlx_lm KVCache fp16": (KVCache, lambda c: [c.keys, c.values]),
            "mlx_lm QuantizedKVCache 4-bit": (lambda: QuantizedKVCache(group_size=64, bits=4), lambda c: [c.keys, c.values]),
            "mlx_lm QuantizedKVCache 8-bit": (lambda: QuantizedKVCache(group_size=64, bits=8), lambda c: [c.keys, c.values]),
        }
        for label, method, key_bits, value_bits in OURS:
            makers[f"kvshard {label}"] = (
                lambda method=method, kb=key_bits, vb=value_bits: CompressedKVCache(
                    head_dim=D, n_kv_heads=Hkv, method=method, key_bits=kb, value_bits=vb),
                lambda c: c._arrays(),
            )
        rows = []
        for series, (make, held) in makers.items():
            try:
                def chunk_append(make=make, held=held):
                    cache = make()
                    cache.update_and_fetch(keys, values)
                    return held(cache)

                t_chunk = time_call(chunk_append, repeats=3 if args.quick else 5, warmup=1)
                cache = make()
                cache.update_and_fetch(keys, values)
                mx.eval(held(cache))

                def step(cache=cache, held=held):
                    cache.update_and_fetch(one_k, one_v)
                    return held(cache)

                for _ in range(3):
                    mx.eval(step())
                _sync()
                start = time.perf_counter()
                for _ in range(steps):
                    mx.eval(step())
                _sync()
                per_step = (time.perf_counter() - start) / steps
                rows.append({"series": series, "chunk_tokens": chunk, "chunk_ms": t_chunk["ms"],
                             "chunk_tokens_per_s": chunk / (t_chunk["ms"] * 1e-3),
                             "step_ms": 1e3 * per_step, "step_tokens_per_s": 1 / per_step})
                print(f"append {name:14s} {series:34s} chunk {chunk / (t_chunk['ms'] * 1e-3):12.0f} tok/s   "
                      f"step {1e3 * per_step:8.3f} ms", flush=True)
            except Exception as err:  # noqa: BLE001
                rows.append({"series": series, "error": f"{type(err).__name__}: {err}"})
                print(f"append {series} ERROR {err}", flush=True)
        result["shapes"][name] = {"shape": shape, "rows": rows}
    _write(args.out, f"append_{tag}", result)
    return result


# ---- end-to-end decode --------------------------------------------------------------------------------


def random_smollm2_shape():
    """A random-weight llama with SmolLM2-135M's shape (30 layers, 9 q / 3 kv heads, head_dim 64)."""
    from mlx_lm.models import llama  # noqa: PLC0415

    args = llama.ModelArgs(
        model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    )
    model = llama.Model(args)
    # fp16 on a GPU; fp32 on the CPU, where MLX's fp16 matmuls do not go through BLAS.
    model.set_dtype(mx.float16 if mx.default_device() == mx.gpu else mx.float32)
    mx.eval(model.parameters())
    return model


def _decode_model(args):
    """(model, description): the real embedded model where it can be loaded, else a random one of its shape."""
    if args.model == "random":
        dtype = "fp16" if mx.default_device() == mx.gpu else "fp32"
        return random_smollm2_shape(), f"random-weight llama with SmolLM2-135M's shape ({dtype} weights)"
    try:
        from kvshard.quant.models import load_model  # noqa: PLC0415

        model, _ = load_model("smollm2-135m")
        return model, "SmolLM2-135M-Instruct (embedded GGUF" + (", dequantized to fp32)" if mx.default_device() == mx.cpu else ", 4-bit weights)")
    except Exception as err:  # noqa: BLE001
        print(f"decode: embedded model not loadable ({err}); using random weights", flush=True)
        return random_smollm2_shape(), f"random-weight llama with SmolLM2-135M's shape (embedded model unavailable: {err})"


def _decode_run(model, prompt, new_tokens, make_cache, kv_bits=None):
    from mlx_lm.generate import generate_step  # noqa: PLC0415

    cache = make_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = None
    count = 0
    kwargs = {"kv_bits": kv_bits, "kv_group_size": 64, "quantized_kv_start": 0} if kv_bits else {}
    for token, _ in generate_step(prompt, model, max_tokens=new_tokens, prompt_cache=cache, **kwargs):
        count += 1
        if first is None:
            mx.eval(token)
            first = time.perf_counter()
    mx.synchronize()
    end = time.perf_counter()
    return {"prefill_s": first - start, "decode_tokens_per_s": (count - 1) / (end - first),
            "peak_memory_bytes": mx.get_peak_memory(), "tokens": count}


class _CacheWithoutLazyKV(CompressedKVCache):
    def update_and_fetch(self, keys, values):
        self._store(keys, values)
        return keys, values


def bench_decode(args, tag: str) -> dict:
    from mlx_lm.models.cache import make_prompt_cache  # noqa: PLC0415

    from kvshard.quant.builder import KVCacheBuilder, KVCacheConfig  # noqa: PLC0415

    gpu = mx.default_device() == mx.gpu
    model, description = _decode_model(args)
    contexts = {"short": 128, "long": (16384 if gpu else 2048) if not args.quick else (4096 if gpu else 512)}
    new_tokens = 64 if gpu else 24
    result = {"section": "decode", "device": device_info(), "model": description, "new_tokens": new_tokens, "rows": []}
    variants = [
        ("mlx_lm KVCache fp16", lambda: make_prompt_cache(model), None),
        ("mlx_lm QuantizedKVCache 4-bit", lambda: make_prompt_cache(model), 4),
        ("mlx_lm QuantizedKVCache 8-bit", lambda: make_prompt_cache(model), 8),
        ("kvshard turboquant_mse k4/v4", lambda: KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4)), None),
        ("kvshard turboquant_mse k4/v2",
         lambda: KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4, bit_width_value=2)), None),
    ]
    def without_lazy_kv():
        # Experiment: CompressedKVCache.update_and_fetch builds a lazy graph of the dequantized history at every
        # step (for attention code other than the hook, which never evaluates it). This shows what building it
        # costs: the same caches, returning the new K/V instead (the hook ignores them).
        caches = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4))
        for cache in caches:
            cache.__class__ = _CacheWithoutLazyKV
        return caches

    variants.append(("kvshard turboquant_mse k4/v4, no lazy K/V graph (experiment)", without_lazy_kv, None))
    vocab = model.args.vocab_size
    for context, length in contexts.items():
        mx.random.seed(7)
        prompt = mx.random.randint(0, vocab, (length,)).astype(mx.int32)
        for series, make_cache, kv_bits in variants:
            try:
                _decode_run(model, prompt[:32], 4, make_cache, kv_bits)  # warm-up (compiles kernels)
                row = _decode_run(model, prompt, new_tokens, make_cache, kv_bits)
                row.update({"series": series, "context": context, "prompt_tokens": length})
                result["rows"].append(row)
                print(f"decode {context:5s} {length:6d} {series:32s} {row['decode_tokens_per_s']:8.1f} tok/s  "
                      f"peak {row['peak_memory_bytes'] / 2**20:8.1f} MiB", flush=True)
            except Exception as err:  # noqa: BLE001
                result["rows"].append({"series": series, "context": context, "error": f"{type(err).__name__}: {err}"})
                print(f"decode {series} ERROR {err}", flush=True)
    _write(args.out, f"decode_{tag}", result)
    _plot_decode(args.out, f"decode_{tag}", result)
    return result


class _Shard:
    """`kvshard serve` as a child process on a free loopback port, with its own SQLite store."""

    def __init__(self, store: str, model: str, extra: list):
        import socket  # noqa: PLC0415
        import subprocess  # noqa: PLC0415

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kvshard.service.cli", "serve", "--host", "127.0.0.1", "--port",
                   str(self.port), "--store", store, "--model", model, "--log-format", "console", *extra]
        self.log = open(store.split("///", 1)[1] + f".{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def wait_ready(self, timeout: float = 600.0) -> float:
        from kvshard.client import Client  # noqa: PLC0415

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvshard serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                with Client(self.target, timeout=2) as client:
                    client.server_info()
                return time.perf_counter() - start
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.5)
        raise TimeoutError(f"kvshard serve not ready after {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.process.kill()
        self.log.close()


def _tokens_per_s(stamps: list) -> float:
    """Decode rate between the first and the last token's arrival (the first follows the prefill)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _re_prefill(model, tokens: int, step: int, budget_s: float, samples: int = 4) -> dict:
    """Re-prefill of `tokens` ids into mlx_lm's KVCache, chunk by chunk as generate_step prefills (one model call per
    `step` tokens, then the caches evaluated). Runs for real until `budget_s` is spent; past that, times one chunk at
    each of `samples` offsets spread over the rest (the caches first grown to the offset with random K/V: the same
    work as the real prefill there) and estimates the rest by interpolating chunk time linearly in the offset (a
    chunk's attention grows linearly with the tokens before it)."""
    import numpy as np  # noqa: PLC0415
    from mlx_lm.models.cache import make_prompt_cache  # noqa: PLC0415

    caches = make_prompt_cache(model)
    ids = mx.random.randint(0, model.args.vocab_size, (1, tokens)).astype(mx.int32)

    def chunk(offset: int) -> float:
        start = time.perf_counter()
        model(ids[:, offset : offset + step], cache=caches)
        mx.eval([c.state for c in caches])
        mx.clear_cache()
        return time.perf_counter() - start

    measured, offset, start = [], 0, time.perf_counter()
    while offset < tokens and (not measured or time.perf_counter() - start < budget_s):
        measured.append((offset, chunk(offset)))
        offset += step
    rest = list(range(offset, tokens, step))
    picks = sorted({rest[round(i * (len(rest) - 1) / max(samples - 1, 1))] for i in range(samples)}) if rest else []
    sampled = []
    for at in picks:
        for c in caches:
            shape = (1, c.keys.shape[1], at - c.offset, c.keys.shape[3])
            c.update_and_fetch(mx.random.normal(shape, dtype=c.keys.dtype), mx.random.normal(shape, dtype=c.keys.dtype))
        sampled.append((at, chunk(at)))
    measured_s = sum(s for _, s in measured)
    points = sorted(measured + sampled)
    estimate = measured_s + float(np.interp(rest, [p for p, _ in points], [s for _, s in points]).sum()) if rest else measured_s
    return {"tokens": tokens, "prefill_step_size": step, "complete": not rest, "measured_tokens": offset,
            "measured_s": measured_s, "estimate_s": estimate, "chunks_s": measured, "sampled_chunks_s": sampled}


def bench_service(args, tag: str) -> dict:
    """Generate over gRPC vs in process (alternating rounds), Attend latency by context, resume-from-store vs
    re-prefill of a long session."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from mlx_lm.generate import generate_step  # noqa: PLC0415

    from kvshard.client import Client  # noqa: PLC0415

    from kvshard.quant.builder import KVCacheBuilder, KVCacheConfig  # noqa: PLC0415
    from kvshard.quant.models import load_model  # noqa: PLC0415

    new_tokens, rounds, restarts = (32, 3, 1) if args.quick else (64, 5, 3)
    resume_tokens = args.service_tokens or (4096 if args.quick else 32768)
    prefill_budget = args.service_prefill_s if args.service_prefill_s is not None else (120.0 if args.quick else 600.0)
    contexts = [c for c in (1024, 4096, 16384, 32768) if c <= resume_tokens]
    result = {"section": "service", "device": device_info(), "model": "SmolLM2-135M-Instruct (embedded GGUF)",
              "cache": "turboquant_mse, 4-bit keys and values", "store": "sqlite (WAL)", "load_average_start": os.getloadavg()}
    folder = tempfile.mkdtemp(prefix="kvshard-bench-")
    store = f"sqlite:///{folder}/store.sqlite3"
    limits = ["--max-session-tokens", str(resume_tokens + 1024), "--max-prompt-tokens", "4096",
              "--memory-budget", "4GiB", "--max-tokens", str(new_tokens + 8)]
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    model, _ = load_model("smollm2-135m")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((9, 1, 64)).astype(np.float32)

    shard = _Shard(store, "smollm2-135m", limits)
    try:
        result["server_start_s"] = shard.wait_ready()
        with Client(shard.target, timeout=600) as client:
            # 1. Generate: a streaming Generate on a fresh session vs mlx_lm's generate_step in this process with the
            # same compressed caches and prompt ids. Alternating rounds (the order flipped each round), so load from
            # others on the shared CPU hits both alike; one short warm-up of each first.
            def over_grpc(n):
                session = client.create_session(key_bits=4)
                stamps = [time.perf_counter() for _ in session.generate(prompt, max_tokens=n, ignore_eos=True)]
                ids = session.token_ids()
                session.delete()
                return _tokens_per_s(stamps), ids[: len(ids) - n], ids[len(ids) - n :]

            def in_process(n):
                caches = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4))
                stamps, tokens = [], []
                for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n, prompt_cache=caches):
                    tokens.append(int(token))
                    stamps.append(time.perf_counter())
                return _tokens_per_s(stamps), tokens

            _, prompt_ids, _ = over_grpc(8)
            in_process(8)
            grpc_tps, local_tps = [], []
            for i in range(rounds):
                for run in (("grpc", "local") if i % 2 == 0 else ("local", "grpc")):
                    if run == "grpc":
                        tps, _, grpc_generated = over_grpc(new_tokens)
                        grpc_tps.append(tps)
                    else:
                        tps, tokens = in_process(new_tokens)
                        local_tps.append(tps)
            grpc_median, local_median = statistics.median(grpc_tps), statistics.median(local_tps)
            result["generate"] = {
                "new_tokens": new_tokens, "prompt_tokens": len(prompt_ids), "rounds": rounds,
                "grpc_tokens_per_s": grpc_median, "in_process_tokens_per_s": local_median,
                "grpc_over_in_process": grpc_median / local_median,
                "per_round_ratio": [g / l for g, l in zip(grpc_tps, local_tps)],
                "grpc_runs": grpc_tps, "in_process_runs": local_tps,
                "same_greedy_tokens": tokens == grpc_generated,
                "first_differing_token": next((i for i, (a, b) in enumerate(zip(tokens, grpc_generated)) if a != b), None),
                "note": "medians over alternating rounds (gRPC first in even rounds); tokens/s between the first and "
                        "last token (prefill excluded); in-process: mlx_lm generate_step (what mlx_lm.generate runs) "
                        "with the same compressed caches and prompt token ids; gRPC: a streaming Generate on a "
                        "fresh session, checkpoints committed to SQLite every 8 tokens",
            }
            print("service generate", result["generate"], flush=True)

            # 2. Attend RPC latency by context, call by call alternating with the same attend in process.
            cache = client.create_cache(head_dim=64, n_kv_heads=3, key_bits=4)
            here = CompressedKVCache(head_dim=64, n_kv_heads=3, key_bits=4)
            result["attend"] = {"query_heads": 9, "kv_heads": 3, "head_dim": 64, "calls": 20, "rows": []}
            for context in contexts:
                while len(cache) < context:
                    k = rng.standard_normal((3, min(4096, context - len(cache)), 64)).astype(np.float32)
                    cache.append(k, k)
                    here.append(mx.array(k), mx.array(k))
                rpc, local = [], []
                for i in range(23):  # 3 warm-up calls
                    start = time.perf_counter()
                    cache.attend(q)
                    middle = time.perf_counter()
                    mx.eval(here.attend(mx.array(q)))
                    if i >= 3:
                        rpc.append(middle - start)
                        local.append(time.perf_counter() - middle)
                row = {"tokens": context, "rpc_ms": 1e3 * statistics.median(rpc), "in_process_ms": 1e3 * statistics.median(local)}
                result["attend"]["rows"].append(row)
                print("service attend", row, flush=True)
            attend_session = cache.session_id

            # 3. A long raw session of the model's shape (30 layers), filled through Append and stored.
            layers = client.create_caches(30, head_dim=64, n_kv_heads=3, key_bits=4)
            resume_session = layers[0].session_id
            start = time.perf_counter()
            for chunk in range(0, resume_tokens, 4096):
                kc = rng.standard_normal((3, min(4096, resume_tokens - chunk), 64)).astype(np.float32)
                for layer in layers:
                    layer.append(kc, kc)
            fill_s = time.perf_counter() - start
            stored_bytes = client.get_session(resume_session).stored_bytes

        # The server restarts; after a warm-up Attend on the other session (loads it, compiles the CPU fast
        # path), resume = GetSession + the first Attend on the long session (loads all its layers) - a warm Attend.
        resumes = []
        for _ in range(restarts):
            shard.stop()
            shard = _Shard(store, "smollm2-135m", limits)
            restart_s = shard.wait_ready()
            with Client(shard.target, timeout=600) as client:
                client.session(attend_session)[0].attend(q)
                start = time.perf_counter()
                layer0 = client.session(resume_session)[0]
                layer0.attend(q)
                cold = time.perf_counter() - start
                warm = []
                for _ in range(5):
                    start = time.perf_counter()
                    layer0.attend(q)
                    warm.append(time.perf_counter() - start)
            resumes.append({"server_start_s": restart_s, "first_attend_s": cold, "warm_attend_s": statistics.median(warm),
                            "resume_s": cold - statistics.median(warm)})
            print("service resume", resumes[-1], flush=True)
    finally:
        shard.stop()
    shutil.rmtree(folder)

    # Re-prefill the same number of tokens in process into mlx_lm's KVCache: the cheapest rebuild (into compressed
    # caches, or through the service, costs more), so the speedups are lower bounds.
    prefill = _re_prefill(model, resume_tokens, 512, prefill_budget)
    resume_s = statistics.median(r["resume_s"] for r in resumes)
    result["resume"] = {
        "tokens": resume_tokens, "layers": 30, "stored_bytes": stored_bytes, "fill_over_grpc_s": fill_s,
        "restarts": resumes, "resume_s": resume_s, "re_prefill": prefill,
        "speedup_vs_measured_prefill": prefill["measured_s"] / resume_s,
        "speedup_vs_estimated_prefill": prefill["estimate_s"] / resume_s,
        "note": "resume: median over server restarts; re-prefill: the embedded model in process (no gRPC) into "
                "mlx_lm's KVCache, 512-token chunks; measured_s is the real prefill of the first measured_tokens, "
                "a lower bound of the whole; estimate_s adds the remaining chunks, interpolated from single chunks "
                "timed at sampled offsets (complete: the whole prefill ran for real)",
    }
    result["load_average_end"] = os.getloadavg()
    print("service resume", {k: v for k, v in result["resume"].items() if k != "re_prefill"}, flush=True)
    _write(args.out, f"service_{tag}", result)
    return result


# ---- output -------------------------------------------------------------------------------------------


def _write(folder: str, name: str, data: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    data = dict(data, written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=float)
    print(f"wrote {os.path.join(folder, name + '.json')}", flush=True)


def write_profile_report(out: str, stem: str, profile, settings: dict, results: dict) -> str:
    """The JSON report of a script that measures one calibration profile (passkey.py, long_range.py): when, where,
    which profile, the script's settings and its results, as out/<stem>_<cpu|gpu>.json. Returns that path less
    ".json", for a plot beside it."""
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": device_info(),
        "model": "smollm2-135m",
        "profile": {"name": profile.name, "fingerprint": profile.fingerprint},
        **settings,
        "results": results,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{stem}_{'gpu' if mx.default_device() == mx.gpu else 'cpu'}")
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    return path


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        return plt
    except ImportError:
        print("matplotlib not installed: no PNG", flush=True)
        return None


def _plot_attention(folder, name, result) -> None:
    plt = _pyplot()
    if plt is None:
        return
    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 6.5), squeeze=False)
    order = list(dict.fromkeys(r["series"] for data in shapes.values() for r in data["rows"] if "ms" in r))
    colors = plt.get_cmap("tab20").colors
    for ax, (shape_name, data) in zip(axes[0], shapes.items()):
        series = {}
        for row in data["rows"]:
            if "ms" in row:
                series.setdefault(row["series"], []).append((row["tokens"], row["ms"]))
        for label, points in series.items():
            points.sort()
            style = "-" if label.startswith("kvshard") else "--"
            if "(pure path)" in label:
                style = ":"
            main = label == "kvshard turboquant_mse k4/v4" or label == FP16_SERIES
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label,
                    linewidth=3 if main else 1.2, markersize=5 if main else 3,
                    color=colors[order.index(label) % len(colors)])
        floor = sorted((r["tokens"], r["bandwidth_floor_ms"]) for r in data["rows"]
                       if r.get("series") == "kvshard turboquant_mse k4/v4" and "bandwidth_floor_ms" in r)
        if floor:
            ax.plot([p[0] for p in floor], [p[1] for p in floor], color="gray", linewidth=3, alpha=0.4,
                    label="bandwidth floor of k4/v4 bytes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"{shape_name}: {data['shape']}")
        ax.grid(True, which="both", alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    device = result["device"].get("gpu") or result["device"].get("cpu") or result["device"]["device"]
    fig.suptitle(f"Decode attention, one step, batch 1 — {device} (latency: eval + synchronize per call)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(os.path.join(folder, name + ".png"), dpi=110)
    plt.close(fig)


def _plot_decode(folder, name, result) -> None:
    plt = _pyplot()
    if plt is None:
        return
    rows = [r for r in result["rows"] if "decode_tokens_per_s" in r]
    contexts = sorted({r["context"] for r in rows}, key=lambda c: c != "short")
    series = list(dict.fromkeys(r["series"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(series))
    for i, label in enumerate(series):
        tps = [next((r["decode_tokens_per_s"] for r in rows if r["series"] == label and r["context"] == c), 0) for c in contexts]
        mem = [next((r["peak_memory_bytes"] / 2**20 for r in rows if r["series"] == label and r["context"] == c), 0) for c in contexts]
        xs = [j + i * width for j in range(len(contexts))]
        axes[0].bar(xs, tps, width, label=label)
        axes[1].bar(xs, mem, width, label=label)
    for ax, title in zip(axes, ("decode tokens/s", "peak memory (MiB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))])
        ax.set_xticklabels([f"{c} ({next(r['prompt_tokens'] for r in rows if r['context'] == c)} tokens)" for c in contexts])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"End-to-end decode — {result['model']}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name + ".png"), dpi=110)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------------

SECTIONS = ("attention", "append", "decode", "service")
EXTRA_SECTIONS = ("tune", "overhead")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvshard bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG results")
    parser.add_argument("--quick", action="store_true", help="fewer contexts and repeats (a few minutes on a CPU)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--tag", help="suffix of result files (default: cpu or gpu)")
    parser.add_argument("--budget-ms", type=float, default=None, help="time spent timing each case (default 2000 on GPU, 3000 on CPU)")
    parser.add_argument("--contexts", type=lambda t: tuple(int(x) for x in t.split(",")), default=None,
                        help="attention section: comma-separated context lengths (default 1K,4K,16K,32K,128K)")
    parser.add_argument("--plot-only", action="store_true", help="re-render the PNGs from the JSON already in --out")
    parser.add_argument("--apply-tune", action="store_true", help="after the tune section, use its best launch shape")
    parser.add_argument("--service-tokens", type=int, default=None,
                        help="service section: tokens of the session resumed from the store (default 32768)")
    parser.add_argument("--service-prefill-s", type=float, default=None,
                        help="service section: seconds of real re-prefill before the rest is estimated from sampled "
                             "chunks (default 600; a full 32K prefill takes about an hour on a 2-core CPU)")
    parser.add_argument("--model", choices=("embedded", "random"), default="embedded",
                        help="decode section: the embedded SmolLM2 or a random model of its shape")
    args = parser.parse_args(argv)
    if args.device != "auto":
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    gpu = mx.default_device() == mx.gpu
    tag = args.tag or ("gpu" if gpu else "cpu")
    if args.budget_ms is None:
        args.budget_ms = 2000.0 if gpu else 3000.0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not gpu and "libblas" not in os.environ.get("LD_PRELOAD", "") and sys.platform.startswith("linux"):
        print("note: LD_PRELOAD has no OpenBLAS; MLX's CPU matmuls use the reference BLAS (much slower)", flush=True)
    if args.plot_only:
        for name in sorted(os.listdir(args.out)):
            if name.endswith(".json") and name.startswith(("attention_", "decode_")):
                with open(os.path.join(args.out, name)) as f:
                    data = json.load(f)
                plot = _plot_attention if name.startswith("attention_") else _plot_decode
                plot(args.out, name[:-5], data)
        return 0
    for section in sections:
        if section == "attention":
            bench_attention(args, tag)
        elif section == "tune":
            bench_tune(args, tag)
        elif section == "overhead":
            bench_overhead(args, tag)
        elif section == "append":
            bench_append(args, tag)
        elif section == "decode":
            bench_decode(args, tag)
        elif section == "service":
            bench_service(args, tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
