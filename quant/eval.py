"""Real-model quality of KV-cache configurations: chunked perplexity on shipped English text.

Every configuration runs the same token stream through the same model; only the per-layer caches differ.
Reported per configuration and text: ΔPPL % against mlx_lm's `KVCache` holding float16 K/V, top-1
agreement with that run's argmax predictions, and effective bits per stored K/V element (bytes actually
held after the run).

`kvshard eval --out DIR` writes DIR/eval.json and DIR/eval.png.
"""

import argparse
import datetime
import functools
import gzip
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from kvshard.quant.progress import progress as report

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The technical texts are other projects' words, so they are read from the Debian packages that carry them (make
# setup installs them) instead of being shipped: (file, package, where the excerpt starts or None).
PACKAGED_TEXTS = {
    "vim_manual": ("/usr/share/vim/vim90/doc/usr_02.txt", "vim-runtime", None),
    "python_source": ("/usr/lib/python3.11/argparse.py", "libpython3.11-minimal", "class HelpFormatter"),
    "dpkg_triggers_spec": ("/usr/share/doc/dpkg/spec/triggers.txt", "dpkg-dev", None),
    "c_header": ("/usr/include/zlib.h", "zlib1g-dev", "typedef voidpf (*alloc_func)"),
    "valgrind_faq": ("/usr/share/doc/valgrind/FAQ.txt.gz", "valgrind", None),  # questions and answers
}
EXCERPT_CHARS = 14000  # a packaged text's excerpt: at most this many characters, cut at a line end
# Seven texts, none of them among the calibration texts (calibrate/klt.py: calibration_texts); the novels, the C
# header and the FAQ are of domains the calibration does not see at all.
TEXTS = {
    "pride_and_prejudice": "pride_and_prejudice.txt",
    "persuasion": "persuasion.txt",
    **{name: path for name, (path, _, _) in PACKAGED_TEXTS.items()},
}
MLX_AFFINE_BITS = (8, 4, 3, 2)
MLX_AFFINE_GROUP = 64


class Float16KVCache(KVCache):
    """mlx_lm's KVCache holding keys and values as float16 whatever the model computes in (float32 on
    the CPU), like llama.cpp's default f16 cache; attention still runs in the model's dtype."""

    def update_and_fetch(self, keys, values):
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(keys.dtype), v.astype(values.dtype)


class Float16QuantizedKVCache(QuantizedKVCache):
    """mlx_lm's QuantizedKVCache fed float16 keys and values, so its scales and biases are float16:
    bits + 32 / group_size bits per element, as on a float16 model."""

    def update_and_fetch(self, keys, values):
        return super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))


@dataclass
class EvalConfig:
    """One cache configuration: `make_caches()` returns a fresh list of per-layer caches."""

    label: str
    family: str
    make_caches: Callable[[], list]


def load_text(name: str) -> str:
    """An eval text by name (see quant/data/README.md), or a path to any UTF-8 text file."""
    if name in PACKAGED_TEXTS:
        return packaged_excerpt(*PACKAGED_TEXTS[name], name=name)
    path = os.path.join(DATA_DIR, TEXTS[name]) if name in TEXTS else name
    with open(path, encoding="utf-8") as f:
        return f.read()


def packaged_excerpt(path: str, package: str, start: str | None, chars: int = EXCERPT_CHARS, name: str | None = None) -> str:
    """At most `chars` characters of a file that Debian's `package` installs, from the first `start` (or the
    file's beginning), cut at a line end; .gz files are read uncompressed."""
    if not os.path.exists(path):
        raise ValueError(f"text {name or path!r} is read from {path}, which Debian's {package} installs "
                         f"(make setup does; or apt-get install {package})")
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        text = f.read()
    text = text[text.index(start):] if start else text
    return text[: text.rfind("\n", 0, chars) + 1]


