"""Passkey retrieval through compressed caches: a 5-digit number hidden at a spread depth of filler text, asked
for at the end; the embedded model greedily completes "The pass key is". Perplexity hides retrieval failures
(a published 2.3-bit method lost 0.33 PPL but 19.9 points on a long-context retrieval suite), so each cache
configuration is scored on the same trials as an fp16 cache.

Trial t of n hides a seeded random key at depth (t + 0.5) / n of the filler; the prompt goes through the model
in chunks of 256 tokens, so later chunks attend to keys and values read back from the codes.

    python benchmarks/passkey.py [--lengths 512 1024 2048] [--trials 20] [--budgets 3.6 2.5] [--variant wide=off]
        [--out benchmarks/results]
writes passkey_<cpu|gpu>.json (after every trial, so a run cut short keeps what it measured) and
passkey_<cpu|gpu>.png: per configuration and length, the hits, the trials run and the effective bits held. Each
trial goes through every configuration before the next trial starts. --resume keeps what that file already holds for
the same profile, trial count and seed and runs only the rest: the trials are drawn in the same order either way,
so a resumed run asks what an uninterrupted one would have. --variant measures the profile re-planned as
profile_recipes.py --variants SPEC does; the plot is left out where matplotlib is not installed (a lent GPU machine).
"""

import argparse
import json
import os
import random
import sys
import time

import mlx.core as mx

from kvshard.quant import KVCacheBuilder, load_model, load_profile
from bench import write_profile_report  # benchmarks/bench.py, beside this script
from profile_recipes import variant  # benchmarks/profile_recipes.py, beside this script
from kvshard.quant.calibrate.profile import RECOMMENDED_BITS
from kvshard.quant.eval import Float16KVCache, effective_bits

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
CHUNK = 256
ANSWER_TOKENS = 8


def prompt_tokens(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """About `length` tokens: the intro, filler with the key sentence at `depth`, the question."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer.encode(INTRO + needle + QUESTION, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER * 20, add_special_tokens=False)) / 20
    repeats = max(1, round((length - fixed) / per_filler))
    before = round(repeats * depth)
    text = INTRO + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer.encode(text, add_special_tokens=False)


def answer(model, tokenizer, tokens: list[int], caches) -> str:
    ids = mx.array(tokens)
    for start in range(0, ids.size, CHUNK):
        logits = model(ids[None, start : start + CHUNK], cache=caches)
    generated = []
    for _ in range(ANSWER_TOKENS):
        token = mx.argmax(logits[0, -1]).item()
        generated.append(token)
        logits = model(mx.array([[token]]), cache=caches)
    return tokenizer.decode(generated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[RECOMMENDED_BITS, 2.5], help="profile budgets beside fp16")
    parser.add_argument("--variant", metavar="SPEC", help="the profile re-planned (profile_recipes.py --variants)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out's report (see above)")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dequantize=True)  # dense float32 on any device, as on the CPU
    profile = load_profile(args.profile)
    if args.variant:
        profile = variant(profile, args.variant)
    configs = {"fp16": lambda: [Float16KVCache() for _ in model.layers]}
    for budget in args.budgets:
        config = profile.config(budget)
        configs[f"{args.profile} <= {budget} bits"] = lambda config=config: KVCacheBuilder.for_model(model, config)
    rng = random.Random(args.seed)
    results = {name: {} for name in configs}
    if args.resume:
        results = _measured(args, profile, configs)
    for length in args.lengths:
        trials = [(rng.randrange(10000, 100000), (t + 0.5) / args.trials) for t in range(args.trials)]
        # Trial by trial, every configuration in turn: a run cut short still compares them on the same trials.
        rows = {name: results[name].setdefault(str(length), {"hits": 0, "trials": 0, "answers": [], "seconds": 0.0})
                for name in configs}
        for t, (key, depth) in enumerate(trials):
            tokens = prompt_tokens(tokenizer, length, key, depth)
            for name, make in configs.items():
                row = rows[name]
                if row["trials"] > t:
                    continue
                start = time.perf_counter()
                caches = make()
                text = answer(model, tokenizer, tokens, caches)
                row.update(hits=row["hits"] + (str(key) in text), trials=t + 1, prompt_tokens=len(tokens),
                           effective_bits=round(max(row.get("effective_bits", 0.0), effective_bits(model, caches)), 4),
                           answers=row["answers"] + [text], seconds=row["seconds"] + time.perf_counter() - start)
                _write(args, profile, results)
        for name, row in rows.items():
            print(f"{length:>5} tokens  {name:<28} {row['hits']}/{row['trials']}  bits {row['effective_bits']:.3f}", file=sys.stderr)
    return 0


def _measured(args, profile, configs) -> dict:
    """Per configuration, the rows (whole or partial) that the report in --out holds for this profile, trial count and
    seed, at the lengths asked."""
    path = os.path.join(args.out, f"passkey_{'gpu' if mx.default_device() == mx.gpu else 'cpu'}.json")
    results = {name: {} for name in configs}
    if not os.path.isfile(path):
        return results
    with open(path) as f:
        report = json.load(f)
    if (report["profile"]["fingerprint"], report["trials"], report["seed"]) != (profile.fingerprint, args.trials, args.seed):
        raise SystemExit(f"--resume: {path} was measured with another profile, trial count or seed")
    for name in configs:
        results[name] = {n: row for n, row in report["results"].get(name, {}).items() if int(n) in args.lengths}
    return results


def _write(args, profile, results: dict) -> None:
    path = write_profile_report(args.out, "passkey", profile,
                                {"trials": args.trials, "lengths": args.lengths, "seed": args.seed, "chunk": CHUNK}, results)
    plot(results, path + ".png", f"passkey retrieval, profile {profile.name}, {args.trials} trials per length")


def plot(results: dict, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_length in results.items():
        lengths = sorted((n for n, row in by_length.items() if row["trials"]), key=int)
        if lengths:
            bits = max(by_length[n]["effective_bits"] for n in lengths)
            ax.plot([int(n) for n in lengths], [by_length[n]["hits"] / by_length[n]["trials"] for n in lengths],
                    marker="o", label=f"{name} ({bits:.2f} bits held)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey found (share of trials)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
