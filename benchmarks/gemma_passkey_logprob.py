"""Why coding Gemma 3's sliding windows loses the passkey: a graded measure instead of hits out of a few trials.

For passkey prompts of one length (gemma_quality.passkey_batch: equal lengths, one batch), the log-probability the
model gives the right key's digits (teacher-forced after the question), per cache configuration, and the KL of
the next-token distribution at the question's last token from fp16's. Prefill in 2,048-token chunks as
gemma_quality.py's passkey; the answer is scored as one more short chunk that attends over the coded history.

    python benchmarks/gemma_passkey_logprob.py --length 4096 --trials 4 --out FILE.json [--configs "a;b;..."]
"""

import argparse
import dataclasses
import json
import os
import random
import sys
import time

import mlx.core as mx
import numpy as np

from gemma_quality import PREFILL_CHUNK, _head, _machine, _now, global_layers, passkey_batch, sliding_layers
from kvshard.quant import KVCacheBuilder, KVCacheConfig, load_profile
from kvshard.quant import eval as quality
from kvshard.quant.models import load_model
from kvshard.quant.sliding import effective_bits_vs_fp16

PROFILE = os.path.join(os.path.dirname(__file__), "results", "gemma3-270m", "gemma3-270m-all-layers")


def mixed(model, config, coded_layers):
    """A caches factory: `config`'s caches on `coded_layers`, the fp16 baseline's (rotating windows where the
    layer slides) on the others."""
    def make():
        coded, base = KVCacheBuilder.for_model(model, config), quality.baseline_config(model).make_caches()
        return [coded[i] if i in coded_layers else base[i] for i in range(len(base))]
    return make


def configs(model, profile) -> dict:
    """Label -> caches factory. 'X on sliding' codes the sliding layers only (global layers fp16), 'on global'
    the reverse, 'all' every layer; 'sliding values klt' codes the sliding layers' values with their calibrated
    transform (Profile.config's sliding_values="klt", the recipe before 2026-12-04) instead of a rotation."""
    fp16 = quality.baseline_config(model).make_caches
    every, sliding, global_ = set(range(len(model.layers))), set(sliding_layers(model)), set(global_layers(model))
    tq = lambda k, v: KVCacheConfig(method="turboquant_mse", key_bits=k, value_bits=v, seed=42, sliding="compressed")
    rows = {"fp16": fp16}
    for b in (3.5, 2.5):
        rows[f"klt {b} all"] = mixed(model, profile.config(b), every)
        rows[f"klt {b} all, sliding values klt"] = mixed(model, profile.config(b, sliding_values="klt"), every)
    rows["klt 3.5 on global"] = mixed(model, profile.config(3.5), global_)
    for b in (3.5, 5.5):
        rows[f"klt {b} on sliding"] = mixed(model, profile.config(b), sliding)
        rows[f"klt {b} on sliding, sliding values klt"] = mixed(model, profile.config(b, sliding_values="klt"), sliding)
    for k, v in ((8, 8), (4, 4), (8, 4), (4, 8)):
        rows[f"tq k{k}/v{v} on sliding"] = mixed(model, tq(k, v), sliding)
    for b, bits in ((5.5, 4), (3.5, 3)):
        calibrated = profile.config(b, sliding_values="klt")
        rows[f"klt {b} keys, tq {bits}-bit values, on sliding"] = mixed(model, tq_values(calibrated, bits), sliding)
    return rows


def tq_values(config, bits: int):
    """The profile's key plans with turboquant_mse values of `bits` bits (no value plans)."""
    return dataclasses.replace(config, value_plans=None, value_method="turboquant_mse", value_bits=bits)


def score(model, prompts: list, answers: list, caches):
    """Per row: summed log-prob of its answer tokens, and the next-token log-probs at the prompt's last token."""
    ids = mx.array(prompts)
    for start in range(0, ids.shape[1] - 1, PREFILL_CHUNK):
        mx.eval(model.model(ids[:, start : min(start + PREFILL_CHUNK, ids.shape[1] - 1)], cache=caches))
    tail = mx.array([[p[-1]] + a[:-1] for p, a in zip(prompts, answers)])
    logits = _head(model, model.model(tail, cache=caches)).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    target = mx.array(answers)
    picked = mx.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    mx.eval(picked, logp)
    return np.array(picked.sum(axis=1)), np.array(logp[:, 0]), np.array(mx.argmax(logits, axis=-1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default="")
    parser.add_argument("--profile", default=PROFILE)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model("gemma3-270m")
    profile = load_profile(args.profile)
    rng = random.Random(args.seed)
    cases = [(rng.randrange(10000, 100000), (t + 0.5) / args.trials) for t in range(args.trials)]
    prompts = passkey_batch(tokenizer, args.length, cases)
    answers = [tokenizer.encode(f" {key}", add_special_tokens=False) for key, _ in cases]
    if len({len(a) for a in answers}) != 1:
        raise SystemExit("answers of different token counts")
    table = configs(model, profile)
    chosen = [c for c in args.configs.split(";") if c] or list(table)
    results, base = {}, None
    for label in chosen:
        start, caches = time.perf_counter(), table[label]()
        logprob, last, argmax = score(model, prompts, answers, caches)
        if base is None:
            base = last
        kl = (np.exp(base) * (base - last)).sum(axis=-1)
        results[label] = {
            "answer_logprob": logprob.round(3).tolist(), "answer_logprob_mean": float(logprob.mean()),
            "digits_right_teacher_forced": int((argmax == np.array(answers)).sum()),
            "kl_at_question_vs_first": kl.round(4).tolist(),
            "effective_bits": effective_bits_vs_fp16(model, caches, args.length + len(answers[0]), args.trials),
            "seconds": round(time.perf_counter() - start, 1)}
        print(label, json.dumps(results[label]), file=sys.stderr, flush=True)
        with open(args.out, "w") as f:
            json.dump({"date": _now(), "machine": _machine(), "length": args.length, "trials": args.trials,
                       "seed": args.seed, "cases": cases, "answer_tokens": len(answers[0]),
                       "prefill_chunk": PREFILL_CHUNK, "reference": chosen[0], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
