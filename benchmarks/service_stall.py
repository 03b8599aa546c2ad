"""How long one expensive call stalls another session's small Attend, with Attend slicing off vs on, in one run.

Two `kvshard serve --model none` shards run side by side: `unsliced` (--attend-slice-cost 2^40: an Attend is
one turn on the MLX thread, as before issue 11) and `sliced` (the default 2^18). Rounds alternate between
them. In each round a client sends an expensive Attend like the issue's, queries (64, 4096, 2) FLOAT16 over
256 tokens of one kv head (cost 2^26, the default --max-attend-cost), while another client sends small
Attends (3 x 1 x 64 queries over 256 tokens of another session) back to back; we record the small calls'
latencies while the big one runs. Also an 8 MiB Append (4096 tokens x 4 heads x 128, fp16; not sliced: an
append is one encode) as the expensive call, for the record.

    python benchmarks/service_stall.py [--rounds 3] [--out benchmarks/results]
writes service_stall_cpu.json: per shard and expensive call, the median and max small-Attend latency (ms)
during it, and the expensive call's own duration (medians over rounds).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ShardProcess  # noqa: E402 (the tests' helper: a shard as a real process)

from bench import device_info  # noqa: E402 (benchmarks/bench.py, beside this script)
from kvshard.wire import kvshard_pb2 as pb  # noqa: E402
from kvshard.wire import kvshard_pb2_grpc as pb_grpc  # noqa: E402
from kvshard.wire.tensors import from_numpy  # noqa: E402

SHARDS = {"unsliced": 1 << 40, "sliced": 1 << 18}
CHANNEL = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def raw_session(stub, heads, dim, tokens, rng):
    shape = pb.RawShape(layers=1, n_kv_heads=heads, head_dim=dim)
    sid = stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=shape)).session_id
    k, v = (from_numpy(rng.standard_normal((heads, tokens, dim)).astype(np.float32), pb.FLOAT32) for _ in range(2))
    stub.Append(pb.AppendRequest(session_id=sid, keys=k, values=v))
    return sid


def small_latencies_during(stub, small_sid, expensive) -> tuple[list[float], float]:
    """Small Attends back to back while `expensive()` runs: their latencies (ms) and its duration (ms)."""
    query = from_numpy(np.ones((3, 1, 64), np.float32), pb.FLOAT32)
    done = threading.Event()
    latencies = []

    def small_calls():
        while not done.is_set():
            start = time.perf_counter()
            stub.Attend(pb.AttendRequest(session_id=small_sid, queries=query))
            latencies.append(1000 * (time.perf_counter() - start))

    worker = threading.Thread(target=small_calls)
    worker.start()
    time.sleep(0.2)  # the small calls are flowing before the expensive one arrives
    del latencies[:]
    start = time.perf_counter()
    expensive()
    duration = 1000 * (time.perf_counter() - start)
    done.set()
    worker.join()
    return latencies, duration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="kvshard-stall-"))
    shards = {name: ShardProcess(tmp, "--model", "none", "--attend-slice-cost", str(cost)).start() for name, cost in SHARDS.items()}
    try:
        setups = {}
        for name, shard in shards.items():
            stub = pb_grpc.KVShardStub(grpc.insecure_channel(shard.target, options=CHANNEL))
            big_sid = raw_session(stub, 1, 2, 256, rng)
            append_sid = raw_session(stub, 4, 128, 1, rng)
            setups[name] = (stub, big_sid, append_sid, raw_session(stub, 3, 64, 256, rng))
        big_queries = from_numpy(rng.standard_normal((64, 4096, 2)).astype(np.float16), pb.FLOAT16)
        big_kv = [from_numpy(rng.standard_normal((4, 4096, 128)).astype(np.float16), pb.FLOAT16) for _ in range(2)]
        samples = {name: {"attend": [], "append": []} for name in shards}
        for _ in range(args.rounds):
            for name, (stub, big_sid, append_sid, small_sid) in setups.items():
                calls = {
                    "attend": lambda: stub.Attend(pb.AttendRequest(session_id=big_sid, queries=big_queries)),
                    "append": lambda: (
                        stub.Append(pb.AppendRequest(session_id=append_sid, keys=big_kv[0], values=big_kv[1])),
                        stub.Trim(pb.TrimRequest(session_id=append_sid, n=4096)),
                    ),
                }
                for call, expensive in calls.items():
                    samples[name][call].append(small_latencies_during(stub, small_sid, expensive))
        results = {}
        for name, calls in samples.items():
            results[name] = {
                call: {
                    "small_attend_median_ms": statistics.median(statistics.median(lat) for lat, _ in rounds),
                    "small_attend_max_ms": statistics.median(max(lat) for lat, _ in rounds),
                    "small_attends_per_round": statistics.median(len(lat) for lat, _ in rounds),
                    "expensive_call_ms": statistics.median(d for _, d in rounds),
                }
                for call, rounds in calls.items()
            }
        report = {
            "what": __doc__.splitlines()[0],
            "machine": device_info(),
            "rounds": args.rounds,
            "attend_slice_cost": SHARDS,
            "expensive_attend": "queries (64, 4096, 2) fp16 over 256 tokens, 1 kv head: cost 2^26",
            "expensive_append": "4096 tokens x 4 kv heads x 128 fp16 keys and values (8 MiB), then a Trim back",
            "results": results,
        }
        os.makedirs(args.out, exist_ok=True)
        path = Path(args.out) / "service_stall_cpu.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(results, indent=2))
    finally:
        for shard in shards.values():
            shard.stop()


if __name__ == "__main__":
    main()
