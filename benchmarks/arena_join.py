"""What sessions joining and leaving a batch arena cost, beside the batched decode step itself (in process, the
service's Sessions and Decoders, no gRPC).

32 sessions of a random-weight Llama-3.2-1B-shaped model (service/random_model.py; fp16 on a GPU) hold contexts of
100 to 4,000 tokens (turboquant_mse 4/4 bits). Side by side: for 1, 8 and 32 of them, the first batched step (the
rows join the arena) and the median step after; then the 32 joining a fresh arena all at once (BatchArena.join
with every session, as a scheduler turn that gathers them) and one session at a time (as streams arriving turn by
turn), and the 32 leaving one by one (as streams finish). On a GPU each evaluation is a wait for the device, so
these count how often the arena evaluates.

    python benchmarks/arena_join.py [--model random:llama-3.2-1b] [--out benchmarks/results]  -> arena_join_<device>.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_step import prefilled  # noqa: E402 (beside this script)
from bench import device_info  # noqa: E402

from kvshard.quant import kernels  # noqa: E402
from kvshard.quant.batch_arena import BatchArena  # noqa: E402
from kvshard.service.generation import decode_batch  # noqa: E402
from kvshard.service.model import ServedModel  # noqa: E402

SESSIONS = 32


def timed_ms(fn) -> float:
    mx.synchronize()
    started = time.perf_counter()
    fn()
    mx.synchronize()
    return 1e3 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    served = ServedModel.load(args.model)
    contexts = [100 + (4000 - 100) * i // (SESSIONS - 1) for i in range(SESSIONS)]
    started = time.perf_counter()
    decoders = [prefilled(served, n, i) for i, n in enumerate(contexts)]
    result = {"device": device_info(), "model": args.model, "cache": "turboquant_mse, 4-bit keys and values",
              "contexts": contexts, "prefill_s": time.perf_counter() - started, "steps": {}}
    for n in (1, 8, 32):
        arena, rows = BatchArena(), decoders[:: SESSIONS // n][:n]
        first = timed_ms(lambda: decode_batch(rows, arena))
        decode_batch(rows, arena)
        steps = [timed_ms(lambda: decode_batch(rows, arena)) for _ in range(args.steps)]
        result["steps"][str(n)] = {"first_step_ms": first, "median_step_ms": statistics.median(steps),
                                   "contexts": [contexts[decoders.index(d)] for d in rows]}
        print(n, result["steps"][str(n)], flush=True)
        for decoder in rows:
            arena.release(decoder.session.caches)
    sessions = [d.session.caches for d in decoders]
    for way in ("all at once", "one at a time"):
        arena = BatchArena()
        join = (lambda: arena.join(sessions)) if way == "all at once" else (lambda: [arena.join([s]) for s in sessions])
        joined = timed_ms(join)
        left = timed_ms(lambda: [arena.release(s) for s in sessions])
        result[f"join {SESSIONS} {way}_ms"] = joined
        result[f"release {SESSIONS} one by one, after joining {way}_ms"] = left
        print(way, joined, left, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if kernels.gpu_backend() else "cpu"
    (out / f"arena_join_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
