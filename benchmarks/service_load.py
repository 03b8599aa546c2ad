"""Load proof: 64 concurrent clients over 256 raw sessions, mixed RPCs including deliberately expensive Attends,
against one `kvshard serve --model none` shard with a memory budget smaller than the sessions.

Each client loops for --seconds: a random session and a random call: small Append, small Attend, GetSession,
Trim, ListSessions, ServerInfo, an expensive Attend inside --max-attend-cost (about 2^22.5 of the 2^26), and
one over it on one of 8 long sessions (8K tokens per layer; deliberately refused: RESOURCE_EXHAUSTED naming
max_attend_cost). Every other non-OK answer is an error, except RESOURCE_EXHAUSTED memory_budget_bytes,
which is also counted apart (the budget is a limit too).
The shard's RSS (/proc), hot-session bytes and MLX's live and cached bytes (its /metrics) are sampled every
0.25 s; RSS growth is counted from the idle process (started and warmed up by one call of each kind on a small session,
then deleted: warm_up), which --memory-budget does not cover.

    python benchmarks/service_load.py [--seconds 60] [--out benchmarks/results]
writes service_load_cpu.json: calls, codes and p50/p99 latency (ms) per RPC, errors, RSS and hot bytes.
"""

import argparse
import collections
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ShardProcess, free_port  # noqa: E402 (the tests' helper: a shard as a real process)

from bench import device_info, revision  # noqa: E402 (benchmarks/bench.py, beside this script)
from kvshard.wire import kvshard_pb2 as pb  # noqa: E402
from kvshard.wire import kvshard_pb2_grpc as pb_grpc  # noqa: E402
from kvshard.wire.tensors import from_numpy  # noqa: E402

CLIENTS, SESSIONS = 64, 256
LAYERS, HEADS, DIM = 2, 3, 64
BUDGET = 128 << 20
LONG_SESSIONS, LONG_TOKENS = 8, 8192
MAX_TOKENS = 1536  # clients trim a session back when it holds more
WEIGHTS = {"Append": 35, "Attend": 30, "GetSession": 15, "Trim": 5, "ListSessions": 3, "ServerInfo": 4, "AttendExpensive": 2, "AttendOverLimit": 4}


def tensor(rng, *shape):
    return from_numpy(rng.standard_normal(shape).astype(np.float32), pb.FLOAT32)


