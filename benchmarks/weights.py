"""Weight quantization on the embedded SmolLM2-135M: kvshard's QuantizedLinear (rotation + Lloyd-Max) beside MLX's
affine `nn.quantize`, in one run. Equal effective bits: ours at group 32 (b + 16/32 bits: one fp16 scale) against
MLX's group 64 (b + 32/64 bits: fp16 scale and bias), the largest group MLX allows on this model (576 input
features; MLX takes 32, 64 or 128).

All seven linear layers of every block are quantized (q, k, v, o, gate, up, down); the tied embedding / output
layer stays dense fp32 in every configuration. The reference is the dense fp32 model (the GGUF's Q4_1 weights
dequantized), with an fp16 KV cache; the dense model cast to fp16 is listed beside it.

Per configuration: bytes held by the linear layers and effective bits (8 · bytes / weights), chunked perplexity
on the shipped texts (ΔPPL vs the dense model) and greedy decode tokens/s (median step of a decode after a short
prompt; configurations alternate in order over rounds). MLX's affine perplexity is computed through
`mx.dequantize` of its own packed weights (the numbers its kernel multiplies by; its CPU kernel takes minutes per
pass); its tokens/s through its real nn.QuantizedLinear.

    python benchmarks/weights.py [--tokens 256] [--texts NAME ...] [--rounds 3] [--out benchmarks/results]
writes weights_cpu.json and .png (or _gpu); a few minutes on a quiet 2-core CPU. `--layer-only`: one layer's
rebuild and call times (weights_layer_cpu.json), what bounds our decode speed.
"""

import argparse
import json
import os
import platform
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from kvshard.quant.eval import TEXTS, Float16KVCache, load_text, perplexity
from kvshard.quant.models import load_model
from kvshard.quant.weights import quantize_model, weight_bytes

BITS = (4, 3, 2)


def _linear(path, module) -> bool:
    return type(module) is nn.Linear


