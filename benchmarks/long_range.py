"""Long-range use of the cache: ΔPPL on tokens 7,168-8,191 of 8,192-token windows, so that every scored token
attends over at least 7K compressed tokens, for a profile's budgets beside an fp16 cache.

Windows are cut one after another from kvshard eval's texts, joined in order (about 24K tokens: two windows);
`--texts` takes the same texts as files where the Debian packages are not installed (a lent GPU machine). Tokens
go through the model in chunks of 256; only the last `--scored` positions are scored. The model runs dense in
float32 on any device, as on the CPU.

    python benchmarks/long_range.py [--windows 2] [--budgets 4.5 3.6 2.5 2.0] [--out benchmarks/results]
writes long_range_<cpu|gpu>.json (after every configuration, so a long run keeps what it measured): per
configuration, ΔPPL % per window and overall, and the effective bits held.
"""

import argparse
import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from kvshard.quant import KVCacheBuilder, load_model, load_profile
from bench import write_profile_report  # benchmarks/bench.py, beside this script
from kvshard.quant.calibrate.profile import RECOMMENDED_BITS
from kvshard.quant.eval import TEXTS, Float16KVCache, effective_bits, load_text

CHUNK = 256


def window_nll(model, tokens: mx.array, caches, scored: int) -> float:
    """Summed NLL (nats) of the last `scored` next-token predictions of `tokens` through `caches`."""
    inputs, targets = tokens[:-1], tokens[1:]
    first = inputs.size - scored
    nll = 0.0
    for start in range(0, inputs.size, CHUNK):
        logits = model(inputs[None, start : start + CHUNK], cache=caches)[0].astype(mx.float32)
        keep = max(first - start, 0)
        if keep < logits.shape[0]:
            loss = nn.losses.cross_entropy(logits[keep:], targets[start + keep : start + CHUNK], reduction="sum")
            nll += loss.item()
        else:
            mx.eval(logits)
    return nll


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--scored", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.5, RECOMMENDED_BITS, 2.5, 2.0])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), help="eval text names or files, joined in order")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dequantize=True)
    profile = load_profile(args.profile)
    stream = tokenizer.encode("\n\n".join(load_text(name) for name in args.texts), add_special_tokens=False)
    if len(stream) < args.windows * args.window:
        raise SystemExit(f"--windows: the texts hold {len(stream) // args.window} windows of {args.window} tokens")
    windows = [mx.array(stream[i * args.window : (i + 1) * args.window]) for i in range(args.windows)]
    configs = {"fp16": lambda: [Float16KVCache() for _ in model.layers]}
    for budget in args.budgets:
        config = profile.config(budget)
        configs[f"{args.profile} <= {budget} bits"] = lambda config=config: KVCacheBuilder.for_model(model, config)
    rows = {}
    for name, make in configs.items():
        start = time.perf_counter()
        nlls, bits = [], []
        for tokens in windows:
            caches = make()
            nlls.append(window_nll(model, tokens, caches, args.scored))
            bits.append(effective_bits(model, caches))
        rows[name] = {"nll": nlls, "effective_bits": round(max(bits), 4), "seconds": time.perf_counter() - start}
        print(f"{name:<28} ppl {math.exp(sum(nlls) / (args.scored * len(nlls))):.3f}  bits {max(bits):.3f}", file=sys.stderr)
        _write(args, profile, rows)
    return 0


def _write(args, profile, rows: dict) -> None:
    base = rows["fp16"]["nll"]
    for row in rows.values():
        row["delta_ppl_pct_per_window"] = [100 * (math.exp((n - b) / args.scored) - 1) for n, b in zip(row["nll"], base)]
        row["delta_ppl_pct"] = 100 * (math.exp((sum(row["nll"]) - sum(base)) / (args.scored * len(base))) - 1)
    write_profile_report(args.out, "long_range", profile,
                         {"window": args.window, "scored": args.scored, "windows": args.windows, "chunk": CHUNK}, rows)


if __name__ == "__main__":
    raise SystemExit(main())