def perplexity(model, tokens, make_caches, chunk: int = 256, context: int = 1024) -> dict:
    """Chunked next-token perplexity of the first `context` tokens, attended through `make_caches()`.

    Tokens go through the model `chunk` at a time, so every position after the first chunk attends to
    keys and values read back from the caches. Returns ppl, nll (sum, nats), count (predicted
    positions), predictions (argmax token per predicted position, an int32 mx.array) and caches (the
    filled caches, whose bytes `effective_bits` counts).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tokens = mx.array(tokens[:context]) if not isinstance(tokens, mx.array) else tokens[:context]
    if tokens.size < 2:
        raise ValueError(f"tokens: need at least 2 tokens to predict one, got {tokens.size}")
    caches = make_caches()
    inputs, targets = tokens[:-1], tokens[1:]
    nll = mx.array(0.0, dtype=mx.float32)
    predictions = []
    for start in range(0, inputs.size, chunk):
        logits = model(inputs[None, start : start + chunk], cache=caches)[0].astype(mx.float32)
        target = targets[start : start + chunk]
        nll = nll + nn.losses.cross_entropy(logits, target, reduction="sum")
        predictions.append(mx.argmax(logits, axis=-1).astype(mx.int32))
        mx.eval(nll, predictions[-1])
    count = targets.size
    nll = nll.item()
    return {
        "ppl": math.exp(nll / count),
        "nll": nll,
        "count": count,
        "predictions": mx.concatenate(predictions),
        "caches": caches,
    }


def held_tokens(cache) -> int:
    """Tokens a cache holds: all it was given, except where a sliding window dropped the oldest."""
    if isinstance(cache, RotatingKVCache):
        return 0 if cache.keys is None else min(cache.offset, cache.keys.shape[2])
    return getattr(cache, "held", cache.offset)


def held_bytes(cache) -> int:
    """Bytes a cache holds for its tokens. mlx_lm caches preallocate in steps of 256 tokens, so their
    arrays are counted only up to the tokens held; any other cache reports its own `nbytes`."""
    if isinstance(cache, (KVCache, QuantizedKVCache, RotatingKVCache)):
        if cache.keys is None:
            return 0
        arrays = cache.keys + cache.values if isinstance(cache, QuantizedKVCache) else [cache.keys, cache.values]
        return sum(a[..., : held_tokens(cache), :].nbytes for a in arrays)
    return int(cache.nbytes)


def effective_bits(model, caches) -> float:
    """8 · bytes held / number of K and V elements held (2 · kv_heads · head_dim · tokens held, summed over
    layers: a sliding-window layer holds only its window)."""
    args = model.args
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    elements = 2 * args.num_key_value_heads * head_dim * sum(held_tokens(c) for c in caches)
    return 8 * sum(held_bytes(c) for c in caches) / elements


def baseline_config(model) -> EvalConfig:
    """float16 K/V in the model's own layout: sliding-window layers keep a rotating window."""
    from .sliding import Float16RotatingKVCache, sliding_windows

    return EvalConfig("fp16", "fp16", lambda: [
        Float16RotatingKVCache(max_size=w) if w else Float16KVCache() for w in sliding_windows(model)
    ])


def mlx_affine_configs(model, bits=MLX_AFFINE_BITS, group_size: int = MLX_AFFINE_GROUP) -> List[EvalConfig]:
    """mlx_lm's QuantizedKVCache on full-attention layers; sliding-window layers keep their float16 rotating window
    (mlx_lm has no quantized rotating cache)."""
    from .sliding import Float16RotatingKVCache, sliding_windows

    def make(b):
        return lambda: [
            Float16RotatingKVCache(max_size=w) if w else Float16QuantizedKVCache(group_size=group_size, bits=b)
            for w in sliding_windows(model)
        ]

    return [EvalConfig(f"mlx_lm affine {b}-bit g{group_size}", "mlx_lm affine", make(b)) for b in bits]


# One plain configuration per method (same bits for K and V, nothing else), to compare the methods.
PLAIN = (
    ("turboquant_mse", 4),
    ("turboquant_mse", 3),
    ("turboquant_mse", 2),
    ("turboquant_prod", 4),
    ("turboquant_rvq", 2),
    ("turboquant_rvq", 1),
    ("polar", 4),
    ("qjl", 2),
)
# The budgets, in effective bits per K/V element, for the tuned configuration.
BUDGETS = (4.5, 3.5, 2.5)
PROFILE_BUDGETS = (4.5, 3.5, 2.5, 2.0)
SINK_TOKENS = 4


def _head_dim(model) -> int:
    args = model.args
    return args.head_dim or args.hidden_size // args.num_attention_heads


def tuned_config(model, tokenizer, budget: float, calibration: dict, tokens: int = 1024):
    """kvshard's best recipe under an effective-bit budget: TurboQuant-MSE with key and value bits per layer
    from one RateQuant water-filling over measured sensitivities, query-aware key scales, mean-centred keys
    and 4 fp16 sink tokens.

    Code bits = budget − the fp16 norm (16 / head_dim) − the fp16 sinks, key mean and key scales spread over
    `tokens` (16 · (sinks + 1) / tokens), rounded down to a whole number of layer-bits."""
    from kvshard.quant import KVCacheConfig, allocate_kv_bits_ratequant

    slots = 2 * len(calibration["keys"])
    code_bits = budget - 16 / _head_dim(model) - 16 * (SINK_TOKENS + 1) / tokens
    code_bits = math.floor(code_bits * slots) / slots
    key_bits, value_bits = allocate_kv_bits_ratequant(
        calibration["keys"], calibration["values"], code_bits, beta=calibration["beta"], bit_choices=range(1, 9)
    )
    return KVCacheConfig(
        method="turboquant_mse",
        key_bits=key_bits,
        value_bits=value_bits,
        sink_tokens=SINK_TOKENS,
        key_scales=calibration["key_scales"],
    )