class Load:
    def __init__(self, target, sessions, long_sessions, seconds, over_limit):
        self.target = target
        self.sessions = sessions
        self.long_sessions = long_sessions
        self.seconds = seconds
        self.deadline = None  # set when the clients start
        self.over_limit = over_limit
        self.latencies = collections.defaultdict(list)
        self.codes = collections.defaultdict(collections.Counter)
        self.errors = collections.Counter()
        self.budget_refusals = 0
        self.refusals = collections.defaultdict(collections.Counter)  # rpc -> reason -> count
        self.lock = threading.Lock()

    def client(self, seed):
        rng = np.random.default_rng(seed)
        pick = random.Random(seed)
        stub = pb_grpc.KVShardStub(grpc.insecure_channel(self.target))
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        over_limit = self.over_limit
        while time.monotonic() < self.deadline:
            rpc = pick.choices(names, weights)[0]
            sid = pick.choice(self.sessions)
            layer = pick.randrange(LAYERS)
            if rpc == "Append":
                kv = tensor(rng, HEADS, pick.randint(1, 16), DIM)
                call = lambda: stub.Append(pb.AppendRequest(session_id=sid, layer=layer, keys=kv, values=kv), timeout=60)  # noqa: E731
            elif rpc == "Attend":
                call = lambda: stub.Attend(pb.AttendRequest(session_id=sid, layer=layer, queries=tensor(rng, HEADS * 3, 1, DIM)), timeout=60)  # noqa: E731
            elif rpc == "AttendExpensive":  # 18 heads x 256 tokens x ~1.2K tokens, about 2^22.5
                call = lambda: stub.Attend(pb.AttendRequest(session_id=sid, layer=layer, queries=tensor(rng, HEADS * 6, 256, DIM)), timeout=60)  # noqa: E731
            elif rpc == "AttendOverLimit":  # 96 heads x 100 tokens (1.2 MiB fp16) over 8K tokens: 2^26.2
                long_sid = pick.choice(self.long_sessions)
                call = lambda: stub.Attend(pb.AttendRequest(session_id=long_sid, layer=layer, queries=over_limit), timeout=60)  # noqa: E731
            elif rpc == "GetSession":
                call = lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=60)  # noqa: E731
            elif rpc == "Trim":
                call = lambda: stub.Trim(pb.TrimRequest(session_id=sid, n=pick.randint(1, 32)), timeout=60)  # noqa: E731
            elif rpc == "ListSessions":
                call = lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=100), timeout=60)  # noqa: E731
            else:
                call = lambda: stub.ServerInfo(pb.ServerInfoRequest(), timeout=60)  # noqa: E731
            start = time.perf_counter()
            try:
                answer = call()
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                answer, code = None, error.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with self.lock:
                        self.refusals[rpc][refusal_reason(error.details())] += 1
            elapsed = 1000 * (time.perf_counter() - start)
            deliberate = rpc == "AttendOverLimit" and code == grpc.StatusCode.RESOURCE_EXHAUSTED
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not deliberate:
                with self.lock:
                    self.budget_refusals += 1
                deliberate = True
            with self.lock:
                self.latencies[rpc].append(elapsed)
                self.codes[rpc][code.name] += 1
                if code != grpc.StatusCode.OK and not deliberate:
                    self.errors[f"{rpc} {code.name}"] += 1
            if rpc == "Append" and answer is not None and answer.offset > MAX_TOKENS:
                stub.Trim(pb.TrimRequest(session_id=sid, n=MAX_TOKENS // 2), timeout=60)


def refusal_reason(details: str) -> str:
    """A RESOURCE_EXHAUSTED's reason without its numbers: the limit it names and what did not fit."""
    return re.sub(r"\d+", "N", details)[:120]


def warm_up(stub) -> None:
    """What the idle process is measured after: every kind of call served once on a small session, then the
    session deleted. The first calls page in code, start OpenBLAS's thread buffers and MLX's, which no budget
    can hold back and which stay the same however many sessions and calls follow."""
    rng = np.random.default_rng(1)
    shape = pb.RawShape(layers=LAYERS, n_kv_heads=HEADS, head_dim=DIM)
    sid = stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=shape), timeout=60).session_id
    kv = tensor(rng, HEADS, 64, DIM)
    stub.Append(pb.AppendRequest(session_id=sid, layer=0, keys=kv, values=kv), timeout=60)
    stub.Attend(pb.AttendRequest(session_id=sid, layer=0, queries=tensor(rng, HEADS * 3, 4, DIM)), timeout=60)
    for call, request in (("GetSession", pb.GetSessionRequest(session_id=sid)), ("Trim", pb.TrimRequest(session_id=sid, n=1)),
                          ("ListSessions", pb.ListSessionsRequest()), ("ServerInfo", pb.ServerInfoRequest()),
                          ("DeleteSession", pb.DeleteSessionRequest(session_id=sid))):
        getattr(stub, call)(request, timeout=60)
    time.sleep(2)  # the shard trims its heaps every second


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


GAUGES = {"hot": "kvshard_hot_session_bytes", "working": "kvshard_call_working_bytes", "mlx_active": "kvshard_mlx_active_bytes",
          "mlx_cache": "kvshard_mlx_cache_bytes", "resident_growth": "kvshard_resident_growth_bytes"}


