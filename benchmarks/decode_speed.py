"""End-to-end decode speed and memory of kvshard's caches beside mlx_lm's, and the attention step alone.

    python benchmarks/decode_speed.py --out benchmarks/results            # on the lent GPU: run_gpu.sh
    python benchmarks/decode_speed.py --quick --out /tmp/x                # a small model, short contexts
    python benchmarks/decode_speed.py --plot benchmarks/results           # the PNGs from the JSON, here

Sections, all series side by side in one process (alternating order per round, medians):
  decode     tok/s of greedy decode on a random-weight Llama-3.2-1B-shaped fp16 model (16 layers, 32 q / 8 kv
             heads, head_dim 64) with the caches at 16K / 64K / 128K tokens: mlx_lm KVCache (fp16),
             mlx_lm QuantizedKVCache 4-bit, kvshard turboquant_mse k4/v4, klt (uncalibrated and with a
             synthesised calibrated plan), plus the step's split into host graph building and evaluation, the
             MLX ops per layer and step, and peak memory at 64K. The caches are filled with random K/V of the
             model's shape (what a decode step costs does not depend on the values), not by a 128K prefill.
  attention  one decode step of one layer, Llama-3.1-8B shape (32 q / 8 kv heads, head_dim 128), batch 1 and 8 at
             32K / 128K, and batch 8 with per-row lengths 4K..64K: fp16 SDPA vs the fused kernels.
Effective bits = 8 · bytes held / K+V elements, from each cache's own nbytes.
"""

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from kvshard.quant import KVCacheConfig, install_attention_hook
from kvshard.quant.attention import CodeSegment
from kvshard.quant.cache import WINDOW_BLOCK, CompressedKVCache
from kvshard.quant.kernels import dispatch, gpu
from kvshard.quant.methods.klt import KLTPlan

LLAMA_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, vocab_size=128256,
                rope_theta=500000.0, tie_word_embeddings=True)
QUICK_MODEL = dict(LLAMA_1B, hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024)


def synthetic_plan(n_kv_heads: int, head_dim: int, bits: tuple, norm_bits: int, seed: int) -> KLTPlan:
    """A plan of a calibrated klt's shape (per-head orthogonal analysis, decaying energies): the speed of its
    path does not depend on how the moments were measured."""
    rng = np.random.default_rng(seed)
    analysis = np.stack([np.linalg.qr(rng.normal(size=(head_dim, head_dim)))[0] for _ in range(n_kv_heads)])
    energies = np.sort(rng.uniform(0.05, 4.0, (n_kv_heads, head_dim)), axis=1)[:, ::-1]
    return KLTPlan(analysis, energies, bits, norm_bits)


# Coordinate bits of the recommended configuration: the shipped profile (smollm2-135m, head_dim 64 as the random
# model's) at its recommended budget, per layer, written by --write-recommended-bits (recommended_bits.json).
RECOMMENDED_BITS_FILE = Path(__file__).parent / "recommended_bits.json"
RECOMMENDED = "ours recommended: klt, keys before RoPE, per-layer mixed bits, 8-bit scales, 4 sinks, 16 window"
RECOMMENDED_BARE = "ours recommended without its window: klt, keys before RoPE, per-layer mixed bits, 4 sinks"


def write_recommended_bits(path: Path = RECOMMENDED_BITS_FILE) -> None:
    from kvshard.quant.calibrate.profile import load_profile  # noqa: PLC0415 (here, not on the GPU machine)

    profile = load_profile("smollm2-135m")
    config = profile.config()
    path.write_text(json.dumps({  # one line: a layer's bits are read, not browsed
        "profile": profile.name, "profile_fingerprint": profile.fingerprint, "budget_bits": config.budget_bits,
        "sink_tokens": config.sink_tokens, "window": config.window,
        "norm_bits": [config.key_plans[0].norm_bits, config.value_plans[0].norm_bits],
        "key_bits": [[int(b) for b in p.coordinate_bits] for p in config.key_plans],
        "value_bits": [[int(b) for b in p.coordinate_bits] for p in config.value_plans]}) + "\n")


