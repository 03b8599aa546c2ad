"""Property-based fuzzing of every RPC over a real socket (hypothesis): random and structured protobuf bodies,
wrong shapes and byte lengths, NaN/Inf, huge sizes, bad UTF-8, truncated bodies, short deadlines.

Properties: the shard never dies and never answers UNKNOWN or INTERNAL, and a rejected request leaves the
guarded sessions bit-identical: their metadata, their stored rows and their attention outputs. A call that
answered OK may change a guarded session (a valid Append is valid); the guard then takes a new snapshot.
The fast slice runs in `make test`; `make test-slow` sends 10,000 requests. A second shard serves the model
(SmolLM2-135M) with tight Generate limits, so Generate and Calibrate run past their precondition: it guards a
model session too (its token ids and stored rows), and gets a fast slice of 60 requests and 1,000 in the slow run.
"""

import collections
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
MODEL_GUARDED = "guarded-m"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}
CUT = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
LIMITS = ["--max-message-bytes", "262144", "--max-append-tokens", "64", "--max-session-tokens", "512",
          "--max-attend-cost", "65536", "--attend-slice-cost", "4096", "--max-sessions", "300"]
MODEL_LIMITS = ["--max-tokens", "4", "--max-prompt-tokens", "32", "--checkpoint-tokens", "2"]
STREAMING = {"Generate"}
REQUESTS = {
    "CreateSession": pb.CreateSessionRequest, "GetSession": pb.GetSessionRequest, "ListSessions": pb.ListSessionsRequest,
    "DeleteSession": pb.DeleteSessionRequest, "Append": pb.AppendRequest, "Attend": pb.AttendRequest, "Trim": pb.TrimRequest,
    "Generate": pb.GenerateRequest, "Calibrate": pb.CalibrateRequest, "ServerInfo": pb.ServerInfoRequest,
}
U32, U64 = 2**32 - 1, 2**64 - 1


class Guard:
    """The shard, a channel, and the guarded sessions' last snapshot."""

    def __init__(self, shard, db_path, model: bool = False):
        self.shard = shard
        self.db_path = db_path
        self.channel = grpc.insecure_channel(shard.target, options=[("grpc.max_send_message_length", -1)])
        self.sent = 0  # fuzzed requests
        self.answers = collections.Counter()  # (method, status name) of the fuzzed requests
        self.guarded = GUARDED + [MODEL_GUARDED] * model
        rng = np.random.default_rng(0)
        self.queries = from_numpy(rng.standard_normal((HEADS, 2, DIM)).astype(np.float32), pb.FLOAT32).SerializeToString()
        for session_id in self.guarded:
            self.recreate(session_id, rng)
        self.snapshots = {sid: self.snapshot(sid) for sid in self.guarded}

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
        self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id).SerializeToString(), 10)
        if session_id == MODEL_GUARDED:
            create = pb.CreateSessionRequest(kind=pb.MODEL, session_id=session_id, cache=pb.CacheConfig(method="turboquant_mse", key_bits=[4]))
            assert self.call("CreateSession", create.SerializeToString(), 30) == grpc.StatusCode.OK
            turn = pb.GenerateRequest(session_id=session_id, prompt="The sea is", max_tokens=2, ignore_eos=True)
            assert self.call("Generate", turn.SerializeToString(), 120) == grpc.StatusCode.OK
            return
        create = pb.CreateSessionRequest(kind=pb.RAW, session_id=session_id, raw=pb.RawShape(layers=LAYERS, n_kv_heads=HEADS, head_dim=DIM))
        assert self.call("CreateSession", create.SerializeToString(), 10) == grpc.StatusCode.OK
        for layer in range(LAYERS):
            kv = from_numpy(rng.standard_normal((HEADS, 5, DIM)).astype(np.float32), pb.FLOAT32)
            append = pb.AppendRequest(session_id=session_id, layer=layer, keys=kv, values=kv)
            assert self.call("Append", append.SerializeToString(), 10) == grpc.StatusCode.OK

    def snapshot(self, session_id):
        # Long timeouts: on a model shard a snapshot may queue behind a Calibrate's forward pass or a Generate.
        info = self.channel.unary_unary("/kvshard.v1.KVShard/GetSession")(
            pb.GetSessionRequest(session_id=session_id, include_token_ids=True).SerializeToString(), timeout=120
        )
        info = pb.Session.FromString(info)
        outputs = [list(info.token_ids)]
        for layer in range(LAYERS if session_id != MODEL_GUARDED else 0):
            request = pb.AttendRequest(session_id=session_id, layer=layer)
            request.queries.ParseFromString(self.queries)
            try:
                outputs.append(self.channel.unary_unary("/kvshard.v1.KVShard/Attend")(request.SerializeToString(), timeout=120))
            except grpc.RpcError as error:
                outputs.append(error.code())
        meta = (info.offset, list(info.layer_offsets), info.committed_offset, info.version, info.memory_bytes, info.stored_bytes)
        return meta, outputs, stored_rows(self.db_path, session_id)

    def check(self, method: str, message, code) -> None:
        self.answers[method, code.name] += 1
        assert code not in NEVER, f"{method} answered {code}: {message!r:.400}"
        assert self.shard.proc.poll() is None, f"the shard died on {method}: {message!r:.400}\n{self.shard.log()[-3000:]}"
        for session_id in self.guarded:
            now = self.snapshot(session_id)
            if code != grpc.StatusCode.OK and code not in CUT:
                assert now == self.snapshots[session_id], f"rejected {method} ({code}) changed {session_id}: {message!r:.400}"
            self.snapshots[session_id] = now
            if max([now[0][0], *now[0][1]]) > 400:  # keep room under max_session_tokens for valid appends and turns
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


