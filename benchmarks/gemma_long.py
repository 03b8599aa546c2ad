"""Long-context quality of compressed caches on Gemma 3 270M (32K context; SmolLM2 fails passkey at ~4K):
passkey retrieval at several lengths and ΔPPL on the late tokens of long windows, fp16 vs compressed, each with
its effective bits per K/V element (8 · bytes held / K+V elements held, after the window).

    python benchmarks/gemma_long.py --text FILE --out benchmarks/results [--lengths 4096 8192 ...] [--trials 20]

The passkey prompt: filler text with "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a random
depth, then "What is the pass key? The pass key is"; success when the greedy continuation (8 tokens) contains the
five digits. Filler and depth come from one seed per trial, the same for every configuration. Results are
written after every length, so a run cut short keeps what it measured.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from kvshard.quant import KVCacheBuilder, KVCacheConfig
from kvshard.quant.eval import SINK_TOKENS, baseline_config, calibrate, effective_bits, held_bytes, klt_config
from kvshard.quant.models import load_model, model_fingerprint

PREFILL = 2048


def configs(model, tokenizer, with_klt: bool):
    """(label, make_caches) pairs; fp16 first."""
    rows = [("fp16", baseline_config(model).make_caches)]
    for sliding in ("fp16", "compressed"):
        config = KVCacheConfig(method="turboquant_mse", bit_width_inlier=4, sink_tokens=SINK_TOKENS, sliding=sliding)
        rows.append((f"turboquant_mse 4-bit, sliding {sliding}", lambda c=config: KVCacheBuilder.for_model(model, c)))
    if with_klt:
        calibration = calibrate(model, tokenizer)
        for budget in (4.5, 3.5, 2.5):
            config = klt_config(model, budget, calibration)
            rows.append((f"klt <= {budget} bits (global layers), sliding fp16",
                         lambda c=config: KVCacheBuilder.for_model(model, c)))
    return rows


def prefill(model, tokens, caches):
    """Run all but the last token through the caches in chunks; return the logits of the last one."""
    for start in range(0, tokens.size - 1, PREFILL):
        mx.eval(model(tokens[None, start : min(start + PREFILL, tokens.size - 1)], cache=caches))
    return model(tokens[None, -1:], cache=caches)[0, -1]


def greedy(model, tokens, caches, steps: int) -> list:
    logits = prefill(model, tokens, caches)
    out = []
    for _ in range(steps):
        token = mx.argmax(logits).item()
        out.append(token)
        logits = model(mx.array([[token]]), cache=caches)[0, -1]
    return out


def passkey_prompt(tokenizer, filler: list, length: int, seed: int):
    rng = random.Random(seed)
    key = f"{rng.randrange(10000, 100000)}"
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    question = tokenizer.encode(" What is the pass key? The pass key is", add_special_tokens=False)
    room = length - len(needle) - len(question) - 1
    start = rng.randrange(0, len(filler) - room)
    hay = filler[start : start + room]
    depth = rng.randrange(0, room)
    return [tokenizer.bos_token_id] + hay[:depth] + needle + hay[depth:] + question, key


def passkey(model, tokenizer, rows, filler, lengths, trials, report, out):
    for length in lengths:
        per_config = {label: {"found": 0, "trials": 0, "effective_bits": None} for label, _ in rows}
        for trial in range(trials):
            tokens, key = passkey_prompt(tokenizer, filler, length, seed=1000 * length + trial)
            for label, make in rows:
                caches = make()
                answer = tokenizer.decode(greedy(model, mx.array(tokens), caches, 8))
                entry = per_config[label]
                entry["found"] += key in answer
                entry["trials"] += 1
                entry["effective_bits"] = effective_bits(model, caches)
                entry["bytes_held"] = sum(held_bytes(c) for c in caches)
            print(f"passkey {length}: trial {trial}: " + ", ".join(f"{k} {v['found']}" for k, v in per_config.items()),
                  file=sys.stderr, flush=True)
        report["passkey"][str(length)] = per_config
        write(report, out)


def late_ppl(model, rows, text_tokens, window: int, scored: int, report, out):
    """NLL of tokens [window − scored, window) of the first `window` tokens, every config."""
    tokens = mx.array(text_tokens[:window])
    base = None
    result = []
    for label, make in rows:
        caches = make()
        start = time.perf_counter()
        for s in range(0, window - scored, PREFILL):
            mx.eval(model(tokens[None, s : min(s + PREFILL, window - scored)], cache=caches))
        nll, count = 0.0, 0
        for s in range(window - scored, window - 1, PREFILL):
            stop = min(s + PREFILL, window - 1)
            logits = model(tokens[None, s:stop], cache=caches)[0].astype(mx.float32)
            nll += nn.losses.cross_entropy(logits, tokens[s + 1 : stop + 1], reduction="sum").item()
            count += stop - s
        ppl = math.exp(nll / count)
        base = base or ppl
        result.append({"label": label, "ppl": ppl, "delta_ppl_pct": 100 * (ppl / base - 1),
                       "effective_bits": effective_bits(model, caches),
                       "bytes_held": sum(held_bytes(c) for c in caches), "seconds": time.perf_counter() - start})
        print(f"late ppl {window}: {label}: {ppl:.3f}", file=sys.stderr, flush=True)
    report["late_ppl"][str(window)] = {"scored_tokens": scored, "rows": result}
    write(report, out)


def write(report, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gemma_long.json"), "w") as f:
        json.dump(report, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="a long UTF-8 text: filler and late-token PPL")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--windows", type=int, nargs="+", default=[16384])
    parser.add_argument("--scored", type=int, default=1024)
    parser.add_argument("--no-klt", action="store_true", help="skip the calibrated klt configurations")
    args = parser.parse_args(argv)
    model, tokenizer = load_model("gemma3-270m")
    with open(args.text, encoding="utf-8") as f:
        text_tokens = tokenizer.encode(f.read(), add_special_tokens=False)
    rows = configs(model, tokenizer, not args.no_klt)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "device": str(mx.default_device()), "mlx": mx.__version__},
        "model": {"name": "gemma3-270m", "fingerprint": model_fingerprint(model)},
        "text": os.path.basename(args.text), "text_tokens": len(text_tokens),
        "configs": [label for label, _ in rows],
        "passkey": {}, "late_ppl": {},
    }
    for window in args.windows:
        late_ppl(model, rows, text_tokens, window, args.scored, report, args.out)
    passkey(model, tokenizer, rows, text_tokens, args.lengths, args.trials, report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
