"""Gemma 3 270M quality in one GPU run: its calibration profile, kvshard eval's texts at 4.5 / 3.5 / 2.5 bits, ΔPPL on
the late tokens of a long window, and passkey retrieval at 4K-32K tokens.

The lent GPU machine reaches no package index and takes 64 MiB a call, so `pack` (here) writes what the run needs
without the package: the GGUF's tensor blocks as they are (no vocabulary metadata, whose parsing is slow), the
converted tokenizer and config, the eval and calibration texts (read here from Debian's packages). `run` (there)
dequantizes the blocks with `gguf` exactly as quant/gemma3.py does and checks the model's fingerprint.

    python benchmarks/gemma_quality.py pack --out DIR
    python3 benchmarks/gemma_quality.py run --packed DIR --out OUT [--deadline-s 150]
    python benchmarks/gemma_quality.py finish --results OUT --profile-out quant/data/profiles/gemma3-270m
    python benchmarks/gemma_quality.py calibrate --out DIR   # here, with the installed model (CPU)
    python benchmarks/gemma_quality.py passkey --out DIR [--lengths 1024 2048]   # here too

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
from kvshard.quant.codebooks import CODEBOOK_VERSION

BUDGETS = (4.5, 3.5, 2.5)
PASSKEY_LENGTHS = (4096, 8192, 16384, 32768)
PASSKEY_BUDGETS = (3.5, 2.5)
PASSKEY_CONFIGS = 4  # passkey_configs' first four by default; its last two locate the all-layer recipe's misses
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
            "codebook_version": CODEBOOK_VERSION, "planned_tokens": 1024, "sliding_window": model.args.sliding_window,
            "sink_tokens": SINK_TOKENS, "layers": "all 18 (KVCacheConfig.sliding='full')",
            "calibration_texts": [{"chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()} for t in texts]}
    return Profile(name, model_fingerprint(model), moments, *weights, meta=meta)


def calibrate_here(out: str, count: int) -> None:
    """The all-layer profile from the installed model and calibration texts (what `run` does there)."""
    from kvshard.quant import gemma3
    from kvshard.quant.calibrate.klt import calibration_texts
    from kvshard.quant.models import load_model

    model, tokenizer = load_model(gemma3.MODEL_NAME)
    start = time.perf_counter()
    profile = calibrate(model, tokenizer, calibration_texts()[:count], "gemma3-270m-all-layers")
    profile.meta["calibration_seconds"] = time.perf_counter() - start
    profile.meta["sliding_layers"] = sliding_layers(model)
    print(f"calibrated in {profile.meta['calibration_seconds']:.1f} s", file=sys.stderr, flush=True)
    save_profile(profile, out)


def klt_configs(model, profile: Profile, label: str, budgets, sliding: str) -> list:
    """The profile's configuration at each budget, its sliding layers as `sliding` asks, as eval configs."""
    return [quality.EvalConfig(f"{label} <= {b} bits", label, lambda b=b: KVCacheBuilder.for_model(
        model, profile.config(b, sliding=sliding))) for b in budgets]


def passkey_configs(model, profile: Profile) -> list:
    """fp16, the global layers coded at 3.5 bits beside fp16 windows, every layer coded at 3.5 and 2.5 bits; then
    two that locate the all-layer recipe's misses (run's --passkey-configs 6): the sliding layers alone coded (the
    3.5-bit plans, global layers fp16), and every layer at 4.5 bits."""
    def sliding_only():
        caches = KVCacheBuilder.for_model(model, profile.config(PASSKEY_BUDGETS[0], sliding="compressed"))
        for i in global_layers(model):
            caches[i] = quality.Float16KVCache()
        return caches

    return ([quality.baseline_config(model)] + klt_configs(model, profile, "klt global, sliding fp16", PASSKEY_BUDGETS[:1], "fp16")
            + klt_configs(model, profile, "klt all layers", PASSKEY_BUDGETS, "compressed")
            + [quality.EvalConfig(f"klt sliding layers only (global fp16), plans of <= {PASSKEY_BUDGETS[0]}", "diagnostic",
                                  sliding_only)]
            + klt_configs(model, profile, "klt all layers", (4.5,), "compressed"))


