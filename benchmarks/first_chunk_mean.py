"""Why a fresh service session's first prefill chunk stays whole (256 tokens): the cache's key mean comes from the
tokens of its first append, and a smaller first chunk costs perplexity.

SmolLM2-135M (the embedded model), turboquant_mse 4/4 bits, the first 1,024 tokens of two eval texts fed as the
service feeds a prompt: a first chunk of 256, 128 or 64 tokens, then chunks of 256. Perplexity of every next
token, with effective bits (8 · bytes held / K+V elements).

    python benchmarks/first_chunk_mean.py [--out benchmarks/results]     -> first_chunk_mean_cpu.json
"""

import argparse
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench import device_info  # noqa: E402 (benchmarks/bench.py, beside this script)

from kvshard.quant import KVCacheBuilder, KVCacheConfig, install_attention_hook  # noqa: E402
from kvshard.quant.eval import effective_bits, load_text  # noqa: E402
from kvshard.quant.models import load_model  # noqa: E402
from kvshard.service.generation import PREFILL_CHUNK  # noqa: E402

TEXTS = ("pride_and_prejudice", "python_source")
FIRST_CHUNKS = (256, 128, 64)
TOKENS = 1024


def perplexity(model, tokens: mx.array, config: KVCacheConfig, first: int) -> tuple[float, float]:
    """(perplexity, effective bits) with a first chunk of `first` tokens, then PREFILL_CHUNK at a time."""
    caches = KVCacheBuilder.for_model(model, config)
    inputs, targets = tokens[:-1], tokens[1:]
    bounds = [0, *range(first, inputs.size, PREFILL_CHUNK), inputs.size]
    nll = 0.0
    for start, end in zip(bounds, bounds[1:]):
        logits = model(inputs[None, start:end], cache=caches)[0].astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, targets[start:end], reduction="sum").item()
    return math.exp(nll / targets.size), effective_bits(model, caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    install_attention_hook(model)
    config = KVCacheConfig(method="turboquant_mse", key_bits=4, value_bits=4, seed=42)
    result = {"device": device_info(), "model": "smollm2-135m (embedded)", "cache": config.to_dict(),
              "tokens": TOKENS, "texts": {}}
    for name in TEXTS:
        tokens = mx.array(tokenizer.encode(load_text(name))[:TOKENS])
        rows = {}
        for first in FIRST_CHUNKS:
            ppl, bits = perplexity(model, tokens, config, first)
            rows[str(first)] = {"ppl": ppl, "effective_bits": bits}
            print(name, first, round(ppl, 4), round(bits, 3), flush=True)
        for row in rows.values():
            row["vs_first_chunk_256"] = row["ppl"] / rows[str(PREFILL_CHUNK)]["ppl"] - 1
        result["texts"][name] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_chunk_mean_cpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