def klt_config(model, budget: float, calibration: dict, tokens: int = 1024):
    """kvshard's transform-coding recipe under an effective-bit budget: the `klt` method with one bit allocation
    over every layer's key and value coordinates (calibrate/klt.py: plan_klt), mean-centred keys and 4 fp16 sink
    tokens. The allocation rounds each token's codes to whole bytes inside the code bits left."""
    from kvshard.quant import KVCacheConfig
    from kvshard.quant.calibrate.klt import plan_klt

    # Per K/V element: the scale byte of each token's keys and values, and the fp16 sinks (keys and values)
    # plus the fp16 key mean, spread over `tokens` tokens.
    code_bits = budget - 8 / _head_dim(model) - 16 * (2 * SINK_TOKENS + 1) / (2 * tokens)
    key_plans, value_plans = plan_klt(calibration["moments"], calibration["keys"], calibration["values"], code_bits)
    return KVCacheConfig(method="klt", sink_tokens=SINK_TOKENS, key_plans=key_plans, value_plans=value_plans)


def calibrate(model, tokenizer) -> dict:
    """Everything the tuned recipe measures on the model, from the calibration prompts (not the eval texts)."""
    from kvshard.quant import calibrate_key_scales, calibrate_layer_sensitivities, fit_distortion_curve
    from kvshard.quant.calibrate.klt import calibration_texts, collect_moments

    return {
        "moments": collect_moments(model, tokenizer, calibration_texts(), skip_tokens=SINK_TOKENS),
        "keys": calibrate_layer_sensitivities(model, tokenizer, target="keys", progress=False),
        "values": calibrate_layer_sensitivities(model, tokenizer, target="values", progress=False),
        "key_scales": calibrate_key_scales(model, tokenizer),
        "beta": fit_distortion_curve("turboquant_mse", _head_dim(model))[1],
    }


def our_configs(model, tokenizer, tokens: int = 1024, sliding: str = "fp16", profile_name: str = "smollm2-135m") -> List[EvalConfig]:
    """kvshard's configurations: each method plain, the tuned and klt recipes at each budget, and the shipped
    profile at its budgets. Calibration runs once, and only if a tuned or klt configuration is actually run.
    `sliding` is what the plain configurations do with sliding-window layers (KVCacheConfig.sliding); the
    calibrated ones cover full-attention layers."""
    from kvshard.quant import KVCacheBuilder, KVCacheConfig, load_profile

    configs = []
    for method, bits in PLAIN:
        config = KVCacheConfig(method=method, key_bits=bits, seed=42, sliding=sliding)
        make = lambda config=config: KVCacheBuilder.for_model(model, config)  # noqa: E731
        configs.append(EvalConfig(f"{method} {bits}-bit", method, make))
    calibration = functools.cache(lambda: calibrate(model, tokenizer))
    for budget in BUDGETS:
        make = lambda budget=budget: KVCacheBuilder.for_model(  # noqa: E731
            model, tuned_config(model, tokenizer, budget, calibration(), tokens)
        )
        configs.append(EvalConfig(f"kvshard tuned <= {budget} bits", "kvshard tuned", make))
    for budget in BUDGETS:
        make = lambda budget=budget: KVCacheBuilder.for_model(  # noqa: E731
            model, klt_config(model, budget, calibration(), tokens)
        )
        configs.append(EvalConfig(f"kvshard klt <= {budget} bits", "kvshard klt", make))
    # The shipped profile, as the service serves it (no calibration at eval time).
    profile = functools.cache(lambda: load_profile(profile_name))
    for budget in PROFILE_BUDGETS:
        make = lambda budget=budget: KVCacheBuilder.for_model(model, profile().config(budget))  # noqa: E731
        configs.append(EvalConfig(f"profile {profile_name} <= {budget} bits", "kvshard profile", make))
    return configs


def compare(model, tokens, configs: List[EvalConfig], chunk: int = 256, progress: str = "") -> List[dict]:
    """Run the fp16 baseline, then every config, on one token stream; rows of ΔPPL, agreement, bits.
    With `progress` set, each finished run is reported on stderr under that name (quant/progress.py)."""
    runs = []
    todo = [baseline_config(model)] + [c for c in configs if c.label != "fp16"]
    for config in report(todo, progress, "config", note=lambda c: f"{c.label}: ppl {runs[-1][1]['ppl']:.3f}") if progress else todo:
        start = time.perf_counter()
        run = perplexity(model, tokens, config.make_caches, chunk, len(tokens))
        runs.append((config, run, time.perf_counter() - start))
    base = runs[0][1]
    return [
        {
            "label": config.label,
            "family": config.family,
            "ppl": run["ppl"],
            "delta_ppl_pct": 100.0 * (run["ppl"] / base["ppl"] - 1.0),
            "top1_agreement": mx.mean(run["predictions"] == base["predictions"]).item(),
            "effective_bits": effective_bits(model, run["caches"]),
            "seconds": seconds,
        }
        for config, run, seconds in runs
    ]


