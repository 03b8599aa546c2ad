"""Crash proof: kill -9 the shard at random moments while clients Append, Trim and Generate (cancelled calls
included), restart it on the same store, and check that every acknowledged append and token is there exactly once.

Clients are the SDK with a patient retry policy: they ride through each kill (UNAVAILABLE, retried), and
their short deadlines (20-200 ms, retried after DEADLINE_EXCEEDED) cut calls on the server. Each client
keeps a local reference of what the SDK told it was done: raw sessions a local CompressedKVCache with the
same appends and trims, the model session the token ids of every turn (prompt ids + the streamed tokens).
At the end the shard is restarted once more and
- each raw session's offset equals the reference's, and Attend is bit-identical to the local cache's
  (an append applied twice or lost would change it);
- the model session's token ids are the reference's exactly, and replaying the same turns on a fresh
  session of an uninterrupted shard generates the same tokens (greedy continuation unchanged);
- SQLite's `PRAGMA integrity_check` answers ok.

Raw rounds run on a `--model none` shard (fast restarts), model rounds on a SmolLM2 shard.

    python benchmarks/service_crash.py [--raw-rounds 40] [--model-rounds 10] [--out benchmarks/results]
writes service_crash_cpu.json.
"""

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ShardProcess  # noqa: E402 (the tests' helper: a shard as a real process)

from kvshard.client import Client, RetryPolicy  # noqa: E402
from kvshard.quant import CompressedKVCache  # noqa: E402
from bench import device_info, revision  # noqa: E402 (benchmarks/bench.py, beside this script)
from kvshard.wire import kvshard_pb2 as pb  # noqa: E402
from kvshard.wire.tensors import from_numpy, to_numpy  # noqa: E402

PATIENT = RetryPolicy(attempts=10_000, initial_backoff=0.05, max_backoff=0.5)
HEADS, DIM = 2, 32
CONFIG = dict(method="turboquant_mse", key_bits=3, value_bits=4, window=4, sink_tokens=2)
TURN_TOKENS = 6
PROMPTS = [[504, 3458, 282], [2030, 314, 253, 1345], [1780, 28], [9112, 17, 1675, 4433]]  # token ids


class RawWriter(threading.Thread):
    """Appends and trims one raw session through the SDK until stopped; `local` mirrors what it was told."""

    def __init__(self, target: str, seed: int):
        super().__init__(daemon=True)
        self.client = Client(target, retry=PATIENT, timeout=30)
        self.cache = self.client.create_caches(1, head_dim=DIM, n_kv_heads=HEADS, seed=42, **{k: v for k, v in CONFIG.items() if k != "method"})[0]
        self.local = CompressedKVCache(head_dim=DIM, n_kv_heads=HEADS, seed=42, **CONFIG)
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.calls = {"append": 0, "trim": 0}
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                timeout = float(self.rng.choice([0.02, 0.05, 0.2, 30.0]))
                if len(self.local) > 64 and self.rng.random() < 0.25:
                    n = int(self.rng.integers(1, 16))
                    self.cache.trim(n, timeout=timeout)
                    self.local.trim(n)
                    self.calls["trim"] += 1
                else:
                    tokens = int(self.rng.integers(1, 40))
                    k, v = (self.rng.standard_normal((HEADS, tokens, DIM)).astype(np.float32) for _ in range(2))
                    self.cache.append(k, v, timeout=timeout)
                    self.local.append(mx.array(k), mx.array(v))
                    self.calls["append"] += 1
                if len(self.local) > 2000:
                    self.cache.trim(1000)
                    self.local.trim(1000)
        except Exception as error:  # noqa: BLE001 (reported, and fails the run)
            self.error = repr(error)

    def verify(self, target: str) -> dict:
        with Client(target, retry=PATIENT) as client:
            info = client.get_session(self.cache.session_id)
            queries = self.rng.standard_normal((HEADS * 2, 3, DIM)).astype(np.float32)
            answer = client.stub.Attend(pb.AttendRequest(session_id=self.cache.session_id, queries=from_numpy(queries, pb.FLOAT32)))
            same = np.array_equal(to_numpy(answer.output, "output"), np.array(self.local.attend(mx.array(queries))))
        return {"offset": info.offset, "expected_offset": len(self.local), "attend_bit_identical": bool(same), **self.calls}


