"""Shards on one Redis store: commits/s with 1, 2 and 3 shards, where the CPU goes, sessions held, and bytes
per stored session token against fp16.

Starts deploy/local-cluster.sh 3 (raw-cache shards, `--model none`, so the commit path is measured, not the
model) and drives Append calls (one commit each) from client threads spread over the first 1, 2 or 3 shards,
in alternating order (1 2 3 3 2 1 ...), medians over rounds. CPU seconds of Redis, the shards and this client
process are read from /proc over each round, so the bottleneck is measured, not guessed.

    .venv/bin/python benchmarks/cluster_scale.py --out benchmarks/results/cluster_scale_cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

from kvshard.client import Client

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M's cache shape: 30 layers, 3 KV heads, head_dim 64.
LAYERS, HEADS, DIM = 30, 3, 64


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_cluster(run_dir: Path) -> dict:
    env = dict(os.environ, KVSHARD_RUN_DIR=str(run_dir), KVSHARD_PYTHON=sys.executable)
    proc = subprocess.Popen([ROOT / "deploy" / "local-cluster.sh", "3", "--", "--model", "none"], env=env, stdout=subprocess.DEVNULL)
    while not (run_dir / "cluster.env").exists():
        if proc.poll() is not None:
            raise SystemExit("local-cluster.sh failed")
        time.sleep(0.3)
    info = dict(line.split("=", 1) for line in (run_dir / "cluster.env").read_text().split())
    info["proc"] = proc
    return info


def commit_round(targets: list[str], clients_per_shard: int, seconds: float, tokens: int, pids: dict) -> dict:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((HEADS, tokens, DIM)).astype(np.float32)
    caches = []
    for i in range(clients_per_shard * len(targets)):
        client = Client(targets[i % len(targets)])
        caches.append(client.create_cache(head_dim=DIM, n_kv_heads=HEADS, key_bits=4, value_bits=3))
    counts = [0] * len(caches)
    stop = threading.Event()

    def drive(n):
        while not stop.is_set():
            caches[n].append(k, k)
            counts[n] += 1

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    threads = [threading.Thread(target=drive, args=(n,)) for n in range(len(caches))]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu = {name: round((cpu_seconds(pid) - before[name]) / elapsed, 3) for name, pid in pids.items()}
    for cache in caches:
        cache.delete()
    return {"commits_per_s": sum(counts) / elapsed, "cpu_cores": cpu}


def stored_bytes_per_token(front: str, redis_client, tokens: int) -> dict:
    """A SmolLM2-shaped session, 4-bit keys / 3-bit values: bytes Redis holds per token against fp16 K+V."""
    rng = np.random.default_rng(1)
    layers = Client(front).create_caches(LAYERS, head_dim=DIM, n_kv_heads=HEADS, key_bits=4, value_bits=3, session_id="bytes")
    for layer in layers:
        for start in range(0, tokens, 64):
            k, v = (rng.standard_normal((HEADS, 64, DIM)).astype(np.float32) for _ in range(2))
            layer.append(k, v)
    info = Client(front).get_session("bytes")
    elements = 2 * LAYERS * HEADS * DIM * tokens
    redis_memory = sum(redis_client.memory_usage(key) or 0 for key in redis_client.scan_iter(match="kvshard:{bytes}*"))
    return {
        "tokens": tokens,
        "stored_bytes": info.stored_bytes,
        "stored_bytes_per_token": info.stored_bytes / tokens,
        "redis_memory_bytes_per_token": redis_memory / tokens,
        "fp16_bytes_per_token": elements * 2 / tokens,
        "effective_bits_stored": 8 * info.stored_bytes / elements,
        "effective_bits_in_redis_memory": 8 * redis_memory / elements,
    }


def plot(result: dict, path: Path) -> None:
    """Commits/s per shard count, and the CPU cores each process used for it (the machine has 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(result["commits_per_s"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar([str(n) for n in counts], [result["commits_per_s"][n] for n in counts])
    left.set(xlabel="shards on one Redis", ylabel="commits/s (median)", title="Append commits/s")
    bottom = [0.0] * len(counts)
    for name in result["cpu_cores_median"][counts[0]]:
        values = [result["cpu_cores_median"][n][name] for n in counts]
        right.bar([str(n) for n in counts], values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set(xlabel="shards on one Redis", ylabel="CPU cores used", title="where the CPU goes")
    right.legend(fontsize=8)
    fig.suptitle(result["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cluster_scale_cpu.json")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients-per-shard", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per Append (one commit)")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="kvshard-scale."))
    cluster = start_cluster(run_dir)
    try:
        shards = [f"127.0.0.1:{p}" for p in cluster["SHARD_PORTS"].split(",")]
        pids = {"redis": int(cluster["REDIS_PIDS"]), "client": os.getpid()}
        pids |= {f"shard{i}": int(p) for i, p in enumerate(cluster["SHARD_PIDS"].split(","))}
        rounds: dict[int, list] = {1: [], 2: [], 3: []}
        for r in range(args.rounds):
            for n in (1, 2, 3) if r % 2 == 0 else (3, 2, 1):
                rounds[n].append(commit_round(shards[:n], args.clients_per_shard, args.seconds, args.tokens, pids))
                print(n, "shards:", rounds[n][-1], flush=True)
        redis_client = redis.Redis.from_url(cluster["REDIS_URL"])
        result = {
            "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}), loopback",
            "setup": f"deploy/local-cluster.sh 3 --model none; one Redis (appendonly, appendfsync always); "
            f"{args.clients_per_shard} client threads per shard in this process, each Appending {args.tokens} tokens "
            f"of one {HEADS}x{DIM} layer (4-bit keys, 3-bit values) per call = one commit; {args.seconds} s per round, "
            f"{args.rounds} rounds in alternating order",
            "commits_per_s": {n: statistics.median(r["commits_per_s"] for r in rs) for n, rs in rounds.items()},
            "cpu_cores_median": {n: {name: statistics.median(r["cpu_cores"][name] for r in rs) for name in pids} for n, rs in rounds.items()},
            "rounds": rounds,
            "stored_session": stored_bytes_per_token(shards[0], redis_client, 256),
        }
        before = redis_client.info("memory")["used_memory"]
        for i in range(200):
            Client(shards[i % 3]).create_cache(head_dim=DIM, n_kv_heads=HEADS, session_id=f"held-{i}").append(*(np.ones((HEADS, 32, DIM), np.float32),) * 2)
        per_session = (redis_client.info("memory")["used_memory"] - before) / 200
        result["sessions_held"] = {
            "sessions": redis_client.zcard("kvshard:updated"),
            "redis_bytes_per_32_token_one_layer_session": per_session,
            "sessions_per_GiB_of_redis_at_that_size": int((1 << 30) / per_session),
        }
    finally:
        cluster["proc"].terminate()
        cluster["proc"].wait()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("commits_per_s", "cpu_cores_median", "stored_session", "sessions_held")}, indent=2))


if __name__ == "__main__":
    main()
