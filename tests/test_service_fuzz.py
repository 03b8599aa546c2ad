"""Property-based fuzzing of every RPC over a real socket (hypothesis): random and structured protobuf bodies,
wrong shapes and byte lengths, NaN/Inf, huge sizes, bad UTF-8, truncated bodies, short deadlines.

Properties: the shard never dies and never answers UNKNOWN or INTERNAL, and a rejected request leaves the
guarded sessions bit-identical: their metadata, their stored rows and their attention outputs. A call that
answered OK may change a guarded session (a valid Append is valid); the guard then takes a new snapshot.
The fast slice runs in `make test`; `make test-slow` sends 10,000 requests.
"""

import sqlite3

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ShardProcess
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire.tensors import from_numpy

LAYERS, HEADS, DIM = 2, 2, 8
GUARDED = ["guarded-a", "guarded-b"]
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}
CUT = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
LIMITS = ["--max-message-bytes", "262144", "--max-append-tokens", "64", "--max-session-tokens", "512",
          "--max-attend-cost", "65536", "--attend-slice-cost", "4096", "--max-sessions", "300"]
STREAMING = {"Generate"}
REQUESTS = {
    "CreateSession": pb.CreateSessionRequest, "GetSession": pb.GetSessionRequest, "ListSessions": pb.ListSessionsRequest,
    "DeleteSession": pb.DeleteSessionRequest, "Append": pb.AppendRequest, "Attend": pb.AttendRequest, "Trim": pb.TrimRequest,
    "Generate": pb.GenerateRequest, "Calibrate": pb.CalibrateRequest, "ServerInfo": pb.ServerInfoRequest,
}
U32, U64 = 2**32 - 1, 2**64 - 1


class Guard:
    """The shard, a channel, and the guarded sessions' last snapshot."""

    def __init__(self, shard, db_path):
        self.shard = shard
        self.db_path = db_path
        self.channel = grpc.insecure_channel(shard.target, options=[("grpc.max_send_message_length", -1)])
        self.sent = 0  # fuzzed requests
        rng = np.random.default_rng(0)
        self.queries = from_numpy(rng.standard_normal((HEADS, 2, DIM)).astype(np.float32), pb.FLOAT32).SerializeToString()
        for session_id in GUARDED:
            self.recreate(session_id, rng)
        self.snapshots = {sid: self.snapshot(sid) for sid in GUARDED}

    def call(self, method: str, body: bytes, timeout: float):
        path = f"/kvshard.v1.KVShard/{method}"
        try:
            if method in STREAMING:
                for _ in self.channel.unary_stream(path)(body, timeout=timeout):
                    pass
            else:
                self.channel.unary_unary(path)(body, timeout=timeout)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def recreate(self, session_id, rng) -> None:
        create = pb.CreateSessionRequest(kind=pb.RAW, session_id=session_id, raw=pb.RawShape(layers=LAYERS, n_kv_heads=HEADS, head_dim=DIM))
        self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id).SerializeToString(), 10)
        assert self.call("CreateSession", create.SerializeToString(), 10) == grpc.StatusCode.OK
        for layer in range(LAYERS):
            kv = from_numpy(rng.standard_normal((HEADS, 5, DIM)).astype(np.float32), pb.FLOAT32)
            append = pb.AppendRequest(session_id=session_id, layer=layer, keys=kv, values=kv)
            assert self.call("Append", append.SerializeToString(), 10) == grpc.StatusCode.OK

    def snapshot(self, session_id):
        info = self.channel.unary_unary("/kvshard.v1.KVShard/GetSession")(
            pb.GetSessionRequest(session_id=session_id).SerializeToString(), timeout=10
        )
        info = pb.Session.FromString(info)
        outputs = []
        for layer in range(LAYERS):
            request = pb.AttendRequest(session_id=session_id, layer=layer)
            request.queries.ParseFromString(self.queries)
            try:
                outputs.append(self.channel.unary_unary("/kvshard.v1.KVShard/Attend")(request.SerializeToString(), timeout=10))
            except grpc.RpcError as error:
                outputs.append(error.code())
        meta = (list(info.layer_offsets), info.committed_offset, info.version, info.memory_bytes, info.stored_bytes)
        return meta, outputs, stored_rows(self.db_path, session_id)

    def check(self, method: str, message, code) -> None:
        assert code not in NEVER, f"{method} answered {code}: {message!r:.400}"
        assert self.shard.proc.poll() is None, f"the shard died on {method}: {message!r:.400}\n{self.shard.log()[-3000:]}"
        for session_id in GUARDED:
            now = self.snapshot(session_id)
            if code != grpc.StatusCode.OK and code not in CUT:
                assert now == self.snapshots[session_id], f"rejected {method} ({code}) changed {session_id}: {message!r:.400}"
            self.snapshots[session_id] = now
            if now[0][0] and max(now[0][0]) > 400:  # keep room under max_session_tokens for valid appends
                self.recreate(session_id, np.random.default_rng(self.sent))
                self.snapshots[session_id] = self.snapshot(session_id)