class Talker(threading.Thread):
    """Greedy Generate turns with token-id prompts through the SDK; `tokens` is the conversation it was told."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.client = Client(target, retry=PATIENT, timeout=120)
        self.session = self.client.create_session(key_bits=4, value_bits=4, window=8)
        self.tokens: list[int] = []
        self.turns: list[list[int]] = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set() and len(self.tokens) < 900:
                prompt = PROMPTS[len(self.turns) % len(PROMPTS)]
                generated = [t.token_id for t in self.session.generate(tokens=prompt, max_tokens=TURN_TOKENS, ignore_eos=True)]
                self.turns.append(prompt)
                self.tokens += prompt + generated
        except Exception as error:  # noqa: BLE001
            self.error = repr(error)


def kill_rounds(shard: ShardProcess, rounds: int, rng: random.Random, log: list, longest: float) -> None:
    """Each round: serve for a random 0.3 s to `longest`, kill -9, restart."""
    for _ in range(rounds):
        time.sleep(rng.uniform(0.3, longest))
        shard.kill9()
        log.append(time.time())
        shard.start()


def integrity(db_path) -> str:
    db = sqlite3.connect(db_path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-rounds", type=int, default=40)
    parser.add_argument("--model-rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rng = random.Random(0)
    report = {"what": __doc__.splitlines()[0], "machine": device_info(), "revision": revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    raw_tmp = Path(tempfile.mkdtemp(prefix="kvshard-crash-raw-"))
    raw = ShardProcess(raw_tmp, "--model", "none").start()
    writers = [RawWriter(raw.target, seed) for seed in range(3)]
    kills = []
    try:
        for writer in writers:
            writer.start()
        kill_rounds(raw, args.raw_rounds, rng, kills, 2.5)
        time.sleep(1)
        for writer in writers:
            writer.stop.set()
            writer.join(300)
        raw.stop()
        raw.start()
        report["raw"] = {
            "rounds": len(kills),
            "sessions": [dict(writer.verify(raw.target), error=writer.error) for writer in writers],
        }
    finally:
        raw.stop()
    report["raw"]["integrity_check"] = integrity(raw_tmp / "kvshard.sqlite3")

    model_tmp = Path(tempfile.mkdtemp(prefix="kvshard-crash-model-"))
    shard = ShardProcess(model_tmp, "--checkpoint-tokens", "2").start()
    kills = []
    try:
        talker, writer = Talker(shard.target), RawWriter(shard.target, 7)
        talker.start()
        writer.start()
        kill_rounds(shard, args.model_rounds, rng, kills, 8.0)  # a turn takes seconds here
        time.sleep(2)
        talker.stop.set()
        writer.stop.set()
        talker.join(600)
        writer.join(300)
        shard.stop()
        shard.start()
        with Client(shard.target, retry=PATIENT, timeout=300) as client:
            stored = list(client.get_session(talker.session.session_id, include_token_ids=True).token_ids)
            replay = client.create_session(key_bits=4, value_bits=4, window=8)
            for prompt in talker.turns:
                replay.generate_text(tokens=prompt, max_tokens=TURN_TOKENS, ignore_eos=True)
            replayed = replay.token_ids()
        report["model"] = {
            "rounds": len(kills),
            "turns": len(talker.turns),
            "tokens_acknowledged": len(talker.tokens),
            "tokens_stored": len(stored),
            "exactly_once": stored == talker.tokens,
            "greedy_continuation_unchanged": replayed == stored,
            "raw_session_on_model_shard": dict(writer.verify(shard.target), error=writer.error),
            "error": talker.error,
        }
    finally:
        shard.stop()
    report["model"]["integrity_check"] = integrity(model_tmp / "kvshard.sqlite3")
    sessions = report["raw"]["sessions"] + [report["model"]["raw_session_on_model_shard"]]
    report["passed"] = (
        all(s["offset"] == s["expected_offset"] and s["attend_bit_identical"] and s["error"] is None for s in sessions)
        and report["model"]["exactly_once"] and report["model"]["greedy_continuation_unchanged"] and report["model"]["error"] is None
        and report["raw"]["integrity_check"] == report["model"]["integrity_check"] == "ok"
    )
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "service_crash_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
