"""How far klt's value codes miss the distortion their plans expect, per layer: the model's own values on one text
(fp16 pass, <bos> + 1,023 tokens), each layer's values coded alone by the profile's 3.5-bit plan, and the measured
squared error in the plan's coordinates against Σ λᵢ δ(bᵢ) (the energies it was planned with, δ the Gaussian
Lloyd-Max distortion). Also the RMS attention-logit error of the coded keys over the causal pairs after the sinks.
--wide-bits W...: rerun each layer with klt's wide (Laplace-law) codebook from W bits on (default 7, the library's).

    python benchmarks/gemma_value_distortion.py --model gemma3-270m --out FILE.json [--wide-bits 7 5 4]
    python benchmarks/gemma_value_distortion.py --model smollm2-135m --out FILE.json   # the shipped profile
"""

import argparse
import json
import os

import mlx.core as mx
import numpy as np

import kvshard.quant.methods.klt as klt
from gemma_layer_error import PROFILE, capture, coded  # beside this script
from kvshard.quant import KVCacheBuilder, load_profile
from kvshard.quant.calibrate.klt import GAUSSIAN_DISTORTION
from kvshard.quant.eval import load_text
from kvshard.quant.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--text", default="pride_and_prejudice")
    parser.add_argument("--budget", type=float, default=3.5)
    parser.add_argument("--wide-bits", type=int, nargs="+", default=[klt.WIDE_BITS])
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    gemma = args.model.startswith("gemma")
    profile = load_profile(PROFILE if gemma else args.model)
    ids = tokenizer.encode(load_text(args.text), add_special_tokens=False)[: 1023 if gemma else 1024]
    ids = [tokenizer.bos_token_id] + ids if gemma else ids
    config = profile.config(args.budget, sliding="full") if gemma else profile.config(args.budget)
    report = {"model": args.model, "text": args.text, "tokens": len(ids), "budget": args.budget,
              "profile": profile.name, "layers": []}
    default_wide = klt.WIDE_BITS
    for i, (q, k, v, scale) in enumerate(capture(model, mx.array(ids))):
        row = {"layer": i}
        plan = config.value_plans[i]
        delta = np.array([GAUSSIAN_DISTORTION[b] for b in plan.coordinate_bits])
        predicted = float(sum((plan.energies[h] * delta).sum() for h in range(plan.energies.shape[0])))
        for wide in args.wide_bits:
            klt.WIDE_BITS = wide
            try:
                k_hat, v_hat, _ = coded(KVCacheBuilder.for_model(model, config)[i], k, v)
            finally:
                klt.WIDE_BITS = default_wide
            error = np.array(v - v_hat)[0][:, 4:]  # after the fp16 sinks
            measured = float(sum(((error[h] @ plan.analysis[h].T) ** 2).mean(0).sum() for h in range(error.shape[0])))
            group = q.shape[1] // k.shape[1]
            logits = np.array((q[0] @ mx.repeat(k_hat - k, group, axis=1)[0].swapaxes(-1, -2)) * scale)
            pairs = np.tril(np.ones(logits.shape[-2:], bool))
            pairs[:, :4] = False
            row[f"wide_from_{wide}"] = {"value_measured_over_predicted": measured / predicted,
                                        "key_logit_rms": float(np.sqrt((logits ** 2)[:, pairs].mean()))}
        report["layers"].append(row)
        print(row, flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
