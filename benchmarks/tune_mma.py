"""Launch-shape sweep of the tensor-core kernel, device time per launch under Nsight Compute: warps per block,
code buffers per warp and target grid, one decode step of one layer at 4 bits (Llama-3.2-1B and Llama-3.1-8B
attention shapes, batch 1 and 8), fp16 SDPA beside it. (results/tune_mma_gpu.json also has a `reg_lut` arm:
centroids from registers, measured slower everywhere and removed.)

    ncu --clock-control none --profile-from-start off --csv --page raw \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \\
        python3 benchmarks/tune_mma.py --series ours --shapes 0 --manifest /tmp/ours_0.json > /tmp/ours_0.csv
    (each shape in its own run, so that a timeout loses one; the same with --series fp16)
    python3 benchmarks/tune_mma.py --summarise /tmp/ours_ /tmp/fp16_ > benchmarks/results/tune_mma_gpu.json
    run_gpu.sh (TUNE=1) runs all of it.

Each case launches REPEATS times between cuProfilerStart/Stop; the manifest lists the cases in launch order,
so the CSV's kernel rows map back to them (ours: the rows of kvshard's kernels; fp16: all rows, in equal groups).
"""

import argparse
import csv
import ctypes
import itertools
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.kernels import gpu

SHAPES = [  # (label, query heads, kv heads, head_dim, batch, contexts)
    ("llama-3.2-1b b1", 32, 8, 64, 1, (16384, 65536, 131072)),
    ("llama-3.1-8b b1", 32, 8, 128, 1, (32768, 131072)),
    ("llama-3.1-8b b8", 32, 8, 128, 8, (32768, 131072)),
]
BUFFERS = {64: (3, 4, 5), 128: (2, 3)}
REPEATS = 3
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "sm__warps_active.avg.pct_of_peak_sustained_active")


def variants(D: int):
    for warps, nb, target in itertools.product((4, 8), BUFFERS[D], (396, 528, 792)):
        yield {"warps": warps, "buffers": nb, "target_blocks": target}


def apply(v: dict, D: int) -> None:
    gpu.GPU_MMA_WARPS, gpu.GPU_MMA_TARGET_BLOCKS = v["warps"], v["target_blocks"]
    gpu.GPU_MMA_BUFFERS = {**gpu.GPU_MMA_BUFFERS, D: v["buffers"]}
    gpu._launch_shape.cache_clear()  # it reads the module's settings


def run(series: str, manifest_path: str, shapes: list) -> None:
    driver = ctypes.CDLL("libcuda.so.1")  # ncu --profile-from-start off records between start and stop
    manifest = []
    defaults = (gpu.GPU_MMA_WARPS, gpu.GPU_MMA_TARGET_BLOCKS, dict(gpu.GPU_MMA_BUFFERS))
    for label, Hq, H, D, B, contexts in (SHAPES[i] for i in shapes):
        for tokens in contexts:
            k = mx.random.normal((B, H, tokens, D)).astype(mx.float16)
            v = mx.random.normal((B, H, tokens, D)).astype(mx.float16)
            q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
            scale = D**-0.5
            mx.eval(k, v, q)
            if series == "fp16":
                cases = [({}, lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))]
            else:
                cache = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=4, value_bits=4)
                for start in range(0, tokens, 8192):
                    cache.update_and_fetch(k[:, :, start:start + 8192], v[:, :, start:start + 8192])
                    mx.eval(cache.state)
                reference = cache.attention(q, scale).astype(mx.float32)
                mx.eval(reference)
                cases = [(var, lambda: cache.attention(q, scale)) for var in variants(D)]
            for var, call in cases:
                if var:
                    apply(var, D)
                err = None
                try:
                    out = call()
                    mx.eval(out)  # compiles outside the profiled range
                    if var:
                        err = mx.abs(out.astype(mx.float32) - reference).max().item()
                    mx.synchronize()
                    driver.cuProfilerStart()
                    for _ in range(REPEATS):
                        mx.eval(call())
                    mx.synchronize()
                    driver.cuProfilerStop()
                    launched = True
                except Exception as e:  # noqa: BLE001 (a shape the kernel cannot launch)
                    launched, err = False, str(e)[:200]
                manifest.append({"shape": label, "batch": B, "head_dim": D, "tokens": tokens, **var,
                                 "launched": launched, "max_abs_diff_vs_default": err})
            gpu.GPU_MMA_WARPS, gpu.GPU_MMA_TARGET_BLOCKS = defaults[0], defaults[1]
            gpu.GPU_MMA_BUFFERS = dict(defaults[2])
            gpu._launch_shape.cache_clear()
            del k, v
            mx.clear_cache()
            with open(manifest_path, "w") as f:  # after every context: a run cut short keeps what it launched
                json.dump(manifest, f)


UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "byte": 1.0,
         "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "%": 1.0, "": 1.0}  # to µs, bytes, percent