model_ids = st.one_of(st.just(MODEL_GUARDED), st.just(MODEL_GUARDED), ids)
floats = st.one_of(st.floats(0, 2), specials, st.floats(allow_nan=True, allow_infinity=True))
samplings = st.builds(pb.SamplingParams, temperature=floats, top_p=floats, top_k=small32, min_p=floats, seed=optional(st.integers(0, U64)))
chat_turns = st.builds(pb.ChatTurn, messages=st.lists(st.builds(
    pb.ChatMessage, role=st.sampled_from(["user", "assistant", "system", "", "robot"]), content=st.text(max_size=60)), max_size=4))
token_ids = st.builds(pb.TokenIds, ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, U32)), max_size=40))


@st.composite
def model_generates(draw):
    """Generate on a model shard: every input form, sampling with specials, limits around --max-tokens 4."""
    request = draw(build(
        pb.GenerateRequest, session_id=model_ids, max_tokens=st.one_of(st.integers(0, 6), small32), sampling=optional(samplings),
        stop=optional(st.lists(st.text(max_size=20), max_size=4)), stop_token_ids=optional(st.lists(small32, max_size=4)),
        ignore_eos=st.booleans(), expected_offset=optional(st.one_of(st.integers(0, 40), st.just(U64))),
        replay_from=optional(st.one_of(st.integers(0, 40), st.just(U64))),
    ))
    form = draw(st.sampled_from(["prompt", "prompt_tokens", "chat", "resume", "none"]))
    if form == "prompt":
        request.prompt = draw(st.text(max_size=80))
    elif form == "prompt_tokens":
        request.prompt_tokens.CopyFrom(draw(token_ids))
    elif form == "chat":
        request.chat.CopyFrom(draw(chat_turns))
    elif form == "resume":
        request.resume = draw(st.booleans())
    return request


# A valid Calibrate measures sensitivities over the prompts: short prompts keep a kl run to ~30 small passes.
# Profile mode is drawn only with names it refuses (a valid one calibrates a profile for minutes).
valid_calibrates = build(
    pb.CalibrateRequest, prompts=st.lists(st.sampled_from(["The sea is calm tonight.", "Two plus two is four.", "Hello there, friend."]), min_size=1, max_size=2),
    method=st.sampled_from(["turboquant_mse", "qjl", "polar"]), target_avg_bits=st.floats(2, 6), bit_choices=st.just([2, 3, 4, 5, 6]),
    beta=st.one_of(st.just(0.0), st.floats(1.1, 3)), apply=st.booleans(), mode=st.sampled_from(["key_norm", "key_norm", "kl"]),
)
any_calibrates = build(
    pb.CalibrateRequest, prompts=optional(st.lists(st.text(min_size=0, max_size=40), max_size=3)),
    method=optional(st.one_of(st.sampled_from(["turboquant_mse", "qjl", "klt"]), st.text(max_size=10))),
    target_avg_bits=optional(st.one_of(st.floats(1, 9), specials)), bit_choices=optional(st.lists(small32, max_size=4)),
    beta=optional(st.one_of(st.floats(0, 3), specials)), apply=st.booleans(), cache=optional(cache_configs()),
    mode=st.sampled_from(["key_norm", "key_norm", "key_norm", "kl", "", "norm"]),
    profile=optional(st.sampled_from(["bad name!", "x" * 65, "é", "../up"])),
    profile_budgets=optional(st.lists(st.one_of(st.floats(0, 9), specials), max_size=3)), validation_tokens=optional(small32),
)
MODEL_MESSAGES = MESSAGES | {
    "Generate": st.one_of(build(pb.GenerateRequest, session_id=st.just(MODEL_GUARDED), prompt=st.text(min_size=1, max_size=40),
                                max_tokens=st.integers(1, 4), ignore_eos=st.booleans()), model_generates()),
    "Calibrate": st.one_of(valid_calibrates, valid_calibrates, any_calibrates),
    "Trim": build(pb.TrimRequest, session_id=model_ids, n=st.one_of(st.integers(0, 10), st.just(U64)), layer=optional(st.integers(0, 3)),
                  expected_offset=optional(st.integers(0, 12))),
}