def passkey_here(out: str, profile_dir: str, lengths: list, trials: int) -> None:
    """Passkey retrieval with the installed model (what `run`'s passkey section does there), e.g. at the shorter
    lengths where the pretrained model's fp16 cache finds the key more often than at 4K-16K."""
    from kvshard.quant import gemma3
    from kvshard.quant.calibrate.profile import load_profile
    from kvshard.quant.models import load_model

    model, tokenizer = load_model(gemma3.MODEL_NAME)
    os.makedirs(out, exist_ok=True)
    configs = passkey_configs(model, load_profile(profile_dir))[:PASSKEY_CONFIGS]
    run_passkey(model, tokenizer, configs, lengths, trials, out, math.inf)


def global_layers(model) -> list:
    from mlx_lm.models.cache import KVCache

    return [i for i, c in enumerate(model.make_cache()) if type(c) is KVCache]


def sliding_layers(model) -> list:
    keep = set(global_layers(model))
    return [i for i in range(len(model.layers)) if i not in keep]


def global_profile(profile: Profile, model, name: str = "gemma3-270m-global") -> Profile:
    """The profile of the global layers alone: what `kvshard calibrate` measures on Gemma (each layer's moments
    and sensitivities are measured on their own, so the subset is the same numbers). Not named after the model:
    a shard would make a profile of its model's name its default, and its sessions cannot hold fp16 windows."""
    keep = global_layers(model)
    meta = {k: v for k, v in profile.meta.items() if k != "sliding_layers"}
    meta["layers"] = f"global {keep} (sliding layers: fp16 window)"
    return Profile(name, profile.model_fingerprint, [profile.moments[i] for i in keep],
                   [profile.key_weights[i] for i in keep], [profile.value_weights[i] for i in keep], meta)


def sliding_weighted(profile: Profile, factor: float) -> Profile:
    """The profile with its sliding layers' sensitivities times `factor`: plan_klt then moves bits between the layer
    kinds, which tests whether the calibration weighs them right."""
    scale = [factor if i in profile.sliding_layers else 1.0 for i in range(len(profile.moments))]
    return Profile(f"{profile.name}-sliding-x{factor:g}", profile.model_fingerprint, profile.moments,
                   [w * f for w, f in zip(profile.key_weights, scale)],
                   [w * f for w, f in zip(profile.value_weights, scale)], dict(profile.meta))


def eval_recipes(model, profile: Profile) -> list:
    """The eval's configurations: plain methods, the all-layer profile, the profile's global layers with fp16
    sliding windows, and the diagnostics at 3.5 bits that locate Gemma's error (README, Gemma section)."""
    from kvshard.quant import KVCacheConfig

    def built(config, fp16_layers=()):
        def make():
            caches = KVCacheBuilder.for_model(model, config)
            for i in fp16_layers:
                caches[i] = quality.Float16KVCache()
            return caches
        return make

    rows = [quality.baseline_config(model)]
    for bits in (4, 3, 2):
        config = KVCacheConfig(method="turboquant_mse", key_bits=bits, seed=42, sliding="compressed")
        rows.append(quality.EvalConfig(f"turboquant_mse {bits}-bit", "turboquant_mse", built(config)))
    for b in BUDGETS:
        rows.append(quality.EvalConfig(f"klt all layers <= {b} bits", "klt all layers", built(profile.config(b))))
    for b in BUDGETS:
        rows.append(quality.EvalConfig(f"klt global, sliding fp16 <= {b} bits", "klt global, sliding fp16",
                                       built(profile.config(b, sliding="fp16"))))
    at = 3.5
    diagnostics = [
        ("klt sliding layers only (global fp16), plans of <= 3.5", built(profile.config(at), global_layers(model))),
        ("turboquant_mse keys 3 / values 8", built(KVCacheConfig(key_bits=3, value_bits=8, sliding="compressed"))),
        ("turboquant_mse keys 8 / values 3", built(KVCacheConfig(key_bits=8, value_bits=3, sliding="compressed"))),
        ("klt all layers + fp16 window 32 <= 3.5", built(profile.config(at, window=32))),
        ("klt all layers, keys not centred <= 3.5", built(dataclasses.replace(profile.config(at), center_keys=False))),
        ("klt all layers, sliding sensitivities x4 <= 3.5", built(sliding_weighted(profile, 4.0).config(at))),
        ("klt all layers, sliding sensitivities x0.25 <= 3.5", built(sliding_weighted(profile, 0.25).config(at))),
    ]
    rows += [quality.EvalConfig(label, "diagnostic", make) for label, make in diagnostics]
    return rows