def _kernel_rows(path: str) -> list:
    """[(kernel name, {metric: value in µs / bytes / %})] in launch order from ncu's raw CSV (a header row,
    a units row, then one row per kernel)."""
    rows = list(csv.DictReader(line for line in open(path) if line.startswith('"')))
    units = next((r for r in rows if not r.get("ID", "").isdigit()), {})
    out = []
    for r in rows:
        if not r.get("ID", "").isdigit():
            continue
        values = {}
        for m in METRICS:
            try:
                values[m] = float(r[m].replace(",", "")) * UNITS.get(units.get(m, ""), 1.0)
            except (KeyError, ValueError):
                values[m] = None
        out.append((r.get("Kernel Name", ""), values))
    return out


def summarise(ours: list, fp16: list) -> dict:
    """Median µs per launch (and achieved read TB/s, active warps) per case, from (manifest, CSV) pairs of
    ncu runs (one per shape); the fp16 SDPA beside each shape."""
    def per_case(manifest, rows):
        cases = [c for c in manifest if c["launched"]]
        per = len(rows) // max(1, len(cases) * REPEATS)  # kernels per call
        result = []
        for i, case in enumerate(cases):
            calls = [rows[(i * REPEATS + j) * per:(i * REPEATS + j + 1) * per] for j in range(REPEATS)]
            us = statistics.median(sum(v[METRICS[0]] or 0.0 for _, v in call) for call in calls)
            read = statistics.median(sum(v[METRICS[1]] or 0.0 for _, v in call) for call in calls)
            warps = [v[METRICS[2]] for call in calls for _, v in call if v[METRICS[2]] is not None]
            result.append(dict(case, us=us, read_tb_s=read / (us * 1e-6) / 1e12 if us else None,
                               warps_active_pct=statistics.median(warps) if warps else None,
                               kernels_per_call=per))
        return result

    def runs(pairs, keep):
        out = []
        for manifest, rows in pairs:
            try:
                out += per_case(json.load(open(manifest)), [r for r in _kernel_rows(rows) if keep(r[0])])
            except (OSError, ValueError, IndexError) as e:  # a run cut short by its timeout: left out, said so
                print(f"{manifest}: {e}", file=sys.stderr)
        return out

    ours = runs(ours, lambda name: "kvshard" in name)
    fp16 = runs(fp16, lambda name: True)
    base = {(c["shape"], c["tokens"]): c["us"] for c in fp16}
    for c in ours:
        c["vs_fp16_sdpa"] = c["us"] / base[(c["shape"], c["tokens"])] if base.get((c["shape"], c["tokens"])) else None
    best = {}
    for c in ours:
        key = f'{c["shape"]} {c["tokens"]}'
        if key not in best or c["us"] < best[key]["us"]:
            best[key] = c
    return {"metrics": METRICS, "repeats": REPEATS, "fp16_sdpa": fp16, "ours": ours, "best": best}


def apply_best(path: str) -> dict:
    """Set gpu.py's tensor-core launch shape to the sweep's fastest: warps and grid by the summed device time
    over the Llama-3.2-1B contexts (the end-to-end model's shape; these settings are shared by head dims), then
    each head_dim's buffers given those. Returns what it set."""
    rows = [r for r in json.load(open(path))["ours"] if r.get("us") and not r.get("reg_lut")]
    def fastest(candidates, keys):
        totals = {}
        for r in candidates:
            totals.setdefault(tuple(r[k] for k in keys), []).append(r["us"])
        most = max(len(v) for v in totals.values())
        return min((k for k, v in totals.items() if len(v) == most), key=lambda k: sum(totals[k]))
    shared = ("warps", "target_blocks")
    chosen = dict(zip(shared, fastest([r for r in rows if r["head_dim"] == 64 and r["batch"] == 1],
                                      shared + ("buffers",))))
    buffers = {}
    for D in sorted({r["head_dim"] for r in rows}):
        same = [r for r in rows if r["head_dim"] == D and all(r[k] == chosen[k] for k in shared)]
        buffers[D] = fastest(same, ("buffers",))[0]
    gpu.GPU_MMA_WARPS, gpu.GPU_MMA_TARGET_BLOCKS = chosen["warps"], chosen["target_blocks"]
    gpu.GPU_MMA_BUFFERS = {**gpu.GPU_MMA_BUFFERS, **buffers}
    gpu._launch_shape.cache_clear()
    return dict(chosen, buffers=buffers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", choices=("ours", "fp16"))
    parser.add_argument("--manifest")
    parser.add_argument("--shapes", nargs="+", type=int, default=list(range(len(SHAPES))), help="indices of SHAPES")
    parser.add_argument("--summarise", nargs=2, metavar=("OURS_PREFIX", "FP16_PREFIX"),
                        help="PREFIX*.json manifests, each beside its PREFIX*.csv")
    args = parser.parse_args()
    if args.summarise:
        pairs = [[(str(m), str(m.with_suffix(".csv")))
                  for m in sorted(Path(prefix).parent.glob(Path(prefix).name + "*.json"))] for prefix in args.summarise]
        json.dump(summarise(*pairs), sys.stdout, indent=1)
        return
    run(args.series, args.manifest, args.shapes)


if __name__ == "__main__":
    main()
