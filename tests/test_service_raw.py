"""The shard over real sockets with raw cache sessions (no model: fast): the remote cache equals the local
one, every bad input answers a precise status and changes nothing, parallel clients, grpcurl, metrics, logs."""

import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import mlx.core as mx
import numpy as np
import pytest

from conftest import ShardProcess, child_env, free_port
from kvshard.client import Client
from kvshard.quant import CompressedKVCache
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc
from kvshard.wire.tensors import from_numpy

HEADS, DIM = 3, 64
MAX_MESSAGE = 256 * 1024
MAX_APPEND = 64


@pytest.fixture(scope="module")
def shard(module_tmp):
    metrics_port = free_port()
    server = ShardProcess(
        module_tmp, "--model", "none", "--max-message-bytes", str(MAX_MESSAGE), "--max-append-tokens", str(MAX_APPEND),
        "--metrics-port", str(metrics_port),
    ).start()
    server.metrics_port = metrics_port
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def client(shard):
    with Client(shard.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(shard):
    channel = grpc.insecure_channel(shard.target)
    yield pb_grpc.KVShardStub(channel)
    channel.close()


def random_kv(rng, tokens, heads=HEADS, dim=DIM, dtype=np.float32):
    return [rng.standard_normal((heads, tokens, dim)).astype(dtype) for _ in range(2)]


@pytest.mark.parametrize("method", ["turboquant_mse", "turboquant_rvq", "qjl"])
def test_remote_cache_is_the_local_cache(client, method):
    rng = np.random.default_rng(0)
    remote = client.create_cache(head_dim=DIM, n_kv_heads=HEADS, method=method, key_bits=3, value_bits=4, window=4, sink_tokens=1)
    local = CompressedKVCache(head_dim=DIM, n_kv_heads=HEADS, method=method, key_bits=3, value_bits=4, seed=42, window=4, sink_tokens=1)
    for tokens in (3, 9, 17):
        k, v = random_kv(rng, tokens)
        remote.append(k, v)
        local.append(mx.array(k), mx.array(v))
    q = rng.standard_normal((9, 2, DIM)).astype(np.float32)
    assert np.array_equal(remote.attend(q), np.array(local.attend(mx.array(q))))
    assert len(remote) == len(local) == 29
    assert remote.memory_bytes() == local.memory_bytes()
    assert remote.trim(5) == local.trim(5) == 5
    assert np.array_equal(remote.attend(q), np.array(local.attend(mx.array(q))))


def test_mlx_and_half_precision_arrays_round_trip(client):
    rng = np.random.default_rng(1)
    cache = client.create_cache(head_dim=DIM, n_kv_heads=HEADS)
    k, v = random_kv(rng, 12, dtype=np.float16)
    cache.append(mx.array(k).astype(mx.bfloat16), mx.array(v))  # bf16 keys, fp16 values
    q16 = rng.standard_normal((1, HEADS, 2, DIM)).astype(np.float16)
    out = cache.attend(q16)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == q16.shape
    out = cache.attend(mx.array(q16).astype(mx.bfloat16))
    assert isinstance(out, mx.array) and out.dtype == mx.bfloat16 and out.shape == q16.shape


def append_request(session_id, keys, values, layer=0, **fields):
    return pb.AppendRequest(session_id=session_id, layer=layer, keys=from_numpy(keys, pb.FLOAT32), values=from_numpy(values, pb.FLOAT32), **fields)


def with_data(tensor, data):
    bad = pb.Tensor()
    bad.CopyFrom(tensor)
    bad.data = data
    return bad


def bad_append_requests(session_id, rng):
    k, v = random_kv(rng, 2)
    good = append_request(session_id, k, v)
    nan = k.copy()
    nan[0, 0, 0] = np.nan
    inf = v.copy()
    inf[1, 1, 1] = np.inf
    wrong_heads = random_kv(rng, 2, heads=HEADS + 1)
    unspecified = pb.AppendRequest()
    unspecified.CopyFrom(good)
    unspecified.keys.dtype = pb.DTYPE_UNSPECIFIED
    big = random_kv(rng, MAX_APPEND + 1)
    huge = random_kv(rng, MAX_APPEND, dim=DIM * 8)
    return [
        ("wrong kv heads", append_request(session_id, *wrong_heads), grpc.StatusCode.INVALID_ARGUMENT, "keys.shape"),
        ("values shape differs", append_request(session_id, k, v[:, :1]), grpc.StatusCode.INVALID_ARGUMENT, "values.shape"),
        ("head_dim differs", append_request(session_id, k[..., :32], v[..., :32]), grpc.StatusCode.INVALID_ARGUMENT, "keys.shape"),
        ("batch of 2", append_request(session_id, np.stack([k, k]), np.stack([v, v])), grpc.StatusCode.INVALID_ARGUMENT, "keys.shape"),
        ("no dtype", unspecified, grpc.StatusCode.INVALID_ARGUMENT, "keys.dtype"),
        ("short buffer", pb.AppendRequest(session_id=session_id, keys=with_data(good.keys, good.keys.data[:-4]), values=good.values), grpc.StatusCode.INVALID_ARGUMENT, "keys.data"),
        ("NaN", append_request(session_id, nan, v), grpc.StatusCode.INVALID_ARGUMENT, "keys.data: contains NaN or Inf"),
        ("Inf", append_request(session_id, k, inf), grpc.StatusCode.INVALID_ARGUMENT, "values.data: contains NaN or Inf"),
        ("layer out of range", append_request(session_id, k, v, layer=2), grpc.StatusCode.INVALID_ARGUMENT, "layer: 2 is out of range"),
        ("unknown session", append_request("no-such-session", k, v), grpc.StatusCode.NOT_FOUND, "session_id"),
        ("too many tokens", append_request(session_id, *big), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_append_tokens"),
        ("message too large", append_request(session_id, *huge), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ("stale offset", append_request(session_id, k, v, expected_offset=3), grpc.StatusCode.ABORTED, "expected_offset: expected 3, the session is at offset 5"),
    ]


def test_every_bad_input_answers_its_code_and_changes_nothing(stub):
    rng = np.random.default_rng(2)
    created = stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=pb.RawShape(layers=2, n_kv_heads=HEADS, head_dim=DIM)))
    sid = created.session_id
    stub.Append(append_request(sid, *random_kv(rng, 5)))
    query = from_numpy(rng.standard_normal((HEADS, 1, DIM)).astype(np.float32), pb.FLOAT32)
    before = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    attended = stub.Attend(pb.AttendRequest(session_id=sid, queries=query)).output.data

    bad_queries = [
        ("query head_dim", pb.AttendRequest(session_id=sid, queries=from_numpy(np.ones((HEADS, 1, 8), np.float32), pb.FLOAT32)), "queries.shape"),
        ("query heads", pb.AttendRequest(session_id=sid, queries=from_numpy(np.ones((HEADS + 1, 1, DIM), np.float32), pb.FLOAT32)), "queries.shape"),
        ("query layer", pb.AttendRequest(session_id=sid, layer=7, queries=query), "layer: 7"),
    ]
    cases = [(name, stub.Append, request, code, field) for name, request, code, field in bad_append_requests(sid, rng)]
    cases += [(name, stub.Attend, request, grpc.StatusCode.INVALID_ARGUMENT, field) for name, request, field in bad_queries]
    cases += [
        ("trim layer", stub.Trim, pb.TrimRequest(session_id=sid, n=1, layer=9), grpc.StatusCode.INVALID_ARGUMENT, "layer: 9"),
        ("trim offset", stub.Trim, pb.TrimRequest(session_id=sid, n=1, layer=0, expected_offset=4), grpc.StatusCode.ABORTED, "expected_offset"),
        ("generate on raw", stub.Generate, pb.GenerateRequest(session_id=sid, prompt="hi", max_tokens=1), grpc.StatusCode.FAILED_PRECONDITION, "Generate"),
    ]
    for name, rpc, request, code, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            answer = rpc(request)
            list(answer) if rpc is stub.Generate else answer
        assert caught.value.code() == code, (name, caught.value.details())
        assert field in caught.value.details(), (name, caught.value.details())
        if code == grpc.StatusCode.ABORTED:
            assert ("kvshard-current-offset", "5") in caught.value.trailing_metadata()
        after = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert (after.layer_offsets, after.version, after.memory_bytes) == (before.layer_offsets, before.version, before.memory_bytes), name
    assert stub.Attend(pb.AttendRequest(session_id=sid, queries=query)).output.data == attended


@pytest.mark.parametrize(
    "request_fields, field",
    [
        (dict(kind=pb.RAW), "raw: required"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=0, head_dim=DIM)), "raw.n_kv_heads"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=1, head_dim=DIM), cache=pb.CacheConfig(key_bits=[9])), "cache.key_bits[0]: 9 bits is out of range"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=1, head_dim=DIM), cache=pb.CacheConfig(value_bits=[0])), "cache.value_bits[0]"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=3, n_kv_heads=1, head_dim=DIM), cache=pb.CacheConfig(key_bits=[2, 3])), "cache.key_bits: give one value or one per layer (3)"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=1, head_dim=DIM), cache=pb.CacheConfig(method="zip")), "cache.method"),
        (dict(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=1, head_dim=DIM), session_id="bad id!"), "session_id"),
    ],
)
def test_bad_session_configs_name_the_field(stub, request_fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateSession(pb.CreateSessionRequest(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details(), caught.value.details()


def test_session_lifecycle_and_paging(stub, client):
    ids = [client.create_cache(DIM, HEADS, session_id=f"page-{i}").session_id for i in range(3)]
    with pytest.raises(grpc.RpcError) as caught:
        client.create_cache(DIM, HEADS, session_id="page-0")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = [s.session_id for s in client.list_sessions(page_size=2)]
    assert [i for i in listed if i.startswith("page-")] == ids
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListSessions(pb.ListSessionsRequest(page_size=5000))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in caught.value.details()
    client.delete_session("page-1")
    with pytest.raises(grpc.RpcError) as caught:
        client.get_session("page-1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSession(pb.GetSessionRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id: required" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateSession(pb.CreateSessionRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # a model session on a raw-only shard
    info = client.server_info()
    assert info.store == "sqlite" and "turboquant_mse" in info.methods and info.limits.max_append_tokens == MAX_APPEND


PARALLEL_CLIENT = textwrap.dedent(
    """
    import json, os, sys, time
    import mlx.core as mx, numpy as np
    from kvshard.client import Client
    from kvshard.quant import CompressedKVCache
    target, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(seed)
    client = Client(target)
    remote = client.create_cache(head_dim=64, n_kv_heads=3, key_bits=3, seed=seed)
    local = CompressedKVCache(head_dim=64, n_kv_heads=3, key_bits=3, seed=seed)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    calls, same = [], True
    for step in range(40):
        k, v = (rng.standard_normal((3, 2, 64)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((3, 1, 64)).astype(np.float32)
        started = time.time()
        remote.append(k, v)
        out = remote.attend(q)
        calls.append((started, time.time()))
        local.append(mx.array(k), mx.array(v))
        same &= bool(np.array_equal(out, np.array(local.attend(mx.array(q)))))
    print(json.dumps({"same": same, "calls": calls, "tokens": len(remote)}), flush=True)
    """
)


def test_two_client_processes_drive_their_sessions_at_once(shard, tmp_path):
    script, go = tmp_path / "parallel_client.py", tmp_path / "go"
    script.write_text(PARALLEL_CLIENT)
    procs = [
        subprocess.Popen([sys.executable, str(script), shard.target, str(seed), str(go)], stdout=subprocess.PIPE, text=True, env=child_env())
        for seed in (11, 12)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(r["same"] and r["tokens"] == 80 for r in results)
    spans = [(r["calls"][0][0], r["calls"][-1][1]) for r in results]
    overlap = min(s[1] for s in spans) - max(s[0] for s in spans)
    assert overlap > 0, spans  # both sessions were being driven at the same time


def grpcurl(*args, timeout=30):
    binary = __import__("shutil").which("grpcurl") or str(__import__("pathlib").Path(sys.executable).parent / "grpcurl")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_describes_and_calls(shard):
    services = grpcurl("-plaintext", shard.target, "list").split()
    assert {"kvshard.v1.KVShard", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    described = grpcurl("-plaintext", shard.target, "describe", "kvshard.v1.KVShard")
    for rpc in ("CreateSession", "GetSession", "ListSessions", "DeleteSession", "Append", "Attend", "Generate", "Calibrate", "Trim", "ServerInfo"):
        assert f"rpc {rpc} (" in described
    assert "stream .kvshard.v1.GenerateResponse" in described
    body = json.dumps({"kind": "RAW", "raw": {"layers": 1, "n_kv_heads": 1, "head_dim": 4}, "session_id": "from-grpcurl"})
    created = json.loads(grpcurl("-plaintext", "-d", body, shard.target, "kvshard.v1.KVShard/CreateSession"))
    assert created["session_id"] == "from-grpcurl" and created["kind"] == "RAW"
    tensor = {"shape": [1, 2, 4], "dtype": "FLOAT32", "data": __import__("base64").b64encode(np.ones((1, 2, 4), np.float32).tobytes()).decode()}
    body = json.dumps({"session_id": "from-grpcurl", "keys": tensor, "values": tensor})
    assert json.loads(grpcurl("-plaintext", "-d", body, shard.target, "kvshard.v1.KVShard/Append"))["offset"] == "2"
    assert json.loads(grpcurl("-plaintext", shard.target, "grpc.health.v1.Health/Check"))["status"] == "SERVING"


def test_metrics_and_one_json_log_line_per_rpc(shard, client):
    cache = client.create_cache(DIM, HEADS, session_id="observed")
    cache.append(*random_kv(np.random.default_rng(3), 4))
    with pytest.raises(grpc.RpcError):
        client.get_session("never-created")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=10).read().decode()
    assert 'kvshard_rpcs_total{code="OK",method="Append"}' in metrics
    assert 'kvshard_rpcs_total{code="NOT_FOUND",method="GetSession"}' in metrics
    assert "kvshard_rpc_seconds_bucket" in metrics and "kvshard_hot_sessions" in metrics and "kvshard_stored_bytes" in metrics
    time.sleep(0.2)
    lines = [json.loads(line) for line in shard.log().splitlines() if line.startswith("{")]
    rpcs = [line for line in lines if line.get("event") == "rpc"]
    append = next(line for line in rpcs if line["method"] == "Append" and line.get("session") == "observed")
    assert append["status"] == "OK" and append["tokens"] == 4 and append["duration_ms"] >= 0 and append["tenant"] == "default"
    missing = next(line for line in rpcs if line.get("session") == "never-created")
    assert missing["status"] == "NOT_FOUND" and "session_id" in missing["error"]