def gauges(metrics_port: int) -> dict[str, float]:
    """The shard's memory gauges (its /metrics): hot-session bytes, MLX arrays alive, MLX's buffer cache."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("kvshard_")}
    return {key: values[name] for key, name in GAUGES.items()}


def memory_map(pid: int) -> dict[str, int]:
    """Resident bytes of the process's anonymous memory by kind (/proc/PID/smaps): the C heap, and other
    anonymous mappings (mmapped blocks, thread stacks and arenas, MLX's buffers)."""
    kinds = {"heap": 0, "anonymous": 0, "file": 0}
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else ""
            kind = "heap" if name == "[heap]" else "anonymous" if not name or name.startswith("[anon") else "file"
        elif fields[0] == "Rss:":
            kinds[kind] += int(fields[1]) * 1024
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    code_revision = revision()  # now: the shards start from this tree, which may move on while they run
    tmp = Path(tempfile.mkdtemp(prefix="kvshard-load-"))
    metrics_port = free_port()
    shard = ShardProcess(tmp, "--model", "none", "--memory-budget", str(BUDGET), "--metrics-port", str(metrics_port), "--log-format", "json").start()
    try:
        stub = pb_grpc.KVShardStub(grpc.insecure_channel(shard.target))
        warm_up(stub)
        idle_rss = rss_bytes(shard.proc.pid)  # the idle process, warmed up (warm_up)
        idle_map = memory_map(shard.proc.pid)
        rng = np.random.default_rng(0)
        sessions = []
        for _ in range(SESSIONS):
            shape = pb.RawShape(layers=LAYERS, n_kv_heads=HEADS, head_dim=DIM)
            sid = stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=shape)).session_id
            for layer in range(LAYERS):
                kv = tensor(rng, HEADS, 1024, DIM)
                stub.Append(pb.AppendRequest(session_id=sid, layer=layer, keys=kv, values=kv))
            sessions.append(sid)
        long_sessions = []
        for _ in range(LONG_SESSIONS):
            shape = pb.RawShape(layers=LAYERS, n_kv_heads=HEADS, head_dim=DIM)
            sid = stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=shape)).session_id
            for layer in range(LAYERS):
                for _ in range(LONG_TOKENS // 2048):
                    kv = tensor(rng, HEADS, 2048, DIM)
                    stub.Append(pb.AppendRequest(session_id=sid, layer=layer, keys=kv, values=kv))
            long_sessions.append(sid)
        setup_rss = rss_bytes(shard.proc.pid)
        over_limit = from_numpy(rng.standard_normal((HEADS * 32, 100, DIM)).astype(np.float16), pb.FLOAT16)
        load = Load(shard.target, sessions, long_sessions, args.seconds, over_limit)
        samples = {"rss": [], **{key: [] for key in GAUGES}}
        timeline = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss = rss_bytes(shard.proc.pid)
                try:
                    values = gauges(metrics_port)
                except OSError:  # a scrape can time out under this load; RSS is still sampled
                    samples["scrape_timeouts"] = samples.get("scrape_timeouts", 0) + 1
                    values = {}
                samples["rss"].append(rss)
                for key, value in values.items():
                    samples[key].append(value)
                if values:
                    timeline.append({"rss": rss, **values, **memory_map(shard.proc.pid)})
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=load.client, args=(seed,)) for seed in range(CLIENTS)]
        started = time.perf_counter()
        load.deadline = time.monotonic() + load.seconds
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        time.sleep(3)  # the shard idles: what stays resident once no call is in flight
        settled = {"rss": rss_bytes(shard.proc.pid), **gauges(metrics_port), **memory_map(shard.proc.pid)}
        peak = max(timeline, key=lambda row: row["rss"])
        per_rpc = {
            rpc: {
                "calls": len(lat),
                "codes": dict(load.codes[rpc]),
                "p50_ms": round(statistics.median(lat), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
            }
            for rpc, lat in sorted(load.latencies.items())
        }
        report = {
            "what": __doc__.splitlines()[0],
            "machine": device_info(),
            "revision": code_revision,
            "clients": CLIENTS,
            "sessions": SESSIONS,
            "session_shape": {"layers": LAYERS, "n_kv_heads": HEADS, "head_dim": DIM, "tokens_per_layer_at_start": 1024},
            "seconds": round(wall, 1),
            "memory_budget_bytes": BUDGET,
            "per_rpc": per_rpc,
            "errors": dict(load.errors),
            "memory_budget_refusals": load.budget_refusals,
            "refusals_per_rpc": {rpc: dict(reasons) for rpc, reasons in sorted(load.refusals.items())},
            "long_sessions": {"count": LONG_SESSIONS, "tokens_per_layer": LONG_TOKENS},
            "calls_per_second": round(sum(len(v) for v in load.latencies.values()) / wall, 1),
            "load_average_1min_at_end": os.getloadavg()[0],
            "rss_idle_bytes": idle_rss,
            "idle_memory_map": idle_map,
            "rss_after_setup_bytes": setup_rss,
            "rss_peak_bytes": max(samples["rss"]),
            "rss_peak_over_idle_bytes": max(samples["rss"]) - idle_rss,
            "rss_growth_over_idle_under_budget": max(samples["rss"]) - idle_rss <= BUDGET,
            "hot_session_bytes_peak": max(samples["hot"]),
            "hot_session_bytes_under_budget": max(samples["hot"]) <= BUDGET,
            "call_working_bytes_peak": max(samples["working"]),
            "hot_plus_working_bytes_peak": max(h + w for h, w in zip(samples["hot"], samples["working"])),
            "mlx_active_bytes_peak": max(samples["mlx_active"]),
            "mlx_cache_bytes_peak": max(samples["mlx_cache"]),
            "at_rss_peak": peak,
            "settled_after_load": settled,
            "metrics_scrape_timeouts": samples.get("scrape_timeouts", 0),
            "shard_alive": shard.proc.poll() is None,
        }
        os.makedirs(args.out, exist_ok=True)
        (Path(args.out) / "service_load_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        shard.stop()


if __name__ == "__main__":
    main()