# The model shard's run draws Generate and Calibrate most (first: hypothesis leans on early choices).
MODEL_METHODS = ["Generate", "Calibrate", "Generate", "Calibrate", "Trim", "Calibrate", "Generate", *sorted(REQUESTS)]


@st.composite
def requests(draw, messages=MESSAGES, guarded=tuple(GUARDED), methods=tuple(sorted(REQUESTS))):
    """(method, message or None, body bytes, timeout): structured, mutated or random bodies."""
    method = draw(st.sampled_from(methods))
    message = draw(messages[method])
    body = message.SerializeToString()
    form = draw(st.sampled_from(["structured"] * 6 + ["truncated", "flipped", "random"]))
    if form == "truncated" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif form == "flipped" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif form == "random":
        body = draw(st.binary(max_size=200))
    # Short deadlines only away from the guarded sessions: a cut call there may commit later, by design.
    # Half the Calibrates get time to run to their answer (they hold no session).
    if getattr(message, "session_id", "") in guarded or (method == "Calibrate" and draw(st.booleans())):
        timeout = 60.0
    else:
        timeout = draw(st.sampled_from([0.001, 0.005, 0.05, 60.0, 60.0, 60.0]))
    return method, message, body, timeout


@pytest.fixture(scope="module")
def guard(module_tmp):
    shard = ShardProcess(module_tmp, "--model", "none", *LIMITS).start()
    yield Guard(shard, module_tmp / "kvshard.sqlite3")
    assert shard.stop() == 0, shard.log()[-3000:]


@pytest.fixture(scope="module")
def model_guard(tmp_path_factory):
    where = tmp_path_factory.mktemp("model-fuzz")
    shard = ShardProcess(where, "--model", "smollm2-135m", *LIMITS, *MODEL_LIMITS).start(timeout=600)
    yield Guard(shard, where / "kvshard.sqlite3", model=True)
    assert shard.stop() == 0, shard.log()[-3000:]


def fuzz(guard, examples: int, messages=MESSAGES, methods=tuple(sorted(REQUESTS))) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(requests(messages, tuple(guard.guarded), tuple(methods)))
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


def fuzz_past_the_precondition(guard, examples: int, answered: bool) -> None:
    """The model shard's run; with `answered`, Generate and Calibrate must also have run to an OK answer, not
    only been refused (the fast slice is too short to be sure of that)."""
    before = guard.sent
    fuzz(guard, examples, MODEL_MESSAGES, MODEL_METHODS)
    assert guard.sent - before >= examples
    drawn = {method for method, _ in guard.answers}
    assert {"Generate", "Calibrate"} <= drawn, sorted(guard.answers.items())
    if answered:
        assert guard.answers["Generate", "OK"] and guard.answers["Calibrate", "OK"], sorted(guard.answers.items())


def test_fuzz_a_model_shard_fast_slice(model_guard):
    fuzz_past_the_precondition(model_guard, 60, answered=False)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # Generates and Calibrates: about a second a request here
def test_fuzz_a_model_shard_a_thousand_requests(model_guard):
    fuzz_past_the_precondition(model_guard, 1_000, answered=True)
    print(f"model shard fuzz: {guard_summary(model_guard)}")


def guard_summary(guard) -> str:
    return ", ".join(f"{method} {code}: {n}" for (method, code), n in sorted(guard.answers.items()))
