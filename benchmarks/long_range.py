"""Long-range use of the cache: ΔPPL on tokens 7,168-8,191 of 8,192-token windows, so that every scored token
attends over at least 7K compressed tokens, for a profile's budgets beside an fp16 cache.

Windows are cut one after another from kvshard eval's texts, joined in order (about 24K tokens: two windows);
`--texts` takes the same texts as files where the Debian packages are not installed (a lent GPU machine). Tokens
go through the model in chunks of 256; every position is scored, and ΔPPL is reported per 1,024 positions of the
window ("delta_ppl_pct_by_position"): whether the loss grows with the number of coded keys attended over, or is
the same early in the window. The headline figure is of the last `--scored` positions. The model runs dense in
float32 on any device, as on the CPU.

    python benchmarks/long_range.py [--windows 2] [--budgets 4.5 3.6 2.5 2.0] [--variants wide=off ...]
        [--planned-tokens 8192] [--recent 0] [--out benchmarks/results]
writes long_range_<cpu|gpu>.json (after every configuration, so a long run keeps what it measured): per
configuration, ΔPPL % per window and overall, and the effective bits held. --variants re-plans the profile
(profile_recipes.py's specs); --planned-tokens plans each budget for a cache of that many tokens (Profile.config's
tokens: the fixed overheads of sinks and key mean spread over them, keys weighed context_key_scale(tokens) times
more) and --recent keeps that many recent tokens in fp16 (its window), both counted in the budget.
"""

import argparse
import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from kvshard.quant import KVCacheBuilder, load_model, load_profile
from bench import write_profile_report  # benchmarks/bench.py, beside this script
from profile_recipes import variant  # benchmarks/profile_recipes.py, beside this script
from kvshard.quant.calibrate.profile import PLANNED_TOKENS, RECOMMENDED_BITS
from kvshard.quant.eval import TEXTS, Float16KVCache, effective_bits, load_text

CHUNK = 256
BUCKET = 1024  # positions per figure of delta_ppl_pct_by_position; a multiple of CHUNK, so a chunk is in one bucket


