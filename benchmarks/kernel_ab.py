"""Merge launches of this tree beside another tree's, side by side in one process on the lent GPU.

    python3 benchmarks/kernel_ab.py --against ../main/quant/kernels/src --out benchmarks/results

The split outputs of one decode step (mma_coded's for the recommended configuration's layer, mma_split's for
turboquant_mse k4/v4; Llama-3.2-1B attention shape, batch 1, 16K / 64K / 128K tokens) are computed once; then
this tree's coded_merge.cu / combine.cu and the other tree's (built from its sources under another kernel name)
merge them in alternating rounds. Per launch: median µs of --repeats launches, each evaluated and synchronised,
and the largest difference between the two outputs. What a change to a merge kernel buys, apart from the rest of
the step (decode_speed.py has the step).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from decode_speed import RECOMMENDED, cache_series, device_info, fill, time_latency  # benchmarks/, beside this script
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.kernels import cuda, gpu

N_Q, N_KV, D = 32, 8, 64
# The other tree's input names where they differ from this tree's (its coded_merge took the synthesis as the
# spec holds it, not transposed).
OTHER_INPUTS = {"coded_merge": ["q", "params", "vsynth", "sk", "sv", "wk", "wv", "part_o", "part_ml"],
                "combine": cuda.COMBINE_INPUTS}


def other_kernel(src: Path, kind: str):
    """`kind` built from the sources under src, named apart so that MLX compiles it on its own."""
    names, outputs, headers, _ = cuda.parts(kind)
    body = cuda._compact((src / f"{kind}.cu").read_text())
    header = "".join(cuda._compact((src / h).read_text()) for h in headers)
    return mx.fast.cuda_kernel(name=f"kvshard_other_{kind}", input_names=OTHER_INPUTS[kind], output_names=outputs,
                               source=body, header=header, ensure_row_contiguous=False)


def coded_case(tokens: int, src: Path):
    """(this tree's merge, the other tree's) of the recommended layer's split outputs at `tokens`."""
    cache = cache_series(N_KV, D, 16)[RECOMMENDED](8)
    fill(cache, N_KV, D, tokens)
    q = mx.random.normal((1, N_Q, 1, D)).astype(mx.float16)
    (segment,) = [s for s in cache.segments(exact=False) if s.is_codes]
    exact = [(cache.sink_keys, cache.sink_values), (cache.window_keys, cache.window_values)]
    km, vm = cache.key_quantizer, cache.value_quantizer
    part_o, part_ml, params, MPV, mv = gpu._coded_split(q, segment, km, vm, D**-0.5, None)
    mx.eval(part_o, part_ml)
    R = N_Q // N_KV
    kwargs = {"template": [("D", D), ("R", R), ("MPV", MPV), ("MV", mv), ("NT", gpu.GPU_COMBINE_THREADS),
                           ("HAS_SINKS", True), ("HAS_WINDOW", True), ("OutT", q.dtype)],
              "grid": (R * gpu.GPU_COMBINE_THREADS, N_KV, 1), "threadgroup": (gpu.GPU_COMBINE_THREADS, 1, 1),
              "output_shapes": [(1, N_Q, 1, D)], "output_dtypes": [q.dtype]}
    fp16 = [a for pair in exact for a in pair]
    mine = cuda.kernel("coded_merge")
    other = other_kernel(src, "coded_merge")
    return (lambda: mine(inputs=[q, params, gpu._synthesis_t(vm), *fp16, part_o, part_ml], **kwargs)[0],
            lambda: other(inputs=[q, params, vm.fused_spec().synthesis, *fp16, part_o, part_ml], **kwargs)[0])


def combine_case(tokens: int, src: Path):
    """(this tree's combine, the other tree's) of turboquant_mse k4/v4's two-launch split outputs at `tokens`."""
    cache = CompressedKVCache(head_dim=D, n_kv_heads=N_KV, key_bits=4, value_bits=4)
    fill(cache, N_KV, D, tokens)
    q = mx.random.normal((1, N_Q, 1, D)).astype(mx.float16)
    (segment,) = cache.segments(exact=False)
    kspec, vspec, ksigns, vsigns, _ = gpu._specs(cache.key_quantizer, cache.value_quantizer)
    R = N_Q // N_KV
    split, kwargs = gpu._launch_shape("mma", kspec, vspec, ksigns.shape[0], vsigns.shape[0], (1, N_KV, N_Q, 1, D, R),
                                      q.dtype, True, gpu.split_size("mma", 1, N_KV, segment.length), False, False, 0)
    lengths = gpu.row_lengths(segment.length, 1)
    part_o, part_ml = split(inputs=[q, gpu._scalar(D**-0.5), ksigns, kspec.centroids, vspec.centroids,
                                    segment.key_codes["idx"], segment.key_codes["norm"], segment.value_codes["idx"],
                                    segment.value_codes["norm"], lengths], **kwargs)
    mx.eval(part_o, part_ml)
    inputs = [q, gpu._scalar(D**-0.5), vsigns, segment.key_mean, part_o, part_ml]
    combine = {"template": [("D", D), ("R", R), ("HAS_MEAN", True), ("NT", gpu.GPU_COMBINE_THREADS),
                            ("ROUNDS", vsigns.shape[0]), ("OutT", q.dtype)],
               "grid": (R * gpu.GPU_COMBINE_THREADS, N_KV, 1), "threadgroup": (gpu.GPU_COMBINE_THREADS, 1, 1),
               "output_shapes": [(1, N_Q, 1, D), (1, N_KV, R)], "output_dtypes": [q.dtype, mx.float32]}
    mine, other = cuda.kernel("combine"), other_kernel(src, "combine")
    return (lambda: mine(inputs=inputs, **combine)[0], lambda: other(inputs=inputs, **combine)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="the other tree's quant/kernels/src")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--contexts", nargs="+", type=int, default=[16384, 65536, 131072])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    src = Path(args.against)
    result = {"device": device_info(), "against": str(src), "repeats": args.repeats, "rounds": args.rounds,
              "cases": []}
    for tokens in args.contexts:
        for name, make in (("coded_merge (recommended layer)", coded_case), ("combine (k4/v4, two launches)",
                                                                             combine_case)):
            mine, other = make(tokens, src)
            diff = mx.abs(mine().astype(mx.float32) - other().astype(mx.float32)).max().item()
            times = {"this tree": [], "other tree": []}
            for r in range(args.rounds):
                for label, launch in (("this tree", mine), ("other tree", other))[:: 1 if r % 2 == 0 else -1]:
                    times[label].append(1e3 * time_latency(launch, args.repeats))
            case = {"kernel": name, "tokens": tokens, "max_abs_diff": diff,
                    **{f"{k} us": statistics.median(v) for k, v in times.items()}, "rounds_us": times}
            case["this / other"] = case["this tree us"] / case["other tree us"]
            result["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k != "rounds_us"}), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "kernel_ab_gpu.json").write_text(json.dumps(result, indent=1))
            mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