def recommended_plans(n_kv_heads: int, head_dim: int, layer: int, layers: int, rope_theta: float) -> tuple:
    """(key plan, value plan) of the recommended configuration's shape for one layer of the random model: the
    profile layer at the same depth, its bits and scale bytes, keys before the model's own RoPE."""
    shipped = json.loads(RECOMMENDED_BITS_FILE.read_text())
    at = round(layer * (len(shipped["key_bits"]) - 1) / max(1, layers - 1))
    frequencies = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)
    key_norm, value_norm = shipped["norm_bits"]
    key = synthetic_plan(n_kv_heads, head_dim, tuple(shipped["key_bits"][at]), key_norm, 10 + layer)
    key = KLTPlan(key.analysis, key.energies, key.coordinate_bits, key_norm, frequencies, False)
    return key, synthetic_plan(n_kv_heads, head_dim, tuple(shipped["value_bits"][at]), value_norm, 100 + layer)


def cache_series(n_kv_heads: int, head_dim: int, layers: int, rope_theta: float = LLAMA_1B["rope_theta"]) -> dict:
    """label -> (layer index) -> that layer's cache. Calibrated-plan klt: the same plan for every layer, but
    the recommended configuration's, which differs per layer."""
    uniform = synthetic_plan(n_kv_heads, head_dim, (4,) * head_dim, 16, 1)
    mixed = synthetic_plan(n_kv_heads, head_dim, (6,) * 8 + (5,) * 24 + (4,) * 16 + (2,) * 16, 8, 2)
    ours = lambda **kw: lambda layer=0: CompressedKVCache(head_dim=head_dim, n_kv_heads=n_kv_heads, **kw)  # noqa: E731

    def recommended(layer=0, window=True):
        shipped = json.loads(RECOMMENDED_BITS_FILE.read_text())
        key_plan, value_plan = recommended_plans(n_kv_heads, head_dim, layer, layers, rope_theta)
        return CompressedKVCache(head_dim=head_dim, n_kv_heads=n_kv_heads, method="klt", key_bits=4, value_bits=4,
                                 key_plan=key_plan, value_plan=value_plan, sink_tokens=shipped["sink_tokens"],
                                 window=shipped["window"] if window else 0)

    return {
        "mlx_lm KVCache fp16": lambda layer=0: KVCache(),
        "mlx_lm QuantizedKVCache 4-bit g64": lambda layer=0: QuantizedKVCache(group_size=64, bits=4),
        "ours turboquant_mse k4/v4": ours(key_bits=4, value_bits=4),
        "ours turboquant_mse k2/v2": ours(key_bits=2, value_bits=2),
        "ours turboquant_mse k4/v4 window 128": ours(key_bits=4, value_bits=4, window=128),
        "ours klt k4/v4 uncalibrated": ours(method="klt", key_bits=4, value_bits=4),
        "ours klt calibrated-shape plan, 4 bits/coord, fp16 scale": ours(
            method="klt", key_bits=4, value_bits=4, key_plan=uniform, value_plan=uniform),
        "ours klt calibrated-shape plan, mixed 6/5/4/2 bits, 8-bit scale": ours(
            method="klt", key_bits=4, value_bits=4, key_plan=mixed, value_plan=mixed),
        RECOMMENDED: recommended,
        # The same bits without the fp16 window (the 3.5-bit point measures better in chunked perplexity): on CUDA
        # its newest 1-16 tokens still wait in fp16 and leave for the codes 16 at a time.
        RECOMMENDED_BARE: lambda layer=0: recommended(layer, window=False),
    }


def fill(cache, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1, chunk: int = 4096) -> None:
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        k = mx.random.normal((batch, n_kv_heads, n, head_dim)).astype(mx.float16)
        v = mx.random.normal((batch, n_kv_heads, n, head_dim)).astype(mx.float16)
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)


def effective_bits(caches, n_kv_heads, head_dim) -> float:
    elements = 2 * sum(c.offset for c in caches) * n_kv_heads * head_dim
    held = sum(c.nbytes for c in caches)
    return 8 * held / elements


