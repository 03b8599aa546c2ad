"""What the codebook change (quant/codebooks.py, CODEBOOK_VERSION 2) does to klt's pre- and post-RoPE plans, on the
setting of tests/test_quant_klt.py::test_real_model_klt_beats_turboquant_at_fewer_bytes: SmolLM2, moments from two
calibration texts, KL probes for the layer weights, 2.875 code bits, next-token KL to fp16 after a 64-token coded prefix.

Codebooks: "v1" (5-8-bit Lloyd-Max started from the law's quantiles, every run on the sphere law), "v2 sphere" (the
converged codebooks, no wide runs), "v2" (what the library does: also the wide codebook for >= 7-bit calibrated runs).

    python benchmarks/klt_rope_codebooks.py --out benchmarks/results/klt_rope_codebooks_cpu.json
"""

import argparse
import dataclasses
import functools
import json
import platform

import mlx.core as mx
import numpy as np

from kvshard.quant import KVCacheBuilder, KVCacheConfig, calibrate_layer_sensitivities, codebooks, load_model
from kvshard.quant.calibrate.klt import calibration_texts, collect_moments, plan_klt
from kvshard.quant.eval import held_bytes
from kvshard.quant.methods import klt

TEXT = "To bake a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten minutes, " * 8
CODEBOOKS = {"v1": (1, None), "v2 sphere": (2, None), "v2": (2, klt.WIDE_BITS)}  # (lloyd_max version, KLTPlan.wide_bits)


def use_codebooks(version: int) -> None:
    codebooks.lloyd_max = functools.partial(LLOYD_MAX, version=version)
    for build in (codebooks.sphere_codebook, codebooks.wide_codebook, codebooks.residual_codebook):
        build.cache_clear()


LLOYD_MAX = codebooks.lloyd_max


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = load_model("smollm2-135m")
    keys = calibrate_layer_sensitivities(model, tokenizer, target="keys", progress=False)
    values = calibrate_layer_sensitivities(model, tokenizer, target="values", progress=False)
    plans = {}
    for name, pre_rope in (("pre-RoPE", True), ("post-RoPE", False)):
        plans[name] = plan_klt(collect_moments(model, tokenizer, calibration_texts(2), pre_rope=pre_rope), keys, values,
                               code_bits=2.875)
    tokens = mx.array(tokenizer.encode(TEXT)[:192])[None]
    reference = mx.softmax(model(tokens, cache=make_prompt_cache(model)).astype(mx.float32), axis=-1)[:, 64:]
    rows = []
    for codebook, (version, wide_bits) in CODEBOOKS.items():
        use_codebooks(version)
        for name, planned in plans.items():
            key_plans, value_plans = ([dataclasses.replace(p, wide_bits=wide_bits) for p in side] for side in planned)
            caches = KVCacheBuilder.for_model(model, KVCacheConfig(method="klt", key_plans=key_plans,
                                                                   value_plans=value_plans, sink_tokens=4))
            model(tokens[:, :64], cache=caches)
            log_probs = mx.log(mx.softmax(model(tokens[:, 64:], cache=caches).astype(mx.float32), axis=-1) + 1e-12)
            kl = (reference * (mx.log(reference + 1e-12) - log_probs)).sum(-1).mean().item()
            bits = [b for plan in key_plans + value_plans for b in plan.coordinate_bits]
            coded = sum(held_bytes(c) for c in caches)
            rows.append({"codebooks": codebook, "keys": name, "kl": round(kl, 5), "held_bytes": coded,
                         "effective_bits": round(8 * coded / (2 * 30 * 3 * 64 * 192), 3),
                         "share_of_coordinates_at_5_bits_or_more": round(float(np.mean(np.array(bits) >= 5)), 4)})
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": f"{platform.machine()}, MLX {mx.__version__} on {mx.default_device()}",
                   "setting": __doc__.split("\n\n")[0], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