def window_nll(model, tokens: mx.array, caches) -> list[float]:
    """Summed NLL (nats) of the next-token predictions of `tokens` through `caches`, per BUCKET positions."""
    inputs, targets = tokens[:-1], tokens[1:]
    buckets = [0.0] * -(-inputs.size // BUCKET)
    for start in range(0, inputs.size, CHUNK):
        logits = model(inputs[None, start : start + CHUNK], cache=caches)[0].astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, targets[start : start + CHUNK], reduction="sum")
        buckets[start // BUCKET] += loss.item()
    return buckets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--scored", type=int, default=1024, help="positions of the headline figure (a multiple of 1024)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.5, RECOMMENDED_BITS, 2.5, 2.0])
    parser.add_argument("--variants", nargs="+", default=[], metavar="SPEC", help="re-plans (profile_recipes.py --variants)")
    parser.add_argument("--no-shipped", action="store_true", help="measure only the --variants, not the profile itself")
    parser.add_argument("--planned-tokens", type=int, default=PLANNED_TOKENS)
    parser.add_argument("--recent", type=int, help="fp16 recent tokens (default: the profile's for its budget)")
    parser.add_argument("--control", type=int, default=0,
                        help="also score the same late tokens with only this many tokens of context (0: not)")
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), help="eval text names or files, joined in order")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="long_range", help="the report is OUT/STEM_<cpu|gpu>.json")
    args = parser.parse_args()
    if args.scored % BUCKET or not 0 < args.scored < args.window:
        parser.error(f"--scored must be a multiple of {BUCKET} below --window, got {args.scored}")
    if args.control and (args.control % BUCKET or not args.scored < args.control < args.window):
        parser.error(f"--control must be a multiple of {BUCKET} between --scored and --window, got {args.control}")

    model, tokenizer = load_model("smollm2-135m", dequantize=True)
    profile = load_profile(args.profile)
    profiles = {} if args.no_shipped else {args.profile: profile}
    profiles.update({f"{args.profile}:{spec}": variant(profile, spec) for spec in args.variants})
    stream = tokenizer.encode("\n\n".join(load_text(name) for name in args.texts), add_special_tokens=False)
    if len(stream) < args.windows * args.window:
        raise SystemExit(f"--windows: the texts hold {len(stream) // args.window} windows of {args.window} tokens")
    windows = [stream[i * args.window : (i + 1) * args.window] for i in range(args.windows)]
    # The control: the same scored tokens, each window cut to its last --control tokens.
    contexts = {"": windows, **({f" @{args.control}": [w[-args.control :] for w in windows]} if args.control else {})}
    configs = {"fp16": (lambda: [Float16KVCache() for _ in model.layers], None)}
    for label, p in profiles.items():
        for budget in args.budgets:
            config = p.config(budget, tokens=args.planned_tokens, window=args.recent)
            configs[f"{label} <= {budget} bits"] = (lambda config=config: KVCacheBuilder.for_model(model, config), p)
    rows = {}
    for name, (make, p) in configs.items():
        for suffix, cut in contexts.items():
            start = time.perf_counter()
            nlls, bits = [], []
            for tokens in cut:
                caches = make()
                nlls.append(window_nll(model, mx.array(tokens), caches))
                bits.append(effective_bits(model, caches))
            rows[name + suffix] = {"context": len(cut[0]), "nll_by_position": nlls, "effective_bits": round(max(bits), 4),
                                   "seconds": time.perf_counter() - start,
                                   "fingerprint": None if p is None else p.fingerprint}
            late = sum(sum(n[-args.scored // BUCKET :]) for n in nlls) / (_late_count(args, len(cut[0])) * len(nlls))
            print(f"{name + suffix:<48} late ppl {math.exp(late):.3f}  bits {max(bits):.3f}", file=sys.stderr)
            _write(args, profile, rows)
    return 0


def _counts(context: int) -> list[int]:
    """Predictions per bucket of a window of `context` tokens (the last token predicts none)."""
    return [min(BUCKET, context - 1 - start) for start in range(0, context - 1, BUCKET)]


def _late_count(args, context: int) -> int:
    return sum(_counts(context)[-args.scored // BUCKET :])


def _write(args, profile, rows: dict) -> None:
    """ΔPPL of each row against the fp16 row of its context: of the late tokens (per window and overall) and per
    bucket of positions."""
    late = args.scored // BUCKET
    for row in rows.values():
        row["nll"] = [sum(n[-late:]) for n in row["nll_by_position"]]
    fp16 = {row["context"]: row for name, row in rows.items() if name.startswith("fp16")}
    for row in rows.values():
        base, scored = fp16[row["context"]], _late_count(args, row["context"])
        windows = len(base["nll"])
        row["delta_ppl_pct_per_window"] = [100 * (math.exp((n - b) / scored) - 1) for n, b in zip(row["nll"], base["nll"])]
        row["delta_ppl_pct"] = 100 * (math.exp((sum(row["nll"]) - sum(base["nll"])) / (scored * windows)) - 1)
        row["delta_ppl_pct_by_position"] = [
            100 * (math.exp(sum(n[i] - b[i] for n, b in zip(row["nll_by_position"], base["nll_by_position"]))
                            / (count * windows)) - 1)
            for i, count in enumerate(_counts(row["context"]))]
    settings = {"window": args.window, "scored": args.scored, "windows": args.windows, "chunk": CHUNK,
                "bucket": BUCKET, "planned_tokens": args.planned_tokens, "recent": args.recent, "variants": args.variants,
                "control": args.control}
    write_profile_report(args.out, args.stem, profile, settings, rows)


if __name__ == "__main__":
    raise SystemExit(main())
