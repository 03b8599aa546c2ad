"""Gemma 3 270M quality in one GPU run: its calibration profile, kvshard eval's texts at 4.5 / 3.5 / 2.5 bits, ΔPPL on
the late tokens of a long window, and passkey retrieval at 4K-32K tokens.

The lent GPU machine reaches no package index and takes 64 MiB a call, so `pack` (here) writes what the run needs
without the package: the GGUF's tensor blocks as they are (no vocabulary metadata, whose parsing is slow), the
converted tokenizer and config, the eval and calibration texts (read here from Debian's packages). `run` (there)
dequantizes the blocks with `gguf` exactly as quant/gemma3.py does and checks the model's fingerprint.

    python benchmarks/gemma_quality.py pack --out DIR
    python3 benchmarks/gemma_quality.py run --packed DIR --out OUT [--deadline-s 150]
    python benchmarks/gemma_quality.py finish --results OUT --profile-out quant/data/profiles/gemma3-270m

Sections run in order and each rewrites its JSON in OUT as it goes, so a run stopped by its deadline or its timeout
still returns what it measured: profile/ (the calibration), eval.json, long_range.json, passkey.json.

Recipes (the cache of each layer; effective bits = 8 · bytes held / K+V elements held, the windows included):
- fp16: float16 K/V, sliding-window layers a float16 rotating window of 512 tokens, as the model's own caches.
- mlx_lm affine b-bit (4 and 2: mlx_lm's 3-bit cache fails at head_dim 256): mlx_lm's QuantizedKVCache on the 3
  global layers; sliding layers fp16 (mlx_lm has no quantized rotating cache).
- turboquant_mse b-bit: every layer coded, sliding ones in a compressed rotating window.
- klt: the Gemma profile's plans for all 18 layers (sliding layers hold their tokens as codes, attention
  windowed by the model's mask: KVCacheConfig.sliding = "full").
- profile gemma3-270m-global: the same calibration's plans for the 3 global layers, sliding layers an fp16 window
  (what `kvshard calibrate --model gemma3-270m` writes; the results of 2026-12-01 label it "profile gemma3-270m").
  At 1K tokens the fp16 windows dominate the bytes; from 8K on they are a small, fixed part.
Every token stream starts with <bos>, as Gemma's own prompts do.
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import traceback

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvshard.quant import KVCacheBuilder
from kvshard.quant import eval as quality
from kvshard.quant.calibrate.profile import SINK_TOKENS, Profile, save_profile

BUDGETS = (4.5, 3.5, 2.5)
PASSKEY_LENGTHS = (4096, 8192, 16384, 32768)
PASSKEY_BUDGETS = (3.5, 2.5)
PREFILL_CHUNK = 2048


def pack(out: str) -> None:
    import gguf

    from kvshard.quant import gemma3
    from kvshard.quant.calibrate.klt import calibration_texts
    from kvshard.quant.models import load_model, model_fingerprint

    os.makedirs(os.path.join(out, "texts"), exist_ok=True)
    reader = gguf.GGUFReader(str(gemma3.gguf_path()[0]))
    index, offset = [], 0
    with open(os.path.join(out, "blocks.bin"), "wb") as f:
        for tensor in reader.tensors:
            data = np.ascontiguousarray(tensor.data)
            f.write(data.tobytes())
            index.append({"name": tensor.name, "type": int(tensor.tensor_type), "dtype": str(data.dtype),
                          "shape": list(data.shape), "offset": offset, "nbytes": data.nbytes})
            offset += data.nbytes
    folder = gemma3.converted_folder()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(folder, name), out)
    for name in quality.TEXTS:
        with open(os.path.join(out, "texts", f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(quality.load_text(name))
    for i, text in enumerate(calibration_texts()):
        with open(os.path.join(out, "texts", f"calibration_{i}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    model, _ = load_model(gemma3.MODEL_NAME)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"tensors": index, "fingerprint": model_fingerprint(model)}, f)


def load_packed(folder: str):
    import gguf

    from kvshard.quant import gemma3
    from kvshard.quant.models import model_fingerprint

    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    blob = np.fromfile(os.path.join(folder, "blocks.bin"), dtype=np.uint8)
    weights = {}
    for t in index["tensors"]:
        data = blob[t["offset"] : t["offset"] + t["nbytes"]].view(t["dtype"]).reshape(t["shape"])
        name, value = gemma3.dequantize(t["name"], data, gguf.GGMLQuantizationType(t["type"]))
        weights[name] = value
    model, tokenizer = gemma3.load_folder(folder, weights)
    if model_fingerprint(model) != index["fingerprint"]:
        raise SystemExit("packed Gemma weights do not give the model's fingerprint")
    return model, tokenizer


def _texts(folder: str, prefix: str) -> dict:
    names = sorted(n for n in os.listdir(os.path.join(folder, "texts")) if n.startswith(prefix))
    return {n[:-4]: open(os.path.join(folder, "texts", n), encoding="utf-8").read() for n in names}


@contextlib.contextmanager
def every_layer_calibrated(model):
    """Calibration measures the layers whose mlx_lm cache is a plain KVCache: for the while, every layer looks
    like one. The calibration passes are single prompts of <= 2048 tokens from position 0, where the model's own
    sliding mask already gives each sliding layer its window, so its moments and sensitivities are its own."""
    from mlx_lm.models.cache import KVCache

    model.make_cache = lambda: [KVCache() for _ in model.layers]
    try:
        yield model
    finally:
        del model.make_cache


def calibrate(model, tokenizer, texts: list, name: str) -> Profile:
    from kvshard.quant.calibrate.klt import collect_moments
    from kvshard.quant.calibrate.ratequant import calibrate_layer_sensitivities
    from kvshard.quant.models import model_fingerprint

    with every_layer_calibrated(model):
        moments = collect_moments(model, tokenizer, texts, skip_tokens=SINK_TOKENS)
        weights = [calibrate_layer_sensitivities(model, tokenizer, target=t, progress=False) for t in ("keys", "values")]
    meta = {"format_version": 1, "created": _now(), "machine": _machine(), "recommended_bits": 3.5,
            "planned_tokens": 1024, "sink_tokens": SINK_TOKENS, "layers": "all 18 (KVCacheConfig.sliding='full')",
            "calibration_texts": [{"chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()} for t in texts]}
    return Profile(name, model_fingerprint(model), moments, *weights, meta=meta)


def global_layers(model) -> list:
    from mlx_lm.models.cache import KVCache

    return [i for i, c in enumerate(model.make_cache()) if type(c) is KVCache]


def global_profile(profile: Profile, model, name: str = "gemma3-270m-global") -> Profile:
    """The profile of the global layers alone: what `kvshard calibrate` measures on Gemma (each layer's moments
    and sensitivities are measured on their own, so the subset is the same numbers). Not named after the model:
    a shard would make a profile of its model's name its default, and its sessions cannot hold fp16 windows."""
    keep = global_layers(model)
    meta = dict(profile.meta, layers=f"global {keep} (sliding layers: fp16 window)")
    return Profile(name, profile.model_fingerprint, [profile.moments[i] for i in keep],
                   [profile.key_weights[i] for i in keep], [profile.value_weights[i] for i in keep], meta)