def stored_rows(db_path, session_id):
    db = sqlite3.connect(db_path)
    try:
        return [
            db.execute("SELECT record, token_ids, version FROM sessions WHERE session_id = ?", (session_id,)).fetchall(),
            db.execute("SELECT layer, data FROM tails WHERE session_id = ? ORDER BY layer", (session_id,)).fetchall(),
            db.execute("SELECT layer, start, data FROM blocks WHERE session_id = ? ORDER BY layer, start", (session_id,)).fetchall(),
        ]
    finally:
        db.close()


# ---- strategies ------------------------------------------------------------------------------------------------

ids = st.one_of(
    st.sampled_from(GUARDED),
    st.sampled_from(GUARDED),
    st.sampled_from(["", "missing", "guarded-a~x", "../guarded-a", "x" * 65]),
    st.text(max_size=70),
    st.text(alphabet="abc-_.~/ é\u0000", max_size=80),
)
small = st.one_of(st.integers(0, 70), st.sampled_from([U32, U32 + 1, U64, 2**63]))  # uint64 fields
small32 = st.one_of(st.integers(0, 70), st.just(U32))
specials = st.sampled_from([0.0, -0.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf"), 65504.0, 1e-45])


@st.composite
def tensors(draw):
    """Half of them valid K/V or queries for the guarded sessions; the rest a little or entirely wrong."""
    if draw(st.booleans()):
        array = np.random.default_rng(draw(st.integers(0, 1000))).standard_normal((HEADS, draw(st.integers(1, 8)), DIM))
        return from_numpy(array.astype(np.float32), draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])))
    if draw(st.integers(0, 4)) == 0:
        return pb.Tensor(shape=draw(st.lists(small, max_size=6)), dtype=draw(st.integers(0, 6)), data=draw(st.binary(max_size=300)))
    heads = draw(st.sampled_from([HEADS, HEADS * 2, 1, 3]))
    tokens = draw(st.sampled_from([1, 2, 5, 64, 65]))
    dim = draw(st.sampled_from([DIM, DIM - 1, DIM + 1]))
    shape = draw(st.sampled_from([(heads, tokens, dim), (1, heads, tokens, dim), (2, heads, tokens, dim), (tokens, dim)]))
    dtype = draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16]))
    array = np.random.default_rng(draw(st.integers(0, 1000))).standard_normal(shape).astype(np.float32)
    if draw(st.booleans()):
        array.flat[draw(st.integers(0, array.size - 1))] = draw(specials)
    message = from_numpy(array, dtype)
    cut = draw(st.sampled_from([0, 0, 0, 1, 2, -1]))
    if cut:
        message.data = message.data[:-cut] if cut > 0 else message.data + b"\0"
    return message


@st.composite
def kv_pairs(draw):
    """Half of them a valid (keys, values) pair for the guarded sessions; the rest drawn apart (or missing)."""
    if draw(st.booleans()):
        keys = draw(tensors())
        values = pb.Tensor()
        values.CopyFrom(keys)
        return keys, values
    return draw(optional(tensors())), draw(optional(tensors()))


def cache_configs():
    return st.builds(
        pb.CacheConfig,
        method=st.one_of(st.sampled_from(["", "turboquant_mse", "turboquant_prod", "turboquant_rvq", "polar", "qjl"]), st.text(max_size=20)),
        key_bits=st.lists(st.integers(0, 12), max_size=4),
        value_bits=st.lists(st.integers(0, 12), max_size=4),
        sink_tokens=small32,
        window=small32,
        seed=st.integers(0, U64),
    )


