"""Decode speed of Gemma 3 270M with fp16 vs compressed caches at long contexts, and the bytes they hold.

    python benchmarks/gemma_decode.py --out benchmarks/results [--contexts 8192 32768] [--steps 16] [--profile P]

A decode step's time depends on how many tokens each cache holds, not on their values, and a 32K prefill of the
real model takes far longer on this shared 2-core CPU than the decode steps measured: every cache is therefore
filled with random K/V (the global layers with the whole context, sliding-window layers with their window) and
then the real model decodes. Configurations alternate step by step (ABAB…) so that machine noise hits them alike;
medians of `--steps` steps after `--warmup`. Output: gemma_decode_<device>.json (+ .png).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig, load_profile
from kvshard.quant.eval import Float16KVCache, Float16QuantizedKVCache, effective_bits, held_bytes
from kvshard.quant.models import load_model
from kvshard.quant.sliding import Float16RotatingKVCache, effective_bits_vs_fp16

FILL_CHUNK = 4096


def configs(model, profile=None):
    layout = [c.max_size if isinstance(c, RotatingKVCache) else None for c in model.make_cache()]

    def ours(**kw):
        return lambda: KVCacheBuilder.for_model(model, KVCacheConfig(method="turboquant_mse", key_bits=4, **kw))

    return {
        "fp16": lambda: [Float16RotatingKVCache(max_size=w) if w else Float16KVCache() for w in layout],
        "mlx_lm affine 4-bit g64 (global), sliding fp16": lambda: [
            Float16RotatingKVCache(max_size=w) if w else Float16QuantizedKVCache(group_size=64, bits=4) for w in layout
        ],
        "turboquant_mse 4-bit, sliding fp16": ours(sliding="fp16"),
        "turboquant_mse 4-bit, sliding compressed": ours(sliding="compressed"),
        **({} if profile is None else {
            f"profile {profile.name} <= 3.5 bits (global), sliding fp16":
                lambda: KVCacheBuilder.for_model(model, profile.config(3.5, sliding="fp16")),
            **({f"profile {profile.name} <= 3.5 bits, all layers (sliding compressed)":
                lambda: KVCacheBuilder.for_model(model, profile.config(3.5))} if profile.sliding_layers else {}),
        }),
    }


def fill(caches, model, context: int):
    """Give every cache `context` tokens of random K/V (a sliding one keeps its window), as a prefill would."""
    attn = model.layers[0].self_attn
    shape = (1, attn.n_kv_heads, 0, attn.head_dim)
    for start in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - start)
        key = mx.random.key(start)
        k = mx.random.normal((*shape[:2], n, shape[3]), key=key).astype(mx.float16)
        v = mx.random.normal((*shape[:2], n, shape[3]), key=mx.random.split(key)[0]).astype(mx.float16)
        for cache in caches:
            if isinstance(cache, CompressedKVCache):
                cache.append(k, v)
            else:
                mx.eval(cache.update_and_fetch(k, v))


def step(model, caches, token):
    start = time.perf_counter()
    mx.eval(model(token, cache=caches))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", help="a Gemma profile (name or folder) whose 3.5-bit configurations are timed too")
    parser.add_argument("--name", help="output file name without .json (default gemma_decode_<device>)")
    args = parser.parse_args(argv)
    model, _ = load_model("gemma3-270m")
    profile = load_profile(args.profile) if args.profile else None
    token = mx.array([[818]])
    rows = []
    for context in args.contexts:
        made = {}
        for label, make in configs(model, profile).items():
            caches = make()
            fill(caches, model, context)
            made[label] = caches
        times = {label: [] for label in made}
        for i in range(args.warmup + args.steps):
            order = list(made) if i % 2 == 0 else list(reversed(made))
            for label in order:
                seconds = step(model, made[label], token)
                if i >= args.warmup:
                    times[label].append(seconds)
        for label, caches in made.items():
            median = statistics.median(times[label])
            rows.append({
                "context": context, "label": label, "median_step_s": median, "tokens_per_s": 1 / median,
                "bytes_held": sum(held_bytes(c) for c in caches), "bits_per_held_element": effective_bits(model, caches),
                "effective_bits": effective_bits_vs_fp16(model, caches, context),
                "steps": len(times[label]),
            })
            print(f"{context}: {label}: {1 / median:.2f} tok/s, {rows[-1]['bytes_held'] / 2**20:.1f} MiB", flush=True)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(mx.default_device()),
                    "mlx": mx.__version__, "load_average": os.getloadavg(),
                    "note": "2 CPU cores shared with other jobs"},
        "model": "gemma3-270m (float32 weights)",
        "method": "caches filled with random K/V, then the real model decodes; configs alternate per step",
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"gemma_decode_{device}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(rows, os.path.join(args.out, f"{name}.png"), report["machine"]["device"])
    return 0


def plot(rows, path, device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        got = {r["context"]: r for r in rows if r["label"] == label}
        xs = [i + j * width for i in range(len(contexts))]
        axes[0].bar(xs, [got[c]["tokens_per_s"] for c in contexts], width, label=label)
        axes[1].bar(xs, [got[c]["bytes_held"] / 2**20 for c in contexts], width, label=label)
    for ax, title in zip(axes, ("decode tok/s (median)", "MiB held by the caches")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(contexts))], [f"{c // 1024}K" for c in contexts])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Gemma 3 270M decode, {device}: fp16 vs compressed caches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
