"""What each part of a profile's recipe buys, at equal effective bits: ΔPPL per text against an fp16 cache
(kvshard eval's chunked perplexity, chunk 256) for profiles and fp16 windows side by side, on one token stream
per text, with the effective bits really held.

    python benchmarks/profile_recipes.py --profiles licences=DIR multi=smollm2-135m --windows 0 16 \\
        --budgets 2.5 3.5 [--texts ...] [--out benchmarks/results/profile_recipes.json]

Each configuration is a profile (name=folder or shipped name) at a budget with a window of fp16 recent tokens,
the window counted in the budget (Profile.config(budget, window=)).

--after-rope LABEL=PROFILE adds PROFILE with its key moments measured again on its own calibration texts, keys as
the model caches them (after RoPE), and its sensitivities kept: what `kvshard calibrate --keys-after-rope` makes,
less the measuring (sensitivities are probed with plain TurboQuant, which knows no RoPE). --after-rope-out DIR
saves it; --calibration-texts gives its texts as files where the Debian packages are not installed (a lent GPU
machine); with --texts and nothing after it, the script only builds. The model runs dense in float32 on any device.

--variants SPEC... adds re-plans of every --profiles profile from its stored moments and sensitivities, no
recalibration: keys=A (key costs times A, Profile.key_cost_scale: the balance of keys against values; scale=A sets
the key cost scale to A, as `kvshard calibrate --measure --key-cost-scale A` does), temper=G (every layer weight to
the power G: G < 1 trusts the probed sensitivities less), shrink=S (key and value moments shrunk by S instead of
klt.SHRINKAGE), wide=on|off (Profile.wide_codebook), sinks=N (Profile.sink_tokens); specs joined by "+" combine
(wide=off+keys=1.2). Each is labelled LABEL:SPEC.

With --decode N the last N tokens of each text's stream are fed one at a time after a chunked prefill of the rest,
and only they are scored: as in generation, each predicted token then sees the window's fp16 tokens (in a chunk of
256, only its last `window` queries do, so chunked perplexity charges a window's bytes without its benefit).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import device_info  # noqa: E402

from kvshard.quant import KVCacheBuilder, Profile, load_model, load_profile, save_profile  # noqa: E402
from kvshard.quant import eval as quality  # noqa: E402
from kvshard.quant.calibrate.klt import calibration_texts, collect_moments, decompose  # noqa: E402
from kvshard.quant.calibrate.profile import SINK_TOKENS, replanned  # noqa: E402

CHUNK = 256  # kvshard eval's chunk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="*", default=[], help="LABEL=PROFILE (a shipped name or a folder)")
    parser.add_argument("--after-rope", nargs="+", default=[], metavar="LABEL=PROFILE",
                        help="PROFILE with key moments measured after RoPE (see above)")
    parser.add_argument("--after-rope-out", help="folder to save the one --after-rope profile in")
    parser.add_argument("--calibration-texts", nargs="+", help="--after-rope's texts as files (default: calibration_texts())")
    parser.add_argument("--variants", nargs="+", default=[], metavar="SPEC", help="re-plans of each profile (see above)")
    parser.add_argument("--windows", nargs="+", type=int, default=[0, 16])
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.5])
    parser.add_argument("--texts", nargs="*", default=list(quality.TEXTS))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=0, help="score only the last N tokens, fed one at a time")
    parser.add_argument("--out", default="benchmarks/results/profile_recipes.json")
    args = parser.parse_args()
    profiles, after_rope = {}, {}
    for option, items, into in (("--profiles", args.profiles, profiles), ("--after-rope", args.after_rope, after_rope)):
        for item in items:
            label, _, where = item.partition("=")
            if not where:
                parser.error(f"{option}: {item!r} must be LABEL=PROFILE")
            into[label] = load_profile(where)
    if not profiles and not after_rope:
        parser.error("--profiles or --after-rope: no profile to measure")
    if args.after_rope_out and len(after_rope) != 1:
        parser.error("--after-rope-out saves one --after-rope profile")
    model, tokenizer = load_model("smollm2-135m", dequantize=True)
    calibration = None
    if args.calibration_texts:
        calibration = [open(path, encoding="utf-8").read() for path in args.calibration_texts]
    for label, profile in list(profiles.items()):
        for spec in args.variants:
            profiles[f"{label}:{spec}"] = variant(profile, spec)
    for label, profile in after_rope.items():
        profiles[label] = keys_after_rope(profile, model, tokenizer, calibration)
        if args.after_rope_out:
            save_profile(profiles[label], args.after_rope_out)
    configs = [
        quality.EvalConfig(f"{label} <= {budget} w{window}", label,
                           lambda p=p, b=budget, w=window: KVCacheBuilder.for_model(model, p.config(b, window=w)))
        for label, p in profiles.items() for budget in args.budgets for window in args.windows
    ]
    per_text = {}
    for name in args.texts:
        ids = tokenizer.encode(quality.load_text(name), add_special_tokens=False)[: args.tokens]
        label = name if name in quality.TEXTS else os.path.splitext(os.path.basename(name))[0]  # a file: its stem
        if args.decode:
            per_text[label] = decode_rows(model, ids, configs, args.decode)
        else:
            per_text[label] = quality.compare(model, ids, configs, progress=label)[1:]
        _write(args, profiles, per_text)
    if not per_text:
        return 0
    for i, config in enumerate(configs):
        deltas = [rows[i]["delta_ppl_pct"] for rows in per_text.values()]
        bits = max(rows[i]["effective_bits"] for rows in per_text.values())
        print(f"{config.label:<28} {bits:.3f} bits  mean {sum(deltas) / len(deltas):+.2f}%  worst {max(deltas):+.2f}%")
    return 0


def keys_after_rope(profile: Profile, model, tokenizer, texts: list[str] | None = None) -> Profile:
    texts = calibration_texts() if texts is None else texts
    if [hashlib.sha256(t.encode()).hexdigest() for t in texts] != [t["sha256"] for t in profile.meta["calibration_texts"]]:
        raise SystemExit(f"--after-rope: profile {profile.name} was not calibrated on these texts")
    moments = collect_moments(model, tokenizer, texts, skip_tokens=SINK_TOKENS, pre_rope=False, progress=True)
    return Profile(profile.name, profile.model_fingerprint, moments, profile.key_weights, profile.value_weights,
                   dict(profile.meta, measured=[]))


def variant(profile: Profile, spec: str) -> Profile:
    """`profile` planned otherwise from the same moments and sensitivities (--variants)."""
    for part in spec.split("+"):
        profile = _one_variant(profile, part)
    return profile


def _one_variant(profile: Profile, spec: str) -> Profile:
    kind, _, value = spec.partition("=")
    if kind not in ("keys", "scale", "temper", "shrink", "wide", "sinks") or not value or (
            kind == "wide" and value not in ("on", "off")):
        raise SystemExit(f"--variants: {spec!r} must be keys=A, scale=A, temper=G, shrink=S, wide=on|off or sinks=N")
    command = f"profile_recipes.py --variants {spec}"
    if kind == "wide":  # what `kvshard calibrate --measure --wide-codebook` makes
        return replanned(profile, profile.key_cost_scale, command, wide_codebook=value == "on")
    if kind == "sinks":
        return replanned(profile, profile.key_cost_scale, command, sink_tokens=int(value))
    x = float(value)
    if kind in ("keys", "scale"):  # what `kvshard calibrate --measure --key-cost-scale` makes
        return replanned(profile, x * profile.key_cost_scale if kind == "keys" else x, command)
    key_weights, value_weights = list(profile.key_weights), list(profile.value_weights)
    if kind == "temper":
        key_weights, value_weights = [w**x for w in key_weights], [w**x for w in value_weights]
    variant = Profile(profile.name, profile.model_fingerprint, profile.moments, key_weights, value_weights,
                      dict(profile.meta, measured=[]))
    if kind == "shrink":
        variant.__dict__["_decomposed"] = [decompose(m, shrinkage=x) for m in profile.moments]
    return variant


def decode_nll(model, tokens: list[int], caches, decode: int) -> float:
    """Summed NLL of the last `decode` next-token predictions, each made by a one-token step after a chunked
    prefill of everything before them."""
    ids = mx.array(tokens)
    first = len(tokens) - 1 - decode
    for start in range(0, first, CHUNK):
        mx.eval(model(ids[None, start : min(start + CHUNK, first)], cache=caches))
    nll = 0.0
    for position in range(first, len(tokens) - 1):
        logits = model(ids[None, position : position + 1], cache=caches)[0].astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, ids[position + 1 : position + 2], reduction="sum").item()
    return nll


def decode_rows(model, tokens: list[int], configs, decode: int) -> list[dict]:
    base = decode_nll(model, tokens, quality.baseline_config(model).make_caches(), decode)
    rows = []
    for config in configs:
        start = time.perf_counter()
        caches = config.make_caches()
        nll = decode_nll(model, tokens, caches, decode)
        rows.append({"label": config.label, "delta_ppl_pct": 100 * (math.exp((nll - base) / decode) - 1),
                     "top1_agreement": None, "effective_bits": quality.effective_bits(model, caches)})
        print(f"{config.label}: {rows[-1]['delta_ppl_pct']:+.2f}% ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return rows


def _write(args, profiles, per_text) -> None:
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": device_info() | {"platform": platform.platform()},
        "tokens": args.tokens,
        "decode": args.decode,
        "profiles": {label: {"fingerprint": p.fingerprint, "texts": p.meta.get("calibration_texts"),
                             "keys": "after RoPE" if p.moments[0].get("rope") is None else "before RoPE"}
                     for label, p in profiles.items()},
        "per_text": {name: [{k: r[k] for k in ("label", "delta_ppl_pct", "top1_agreement", "effective_bits")}
                            for r in rows] for name, rows in per_text.items()},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