def _mlx_affine(model, bits: int, group_size: int):
    """MLX's nn.quantize on the linear layers, scales and biases in fp16 as on an fp16 model."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_linear)
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            module.scales, module.biases = module.scales.astype(mx.float16), module.biases.astype(mx.float16)
    return model


def _dense_view(model):
    """A copy of an affine-quantized model with every nn.QuantizedLinear replaced by its dequantized weight."""
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            dense = nn.Linear(module.weight.shape[1] * 32 // module.bits, module.weight.shape[0], bias=False)
            dense.weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            dense.weight = dense.weight.astype(mx.float32)
            layers.append((path, dense))
    return layers


def _fresh(weights, args):
    from mlx_lm.models import llama

    model = llama.Model(args)
    model.load_weights(weights)
    model.eval()
    return model


def _decode_step_s(model, prompt: mx.array, steps: int) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    cache = [Float16KVCache() for _ in make_prompt_cache(model)]
    logits = model(prompt[None], cache=cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_timings(repeats: int) -> dict:
    """One 576 -> 1536 layer (SmolLM2's gate/up shape), one decode token, medians of `repeats` calls per path in
    alternating order: the rotated weight rebuilt by the compiled kernel (what QuantizedLinear does) against
    unpack + codebook gather (what it did before), a whole call, MLX's affine layer and the dense one."""
    from kvshard.quant.codebooks import sphere_codebook
    from kvshard.quant.packing import unpack
    from kvshard.quant.weights import QuantizedLinear

    dense = nn.Linear(576, 1536, bias=False)
    x = mx.random.normal((1, 1, 576), key=mx.random.key(0))
    rows = {}
    for bits in BITS:
        ours = QuantizedLinear.from_linear(dense, bits, 32)
        affine = nn.QuantizedLinear.from_linear(dense, 64, bits)
        book = sphere_codebook(32, bits)

        def gathered():
            groups = book.lookup(unpack(ours.codes, bits, 576)).reshape(1536, -1, 32)
            return (groups * ours.scales[..., None].astype(mx.float32)).reshape(1536, 576)

        paths = {"rebuild compiled": ours.rotated_weight, "rebuild unpack+gather": gathered,
                 "kvshard call": lambda: ours(x), "mlx affine call": lambda: affine(x), "dense fp32 call": lambda: dense(x)}
        times = {name: [] for name in paths}
        for i in range(repeats + 3):
            for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
                start = time.perf_counter()
                mx.eval(paths[name]())
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
        rows[f"{bits}-bit"] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(bits, {k: round(v, 2) for k, v in rows[f"{bits}-bit"].items()}, flush=True)
    return {"shape": [1536, 576], "repeats": repeats, "unit": "ms, median", "rows": rows}


def _machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "mlx": mx.__version__,
            "device": str(mx.default_device()), "ld_preload": os.environ.get("LD_PRELOAD", "")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens of each text for perplexity")
    parser.add_argument("--texts", nargs="+", choices=list(TEXTS), default=["pride_and_prejudice", "python_source"])
    parser.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (configurations alternate order)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layer-only", action="store_true", help="only the one-layer timings (weights_layer_<device>.json)")
    args = parser.parse_args(argv)
    tag = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if args.layer_only:
        result = {"benchmark": "weights_layer", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": _machine(), **layer_timings(30), "load_average": os.getloadavg()}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"weights_layer_{tag}.json"), "w") as f:
            json.dump(result, f, indent=2)
        return 0

    base, tokenizer = load_model("smollm2-135m")
    weights = tree_flatten(base.parameters())
    n_weights = sum(m.weight.size for _, m in base.named_modules() if type(m) is nn.Linear)
    configs = {"dense fp32": base, "dense fp16": _fresh([(k, v.astype(mx.float16)) for k, v in weights], base.args)}
    for bits in BITS:
        configs[f"kvshard {bits}-bit g32"] = quantize_model(_fresh(weights, base.args), bits=bits, group_size=32)
        configs[f"mlx affine {bits}-bit g64"] = _mlx_affine(_fresh(weights, base.args), bits, 64)
    for model in configs.values():
        mx.eval(model.parameters())

    texts = {name: tokenizer.encode(load_text(name), add_special_tokens=False)[: args.tokens] for name in args.texts}
    rows = {}
    for label, model in configs.items():
        scored = model
        if label.startswith("mlx affine"):
            scored = _fresh(weights, base.args)
            scored.update_modules(tree_unflatten(_dense_view(model)))
        ppl = {}
        for name, tokens in texts.items():
            ppl[name] = perplexity(scored, tokens, lambda: [Float16KVCache() for _ in scored.layers], 256, len(tokens))["ppl"]
        nbytes = weight_bytes(model)
        rows[label] = {"label": label, "linear_bytes": nbytes, "effective_bits": 8 * nbytes / n_weights,
                       "ppl": ppl, "step_s": []}
        print(f"{label:26s} bits {rows[label]['effective_bits']:.3f}  ppl {ppl}", flush=True)

    prompt = mx.array(texts[next(iter(texts))][:32])
    order = list(configs)
    for round_ in range(args.rounds):
        for label in order if round_ % 2 == 0 else order[::-1]:
            rows[label]["step_s"].append(_decode_step_s(configs[label], prompt, args.steps))
    dense = rows["dense fp32"]
    for row in rows.values():
        row["ppl_mean"] = statistics.mean(row["ppl"].values())
        row["delta_ppl_pct"] = {n: 100 * (row["ppl"][n] / dense["ppl"][n] - 1) for n in texts}
        row["delta_ppl_pct_mean"] = statistics.mean(row["delta_ppl_pct"].values())
        row["decode_tokens_per_s"] = 1 / statistics.median(row["step_s"])
        print(f"{row['label']:26s} bits {row['effective_bits']:6.3f}  MiB {row['linear_bytes'] / 2**20:7.2f}  "
              f"ΔPPL {row['delta_ppl_pct_mean']:+7.2f}%  {row['decode_tokens_per_s']:6.1f} tok/s", flush=True)
    result = {
        "benchmark": "weights", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": _machine(),
        "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to dense fp32 = the reference)",
        "linear_weights": n_weights, "tokens_per_text": args.tokens, "chunk": 256, "texts": list(texts),
        "decode": {"prompt_tokens": int(prompt.size), "steps_per_round": args.steps, "rounds": args.rounds,
                   "statistic": "1 / median step time over all rounds"},
        "load_average": os.getloadavg(),
        "rows": list(rows.values()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"weights_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(list(rows.values()), os.path.join(args.out, f"weights_{tag}.png"), result["machine"]["cpu"])
    return 0


def plot(rows, path: str, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for family, marker in (("kvshard", "o"), ("mlx affine", "s")):
        got = [r for r in rows if r["label"].startswith(family)]
        quality.plot([r["effective_bits"] for r in got], [r["delta_ppl_pct_mean"] for r in got], marker=marker, label=family)
    quality.set_yscale("log")
    quality.set_xlabel("effective bits per weight (linear layers)")
    quality.set_ylabel("mean ΔPPL % vs dense fp32")
    quality.legend(fontsize=8)
    speed.barh([r["label"] for r in rows], [r["decode_tokens_per_s"] for r in rows])
    speed.set_xlabel("decode tokens/s (median step)")
    speed.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"SmolLM2-135M weight quantization, {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