def _mean_rows(per_text: dict) -> List[dict]:
    labels = [r["label"] for r in next(iter(per_text.values()))]
    means = []
    for i, label in enumerate(labels):
        rows = [rows[i] for rows in per_text.values()]
        mean = {"label": label, "family": rows[0]["family"]}
        for key in ("ppl", "delta_ppl_pct", "top1_agreement", "effective_bits", "seconds"):
            mean[key] = sum(r[key] for r in rows) / len(rows)
        means.append(mean)
    return means


def plot(mean_rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = []
    for row in mean_rows:
        if row["family"] != "fp16" and row["family"] not in families:
            families.append(row["family"])
    for family in families:
        rows = sorted((r for r in mean_rows if r["family"] == family), key=lambda r: r["effective_bits"])
        # A log axis cannot show ΔPPL <= 0; such points sit at the floor.
        ys = [max(r["delta_ppl_pct"], 1e-3) for r in rows]
        ax.plot([r["effective_bits"] for r in rows], ys, marker="o", label=family)
        for r, y in zip(rows, ys):
            ax.annotate(r["label"], (r["effective_bits"], y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (bytes held)")
    ax.set_ylabel("ΔPPL % vs fp16 KV cache")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(model, tokenizer, texts, n_tokens: int, chunk: int, configs: List[EvalConfig], start: int = 0) -> dict:
    per_text = {}
    for name in texts:
        tokens = tokenizer.encode(load_text(name), add_special_tokens=False)
        if len(tokens) < start + n_tokens:
            raise ValueError(f"texts: {name!r} has {len(tokens)} tokens, fewer than --start + --tokens {start + n_tokens}")
        per_text[name] = compare(model, tokens[start : start + n_tokens], configs, chunk, progress=name)
    return {"per_text": per_text, "mean": _mean_rows(per_text)}


def _select(configs: List[EvalConfig], wanted: Optional[List[str]]) -> List[EvalConfig]:
    if not wanted:
        return configs
    chosen = [c for c in configs if c.label in wanted or c.family in wanted]
    unknown = set(wanted) - {c.label for c in chosen} - {c.family for c in chosen}
    if unknown:
        known = sorted({c.label for c in configs} | {c.family for c in configs})
        raise ValueError(f"configs: unknown {sorted(unknown)}; known: {known}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvshard eval", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for eval.json and eval.png")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of each text to score")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--start", type=int, default=0, help="token of each text where scoring starts (other passages)")
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), help="shipped text names or file paths")
    parser.add_argument("--configs", nargs="+", help="labels or families to run (default: all)")
    parser.add_argument("--sliding", default="fp16", choices=("fp16", "compressed"),
                        help="plain configurations' sliding-window layers (hybrid models such as gemma3-270m)")
    parser.add_argument("--profile", default="smollm2-135m", help="calibration profile of the 'kvshard profile' family")
    args = parser.parse_args(argv)
    if args.start < 0:
        parser.error(f"--start must be >= 0, got {args.start}")

    from kvshard.quant.models import load_model, model_fingerprint

    model, tokenizer = load_model(args.model)
    configs = _select(mlx_affine_configs(model) + our_configs(model, tokenizer, args.tokens, args.sliding, args.profile), args.configs)
    result = run_eval(model, tokenizer, args.texts, args.tokens, args.chunk, configs, args.start)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
        },
        "model": {"name": args.model, "fingerprint": model_fingerprint(model)},
        "tokens": args.tokens,
        "chunk": args.chunk,
        "start": args.start,
        "texts": args.texts,
        "sliding": args.sliding,
        **result,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(
        report["mean"],
        os.path.join(args.out, "eval.png"),
        f"{args.model}: chunked PPL, {args.tokens} tokens × {len(args.texts)} texts"
        + (f" from token {args.start}" if args.start else "") + f", chunk {args.chunk}",
    )
    for row in report["mean"]:
        print(
            f"{row['label']:<32} bits {row['effective_bits']:6.3f}  ppl {row['ppl']:8.3f}  "
            f"ΔPPL {row['delta_ppl_pct']:+9.2f}%  top-1 {row['top1_agreement']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
