"""End-to-end decode of the embedded SmolLM2-135M on the CPU at a long context: mlx_lm's KVCache and
QuantizedKVCache beside kvshard's caches, in one run.

The loop every series runs: the context is prefilled once, in chunks, with mlx_lm's KVCache; each series'
caches then take each layer's K/V in the same chunks (so every series attends over the same
history; a compressed prefill would differ only by its quantization error). With --prefill N < --context the
model prefills N tokens and every cache holds their K/V repeated up to the context: what a decode step costs
depends on how many tokens a cache holds, not on their values, and on this shared CPU an 8K prefill did not
finish in 40 minutes. Then a warm-up, and rounds of
decode steps (model call + greedy token, evaluated) with the order of the series reversed every round, so
that the machine's load drifts over all of them alike. Reported per series: the median step time of all
its steps, tokens/s, its ratio to mlx_lm's KVCache, the same for the process's CPU time per step (all threads:
the steadier measure on a shared machine), peak memory during its steps (`mx.get_peak_memory`, model weights
included) and the bytes its caches hold, with effective bits per K/V element (8 * bytes / elements).

The recommended configuration is the service's default, `load_profile("smollm2-135m").config(budget_bits=3.5)`:
klt with keys coded before RoPE, mixed bits per layer and coordinate, 8-bit scales and 4 fp16 sinks; beside it
the same on 1 kernel thread (by default its kernel calls take both cores at this size), and its plans with keys
coded after RoPE (what the pre-RoPE synthesis costs).
The prompt is the start of Pride and Prejudice (quant/data), repeated to the context length.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/decode_cpu_e2e.py [--context 8192] [--rounds 4] [--steps 8] [--out benchmarks/results]
writes decode_cpu_e2e_<context>.json and .png.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from kvshard.quant import KVCacheBuilder, KVCacheConfig, kernels, load_model
from bench import device_info  # benchmarks/bench.py, beside this script
from kvshard.quant.calibrate.profile import load_profile
from kvshard.quant.eval import Float16KVCache, load_text
from kvshard.quant.kernels import cpu

CHUNK = 512
BASELINE = "mlx_lm KVCache (the model's dtype: fp32 on this CPU)"


RECOMMENDED = "kvshard recommended: profile smollm2-135m at 3.5 bits (klt, keys before RoPE)"


def _keys_after_rope(config):
    """The configuration with its key plans coding keys as given (after RoPE): the same bits and transforms, for
    what the pre-RoPE synthesis costs a step (its quality is not the calibrated one's)."""
    return dataclasses.replace(config, key_plans=[dataclasses.replace(p, rope_frequencies=None) for p in config.key_plans])


def _series(model, window: int, slow: bool) -> dict:
    """name -> (make caches, environment for its steps)."""
    n_layers = len(model.layers)
    recommended = load_profile("smollm2-135m").config(budget_bits=3.5)
    ours = lambda config: (lambda: KVCacheBuilder.for_model(model, config))  # noqa: E731
    series = {
        BASELINE: (lambda: make_prompt_cache(model), {}),
        "mlx_lm KVCache holding fp16 (eval's Float16KVCache)": (lambda: [Float16KVCache() for _ in range(n_layers)],
                                                                {}),
        "mlx_lm QuantizedKVCache 4-bit": (lambda: [QuantizedKVCache(group_size=64, bits=4) for _ in range(n_layers)],
                                          {}),
        "kvshard turboquant_mse k4/v4": (ours(KVCacheConfig(bit_width_inlier=4)), {}),
        "kvshard turboquant_mse k4/v4, kernel on 2 threads": (ours(KVCacheConfig(bit_width_inlier=4)),
                                                              {cpu.ENV_THREADS: "2"}),
        "kvshard turboquant_mse k2/v2": (ours(KVCacheConfig(bit_width_inlier=2)), {}),
        f"kvshard turboquant_mse k4/v4, fp16 window {window}": (ours(KVCacheConfig(bit_width_inlier=4, window=window)),
                                                               {}),
        RECOMMENDED: (ours(recommended), {}),
        "kvshard recommended, kernel on 1 thread": (ours(recommended), {cpu.ENV_THREADS: "1"}),
        "kvshard recommended's plans with keys coded after RoPE (speed only)": (ours(_keys_after_rope(recommended)), {}),
    }
    if slow:
        series["kvshard turboquant_mse k4/v4, portable MLX path"] = (ours(KVCacheConfig(bit_width_inlier=4)),
                                                                     {kernels.ENV_BACKEND: "pure"})
    return series


def _prefill(model, prompt, context: int, saved: str | None) -> list:
    """Per chunk, per layer: the (keys, values) mlx_lm's KVCache holds for `context` tokens; and those caches.
    The model prefills `prompt` (in chunks); a prompt shorter than the context has its K/V repeated up to it
    (decode time does not depend on what the K/V are, only on how many tokens each cache holds). `saved`: a
    safetensors file of the prefilled K/V, written on the first run and read on later ones (the prefill is
    most of a run's time on this CPU; what is timed starts after it)."""
    caches = make_prompt_cache(model)
    if saved and os.path.exists(saved):
        held = mx.load(saved)
        keys, values = [held[f"{i}.keys"] for i in range(len(caches))], [held[f"{i}.values"] for i in range(len(caches))]
        if keys[0].shape[2] != prompt.size:
            raise ValueError(f"{saved} holds {keys[0].shape[2]} tokens, not --prefill {prompt.size}")
    else:
        for start in range(0, prompt.size, CHUNK):
            model(prompt[None, start : start + CHUNK], cache=caches)
            mx.eval([c.state for c in caches])
        keys = [c.keys[:, :, : c.offset] for c in caches]
        values = [c.values[:, :, : c.offset] for c in caches]
        if saved:
            mx.save_safetensors(saved, {f"{i}.{side}": kv[i] for i in range(len(caches))
                                        for side, kv in (("keys", keys), ("values", values))})
        caches = make_prompt_cache(model)
    repeat = -(-context // prompt.size)
    for c, k, v in zip(caches, keys, values):
        c.update_and_fetch(mx.concatenate([k] * repeat, axis=2)[:, :, :context],
                           mx.concatenate([v] * repeat, axis=2)[:, :, :context])
    mx.eval([c.state for c in caches])
    chunks = [[(c.keys[:, :, start : start + CHUNK], c.values[:, :, start : start + CHUNK]) for c in caches]
              for start in range(0, context, CHUNK)]
    return chunks, caches


def _fill(caches, chunks) -> None:
    for chunk in chunks:
        for cache, (keys, values) in zip(caches, chunk):
            cache.update_and_fetch(keys, values)
        mx.eval([c.state for c in caches])


def _held_bytes(caches) -> int:
    return sum(c.nbytes for c in caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per series per round")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--portable", action="store_true", help="add the portable MLX path (several times slower)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prefill", type=int, help="tokens the model prefills (default: the context); the context "
                        "holds their K/V repeated")
    parser.add_argument("--saved-prefill", help="safetensors file: the prefilled K/V, written once and then reused")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    series = _series(model, args.window, args.portable)
    load_before = os.getloadavg()
    tokens = tokenizer.encode(load_text("pride_and_prejudice"))
    while len(tokens) <= args.context:
        tokens = tokens + tokens
    prefill = args.prefill or args.context
    prompt = mx.array(tokens[:prefill])
    started = time.perf_counter()
    chunks, plain = _prefill(model, prompt, args.context, args.saved_prefill)
    print(f"prefill {prefill} tokens, held as {args.context}: {time.perf_counter() - started:.1f} s", flush=True)

    state = {}
    for name, (make, environment) in series.items():
        caches = plain if name == BASELINE else make()
        if caches is not plain:
            _fill(caches, chunks)
        if {c.offset for c in caches} != {args.context}:
            raise RuntimeError(f"{name}: its caches hold {sorted({c.offset for c in caches})} tokens, not {args.context}")
        state[name] = {"caches": caches, "environment": environment, "token": mx.array([tokens[args.context]]), "times": [], "cpu_times": [],
                       "peak": 0, "bytes": _held_bytes(caches)}
    del chunks
    elements = 2 * sum(c.keys[:, :, : c.offset].size for c in plain)  # K and V elements of the context

    def step(s):
        logits = model(s["token"][None], cache=s["caches"])
        s["token"] = mx.argmax(logits[0, -1:], axis=-1)
        mx.eval(s["token"])

    names = list(series)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in names if round_ % 2 else names[::-1]:
            s = state[name]
            os.environ.update(s["environment"])
            mx.synchronize()
            mx.reset_peak_memory()
            for _ in range(args.steps if round_ else 2):
                start, start_cpu = time.perf_counter(), time.process_time()
                step(s)
                if round_:
                    s["times"].append(time.perf_counter() - start)
                    s["cpu_times"].append(time.process_time() - start_cpu)
            s["peak"] = max(s["peak"], mx.get_peak_memory())
            for variable in s["environment"]:
                os.environ.pop(variable)
        print(f"round {round_} done", flush=True)

    base = statistics.median(state[BASELINE]["times"])
    base_cpu = statistics.median(state[BASELINE]["cpu_times"])
    rows = []
    for name in names:
        s = state[name]
        median, median_cpu = statistics.median(s["times"]), statistics.median(s["cpu_times"])
        quartiles = statistics.quantiles(s["times"], n=4)
        rows.append({"series": name, "median_step_ms": 1e3 * median, "q1_ms": 1e3 * quartiles[0],
                     "q3_ms": 1e3 * quartiles[2], "tokens_per_s": 1 / median, "vs_baseline": base / median,
                     "median_step_cpu_ms": 1e3 * median_cpu, "vs_baseline_cpu": base_cpu / median_cpu,
                     "steps": len(s["times"]), "peak_memory_bytes": s["peak"], "cache_bytes": s["bytes"],
                     "effective_bits": 8 * s["bytes"] / elements})
        print(f"{name:56s} {1e3 * median:8.1f} ms  {1 / median:6.2f} tok/s  {base / median:5.2f}x  "
              f"cpu {1e3 * median_cpu:8.1f} ms {base_cpu / median_cpu:5.2f}x  "
              f"peak {s['peak'] / 2**20:7.1f} MiB  {8 * s['bytes'] / elements:5.2f} bits", flush=True)
    result = {"device": device_info(), "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32)",
              "context": args.context, "prefilled_tokens": prefill, "prefill_chunk": CHUNK, "rounds": args.rounds, "steps_per_round": args.steps,
              "baseline": BASELINE,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, f"decode_cpu_e2e_{args.context}")
    with open(name + ".json", "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, name + ".png")


def _plot(result: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(14, 5))
    bars = ax.barh([r["series"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1],
                   color=["#888" if r["series"].startswith("mlx_lm") else "#2a7" for r in rows][::-1])
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['tokens_per_s']:.2f} tok/s, {r['vs_baseline']:.2f}x (CPU time {r['vs_baseline_cpu']:.2f}x), "
                f"{r['effective_bits']:.2f} bits", va="center",
                fontsize=8)
    ax.set_xlabel("decode tokens/s (median step)")
    load = result["load_average_before"][0], result["load_average_after"][0]
    ax.set_title(f"SmolLM2-135M decode at {result['context']} tokens, {result['device'].get('cpu', 'CPU')}, "
                 f"{result['device'].get('cpu_count')} cores, load average {load[0]:.0f} / {load[1]:.0f}", fontsize=10)
    ax.set_xlim(0, max(r["tokens_per_s"] for r in rows) * 2.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
