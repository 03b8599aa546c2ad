"""Passkey retrieval through compressed caches: a 5-digit number hidden at a spread depth of filler text, asked
for at the end; the embedded model greedily completes "The pass key is". Perplexity hides retrieval failures
(a published 2.3-bit method lost 0.33 PPL but 19.9 points on a long-context retrieval suite), so each cache
configuration is scored on the same trials as an fp16 cache.

Trial t of n hides a seeded random key at depth (t + 0.5) / n of the filler; the prompt goes through the model
in chunks of 256 tokens, so later chunks attend to keys and values read back from the codes.

    python benchmarks/passkey.py [--lengths 512 1024 2048] [--trials 20] [--budgets 3.6 2.5] [--out benchmarks/results]
writes passkey_<cpu|gpu>.json (after every configuration and length, so a long run keeps what it measured) and
passkey_<cpu|gpu>.png: per configuration and length, the hits, the trials and the effective bits held.
"""

import argparse
import random
import sys
import time

import mlx.core as mx

from kvshard.quant import KVCacheBuilder, load_model, load_profile
from bench import write_profile_report  # benchmarks/bench.py, beside this script
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dequantize=True)  # dense float32 on any device, as on the CPU
    profile = load_profile(args.profile)
    configs = {"fp16": lambda: [Float16KVCache() for _ in model.layers]}
    for budget in args.budgets:
        config = profile.config(budget)
        configs[f"{args.profile} <= {budget} bits"] = lambda config=config: KVCacheBuilder.for_model(model, config)
    rng = random.Random(args.seed)
    results = {name: {} for name in configs}
    for length in args.lengths:
        trials = [(rng.randrange(10000, 100000), (t + 0.5) / args.trials) for t in range(args.trials)]
        for name, make in configs.items():
            hits, bits, answers = 0, [], []
            start = time.perf_counter()
            for key, depth in trials:
                tokens = prompt_tokens(tokenizer, length, key, depth)
                caches = make()
                text = answer(model, tokenizer, tokens, caches)
                hits += str(key) in text
                answers.append(text)
                bits.append(effective_bits(model, caches))
            results[name][str(length)] = {
                "hits": hits, "trials": len(trials), "prompt_tokens": len(tokens),
                "effective_bits": round(max(bits), 4), "answers": answers, "seconds": time.perf_counter() - start,
            }
            print(f"{length:>5} tokens  {name:<28} {hits}/{len(trials)}  bits {max(bits):.3f}", file=sys.stderr)
            _write(args, profile, results)
    return 0


def _write(args, profile, results: dict) -> None:
    path = write_profile_report(args.out, "passkey", profile,
                                {"trials": args.trials, "lengths": args.lengths, "seed": args.seed, "chunk": CHUNK}, results)
    plot(results, path + ".png", f"passkey retrieval, profile {profile.name}, {args.trials} trials per length")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_length in results.items():
        if by_length:
            lengths = sorted(by_length, key=int)
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
