"""Launch-shape sweep of the tensor-core kernel: warps per block, 16-token steps per warp step and target grid,
one decode step of one layer at batch 1, device time per call (throughput: 20 calls evaluated together).

    python benchmarks/tune_mma.py --out benchmarks/results      # writes tune_mma_gpu.json
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

from decode_speed import time_throughput  # benchmarks/, beside this script
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.kernels import gpu

SHAPES = {"llama-3.2-1b (32 q / 8 kv, d 64)": (32, 8, 64), "llama-3.1-8b (32 q / 8 kv, d 128)": (32, 8, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--contexts", nargs="+", type=int, default=[16384, 65536, 131072])
    args = parser.parse_args()
    rows = []
    for shape, (Hq, H, D) in SHAPES.items():
        for tokens in args.contexts:
            cache = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=4, value_bits=4)
            for start in range(0, tokens, 8192):
                n = min(8192, tokens - start)
                cache.update_and_fetch(mx.random.normal((1, H, n, D)).astype(mx.float16),
                                       mx.random.normal((1, H, n, D)).astype(mx.float16))
                mx.eval(cache.state)
            q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
            reference = cache.attention(q, D**-0.5)
            mx.eval(reference)
            for warps in (4, 8):
                for unroll in (1, 2):
                    for target in (132, 264, 396, 792):
                        gpu.GPU_MMA_WARPS, gpu.GPU_MMA_UNROLL, gpu.GPU_MMA_TARGET_BLOCKS = warps, unroll, target
                        try:
                            out = cache.attention(q, D**-0.5)
                            err = mx.abs(out.astype(mx.float32) - reference.astype(mx.float32)).max().item()
                            ms = time_throughput(lambda: cache.attention(q, D**-0.5), groups=9)
                        except Exception as e:  # noqa: BLE001 (a shape the kernel cannot launch)
                            ms, err = None, str(e)[:200]
                        rows.append({"shape": shape, "tokens": tokens, "warps": warps, "unroll": unroll,
                                     "target_blocks": target, "ms": ms, "max_abs_diff_vs_default": err})
                        print(shape, tokens, warps, unroll, target, ms, err, flush=True)
            gpu.GPU_MMA_WARPS, gpu.GPU_MMA_UNROLL, gpu.GPU_MMA_TARGET_BLOCKS = 4, 1, 396
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_mma_gpu.json").write_text(json.dumps({"device": str(mx.default_device()),
                                                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
