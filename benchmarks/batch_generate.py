"""mlx_lm's batch_generate over kvshard caches beside the same prompts generated one after another, in one run.

The embedded SmolLM2-135M, N prompts of different lengths (the start of Pride and Prejudice cut at 16..96
tokens), greedy, the same new tokens per prompt. Series: mlx_lm's KVCache and kvshard turboquant_mse k4/v4, each
(a) one prompt at a time with generate_step and (b) all N in one batch_generate. Rounds alternate the order of
the series so that the machine's load drifts over all of them alike; reported per series: the median over rounds
of the wall time of the whole job (prefill included) and aggregate generated tokens/s, the batched/sequential
ratio, and the kvshard caches' effective bits per K/V element (8 * bytes held / elements) at the end.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/batch_generate.py [--prompts 8] [--tokens 10] [--rounds 3] [--out benchmarks/results]
writes batch_generate_<cpu|gpu>.json.
"""

import argparse
import json
import os
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import batch_generate, generate_step
from mlx_lm.models.cache import KVCache

from bench import device_info  # benchmarks/bench.py, beside this script
from kvshard.quant import KVCacheBuilder, KVCacheConfig, load_model
from kvshard.quant.eval import effective_bits, load_text


def run_sequential(model, prompts, tokens, make):
    start, caches = time.perf_counter(), None
    for prompt in prompts:
        caches = make()
        for _ in generate_step(mx.array(prompt), model, max_tokens=tokens, prompt_cache=caches):
            pass
    return time.perf_counter() - start, caches


def run_batched(model, tokenizer, prompts, tokens, make):
    model.make_cache = make
    try:
        start = time.perf_counter()
        result = batch_generate(model, tokenizer, prompts, max_tokens=tokens, return_prompt_caches=True)
        return time.perf_counter() - start, result.caches[-1]
    finally:
        del model.make_cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    text = tokenizer.encode(load_text("pride_and_prejudice"))
    lengths = [16 + (96 - 16) * i // max(1, args.prompts - 1) for i in range(args.prompts)]
    prompts = [text[:n] for n in lengths]
    config = KVCacheConfig(method="turboquant_mse", bit_width_inlier=4)
    makes = {"mlx_lm KVCache": lambda: [KVCache() for _ in model.layers],
             "kvshard turboquant_mse k4/v4": lambda: KVCacheBuilder.for_model(model, config)}
    series = [(name, mode) for name in makes for mode in ("sequential", "batched")]
    times, held = {s: [] for s in series}, {}
    for round_ in range(args.rounds):
        for name, mode in series if round_ % 2 == 0 else series[::-1]:
            if mode == "sequential":
                seconds, caches = run_sequential(model, prompts, args.tokens, makes[name])
            else:
                seconds, caches = run_batched(model, tokenizer, prompts, args.tokens, makes[name])
            times[(name, mode)].append(seconds)
            held[name] = caches
            print(f"round {round_}: {name}, {mode}: {seconds:.2f} s", flush=True)

    generated = args.prompts * args.tokens
    results = []
    for name, mode in series:
        median = statistics.median(times[(name, mode)])
        sequential = statistics.median(times[(name, "sequential")])
        results.append({"caches": name, "mode": mode, "seconds": times[(name, mode)], "median_s": median,
                        "tokens_per_s": generated / median, "speedup_over_sequential": sequential / median})
    bits = effective_bits(model, held["kvshard turboquant_mse k4/v4"])
    report = {
        "what": "batch_generate of N prompts vs the same prompts one at a time (generate_step), whole job incl. prefill",
        "model": "smollm2-135m", "prompt_tokens": lengths, "new_tokens_per_prompt": args.tokens, "rounds": args.rounds,
        "kvshard_effective_bits": bits, "load_average": os.getloadavg(), "device": device_info(), "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"batch_generate_{'gpu' if mx.default_device() == mx.gpu else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for r in results:
        print(f"{r['caches']:32s} {r['mode']:10s} {r['median_s']:7.2f} s  {r['tokens_per_s']:6.2f} tok/s  "
              f"x{r['speedup_over_sequential']:.2f}")
    print(f"kvshard effective bits {bits:.3f}; load average {os.getloadavg()}; wrote {path}")


if __name__ == "__main__":
    main()