def ops_per_layer(model, cache) -> dict:
    """MLX primitives in one layer's graph for one decode step (attention module, cache update included)."""
    attn = model.model.layers[0].self_attn
    x = mx.random.normal((1, 1, model.args.hidden_size)).astype(mx.float16)
    mx.eval(x)
    out = attn(x, mask=None, cache=cache)
    path = Path(tempfile.mkdtemp()) / "layer.dot"
    mx.export_to_dot(str(path), out)
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', path.read_text())
    mx.eval(out)
    counts = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return {"ops": len(labels), "by_op": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def step_fn(model, caches):
    def step(y):
        logits = model(y, cache=caches)
        return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
    return step


def time_decode(step, steps: int) -> tuple:
    """(tok/s of `steps` pipelined steps as mlx_lm's generate_step runs them, median host ms to build one
    step's graph, median ms to evaluate a built step)."""
    y = mx.array([[1]])
    y = step(y)
    mx.async_eval(y)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    tok_s = steps / (time.perf_counter() - start)
    build, run = [], []
    for _ in range(8):
        t0 = time.perf_counter()
        out = step(y)
        t1 = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        t2 = time.perf_counter()
        build.append(1e3 * (t1 - t0))
        run.append(1e3 * (t2 - t1))
        y = out
    return tok_s, statistics.median(build), statistics.median(run)


def bench_decode(args) -> dict:
    config = QUICK_MODEL if args.quick else LLAMA_1B
    model = llama.Model(llama.ModelArgs(**config))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    install_attention_hook(model)
    weight_bytes = sum(v.nbytes for _, v in _leaves(model.parameters()))
    H, D, layers = config["num_key_value_heads"], config["head_dim"], config["num_hidden_layers"]
    if args.quick:
        D = config["hidden_size"] // config["num_attention_heads"]
    series = cache_series(H, D, layers)
    if args.series:
        series = {k: v for k, v in series.items() if any(s in k for s in args.series)}
    contexts = [int(c) for c in args.contexts]
    result = {"device": device_info(), "model": config, "weight_bytes": weight_bytes, "steps": args.steps,
              "rounds": args.rounds, "contexts": {}}
    for tokens in contexts:
        row = {}
        built = {}
        for label, make in series.items():
            try:
                caches = [make(i) for i in range(layers)]
                for c in caches:
                    fill(c, H, D, tokens)
                step = step_fn(model, caches)
                # Compile the kernels, mark the caches as read by the hook, and trace every mx.compile graph a step
                # takes (klt's window blocks are coded every WINDOW_BLOCK steps): once per process, not timed.
                y = mx.array([[1]])
                for _ in range(WINDOW_BLOCK + 1):
                    y = step(y)
                    y.item()
                built[label] = (caches, step)
                row[label] = {"ops_per_layer": ops_per_layer(model, caches[0]), "tok_s": [], "build_ms": [],
                              "eval_ms": []}
                if hasattr(caches[0], "nbytes") and isinstance(caches[0], CompressedKVCache):
                    row[label]["effective_bits"] = effective_bits(caches, H, D)
                    row[label]["kv_bytes"] = sum(c.nbytes for c in caches)
            except Exception as err:  # noqa: BLE001 (record what mlx_lm or a path does not support)
                row[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
                built.pop(label, None)
        caches = step = None  # only `built` holds the caches now, so the memory phase can free them
        for r in range(args.rounds):
            order = list(built) if r % 2 == 0 else list(reversed(built))
            for label in order:
                tok_s, build, run = time_decode(built[label][1], args.steps)
                row[label]["tok_s"].append(tok_s)
                row[label]["build_ms"].append(build)
                row[label]["eval_ms"].append(run)
        for label in built:
            rec = row[label]
            rec["median_tok_s"] = statistics.median(rec["tok_s"])
            rec["median_build_ms"] = statistics.median(rec["build_ms"])
            rec["median_eval_ms"] = statistics.median(rec["eval_ms"])
        fp16 = row.get("mlx_lm KVCache fp16", {}).get("median_tok_s")
        fp16_kv = 2 * 2 * layers * H * D * tokens
        for label in built:
            if fp16:
                row[label]["vs_fp16"] = row[label]["median_tok_s"] / fp16
            # What the bytes alone allow: a step reads the weights and the K/V once.
            kv = row[label].get("kv_bytes", fp16_kv)
            row[label]["ceiling_from_bytes_vs_fp16"] = (weight_bytes + fp16_kv) / (weight_bytes + kv)
        result["contexts"][str(tokens)] = row
        if tokens == args.memory_at:
            result["memory"] = bench_memory(model, series, H, D, layers, tokens, built)
        _write(args, "decode", result)  # after every context: a run cut short keeps what it measured
        del built
        mx.clear_cache()
        print(f"decode {tokens}: " + ", ".join(f"{k}: {v.get('median_tok_s', v.get('error', v.get('skipped')))}"
                                               for k, v in row.items()), flush=True)
    return result


def bench_memory(model, series, H, D, layers, tokens, built) -> dict:
    """Peak MLX memory above the weights during 8 decode steps over caches of `tokens` (the caches included), and
    while they were filled (in 4096-token chunks); each series alone, the others' caches freed first."""
    built.clear()
    mx.synchronize()
    mx.clear_cache()
    memory = {"tokens": tokens}
    for label, make in series.items():
        if "Quantized" in label or ("klt" in label and label not in (RECOMMENDED, RECOMMENDED_BARE)):
            continue
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        caches = [make(i) for i in range(layers)]
        for c in caches:
            fill(c, H, D, tokens)
        mx.synchronize()
        fill_peak = mx.get_peak_memory() - base
        mx.reset_peak_memory()
        time_decode(step_fn(model, caches), 8)
        mx.synchronize()
        held = sum(getattr(c, "nbytes", 0) for c in caches)
        memory[label] = {"peak_above_weights_bytes": mx.get_peak_memory() - base, "cache_bytes_held": held,
                         "fill_peak_above_weights_bytes": fill_peak}
        del caches
        mx.synchronize()
        mx.clear_cache()
    fp16 = memory.get("mlx_lm KVCache fp16", {}).get("peak_above_weights_bytes")
    for label, rec in memory.items():
        if isinstance(rec, dict) and fp16:
            rec["peak_vs_fp16"] = rec["peak_above_weights_bytes"] / fp16
    return memory


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix, tree


def time_latency(fn, repeats: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_throughput(fn, per_group: int = 20, groups: int = 7) -> float:
    times = []
    for _ in range(groups + 1):
        t = time.perf_counter()
        mx.eval([fn() for _ in range(per_group)])
        mx.synchronize()
        times.append((time.perf_counter() - t) / per_group)
    return 1e3 * statistics.median(times[1:])


def bench_attention(args) -> dict:
    Hq, H, D = (8, 2, 64) if args.quick else (32, 8, 128)
    contexts = [int(c) for c in args.attention_contexts]
    result = {"device": device_info(), "shape": {"n_q_heads": Hq, "n_kv_heads": H, "head_dim": D}, "cases": []}
    scale = D**-0.5
    for batch in (1, 8):
        for tokens in contexts:
            q = mx.random.normal((batch, Hq, 1, D)).astype(mx.float16)
            k = mx.random.normal((batch, H, tokens, D)).astype(mx.float16)
            v = mx.random.normal((batch, H, tokens, D)).astype(mx.float16)
            mx.eval(q, k, v)
            case = {"batch": batch, "tokens": tokens, "series": {}}
            sdpa = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
            case["series"]["fp16 SDPA"] = {"latency_ms": time_latency(sdpa, args.repeats),
                                           "throughput_ms": time_throughput(sdpa), "effective_bits": 16.0}
            for label, kw in (("ours turboquant_mse k4/v4", dict(key_bits=4, value_bits=4)),
                              ("ours turboquant_mse k2/v2", dict(key_bits=2, value_bits=2)),
                              ("ours klt k4/v4 uncalibrated", dict(method="klt", key_bits=4, value_bits=4))):
                if args.attention_series and not any(s in label for s in args.attention_series):
                    continue
                cache = CompressedKVCache(head_dim=D, n_kv_heads=H, **kw)
                cache.update_and_fetch(k, v)
                mx.eval(cache.state)
                attend = lambda cache=cache: cache.attention(q, scale)  # noqa: E731
                ref = sdpa_on_dequantized(cache, q, scale)
                err = mx.abs(attend().astype(mx.float32) - ref).max().item()
                case["series"][label] = {
                    "latency_ms": time_latency(attend, args.repeats), "throughput_ms": time_throughput(attend),
                    "effective_bits": 8 * cache.nbytes / (2 * batch * H * tokens * D),
                    "kernel": dispatch.gpu_kernel(q, cache.segments()[0], cache.key_quantizer, cache.value_quantizer),
                    "max_abs_err_vs_sdpa_on_dequantized": err}
                del cache
            fp16 = case["series"]["fp16 SDPA"]
            for rec in case["series"].values():
                rec["latency_vs_fp16"] = rec["latency_ms"] / fp16["latency_ms"]
                rec["throughput_vs_fp16"] = rec["throughput_ms"] / fp16["throughput_ms"]
            result["cases"].append(case)
            _write(args, "attention", result)
            print(f"attention b{batch} {tokens}: " + ", ".join(
                f"{k}: {v['latency_ms']:.3f}/{v['throughput_ms']:.3f} ms" for k, v in case["series"].items()), flush=True)
            del k, v
            mx.clear_cache()
    result["ragged"] = bench_ragged(args, Hq, H, D, scale)
    return result


def sdpa_on_dequantized(cache, q, scale):
    keys, values = cache.dequantized()
    return mx.fast.scaled_dot_product_attention(q.astype(mx.float32), keys.astype(mx.float32),
                                                values.astype(mx.float32), scale=scale)


def bench_ragged(args, Hq, H, D, scale) -> dict:
    """Batch 8, rows of 4K..64K tokens (per-row lengths in the kernel) vs every row at the longest length,
    and fp16 SDPA over K/V padded to the longest row with a mask (what a batched fp16 cache does)."""
    lengths = [4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536]
    if args.quick:
        lengths = [n // 16 for n in lengths]
    B, T = len(lengths), max(lengths)
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    k = mx.random.normal((B, H, T, D)).astype(mx.float16)
    v = mx.random.normal((B, H, T, D)).astype(mx.float16)
    mask = (mx.arange(T)[None] < mx.array(lengths)[:, None])[:, None, None, :]
    mx.eval(q, k, v, mask)
    cache = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=4, value_bits=4)
    cache.update_and_fetch(k, v)
    mx.eval(cache.state)
    (segment,) = cache.segments(exact=False)
    km, vm = cache.key_quantizer, cache.value_quantizer
    kernel = dispatch.gpu_kernel(q, segment, km, vm)
    if kernel is None:
        return {"skipped": "no fused GPU kernel on this device"}
    row_lengths = mx.array(lengths, dtype=mx.int32)
    ragged = lambda: gpu.attention(q, segment, km, vm, scale, kernel, row_lengths)[0]  # noqa: E731
    full = lambda: gpu.attention(q, segment, km, vm, scale, kernel)[0]  # noqa: E731
    padded = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # noqa: E731
    # Correctness of the per-row lengths: each row against the portable path over that row's tokens.
    out = ragged()
    errs = []
    for b, n in enumerate(lengths):
        row = CodeSegment({a: c[b:b + 1, :, :n] for a, c in segment.key_codes.items()},
                          {a: c[b:b + 1, :, :n] for a, c in segment.value_codes.items()},
                          segment.key_mean[b:b + 1], n)
        from kvshard.quant.attention import compressed_attention  # noqa: PLC0415
        ref = compressed_attention(q[b:b + 1], [row], n_kv_heads=H, key_method=km, value_method=vm, scale=scale,
                                   backend="pure")
        errs.append(mx.abs(out[b:b + 1].astype(mx.float32) - ref.astype(mx.float32)).max().item())
    return {"lengths": lengths, "kernel": kernel,
            "ours per-row lengths": {"latency_ms": time_latency(ragged, args.repeats),
                                     "throughput_ms": time_throughput(ragged)},
            "ours every row at the longest": {"latency_ms": time_latency(full, args.repeats),
                                              "throughput_ms": time_throughput(full)},
            "fp16 SDPA padded + mask": {"latency_ms": time_latency(padded, args.repeats),
                                        "throughput_ms": time_throughput(padded)},
            "max_abs_err_per_row_vs_portable": max(errs)}


def device_info() -> dict:
    info = {"platform": platform.platform(), "mlx": mx.__version__, "default_device": str(mx.default_device())}
    try:
        info.update({k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))})
    except Exception:  # noqa: BLE001
        pass
    return info


def _write(args, section: str, result: dict) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"speed_{section}_{args.tag}.json").write_text(json.dumps(result, indent=1))


