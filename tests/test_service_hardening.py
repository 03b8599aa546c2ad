"""The shard against an attacker and a careless client, over real sockets (raw sessions on a model-less shard,
but for one test of Calibrate in its worker process on a model shard).

Each test reproduces one finding of issue 11 and fails without its fix: an Attend that would kill the shard,
cancelled calls half-applied, undecodable bodies answering UNKNOWN, racing creates past --max-sessions,
tokens with '=', ids shared across tenants, unbounded ids in logs, status precedence, two shards on one port,
one tenant starving the others, one session over the memory budget.
"""

import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import mlx.core as mx
import numpy as np
import pytest

from conftest import ShardProcess, child_env, free_port
from kvshard.client import Client, RetryPolicy
from kvshard.quant import CompressedKVCache
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc
from kvshard.wire.tensors import from_numpy, to_numpy

CONFIG = dict(method="turboquant_mse", key_bits=4, value_bits=4, window=0, sink_tokens=0)
CACHE_CONFIG = pb.CacheConfig(method="turboquant_mse", key_bits=[4], value_bits=[4], seed=42)
PADDED_TOKEN = "c2VjcmV0LXBhZGRlZA=="  # base64 with '=' padding, no tenant: tenant "default"
ALICE_TOKEN, BOB_TOKEN = "YWxpY2U=", "bob-token"
TENANT_QUOTA = 3