def raw_shapes():
    return st.builds(pb.RawShape, layers=st.integers(0, 300), n_kv_heads=st.integers(0, 300), head_dim=st.integers(0, 1100))


def optional(strategy):
    return st.one_of(st.none(), strategy)


def build(cls, **fields):
    """A message from drawn fields; None leaves a field unset (optional fields keep HasField false)."""
    return st.fixed_dictionaries(fields).map(lambda drawn: cls(**{k: v for k, v in drawn.items() if v is not None}))


MESSAGES = {
    "CreateSession": build(
        pb.CreateSessionRequest, kind=st.integers(0, 4), raw=optional(raw_shapes()), cache=optional(cache_configs()),
        session_id=optional(ids), labels=optional(st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40)),
    ),
    "GetSession": build(pb.GetSessionRequest, session_id=ids, include_token_ids=st.booleans()),
    "ListSessions": build(pb.ListSessionsRequest, page_size=st.one_of(st.integers(0, 2000), st.just(U32)), page_token=optional(ids)),
    "DeleteSession": build(pb.DeleteSessionRequest, session_id=ids.filter(lambda i: i not in GUARDED)),
    "Append": st.builds(
        lambda kv, **fields: pb.AppendRequest(keys=kv[0], values=kv[1], **{k: v for k, v in fields.items() if v is not None}),
        kv_pairs(),
        session_id=ids,
        layer=st.sampled_from([0, 1, 0, 1, 2, U32]),
        expected_offset=optional(st.one_of(st.integers(0, 40), st.just(U64))),
    ),
    "Attend": build(pb.AttendRequest, session_id=ids, layer=st.one_of(st.integers(0, 3), st.just(U32)), queries=optional(tensors())),
    "Trim": build(
        pb.TrimRequest, session_id=ids, n=st.one_of(st.integers(0, 10), st.just(U64)), layer=optional(st.integers(0, 3)),
        expected_offset=optional(st.integers(0, 12)),
    ),
    "Generate": build(
        pb.GenerateRequest, session_id=ids, prompt=optional(st.text(max_size=100)), max_tokens=small32,
        expected_offset=optional(st.integers(0, U64)), stop=optional(st.lists(st.text(max_size=300), max_size=20)),
    ),
    "Calibrate": build(pb.CalibrateRequest, target_avg_bits=optional(st.floats(allow_nan=True)), apply=st.booleans()),
    "ServerInfo": st.just(pb.ServerInfoRequest()),
}


@st.composite
def requests(draw):
    """(method, message or None, body bytes, timeout): structured, mutated or random bodies."""
    method = draw(st.sampled_from(sorted(REQUESTS)))
    message = draw(MESSAGES[method])
    body = message.SerializeToString()
    form = draw(st.sampled_from(["structured"] * 6 + ["truncated", "flipped", "random"]))
    if form == "truncated" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif form == "flipped" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif form == "random":
        body = draw(st.binary(max_size=200))
    guarded = getattr(message, "session_id", "") in GUARDED
    # Short deadlines only away from the guarded sessions: a cut call there may commit later, by design.
    timeout = 10.0 if guarded else draw(st.sampled_from([0.001, 0.005, 0.05, 10.0, 10.0, 10.0]))
    return method, message, body, timeout


@pytest.fixture(scope="module")
def guard(module_tmp):
    shard = ShardProcess(module_tmp, "--model", "none", *LIMITS).start()
    yield Guard(shard, module_tmp / "kvshard.sqlite3")
    assert shard.stop() == 0, shard.log()[-3000:]


def fuzz(guard, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(request):
        method, message, body, timeout = request
        guard.sent += 1
        guard.check(method, message, guard.call(method, body, timeout))

    one()


def test_fuzz_fast_slice(guard):
    before = guard.sent
    fuzz(guard, 300)
    assert guard.sent - before >= 300


@pytest.mark.slow
def test_fuzz_ten_thousand_requests(guard):
    before = guard.sent
    fuzz(guard, 10_000)
    assert guard.sent - before >= 10_000
