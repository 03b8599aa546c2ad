"""Start-up time saved by `kvshard precompute`: building caches in a fresh process with the artifacts loaded from
the folder (`with_artifact_store`) vs computed (Lloyd-Max codebooks, QR rotations), side by side.

Each sample is a new Python process that imports kvshard, then times only the cache construction (imports are
the same either way). Scenarios alternate, in reversed order every other round; medians are reported.

    python benchmarks/precompute.py [--rounds 5] [--out benchmarks/results]
writes precompute_cpu.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

from kvshard.quant.precompute import PRECOMPUTED_METHODS, precompute

SCENARIOS = {
    # one layer kind of the embedded model: TurboQuant-MSE, 4-bit keys, 2-bit values, head_dim 64
    "turboquant_mse k4/v2, head_dim 64": [("turboquant_mse", 64, 4, 2)],
    # RateQuant-style per-layer bits: key/value widths 1..4 of the residual-VQ method at head_dim 128
    "turboquant_rvq bits 1..4, head_dim 128": [("turboquant_rvq", 128, b, b) for b in range(1, 5)],
    # every method the store covers at bits 1..4, head_dims 64 and 128
    "all methods, bits 1..4, head_dims 64+128": [(m, d, b, b) for m in PRECOMPUTED_METHODS for d in (64, 128)
                                                  for b in range(1, 5) if not (m == "turboquant_prod" and b < 2)],
}

CHILD = """
import sys, time
from kvshard.quant import KVCacheBuilder
cases, store = eval(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
for method, dim, key_bits, value_bits in cases:
    builder = KVCacheBuilder().with_method(method).with_head_dim(dim).with_bit_width(inlier=key_bits, value=value_bits)
    (builder.with_artifact_store(store) if store != "-" else builder).build()
print(time.perf_counter() - start)
"""


def _sample(cases, store) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, repr(cases), store or "-"], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="kvshard-artifacts-")
    start = time.perf_counter()
    files = precompute(folder, (64, 128), range(1, 5), (42,))
    precompute_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    samples = {(name, store): [] for name in SCENARIOS for store in ("computed", "loaded")}
    order = list(samples)
    for round_ in range(args.rounds):
        for name, store in order if round_ % 2 == 0 else order[::-1]:
            samples[name, store].append(_sample(SCENARIOS[name], folder if store == "loaded" else None))
    rows = []
    for name in SCENARIOS:
        computed, loaded = (statistics.median(samples[name, s]) for s in ("computed", "loaded"))
        rows.append({"scenario": name, "caches": len(SCENARIOS[name]), "computed_s": computed, "loaded_s": loaded,
                     "saving_s": computed - loaded, "speedup": computed / loaded,
                     "samples": {s: samples[name, s] for s in ("computed", "loaded")}})
        print(f"{name:42s} computed {computed:7.3f} s  loaded {loaded:7.3f} s  x{computed / loaded:6.1f}", flush=True)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    result = {"benchmark": "precompute", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "mlx": mx.__version__},
              "store": {"head_dims": [64, 128], "bits": list(range(1, 5)), "seeds": [42], "files": len(files),
                        "bytes": size, "precompute_s": precompute_s},
              "rounds": args.rounds, "statistic": "median over rounds, each a fresh process", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "precompute_cpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