def recipes(model, profile: Profile, budgets=BUDGETS) -> list:
    from kvshard.quant import KVCacheConfig

    # mlx_lm's QuantizedKVCache cannot hold 3-bit codes at head_dim 256: it allocates 256 // (32 // 3) = 25 words
    # a row for the 24 that mx.quantize packs, and the first update fails on the shapes.
    configs = [quality.baseline_config(model)] + quality.mlx_affine_configs(model, bits=(4, 2))
    for bits in (4, 3, 2):
        config = KVCacheConfig(method="turboquant_mse", key_bits=bits, seed=42, sliding="compressed")
        configs.append(quality.EvalConfig(f"turboquant_mse {bits}-bit", "turboquant_mse",
                                          lambda c=config: KVCacheBuilder.for_model(model, c)))
    configs += klt_recipes(model, profile, budgets) + profile_recipes(model, global_profile(profile, model), budgets)
    return configs


def klt_recipes(model, profile: Profile, budgets) -> list:
    return [quality.EvalConfig(f"klt all layers <= {b} bits", "kvshard klt", lambda b=b: KVCacheBuilder.for_model(
        model, dataclasses.replace(profile.config(b), sliding="full"))) for b in budgets]


def profile_recipes(model, profile: Profile, budgets) -> list:
    return [quality.EvalConfig(f"profile {profile.name} <= {b} bits", "kvshard profile",
                               lambda b=b: KVCacheBuilder.for_model(model, profile.config(b))) for b in budgets]