def diagnostics_left(model, profile: Profile) -> list:
    """fp16 and the diagnostics that the 2026-12-01 15:30 run's eval section did not reach."""
    rows = eval_recipes(model, profile)
    return [rows[0]] + rows[-5:]


def batched_nll(model, tokens: mx.array, caches, chunk: int = 256, scored_from: int = 0):
    """Per row of `tokens` (batch, T): summed NLL (nats) of the next-token predictions from position
    `scored_from` on, and the argmax predictions there. Chunks before it skip the vocabulary projection."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    nll, predictions = mx.zeros((tokens.shape[0],)), []
    for start in range(0, inputs.shape[1], chunk):
        stop = min(start + chunk, inputs.shape[1])
        hidden = model.model(inputs[:, start:stop], cache=caches)
        keep = max(scored_from - start, 0)
        if keep >= stop - start:
            mx.eval(hidden)
            continue
        logits = _head(model, hidden[:, keep:]).astype(mx.float32)
        nll = nll + nn.losses.cross_entropy(logits, targets[:, start + keep : stop], reduction="none").sum(axis=1)
        predictions.append(mx.argmax(logits, axis=-1))
        mx.eval(nll, predictions[-1])
    return nll, mx.concatenate(predictions, axis=1)


def _head(model, hidden):
    return model.model.embed_tokens.as_linear(hidden) if model.tie_word_embeddings else model.lm_head(hidden)


def _bits(model, caches, tokens: int, batch: int) -> dict:
    from kvshard.quant.sliding import effective_bits_vs_fp16

    return {"effective_bits": effective_bits_vs_fp16(model, caches, tokens, batch),
            "bits_per_held_element": quality.effective_bits(model, caches) / batch}


def run_eval(model, tokenizer, texts: dict, configs, tokens: int, out: str, deadline: float, name: str = "eval.json",
             check: str | None = None) -> None:
    """All texts in one batch (<bos> + tokens − 1 of each): per text ΔPPL vs fp16, top-1 agreement, bits.
    `check`: the label of a configuration also run on the first text alone, whose NLL is reported beside the
    batched one (the batch must not change what a text measures)."""
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False)[: tokens - 1] for t in texts.values()]
    short = [n for n, row in zip(texts, ids) if len(row) < tokens]
    if short:
        raise ValueError(f"texts {short} have fewer than {tokens} tokens")
    batch, count = mx.array(ids), tokens - 1
    per_text, base, report = {n: [] for n in texts}, None, {"batch_check": {}}
    for config in configs:
        if time.monotonic() > deadline:
            break
        start, caches = time.perf_counter(), config.make_caches()
        nll, predictions = batched_nll(model, batch, caches)
        seconds = time.perf_counter() - start
        if base is None:
            base = (nll, predictions)
        bits = _bits(model, caches, count, len(ids))  # the caches hold the tokens − 1 inputs
        for i, text in enumerate(texts):
            per_text[text].append({"label": config.label, "family": config.family,
                                   "ppl": math.exp(nll[i].item() / count),
                                   "delta_ppl_pct": 100 * (math.exp((nll[i] - base[0][i]).item() / count) - 1),
                                   "top1_agreement": mx.mean(predictions[i] == base[1][i]).item(),
                                   **bits, "seconds": seconds})
        if config.label == check:
            alone, _ = batched_nll(model, batch[:1], config.make_caches())
            report["batch_check"] = {"label": check, "text": next(iter(texts)), "nll_batched": nll[0].item(),
                                     "nll_alone": alone[0].item()}
        print(f"eval {config.label}: {seconds:.1f} s, mean ΔPPL "
              f"{sum(r[-1]['delta_ppl_pct'] for r in per_text.values()) / len(texts):+.2f}%", file=sys.stderr, flush=True)
        _write(out, name, {"tokens": tokens, "chunk": 256, "texts": list(texts), "per_text": per_text,
                           "mean": quality._mean_rows(per_text), **report})


def run_long_range(model, tokenizer, texts: dict, configs, window: int, scored: int, out: str, deadline: float,
                   chunk: int = PREFILL_CHUNK) -> None:
    stream = [tokenizer.bos_token_id] + tokenizer.encode("\n\n".join(texts.values()), add_special_tokens=False)
    window = min(window, len(stream) // 1024 * 1024)  # the texts hold ~17K Gemma tokens
    tokens = mx.array(stream[:window])[None]
    rows = {}
    for config in configs:
        if time.monotonic() > deadline:
            break
        start, caches = time.perf_counter(), config.make_caches()
        nll, _ = batched_nll(model, tokens, caches, chunk, scored_from=window - 1 - scored)
        nll = nll.item()
        rows[config.label] = {"nll": nll, "ppl": math.exp(nll / scored), **_bits(model, caches, window - 1, 1),
                              "seconds": time.perf_counter() - start}
        base = rows[next(iter(rows))]["nll"]
        for row in rows.values():
            row["delta_ppl_pct"] = 100 * (math.exp((row["nll"] - base) / scored) - 1)
        print(f"long range {config.label}: ppl {rows[config.label]['ppl']:.3f}", file=sys.stderr, flush=True)
        _write(out, "long_range.json", {"window": window, "scored": scored, "scored_from": window - scored,
                                        "chunk": chunk, "texts": list(texts), "results": rows})


def passkey_batch(tokenizer, length: int, cases: list) -> list:
    """One prompt per (key, depth), all exactly `length` tokens with <bos> (benchmarks/passkey.py's prompt, asked
    for more tokens until it has at least `length`; the filler before the question is then cut by the few tokens
    over), so that they run as one batch."""
    from passkey import QUESTION, prompt_tokens  # benchmarks/passkey.py, beside this script

    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    prompts = []
    for key, depth in cases:
        asked = length
        while len(tokens := [tokenizer.bos_token_id] + prompt_tokens(tokenizer, asked, key, depth)) < length:
            asked += length - len(tokens) + 8  # its filler estimate falls short at long lengths
        if tokens[-len(question):] != question:
            raise ValueError("passkey prompt does not end with the question's own tokens")
        body = tokens[: -len(question)]
        prompts.append(body[: length - len(question)] + question)
    if any(len(p) != length for p in prompts):
        raise ValueError(f"passkey prompts of {length} tokens: filler too short")
    return prompts


def answer_batch(model, prompts: list, caches, steps: int = 8) -> list:
    """Greedy continuations (token ids per prompt) of equal-length prompts run as one batch."""
    ids = mx.array(prompts)
    for start in range(0, ids.shape[1] - 1, PREFILL_CHUNK):
        mx.eval(model.model(ids[:, start : min(start + PREFILL_CHUNK, ids.shape[1] - 1)], cache=caches))
    token, generated = ids[:, -1:], []
    for _ in range(steps):
        token = mx.argmax(_head(model, model.model(token, cache=caches))[:, -1], axis=-1)[:, None]
        generated.append(token)
        mx.eval(token)
    return mx.concatenate(generated, axis=1).tolist()


def run_passkey(model, tokenizer, configs, lengths, trials: int, out: str, deadline: float, seed: int = 0) -> None:
    rng, results = random.Random(seed), {c.label: {} for c in configs}
    for length in lengths:
        cases = [(rng.randrange(10000, 100000), (t + 0.5) / trials) for t in range(trials)]
        prompts = passkey_batch(tokenizer, length, cases)
        for config in configs:
            if time.monotonic() > deadline:
                break
            start, caches = time.perf_counter(), config.make_caches()
            texts = [tokenizer.decode(row) for row in answer_batch(model, prompts, caches)]
            hits = sum(str(key) in text for (key, _), text in zip(cases, texts))
            results[config.label][str(length)] = {"hits": hits, "trials": trials, "prompt_tokens": length,
                                                  **_bits(model, caches, length + 7, trials), "answers": texts,
                                                  "seconds": time.perf_counter() - start}
            print(f"passkey {length} {config.label}: {hits}/{trials}", file=sys.stderr, flush=True)
            _write(out, "passkey.json", {"trials": trials, "lengths": list(lengths), "seed": seed, "batched": True,
                                         "prefill_chunk": PREFILL_CHUNK, "results": results})


def finish(results: str, profile_out: str, eval_name: str = "eval_gpu.json", note: str = "") -> None:
    """Here, from a run's results (benchmarks/results/gemma3-270m): the all-layer profile, its moments rounded
    to float16 (half the file; at 4.5 / 3.5 / 2.5 bits plan_klt moves at most 2 of 9,216 coordinate bits), with
    the eval's measured rows (`eval_name`: this script's eval_gpu.json, or gemma_cpu_eval.py's report), written
    to `profile_out`; and, for the GPU's report, eval_gpu.png."""
    from kvshard.quant.calibrate.profile import load_profile

    with open(os.path.join(results, eval_name)) as f:
        report = json.load(f)
    profile = load_profile(profile_out)
    rounded = [{k: v if k == "rope" else np.asarray(v, np.float16).astype(np.float64) for k, v in layer.items()}
               for layer in profile.moments]
    measured = []
    for family, sliding in (("klt all layers", "compressed"), ("klt global, sliding fp16", "fp16")):
        for budget in BUDGETS:
            label = f"{family} <= {budget} bits"
            rows = {text: next(r for r in rows if r["label"] == label) for text, rows in report["per_text"].items()}
            deltas = {text: round(r["delta_ppl_pct"], 4) for text, r in rows.items()}
            measured.append({"budget_bits": budget, "sliding": sliding,
                             "effective_bits": round(max(r["effective_bits"] for r in rows.values()), 4),
                             "delta_ppl_pct": deltas, "mean_delta_ppl_pct": round(sum(deltas.values()) / len(deltas), 4),
                             "worst_delta_ppl_pct": max(deltas.values()), "tokens": report["tokens"]})
    meta = dict(profile.meta, measured=measured, moments_dtype="float16", layers=(
        "all 18: Profile.config codes them all (sliding='compressed' or 'full'), or with sliding='fp16' the global "
        "layers 5, 11, 17 alone"), measurement_note=(
        note or "benchmarks/gemma_quality.py on an H200: <bos> + 1,023 tokens of each of kvshard eval's 7 texts, with "
        "the float32 moments; effective bits vs the fp16 cache at that length (sliding layers: their 512-token window)"))
    half = Profile(profile.name, profile.model_fingerprint, rounded, profile.key_weights, profile.value_weights, meta)
    save_profile(half, profile_out, dtype=np.float16)
    if "mean" not in report:
        return
    rows = [r for r in report["mean"] + report["diagnostics_mean"][1:] if "turboquant_mse keys" not in r["label"]]
    quality.plot(rows, os.path.join(results, "eval_gpu.png"), f"gemma3-270m on an H200: chunked PPL, <bos> + "
                 f"{report['tokens'] - 1} tokens x {len(report['texts'])} texts, chunk 256; bits vs the fp16 cache")


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
    here = sub.add_parser("calibrate", help="calibrate the all-layer profile here, with the installed model")
    here.add_argument("--out", required=True)
    here.add_argument("--calibration-texts", type=int, default=8)
    keys = sub.add_parser("passkey", help="passkey retrieval here, with the installed model")
    keys.add_argument("--out", required=True)
    keys.add_argument("--profile", default=os.path.join(os.path.dirname(__file__), "results", "gemma3-270m",
                                                        "gemma3-270m-all-layers"))
    keys.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    keys.add_argument("--trials", type=int, default=20)
    done = sub.add_parser("finish")
    done.add_argument("--results", required=True)
    done.add_argument("--profile-out", required=True)
    done.add_argument("--eval", default="eval_gpu.json", help="the eval report in --results whose rows the profile records")
    done.add_argument("--note", default="", help="how that report was measured (default: this script on an H200)")
    run = sub.add_parser("run")
    run.add_argument("--packed", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--profile", help="an all-layer profile folder of this model (default: calibrate one here)")
    run.add_argument("--deadline-s", type=float, default=150.0, help="no new work starts after this many seconds")
    run.add_argument("--tokens", type=int, default=1024, help="eval tokens per text")
    run.add_argument("--window", type=int, default=16384)
    run.add_argument("--scored", type=int, default=1024)
    run.add_argument("--lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS))
    run.add_argument("--trials", type=int, default=20)
    run.add_argument("--passkey-configs", type=int, default=PASSKEY_CONFIGS,
                     help="the first N of fp16, global 3.5, all 3.5, all 2.5, sliding only 3.5, all 4.5")
    run.add_argument("--calibration-texts", type=int, default=8)
    run.add_argument("--eval-texts", type=int, default=len(quality.TEXTS), help="the first N of kvshard eval's texts")
    run.add_argument("--sections", nargs="+", default=["eval", "long_range", "passkey", "mlx_affine"])
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
        return 0
    if args.command == "calibrate":
        calibrate_here(args.out, args.calibration_texts)
        return 0
    if args.command == "passkey":
        passkey_here(args.out, args.profile, args.lengths, args.trials)
        return 0
    if args.command == "finish":
        finish(args.results, args.profile_out, args.eval, args.note)
        return 0
    began = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = load_packed(args.packed)
    if args.profile:
        from kvshard.quant.calibrate.profile import load_profile

        profile = load_profile(args.profile)
        if profile.model_fingerprint != index_fingerprint(args.packed) or len(profile.moments) != len(model.layers):
            raise SystemExit(f"{args.profile} is not an all-layer profile of this model")
    else:
        calibration = list(_texts(args.packed, "calibration_").values())[: args.calibration_texts]
        start = time.perf_counter()
        profile = calibrate(model, tokenizer, calibration, "gemma3-270m")
        profile.meta["calibration_seconds"] = time.perf_counter() - start
        print(f"calibrated in {profile.meta['calibration_seconds']:.1f} s", file=sys.stderr, flush=True)
    profile.meta["sliding_layers"] = sliding_layers(model)
    save_profile(profile, os.path.join(args.out, "profile"))
    texts = {n: t for n, t in _texts(args.packed, "").items() if not n.startswith("calibration_")}
    texts = {n: texts[n] for n in quality.TEXTS}
    eval_texts = {n: texts[n] for n in list(texts)[: args.eval_texts]}
    fp16 = quality.baseline_config(model)
    long_configs = ([fp16] + klt_configs(model, profile, "klt all layers", BUDGETS, "compressed")
                    + klt_configs(model, profile, "klt global, sliding fp16", BUDGETS, "fp16"))
    passkeys = passkey_configs(model, profile)[: args.passkey_configs]
    affine = [fp16] + quality.mlx_affine_configs(model, bits=(4, 2))  # 3 bits fails at head_dim 256 (finish says why)
    # After loading, each section may start work until its share of the time left (and what an earlier one left
    # unused). A section that fails leaves the others.
    now = time.monotonic()
    left = began + args.deadline_s - now
    sections = {
        "eval": (0.35, lambda until: run_eval(model, tokenizer, eval_texts, eval_recipes(model, profile), args.tokens,
                                              args.out, until, check="klt all layers <= 3.5 bits")),
        "long_range": (0.2, lambda until: run_long_range(model, tokenizer, texts, long_configs, args.window,
                                                         args.scored, args.out, until)),
        "passkey": (0.35, lambda until: run_passkey(model, tokenizer, passkeys, args.lengths, args.trials,
                                                    args.out, until)),
        "diagnostics": (0.15, lambda until: run_eval(model, tokenizer, eval_texts, diagnostics_left(model, profile),
                                                     args.tokens, args.out, until, name="eval_diagnostics.json")),
        "mlx_affine": (0.1, lambda until: run_eval(model, tokenizer, eval_texts, affine, args.tokens, args.out, until,
                                                   name="eval_mlx_affine.json")),
    }
    failed, share = 0, 0.0
    for name in args.sections:
        share += sections[name][0]
        try:
            sections[name][1](now + share * left)
        except Exception:  # noqa: BLE001 - report it and measure the rest
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


def index_fingerprint(folder: str) -> str:
    with open(os.path.join(folder, "index.json")) as f:
        return json.load(f)["fingerprint"]


if __name__ == "__main__":
    raise SystemExit(main())
