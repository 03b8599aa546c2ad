"""The durability contract over real processes: kill -9 the server mid-stream, restart it on the same store,
and the session continues exactly as an uninterrupted one; a session of another model is refused."""

import json
import sqlite3

import grpc
import numpy as np
import pytest

from conftest import ShardProcess, free_port
from kvshard.client import NO_RETRY, Client, RetryPolicy
from kvshard.service.store.codec import join_state
from kvshard.service.store.sqlite import SQLiteStore

CHECKPOINT = 4
TURNS = [
    ("Name three fruits.", 8),
    ("Now name three colours, one per line.", 16),
    ("Which of them is your favourite?", 12),
]
CONFIG = dict(key_bits=4, value_bits=3, window=4)
PATIENT = RetryPolicy(attempts=200, initial_backoff=0.2, max_backoff=0.5)  # outlasts a model reload


def user(text):
    return [{"role": "user", "content": text}]


def tamper_fingerprint(db_path, session_id):
    db = sqlite3.connect(db_path)
    record = json.loads(db.execute("SELECT record FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0])
    record["model_fingerprint"] = "0" * 64
    db.execute("UPDATE sessions SET record = ? WHERE session_id = ?", (json.dumps(record), session_id))
    db.commit()
    db.close()


def stored_codes(db_path, session_id, layers=30):
    """Every layer's codes as the store holds them, blocks joined."""
    store = SQLiteStore(db_path)
    codes = []
    for tail, blocks in store.load_layers(session_id, layers):
        state = join_state(tail, [b for _, b in blocks])
        codes.append({f"{g}/{n}": np.array(a) for g in ("key_codes", "value_codes") for n, a in state[g].items()})
    store.close()
    return codes


def test_kill9_mid_stream_then_restart_continues_bit_exact(tmp_path):
    db_path = tmp_path / "kvshard.sqlite3"
    store, port = f"sqlite:///{db_path}", free_port()
    args = ("--checkpoint-tokens", str(CHECKPOINT), "--max-tokens", "32")

    def shard():
        return ShardProcess(tmp_path, *args, store=store, port=port)

    first = shard().start()
    fragile = Client(first.target, retry=NO_RETRY)
    session = fragile.create_session(**CONFIG)
    other_model = fragile.create_session(**CONFIG)
    turn1 = [t.token_id for t in session.generate(messages=user(TURNS[0][0]), max_tokens=TURNS[0][1])]
    acknowledged = session.offset

    # Turn 2 is cut by kill -9 after 6 tokens; the restarted server reports its last checkpoint.
    received = []
    with pytest.raises(grpc.RpcError) as cut:
        for token in session.generate(messages=user(TURNS[1][0]), max_tokens=TURNS[1][1], ignore_eos=True):
            received.append(token.token_id)
            if len(received) == 6:
                first.kill9()
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    tamper_fingerprint(db_path, other_model.session_id)
    second = shard().start()
    resumed_client = Client(second.target, retry=PATIENT)
    info = resumed_client.get_session(session.session_id, include_token_ids=True)
    progress = info.last_generate
    assert progress.start_offset == acknowledged and not progress.finished
    assert progress.generated_tokens % CHECKPOINT == 0 and CHECKPOINT <= progress.generated_tokens < TURNS[1][1]
    assert info.offset == info.committed_offset == acknowledged + progress.prompt_tokens + progress.generated_tokens
    committed = list(info.token_ids[acknowledged + progress.prompt_tokens :])
    assert committed[: len(received)] == received[: len(committed)]

    resumed = resumed_client.session(session.session_id)
    rest = [t.token_id for t in resumed.generate(resume=True, max_tokens=TURNS[1][1] - len(committed), ignore_eos=True)]
    turn2 = committed + rest

    # Turn 3 is cut by kill -9 too, and the SDK resumes it by itself once the server is back.
    third = shard()
    turn3 = []
    for token in resumed.generate(messages=user(TURNS[2][0]), max_tokens=TURNS[2][1], ignore_eos=True):
        turn3.append(token)
        if len(turn3) == 6:
            second.kill9()
            third.start(wait=False)
    assert [t.offset for t in turn3] == list(range(turn3[0].offset, turn3[0].offset + TURNS[2][1]))  # each token once
    third.wait_serving()

    # The same conversation, uninterrupted, on the restarted server.
    baseline = resumed_client.create_session(**CONFIG)
    expected = [
        [t.token_id for t in baseline.generate(messages=user(text), max_tokens=n, ignore_eos=i > 0)]
        for i, (text, n) in enumerate(TURNS)
    ]
    assert [turn1, turn2, [t.token_id for t in turn3]] == expected
    assert resumed.token_ids() == baseline.token_ids()

    with pytest.raises(grpc.RpcError) as refused:
        list(resumed_client.session(other_model.session_id).generate("Hello", max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "model" in refused.value.details()

    assert third.stop() == 0
    for resumed_layer, baseline_layer in zip(stored_codes(db_path, session.session_id), stored_codes(db_path, baseline.session_id), strict=True):
        assert resumed_layer.keys() == baseline_layer.keys()
        for name in resumed_layer:
            assert np.array_equal(resumed_layer[name], baseline_layer[name]), name


def test_resuming_a_long_session_logs_each_layer(tmp_path):
    port = free_port()
    rng = np.random.default_rng(0)
    shard = ShardProcess(tmp_path, "--model", "none", port=port).start()
    try:
        with Client(shard.target, retry=NO_RETRY) as client:
            caches = client.create_caches(2, head_dim=8, n_kv_heads=1, session_id="long", key_bits=2)
            for cache in caches:
                for _ in range(2):  # 8192 tokens, in appends under max_append_tokens
                    kv = rng.standard_normal((1, 4096, 8)).astype(np.float32)
                    cache.append(kv, kv)
        shard.stop()
        assert '"resuming"' not in shard.log()
        shard.start()
        with Client(shard.target, retry=PATIENT) as client:
            first = client.session("long")[0]
            assert first.attend(np.ones((1, 1, 8), np.float32)).shape == (1, 1, 8) and first.offset == 8192
    finally:
        shard.stop()
    lines = [json.loads(line) for line in shard.log().splitlines() if '"resuming"' in line]
    assert [line["layers"] for line in lines] == ["1/2", "2/2"]
    assert all(line["tokens"] == 8192 and line["seconds"] >= 0 for line in lines)
