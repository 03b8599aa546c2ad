"""How long one expensive call stalls another session's small Attend, before vs after turn-taking, in one run.

Two `kvshard serve --model smollm2-135m` shards run side by side: `before` runs the code of a base revision
from a `git archive` of it (8cb9575: an Append was one encode turn on the MLX thread and a Calibrate one turn
for its whole run; 1bafd57: Appends in turns of --append-slice-cost, a Calibrate one turn per forward pass),
`after` runs this tree (a Calibrate runs in a worker process with its own copy of the model). Rounds alternate between them. In each round one client sends
an expensive call while another sends small Attends (3 x 1 x 64 queries over 256 tokens of another session)
back to back; we record the small calls' latencies while the expensive one runs. The expensive calls:

- append: 4096 tokens x 4 kv heads x 128, fp16 keys and values (8 MiB), then a Trim back;
- calibrate: a RateQuant Calibrate (mode kl, the library's default prompts) of the served model;
- calibrate_profile: a profile-mode Calibrate (moments over one prompt, one budget, 16 validation tokens: the
  cheapest profile the service makes, minutes here), only with --calls naming it;
- attend: queries (64, 4096, 2) fp16 over 256 tokens of one kv head (cost 2^26; sliced on both shards).

    python benchmarks/service_stall.py [--rounds 3] [--calibrate-rounds 1] [--base 1bafd57] [--out benchmarks/results]
    python benchmarks/service_stall.py --shards after --calls calibrate,calibrate_profile --json service_stall_calibrate_cpu.json
writes service_stall_cpu.json (or --json): per shard and expensive call, the median and max small-Attend latency
(ms) during it, and the expensive call's own duration (medians over rounds), with the load average.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ShardProcess, child_env  # noqa: E402 (the tests' helper: a shard as a real process)

from bench import device_info, revision  # noqa: E402 (benchmarks/bench.py, beside this script)
from kvshard.wire import kvshard_pb2 as pb  # noqa: E402
from kvshard.wire import kvshard_pb2_grpc as pb_grpc  # noqa: E402
from kvshard.wire.tensors import from_numpy  # noqa: E402

CHANNEL = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
PACKAGES = ("quant", "service", "wire", "client")  # kvshard.<name> lives in <name>/ (pyproject's package-dir)


class RevisionShard(ShardProcess):
    """A shard running the code of another revision: its tree is unpacked under `tree` and imported through
    a kvshard/ namespace folder of symlinks put first on PYTHONPATH (ahead of this checkout's editable install)."""

    def __init__(self, tmp_path, tree: Path, *args):
        super().__init__(tmp_path, *args)
        self.path = tmp_path / "pythonpath"
        (self.path / "kvshard").mkdir(parents=True)
        for name in PACKAGES:
            (self.path / "kvshard" / name).symlink_to(tree / name)

    def start(self, wait: bool = True, timeout: float = 300):
        command = [sys.executable, "-m", "kvshard.service.cli", "serve", "--port", str(self.port), "--store", self.store, *self.args]
        env = child_env() | {"PYTHONPATH": str(self.path)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        if wait:
            self.wait_serving(timeout)
        return self


def unpack(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, *PACKAGES], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


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
    parser.add_argument("--calibrate-rounds", type=int, default=1, help="a Calibrate of the whole model takes minutes here")
    parser.add_argument("--base", default="1bafd57", help="the revision the `before` shard runs")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shards", default="before,after", help="which shards run: before (--base), after (this tree)")
    parser.add_argument("--calls", default="append,calibrate,attend", help="the expensive calls, in order (also: calibrate_profile)")
    parser.add_argument("--json", default="service_stall_cpu.json", help="the result file's name under --out")
    args = parser.parse_args()
    code_revision = revision()  # now: the shards start from this tree, which may move on while they run
    names = args.shards.split(",")
    chosen = args.calls.split(",")
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="kvshard-stall-"))
    for name in names:
        (tmp / name).mkdir()
    makers = {
        "before": lambda: RevisionShard(tmp / "before", unpack(args.base, tmp / "base-tree"), "--model", args.model),
        "after": lambda: ShardProcess(tmp / "after", "--model", args.model),
    }
    shards = {name: makers[name]() for name in names}
    try:
        for shard in shards.values():
            shard.start(wait=False)
        setups = {}
        for name, shard in shards.items():
            shard.wait_serving(600)
            stub = pb_grpc.KVShardStub(grpc.insecure_channel(shard.target, options=CHANNEL))
            big_sid = raw_session(stub, 1, 2, 256, rng)
            append_sid = raw_session(stub, 4, 128, 16, rng)
            setups[name] = (stub, big_sid, append_sid, raw_session(stub, 3, 64, 256, rng))
        big_queries = from_numpy(rng.standard_normal((64, 4096, 2)).astype(np.float16), pb.FLOAT16)
        big_kv = [from_numpy(rng.standard_normal((4, 4096, 128)).astype(np.float16), pb.FLOAT16) for _ in range(2)]
        samples = {name: {call: [] for call in chosen} for name in shards}
        profile_prompt = "The old lighthouse keeper climbed the spiral stairs every evening and watched the ships pass the rocky point."
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, (stub, big_sid, append_sid, small_sid) in setups.items():
                calls = {
                    "append": lambda: (
                        stub.Append(pb.AppendRequest(session_id=append_sid, keys=big_kv[0], values=big_kv[1])),
                        stub.Trim(pb.TrimRequest(session_id=append_sid, n=4096)),
                    ),
                    "calibrate": lambda: stub.Calibrate(pb.CalibrateRequest(mode="kl", target_avg_bits=4), timeout=1800),
                    "calibrate_profile": lambda: stub.Calibrate(pb.CalibrateRequest(
                        profile="stall-profile", profile_budgets=[3.5], validation_tokens=16, prompts=[profile_prompt]), timeout=1800),
                    "attend": lambda: stub.Attend(pb.AttendRequest(session_id=big_sid, queries=big_queries)),
                }
                for call in chosen:
                    if not call.startswith("calibrate") or len(samples[name][call]) < args.calibrate_rounds:
                        samples[name][call].append(small_latencies_during(stub, small_sid, calls[call]))
                load.append(os.getloadavg()[0])
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
        worst = {call: results["before"][call]["small_attend_max_ms"] / results["after"][call]["small_attend_max_ms"]
                 for call in chosen if len(results) == 2}
        report = {
            "what": __doc__.splitlines()[0],
            "machine": device_info(),
            "revision": code_revision,
            "load_average_1min": {"median": statistics.median(load), "min": min(load), "max": max(load)},
            "rounds": args.rounds,
            "calibrate_rounds": args.calibrate_rounds,
            "before": f"revision {args.base}" if "before" in shards else None,
            "after": "this tree (--append-slice-cost 2^18, Calibrate in a worker process with its own model copy)",
            "expensive_append": "4096 tokens x 4 kv heads x 128 fp16 keys and values (8 MiB), then a Trim back",
            "expensive_calibrate": f"Calibrate mode kl on {args.model}, the default prompts",
            "expensive_attend": "queries (64, 4096, 2) fp16 over 256 tokens, 1 kv head: cost 2^26",
            "expensive_calibrate_profile": "Calibrate profile=stall-profile, profile_budgets [3.5], validation_tokens 16, one prompt",
            "worst_wait_before_over_after": worst,
            "results": results,
        }
        os.makedirs(args.out, exist_ok=True)
        path = Path(args.out) / args.json
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({"worst_wait_before_over_after": worst, "results": results}, indent=2))
    finally:
        for shard in shards.values():
            if shard.proc is not None:
                shard.stop()


if __name__ == "__main__":
    main()