def run_eval(model, tokenizer, texts: dict, configs, tokens: int, out: str, deadline: float) -> None:
    per_text = {}
    for name, text in texts.items():
        if time.monotonic() > deadline:
            break
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)[: tokens - 1]
        per_text[name] = quality.compare(model, ids, configs, progress=name)
        _write(out, "eval.json", {"tokens": tokens, "chunk": 256, "texts": list(per_text), "per_text": per_text,
                                  "mean": quality._mean_rows(per_text)})


def late_nll(model, tokens: mx.array, caches, scored: int, chunk: int = 1024) -> float:
    """Summed NLL (nats) of the last `scored` next-token predictions of `tokens`."""
    inputs, targets = tokens[:-1], tokens[1:]
    first, nll = inputs.size - scored, 0.0
    for start in range(0, inputs.size, chunk):
        logits = model(inputs[None, start : start + chunk], cache=caches)[0]
        keep = max(first - start, 0)
        if keep < logits.shape[0]:
            nll += nn.losses.cross_entropy(logits[keep:].astype(mx.float32), targets[start + keep : start + chunk],
                                           reduction="sum").item()
        else:
            mx.eval(logits)
    return nll


def run_long_range(model, tokenizer, texts: dict, configs, window: int, scored: int, out: str, deadline: float) -> None:
    stream = [tokenizer.bos_token_id] + tokenizer.encode("\n\n".join(texts.values()), add_special_tokens=False)
    window = min(window, len(stream) // 1024 * 1024)  # the texts hold ~17K Gemma tokens
    tokens = mx.array(stream[:window])
    rows = {}
    for config in configs:
        if time.monotonic() > deadline:
            break
        start, caches = time.perf_counter(), config.make_caches()
        nll = late_nll(model, tokens, caches, scored)
        rows[config.label] = {"nll": nll, "ppl": math.exp(nll / scored),
                              "effective_bits": quality.effective_bits(model, caches), "seconds": time.perf_counter() - start}
        base = rows[next(iter(rows))]["nll"]
        for row in rows.values():
            row["delta_ppl_pct"] = 100 * (math.exp((row["nll"] - base) / scored) - 1)
        print(f"long range {config.label}: ppl {rows[config.label]['ppl']:.3f}", file=sys.stderr, flush=True)
        _write(out, "long_range.json", {"window": window, "scored": scored, "scored_from": window - scored,
                                        "chunk": 1024, "results": rows})


def answer(model, tokens: list, caches, steps: int = 8) -> list:
    ids = mx.array(tokens)
    for start in range(0, ids.size, PREFILL_CHUNK):
        logits = model(ids[None, start : start + PREFILL_CHUNK], cache=caches)
    generated = []
    for _ in range(steps):
        token = mx.argmax(logits[0, -1]).item()
        generated.append(token)
        logits = model(mx.array([[token]]), cache=caches)
    return generated


def run_passkey(model, tokenizer, configs, lengths, trials: int, out: str, deadline: float, seed: int = 0) -> None:
    from passkey import prompt_tokens  # benchmarks/passkey.py, beside this script

    rng, results = random.Random(seed), {c.label: {} for c in configs}
    for length in lengths:
        cases = [(rng.randrange(10000, 100000), (t + 0.5) / trials) for t in range(trials)]
        for config in configs:
            hits, done, bits, answers, start = 0, 0, 0.0, [], time.perf_counter()
            for key, depth in cases:
                if time.monotonic() > deadline:
                    break
                tokens = [tokenizer.bos_token_id] + prompt_tokens(tokenizer, length, key, depth)
                caches = config.make_caches()
                text = tokenizer.decode(answer(model, tokens, caches))
                hits, done = hits + (str(key) in text), done + 1
                answers.append(text)
                bits = max(bits, quality.effective_bits(model, caches))
            if done:
                results[config.label][str(length)] = {"hits": hits, "trials": done, "prompt_tokens": len(tokens),
                                                      "effective_bits": bits, "answers": answers,
                                                      "seconds": time.perf_counter() - start}
                print(f"passkey {length} {config.label}: {hits}/{done}", file=sys.stderr, flush=True)
            _write(out, "passkey.json", {"trials": trials, "lengths": list(lengths), "seed": seed,
                                         "prefill_chunk": PREFILL_CHUNK, "results": results})


def finish(results: str, profile_out: str) -> None:
    """Here, from a run's results: the global-layer profile with its measured quality (the eval's profile rows),
    written to `profile_out`, and eval.png."""
    from kvshard.quant.calibrate.profile import load_profile
    from kvshard.quant.models import load_model

    model, _ = load_model("gemma3-270m")
    with open(os.path.join(results, "eval.json")) as f:
        report = json.load(f)
    profile = global_profile(load_profile(os.path.join(results, "profile")), model)
    measured = []
    for budget in BUDGETS:
        rows = {text: next(r for r in rows if r["family"] == "kvshard profile" and r["label"].endswith(f"<= {budget} bits"))
                for text, rows in report["per_text"].items()}
        deltas = {text: round(r["delta_ppl_pct"], 4) for text, r in rows.items()}
        measured.append({"budget_bits": budget, "effective_bits": round(max(r["effective_bits"] for r in rows.values()), 4),
                         "delta_ppl_pct": deltas, "mean_delta_ppl_pct": round(sum(deltas.values()) / len(deltas), 4),
                         "worst_delta_ppl_pct": max(deltas.values()), "tokens": report["tokens"]})
    profile.meta.update(measured=measured, measurement_note="benchmarks/gemma_quality.py on the GPU: <bos> + 1,023 "
                        "tokens of each text; at 1K tokens the sliding layers' fp16 windows dominate the bytes")
    save_profile(profile, profile_out)
    quality.plot(report["mean"], os.path.join(results, "eval.png"),
                 f"gemma3-270m: chunked PPL, {report['tokens']} tokens x {len(report['texts'])} texts, chunk 256")


def _write(out: str, name: str, document: dict) -> None:
    document = {"date": _now(), "machine": _machine(), "model": "gemma3-270m", **document}
    with open(os.path.join(out, name), "w") as f:
        json.dump(document, f, indent=1, default=lambda a: np.asarray(a).tolist())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} on {mx.default_device()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack").add_argument("--out", required=True)
    done = sub.add_parser("finish")
    done.add_argument("--results", required=True)
    done.add_argument("--profile-out", required=True)
    run = sub.add_parser("run")
    run.add_argument("--packed", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--deadline-s", type=float, default=150.0, help="no new work starts after this many seconds")
    run.add_argument("--tokens", type=int, default=1024, help="eval tokens per text")
    run.add_argument("--window", type=int, default=16384)
    run.add_argument("--scored", type=int, default=1024)
    run.add_argument("--lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS))
    run.add_argument("--trials", type=int, default=20)
    run.add_argument("--calibration-texts", type=int, default=8)
    run.add_argument("--eval-texts", type=int, default=len(quality.TEXTS), help="the first N of kvshard eval's texts")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
        return 0
    if args.command == "finish":
        finish(args.results, args.profile_out)
        return 0
    began = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = load_packed(args.packed)
    calibration = list(_texts(args.packed, "calibration_").values())[: args.calibration_texts]
    start = time.perf_counter()
    profile = calibrate(model, tokenizer, calibration, "gemma3-270m-all-layers")
    profile.meta["calibration_seconds"] = time.perf_counter() - start
    save_profile(profile, os.path.join(args.out, "profile"))
    print(f"calibrated in {profile.meta['calibration_seconds']:.1f} s", file=sys.stderr, flush=True)
    texts = {n: t for n, t in _texts(args.packed, "").items() if not n.startswith("calibration_")}
    texts = {n: texts[n] for n in quality.TEXTS}
    sliding_fp16 = global_profile(profile, model)
    # After calibration, each section may start work until its share of the time left (and what an earlier one
    # left unused): the eval 45%, the long window 15%, passkey the rest. A section that fails leaves the others.
    now = time.monotonic()
    left = began + args.deadline_s - now
    eval_texts = {n: texts[n] for n in list(texts)[: args.eval_texts]}
    long_configs = [quality.baseline_config(model)] + profile_recipes(model, sliding_fp16, BUDGETS)
    passkey_configs = [quality.baseline_config(model)] + profile_recipes(model, sliding_fp16, PASSKEY_BUDGETS)
    sections = [
        lambda: run_eval(model, tokenizer, eval_texts, recipes(model, profile), args.tokens, args.out, now + 0.45 * left),
        lambda: run_long_range(model, tokenizer, texts, long_configs, args.window, args.scored, args.out, now + 0.6 * left),
        lambda: run_passkey(model, tokenizer, passkey_configs, args.lengths, args.trials, args.out, began + args.deadline_s),
    ]
    failed = 0
    for section in sections:
        try:
            section()
        except Exception:  # noqa: BLE001 - report it and measure the rest
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