@pytest.fixture(scope="module")
def shard(module_tmp):
    metrics_port = free_port()
    server = ShardProcess(module_tmp, "--model", "none", "--metrics-port", str(metrics_port)).start()
    server.metrics_port = metrics_port
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def stub(shard):
    channel = grpc.insecure_channel(shard.target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    yield pb_grpc.KVShardStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def auth_shard(module_tmp):
    tokens = [f"--auth-token={PADDED_TOKEN}", f"--auth-token={ALICE_TOKEN}=alice", f"--auth-token={BOB_TOKEN}=bob"]
    own = module_tmp / "auth"  # its own store: the `shard` fixture's sessions are tenant default too
    own.mkdir()
    server = ShardProcess(own, "--model", "none", "--max-tenant-sessions", str(TENANT_QUOTA), *tokens).start()
    yield server
    assert server.stop() == 0, server.log()


def tensor(array) -> pb.Tensor:
    return from_numpy(np.ascontiguousarray(array), pb.FLOAT16 if array.dtype == np.float16 else pb.FLOAT32)


def raw_session(stub, layers=1, heads=1, dim=2, metadata=None, **fields) -> str:
    request = pb.CreateSessionRequest(kind=pb.RAW, raw=pb.RawShape(layers=layers, n_kv_heads=heads, head_dim=dim), cache=CACHE_CONFIG, **fields)
    return stub.CreateSession(request, metadata=metadata).session_id


def append(stub, session_id, keys, values, timeout=30, metadata=None, **fields):
    request = pb.AppendRequest(session_id=session_id, keys=tensor(keys), values=tensor(values), **fields)
    return stub.Append(request, timeout=timeout, metadata=metadata)


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def wait_settled(stub, session_id, timeout=10.0) -> pb.Session:
    """GetSession once no call is applying a change: offset == committed_offset."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        if info.offset == info.committed_offset or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def wait_finished(server, method: str, calls: int, timeout=2.0) -> None:
    """Wait until the shard logged `calls` answers of `method` (a call cut before its handler ran logs none)."""
    deadline = time.monotonic() + timeout
    while server.log().count(f'"method": "{method}"') < calls and time.monotonic() < deadline:
        time.sleep(0.02)


def stored_rows(db_path, session_id):
    """Everything the SQLite store holds for a session, as bytes: record, token ids, tails and blocks."""
    db = sqlite3.connect(db_path)
    try:
        rows = [db.execute("SELECT record, token_ids, version FROM sessions WHERE session_id = ?", (session_id,)).fetchall()]
        rows.append(db.execute("SELECT layer, data FROM tails WHERE session_id = ? ORDER BY layer", (session_id,)).fetchall())
        rows.append(db.execute("SELECT layer, start, data FROM blocks WHERE session_id = ? ORDER BY layer, start", (session_id,)).fetchall())
        return rows
    finally:
        db.close()


def metric(shard, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and labels in line)


# ---- A: cost-based admission ---------------------------------------------------------------------------------


def test_an_attend_inside_the_message_limit_but_over_the_cost_is_refused_and_the_shard_lives(stub):
    rng = np.random.default_rng(0)
    sid = raw_session(stub)
    kv = rng.standard_normal((1, 1024, 2)).astype(np.float32)
    append(stub, sid, kv, kv)
    queries = rng.standard_normal((512, 4096, 2)).astype(np.float16)  # 8 MiB: inside the 16 MiB message limit
    code, details = status_of(lambda: stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(queries))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_attend_cost" in details
    small = rng.standard_normal((1, 1, 2)).astype(np.float32)
    assert stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(small)), timeout=10).offset == 1024


def test_a_sliced_attend_equals_the_whole_one(stub):
    """An Attend over the slice cost runs in several turns on the MLX thread; the answer is the same."""
    rng = np.random.default_rng(1)
    sid = raw_session(stub, heads=2, dim=16)
    local = CompressedKVCache(head_dim=16, n_kv_heads=2, seed=42, **CONFIG)
    k, v = (rng.standard_normal((2, 300, 16)).astype(np.float32) for _ in range(2))
    append(stub, sid, k, v)
    local.append(mx.array(k), mx.array(v))
    queries = rng.standard_normal((16, 1000, 16)).astype(np.float32)  # cost 4.8M: 19 slices of at most 2^18
    output = to_numpy(stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(queries))).output, "output")
    np.testing.assert_allclose(output, np.array(local.attend(mx.array(queries))), rtol=1e-4, atol=1e-5)


def test_a_large_append_takes_turns_yet_commits_once_all_or_nothing(shard, stub):
    """An Append over --append-slice-cost (2^18 key elements) encodes in several turns on the MLX thread once
    the cache has its key mean: the codes are exactly those of one call, it commits once, and a slice that
    fails (NaN in the last one) leaves the session exactly as it was."""
    rng = np.random.default_rng(2)
    sid = raw_session(stub, heads=4, dim=128)
    local = CompressedKVCache(head_dim=128, n_kv_heads=4, seed=42, **CONFIG)
    first = rng.standard_normal((4, 16, 128)).astype(np.float32)  # a fresh cache's first call sets its key mean
    append(stub, sid, first, first)
    local.append(mx.array(first), mx.array(first))
    k, v = (rng.standard_normal((4, 1500, 128)).astype(np.float32) for _ in range(2))  # 3 slices of 512 tokens
    assert append(stub, sid, k, v).offset == 1516
    local.append(mx.array(k), mx.array(v))
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.version == 3 and info.committed_offset == 1516  # create, first append, then one commit
    queries = rng.standard_normal((4, 1, 128)).astype(np.float32)
    output = to_numpy(stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(queries))).output, "output")
    np.testing.assert_array_equal(output, np.array(local.attend(mx.array(queries)).astype(mx.float32)))
    stored = stored_rows(shard.store.removeprefix("sqlite:///"), sid)
    v[:, -1, 0] = np.nan  # the third slice fails after two were encoded
    code, details = status_of(lambda: append(stub, sid, k, v))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
    after = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert (after.offset, after.version) == (1516, 3) and stored_rows(shard.store.removeprefix("sqlite:///"), sid) == stored
    again = to_numpy(stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(queries))).output, "output")
    np.testing.assert_array_equal(again, output)


def calibration_workers(pid: int) -> list[int]:
    """The shard's child processes that multiprocessing spawned to run work (not its resource tracker)."""
    workers = []
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        try:
            if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
                workers.append(int(child))
        except FileNotFoundError:  # it exited meanwhile
            pass
    return workers


def test_other_sessions_carry_on_while_a_calibrate_runs_in_its_worker_process(tmp_path):
    """A Calibrate runs in a worker process with its own copy of the model, not on the shard's MLX thread:
    another session's small Attends keep completing while it runs (31 forward passes), instead of waiting for
    its end or for each pass; a Calibrate cut by its deadline kills the worker, a later one starts a fresh one."""
    server = ShardProcess(tmp_path).start(timeout=600)
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.KVShardStub(channel)
        sid = raw_session(stub, heads=2, dim=16)
        kv = np.random.default_rng(5).standard_normal((2, 64, 16)).astype(np.float32)
        append(stub, sid, kv, kv)
        query = pb.AttendRequest(session_id=sid, queries=tensor(kv[:, :1]))
        done, completed = threading.Event(), []

        def small_attends():
            while not done.is_set():
                stub.Attend(query, timeout=600)
                completed.append(time.monotonic())

        worker = threading.Thread(target=small_attends)
        worker.start()
        request = pb.CalibrateRequest(mode="kl", prompts=["The cat sat on the mat.", "A dog ran in the park."], target_avg_bits=4)
        started = time.monotonic()
        response = stub.Calibrate(request, timeout=600)
        ended = time.monotonic()
        done.set()
        worker.join()
        layers = len(response.sensitivities)
        during = [t for t in completed if started < t < ended]
        assert layers == 30 and len(during) >= layers, (len(during), ended - started)
        assert len(calibration_workers(server.proc.pid)) == 1  # the worker stays for the next Calibrate
        code, _ = status_of(lambda: stub.Calibrate(request, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 30
        while calibration_workers(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert calibration_workers(server.proc.pid) == []
        channel.close()
    finally:
        server.stop()


@pytest.mark.slow  # a profile's moments, 62 probe passes and its validation: 7 minutes at load 15
def test_a_profile_mode_calibrate_in_the_worker_registers_its_profile_and_applies_it(tmp_path):
    """The worker saves the profile it calibrated; the shard registers it (ServerInfo lists it) and the
    session `apply` asks for is made from it."""
    server = ShardProcess(tmp_path).start(timeout=600)
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.KVShardStub(channel)
        prompt = "The old lighthouse keeper climbed the spiral stairs every evening and watched the ships pass the rocky point."
        request = pb.CalibrateRequest(profile="worker-profile", profile_budgets=[3.5], validation_tokens=16, apply=True, prompts=[prompt])
        response = stub.Calibrate(request, timeout=1800)
        assert response.profile.name == "worker-profile" and len(response.profile.measured) == 1
        assert response.session.cache.profile == "worker-profile"
        info = stub.ServerInfo(pb.ServerInfoRequest())
        assert {"worker-profile": response.profile.fingerprint}.items() <= {p.name: p.fingerprint for p in info.profiles}.items()
        channel.close()
    finally:
        server.stop()


# ---- C: exactly-once, all-or-nothing -------------------------------------------------------------------------


def test_calls_cut_by_deadlines_are_wholly_committed_or_not_applied_and_survive_kill9(tmp_path):
    heads, dim = 8, 128
    server = ShardProcess(tmp_path, "--model", "none").start()
    db_path = tmp_path / "kvshard.sqlite3"
    rng = np.random.default_rng(2)
    local = CompressedKVCache(head_dim=dim, n_kv_heads=heads, seed=42, **CONFIG)
    try:
        with Client(server.target, retry=RetryPolicy(attempts=100, initial_backoff=0.01, max_backoff=0.2)) as client:
            cache = client.create_caches(1, head_dim=dim, n_kv_heads=heads, key_bits=4, value_bits=4)[0]
            stub, sid = client.stub, cache.session_id
            outcomes, attempts = set(), 0
            for deadline in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.001, 0.003, 0.01, 0.03, 1.0):
                tokens = int(rng.integers(64, 512))
                k, v = (rng.standard_normal((heads, tokens, dim)).astype(np.float32) for _ in range(2))
                before = wait_settled(stub, sid).offset
                code, _ = status_of(lambda: append(stub, sid, k, v, expected_offset=before, timeout=deadline))
                outcomes.add(code)
                attempts += 1
                wait_finished(server, "Append", attempts)  # a cut call may run on after the client gave up
                after = wait_settled(stub, sid)
                assert after.offset == after.committed_offset, f"applied but not committed after {code}"
                assert after.offset in (before, before + k.shape[1]), after.offset
                if after.offset != before:
                    local.append(mx.array(k), mx.array(v))
                if code == grpc.StatusCode.OK:
                    assert after.offset == before + k.shape[1]
            assert grpc.StatusCode.DEADLINE_EXCEEDED in outcomes and grpc.StatusCode.OK in outcomes
            cache.refresh()
            for _ in range(6):  # the SDK: a short deadline is retried, and an applied first attempt recognised
                k, v = (rng.standard_normal((heads, 256, dim)).astype(np.float32) for _ in range(2))
                cache.append(k, v, timeout=0.03)
                local.append(mx.array(k), mx.array(v))
            for trims, deadline in enumerate((0.001, 0.01), start=1):
                before = wait_settled(stub, sid).offset
                code, _ = status_of(lambda: stub.Trim(pb.TrimRequest(session_id=sid, n=5, expected_offset=before), timeout=deadline))
                wait_finished(server, "Trim", trims)
                after = wait_settled(stub, sid)
                assert after.offset == after.committed_offset and after.offset in (before, before - 5)
                if after.offset != before:
                    local.trim(5)
            expected_offset = len(local)
            assert wait_settled(stub, sid).offset == expected_offset
            stored = stored_rows(db_path, sid)
        server.kill9()
        assert stored_rows(db_path, sid) == stored
        server.start()
        with Client(server.target) as client:
            assert client.get_session(sid).offset == expected_offset
            queries = rng.standard_normal((heads, 3, dim)).astype(np.float32)
            answer = client.stub.Attend(pb.AttendRequest(session_id=sid, queries=tensor(queries)))
            assert np.array_equal(to_numpy(answer.output, "output"), np.array(local.attend(mx.array(queries))))
    finally:
        server.stop()


# ---- B: undecodable bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\x0a\x02\xff\xfe", b"\x52\xf4", b"\x0a\xff\xff\xff\xff\x0f"], ids=["bad utf-8", "truncated", "huge length"])
def test_an_undecodable_body_is_invalid_argument_logged_and_counted(shard, body):
    channel = grpc.insecure_channel(shard.target)
    before = metric(shard, "kvshard_malformed_requests_total", 'method="GetSession"')
    call = channel.unary_unary("/kvshard.v1.KVShard/GetSession")
    code, details = status_of(lambda: call(body, timeout=5))
    channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request: not a valid GetSession request body" in details
    assert metric(shard, "kvshard_malformed_requests_total", 'method="GetSession"') == before + 1
    deadline = time.monotonic() + 5  # the log line is written after the answer is sent
    while not (logged := [line for line in shard.log().splitlines() if "not a valid GetSession" in line]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged and all('"status": "INVALID_ARGUMENT"' in line for line in logged)


def test_an_undecodable_body_without_a_token_is_unauthenticated(auth_shard):
    channel = grpc.insecure_channel(auth_shard.target)
    code, _ = status_of(lambda: channel.unary_unary("/kvshard.v1.KVShard/GetSession")(b"\x52\xf4", timeout=5))
    channel.close()
    assert code == grpc.StatusCode.UNAUTHENTICATED


# ---- D, J: session counts ------------------------------------------------------------------------------------


def test_max_sessions_holds_under_concurrent_creates(tmp_path):
    server = ShardProcess(tmp_path, "--model", "none", "--max-sessions", "8").start()
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.KVShardStub(channel)
        codes = []
        barrier = threading.Barrier(30)

        def create():
            barrier.wait()
            codes.append(status_of(lambda: raw_session(stub))[0])

        threads = [threading.Thread(target=create) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        channel.close()
        assert codes.count(grpc.StatusCode.OK) == 8 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 22
        db = sqlite3.connect(tmp_path / "kvshard.sqlite3")
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 8
        db.close()
    finally:
        server.stop()


def test_one_tenant_cannot_use_up_the_sessions_of_all(auth_shard):
    channel = grpc.insecure_channel(auth_shard.target)
    stub = pb_grpc.KVShardStub(channel)
    alice, bob = [("authorization", f"Bearer {ALICE_TOKEN}")], [("authorization", f"Bearer {BOB_TOKEN}")]
    for _ in range(TENANT_QUOTA):
        raw_session(stub, metadata=alice)
    code, details = status_of(lambda: raw_session(stub, metadata=alice))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tenant_sessions" in details
    raw_session(stub, metadata=bob)
    channel.close()


def test_a_tenant_over_its_byte_quota_is_refused_whole_and_others_carry_on(tmp_path):
    tokens = [f"--auth-token={ALICE_TOKEN}=alice", f"--auth-token={BOB_TOKEN}=bob"]
    server = ShardProcess(tmp_path, "--model", "none", "--max-tenant-bytes", "48KiB", *tokens).start()
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.KVShardStub(channel)
        alice, bob = [("authorization", f"Bearer {ALICE_TOKEN}")], [("authorization", f"Bearer {BOB_TOKEN}")]
        sid = raw_session(stub, heads=2, dim=64, metadata=alice)
        rng = np.random.default_rng(11)
        kv = rng.standard_normal((2, 64, 64)).astype(np.float32)
        code, appended = grpc.StatusCode.OK, 0
        while code == grpc.StatusCode.OK and appended < 64 * 100:
            before = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice)
            stored = stored_rows(tmp_path / "kvshard.sqlite3", f"alice~{sid}")
            code, details = status_of(lambda: append(stub, sid, kv, kv, metadata=alice))
            appended += 64
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tenant_bytes" in details and "49152" in details
        assert appended > 64  # some appends fitted
        after = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice)
        assert (after.offset, after.version, after.stored_bytes) == (before.offset, before.version, before.stored_bytes)
        assert stored_rows(tmp_path / "kvshard.sqlite3", f"alice~{sid}") == stored
        other = raw_session(stub, heads=2, dim=64, metadata=bob)  # bob's quota is his own
        append(stub, other, kv, kv, metadata=bob)
        stub.Trim(pb.TrimRequest(session_id=sid, n=128), metadata=alice)  # shrinking is always allowed
        append(stub, sid, kv, kv, metadata=alice)  # and makes room again
        channel.close()
    finally:
        server.stop()


# ---- E, F: tokens and tenants --------------------------------------------------------------------------------


def test_tokens_with_padding_are_whole_and_tenants_have_their_own_ids(auth_shard):
    channel = grpc.insecure_channel(auth_shard.target)
    stub = pb_grpc.KVShardStub(channel)

    def info(token):
        return stub.ServerInfo(pb.ServerInfoRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=60)

    assert info(PADDED_TOKEN).tenant == "default" and info(ALICE_TOKEN).tenant == "alice"
    for wrong in (PADDED_TOKEN.rstrip("="), ALICE_TOKEN.rstrip("=")):
        assert status_of(lambda: info(wrong))[0] == grpc.StatusCode.UNAUTHENTICATED
    default, bob = [("authorization", f"Bearer {PADDED_TOKEN}")], [("authorization", f"Bearer {BOB_TOKEN}")]
    raw_session(stub, metadata=default, session_id="shared-name")
    # Bob creating the same id gets his own session: nothing tells him that another tenant holds one.
    assert raw_session(stub, metadata=bob, session_id="shared-name") == "shared-name"
    code, _ = status_of(lambda: raw_session(stub, metadata=bob, session_id="shared-name"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    kv = np.ones((1, 3, 2), np.float32)
    append(stub, "shared-name", kv, kv, metadata=bob)
    assert stub.GetSession(pb.GetSessionRequest(session_id="shared-name"), metadata=default).offset == 0
    assert stub.GetSession(pb.GetSessionRequest(session_id="shared-name"), metadata=bob).offset == 3
    channel.close()


# ---- G, H: validation before logging and before the offset ---------------------------------------------------


@pytest.mark.parametrize("length", [65, 20_000, 4 << 20])
def test_a_long_session_id_is_invalid_argument_and_never_logged(shard, stub, length):
    log_before = shard.log_path.stat().st_size
    code, details = status_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="x" * length), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"got {length} characters" in details and len(details) < 200
    time.sleep(0.2)
    assert shard.log_path.stat().st_size - log_before < 2000


def test_a_malformed_or_oversized_append_is_told_so_before_its_offset(stub):
    sid = raw_session(stub, heads=2, dim=4)
    kv = np.ones((2, 3, 4), np.float32)
    append(stub, sid, kv, kv)
    wrong_shape = np.ones((3, 3, 4), np.float32)
    too_many = np.ones((2, 4097, 4), np.float32)
    code, details = status_of(lambda: append(stub, sid, wrong_shape, wrong_shape, expected_offset=0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "keys.shape" in details
    code, details = status_of(lambda: append(stub, sid, too_many, too_many, expected_offset=0))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_append_tokens" in details
    assert status_of(lambda: append(stub, sid, kv, kv, expected_offset=0))[0] == grpc.StatusCode.ABORTED


# ---- I: one shard per port ------------------------------------------------------------------------------------


def test_a_second_shard_on_a_taken_port_fails_to_start(shard, stub, tmp_path):
    command = [sys.executable, "-m", "kvshard.service.cli", "serve", "--model", "none", "--port", str(shard.port),
               "--store", f"sqlite:///{tmp_path}/other.sqlite3"]
    second = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and "in use" in second.stderr
    assert stub.ServerInfo(pb.ServerInfoRequest(), timeout=5).store == "sqlite"


# ---- ServerInfo ----------------------------------------------------------------------------------------------


def test_server_info_lists_every_limit_a_flag_sets_and_grpcurl_shows_them(tmp_path):
    import dataclasses
    import json
    import os

    from kvshard.service.sessions import Limits

    flags = {"max_tokens": 101, "max_prompt_tokens": 202, "max_session_tokens": 3003, "max_append_tokens": 404,
             "max_message_bytes": 5 << 20, "max_sessions": 606, "max_tenant_sessions": 7, "max_tenant_bytes": 8 << 20,
             "max_attend_cost": 909, "attend_slice_cost": 1010, "append_slice_cost": 1111, "memory_budget_bytes": 12 << 20,
             "session_ttl_s": 1313, "checkpoint_tokens": 14}
    spelled = {"memory_budget_bytes": "--memory-budget", "session_ttl_s": "--session-ttl"}
    fixed = {"min_bits": Limits.min_bits, "max_bits": Limits.max_bits}  # the codecs' range, not a flag
    assert {f.name for f in dataclasses.fields(Limits)} == set(flags) | set(fixed)
    assert set(pb.Limits.DESCRIPTOR.fields_by_name) == set(flags) | set(fixed)
    args = [f"{spelled.get(name, '--' + name.replace('_', '-'))}={value}" for name, value in flags.items()]
    server = ShardProcess(tmp_path, "--model", "none", *args).start()
    try:
        channel = grpc.insecure_channel(server.target)
        limits = pb_grpc.KVShardStub(channel).ServerInfo(pb.ServerInfoRequest(), timeout=10).limits
        channel.close()
        assert {name: getattr(limits, name) for name in flags | fixed} == flags | fixed
        grpcurl = os.path.join(os.path.dirname(sys.executable), "grpcurl")
        shown = subprocess.run([grpcurl, "-plaintext", "-emit-defaults", server.target, "kvshard.v1.KVShard/ServerInfo"],
                               capture_output=True, text=True, timeout=60, check=True)
        assert {name: int(value) for name, value in json.loads(shown.stdout)["limits"].items()} == flags | fixed
    finally:
        server.stop()


# ---- memory budget ---------------------------------------------------------------------------------------------


def test_a_request_whose_working_memory_cannot_fit_the_budget_is_refused_before_its_body_is_parsed(tmp_path):
    """A call's working memory (a multiple of its message size) is reserved against --memory-budget before its
    body is parsed: one that can never fit is RESOURCE_EXHAUSTED naming memory_budget_bytes, even when its body
    would not parse, and nothing changes; a request that fits is served."""
    server = ShardProcess(tmp_path, "--model", "none", "--memory-budget", "1MiB").start()
    try:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.KVShardStub(channel)
        sid = raw_session(stub, heads=2, dim=64)
        rng = np.random.default_rng(5)
        small = rng.standard_normal((2, 8, 64)).astype(np.float32)
        append(stub, sid, small, small)
        before = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        stored = stored_rows(tmp_path / "kvshard.sqlite3", sid)
        big = rng.standard_normal((2, 300, 64)).astype(np.float32)  # 307 KB of message: ~1.3 MB to work on
        code, details = status_of(lambda: append(stub, sid, big, big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory_budget_bytes" in details and "working memory" in details
        garbage = channel.unary_unary("/kvshard.v1.KVShard/Append")  # raw bytes in, raw bytes out
        code, details = status_of(lambda: garbage(b"\xff" * 400_000, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory_budget_bytes" in details
        after = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert (after.offset, after.version, after.memory_bytes) == (before.offset, before.version, before.memory_bytes)
        assert stored_rows(tmp_path / "kvshard.sqlite3", sid) == stored
        append(stub, sid, small, small)  # still usable within the budget
        channel.close()
    finally:
        server.stop()


def test_held_bytes_count_what_an_attended_cache_keeps_alive():
    """The budget counts a hot session at its held bytes: after an Attend they cover every MLX array the cache
    keeps alive, the CPU kernels' per-head matrices derived from its methods included (half as much again as
    a 1K-token layer's codes, which the load proof found alive beyond the hot bytes)."""
    import gc

    from kvshard.quant import KVCacheConfig
    from kvshard.service import memory

    gc.collect()
    before = mx.get_active_memory()
    cache = KVCacheConfig(seed=7).make_cache(0, 1, 64, 3)
    keys = mx.random.normal((3, 1024, 64))
    cache.append(keys, keys)
    mx.eval(cache.attend(mx.random.normal((9, 1, 64))))
    del keys
    gc.collect()
    alive = mx.get_active_memory() - before
    assert alive > 1.3 * sum(a.nbytes for group in (cache.key_codes, cache.value_codes) for a in group.values())
    assert alive <= memory.held_bytes(cache) <= alive + 64 * 1024


def test_calls_wait_their_turn_for_working_memory_and_none_is_refused_while_room_frees(tmp_path):
    """Calls that do not fit together wait in arrival order and are admitted as others end, instead of being
    refused; calls together hold at most half the room; one that can never fit is refused at once."""
    import asyncio

    from kvshard.service.errors import LimitExceeded
    from kvshard.service.sessions import Limits, SessionManager
    from kvshard.service.store import open_store
    from kvshard.service.worker import SerialExecutor

    async def scenario():
        manager = SessionManager(open_store(f"sqlite:///{tmp_path}/s.sqlite3"), SerialExecutor("m"), SerialExecutor("i"),
                                 None, Limits(memory_budget_bytes=8 << 20))
        def message(share):  # an Append message whose working memory is this share of the calls' room
            return int(manager.calls_room * share - 16 * 1024) // 4

        order = []

        async def call(name, share, hold_s):
            release = await manager.reserve_call("Append", message(share))
            order.append(name)
            assert manager.working <= manager.calls_room
            await asyncio.sleep(hold_s)
            release()

        tasks = []
        # b does not fit beside a and waits; c would fit at once but came after b, so it waits its turn (a large
        # call is never starved by small ones); d and e queue behind them.
        for name, share in (("a", 0.6), ("b", 0.6), ("c", 0.1), ("d", 0.3), ("e", 0.6)):
            tasks.append(asyncio.create_task(call(name, share, 0.05)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        assert order == list("abcde") and manager.working == 0
        with pytest.raises(LimitExceeded, match="memory_budget_bytes: .*send smaller requests"):
            await manager.reserve_call("Append", manager.calls_room)
        assert manager.working == 0

    asyncio.run(scenario())


def test_dropped_caches_free_what_the_cpu_kernels_derived_from_their_methods():
    """The CPU kernels cache per method object what they derive from it (layouts, encoders); a shard drops
    and reloads sessions all day, so those caches must not keep the methods (and the sessions' memory) alive."""
    import gc
    import weakref

    from kvshard.quant import KVCacheConfig
    from kvshard.quant.kernels import cpu

    before = len(cpu._ENCODERS), len(cpu._LAYOUTS)
    caches = [KVCacheConfig(seed=seed).make_cache(0, 1, 64, 2) for seed in range(4)]
    keys = mx.random.normal((2, 32, 64))
    for cache in caches:
        cache.append(keys, keys)
        mx.eval(cache.attend(mx.random.normal((4, 1, 64))))
    methods = [weakref.ref(cache.key_quantizer) for cache in caches]
    del cache, caches
    gc.collect()
    assert all(method() is None for method in methods)
    assert (len(cpu._ENCODERS), len(cpu._LAYOUTS)) == before


# ---- A: a long prompt takes turns -------------------------------------------------------------------------------


@pytest.mark.slow  # two 600-token prefills on the CPU: minutes here
def test_a_long_prompt_fed_in_turns_generates_what_one_pass_over_the_same_chunks_does(tmp_path, smollm):
    """A 600-token prompt is fed 256 tokens per turn on the MLX thread; the greedy tokens equal a local run of
    the same chunks through the same compressed caches (the same arithmetic, so no knife edge)."""
    from kvshard.quant import KVCacheBuilder, KVCacheConfig
    from kvshard.service.sessions import cache_config

    model, _ = smollm
    prompt = [int(t) for t in np.random.default_rng(4).integers(100, 20000, 600)]
    layers = len(model.layers)
    config = KVCacheConfig(method="turboquant_mse", key_bits=[4] * layers, value_bits=[4] * layers)
    caches = KVCacheBuilder.for_model(model, cache_config(config))
    expected, pending = [], list(prompt)
    for _ in range(3):
        for start in range(0, len(pending), 256):
            logits = model(mx.array(pending[start : start + 256])[None], cache=caches)[:, -1, :]
        expected.append(mx.argmax(logits.astype(mx.float32), axis=-1).item())
        pending = expected[-1:]
    server = ShardProcess(tmp_path).start()
    try:
        with Client(server.target, timeout=300) as client:
            session = client.create_session(key_bits=4, value_bits=4)
            tokens = [t.token_id for t in session.generate(tokens=prompt, max_tokens=3, ignore_eos=True)]
    finally:
        server.stop()
    assert tokens == expected