def plot(folder: Path, tag: str = "gpu") -> None:
    """speed_decode_<tag>.png (tok/s per context, fp16 beside ours) and speed_attention_<tag>.png."""
    import matplotlib  # noqa: PLC0415 (only where plots are made)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    decode = json.loads((folder / f"speed_decode_{tag}.json").read_text())
    contexts = list(decode["contexts"])
    labels = [k for k in decode["contexts"][contexts[0]] if "median_tok_s" in decode["contexts"][contexts[0]][k]]
    fig, ax = plt.subplots(figsize=(11, 6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [decode["contexts"][c].get(label, {}).get("median_tok_s", 0) for c in contexts]
        ax.bar([j + i * width for j in range(len(contexts))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [f"{int(c) // 1024}K" for c in contexts])
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(f"Decode, random Llama-3.2-1B-shaped fp16 model, batch 1 — {decode['device'].get('device_name', tag)}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.tight_layout()
    fig.savefig(folder / f"speed_decode_{tag}.png", dpi=110)
    attention = json.loads((folder / f"speed_attention_{tag}.json").read_text())
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cases = attention["cases"]
    series = list(cases[0]["series"])
    width = 0.8 / len(series)
    for i, label in enumerate(series):
        ax.bar([j + i * width for j in range(len(cases))], [c["series"][label]["latency_ms"] for c in cases], width,
               label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))],
                  [f"batch {c['batch']}, {c['tokens'] // 1024}K" for c in cases])
    ax.set_ylabel("ms per decode step of one layer (median latency)")
    ax.set_title(f"Attention, Llama-3.1-8B shape — {attention['device'].get('device_name', tag)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / f"speed_attention_{tag}.png", dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", default="decode,attention")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--contexts", nargs="+", default=["16384", "65536", "131072"])
    parser.add_argument("--attention-contexts", nargs="+", default=["32768", "131072"])
    parser.add_argument("--series", nargs="*", default=None, help="substrings of the decode series to run")
    parser.add_argument("--attention-series", nargs="*", default=None, help="substrings of ours to time in attention")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--memory-at", type=int, default=65536)
    parser.add_argument("--tag", default="gpu" if dispatch.gpu_backend() else "cpu")
    parser.add_argument("--plot", default=None, help="a results folder: draw its PNGs and stop")
    parser.add_argument("--apply-tune", default=None, help="tune_mma_gpu.json: run with its fastest launch shape")
    parser.add_argument("--write-recommended-bits", action="store_true", help=f"write {RECOMMENDED_BITS_FILE.name}")
    args = parser.parse_args(argv)
    if args.write_recommended_bits:
        write_recommended_bits()
        return 0
    if args.plot:
        plot(Path(args.plot), args.tag if args.tag != "cpu" else "gpu")
        return 0
    tuned = None
    if args.apply_tune:
        from tune_mma import apply_best  # noqa: PLC0415 (benchmarks/, beside this script)

        try:
            tuned = apply_best(args.apply_tune)
        except (OSError, ValueError, KeyError) as e:  # a sweep cut short: the defaults, said so
            print(f"no launch shape from {args.apply_tune}: {e}", flush=True)
        print("launch shape from the sweep:", tuned, flush=True)
    for section in args.only.split(","):
        result = {"decode": bench_decode, "attention": bench_attention}[section](args)
        result["mma_launch_shape"] = tuned or {"warps": gpu.GPU_MMA_WARPS, "target_blocks": gpu.GPU_MMA_TARGET_BLOCKS,
                                               "buffers": gpu.GPU_MMA_BUFFERS}
        _write(args, section, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
