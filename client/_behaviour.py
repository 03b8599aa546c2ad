"""The client's behaviour, written once for both transports.

Every operation is a generator of steps — one RPC attempt, a pause before a retry, opening a stream, reading
its next message, handing a value to the caller — that a transport performs: blocking in sync.py, awaiting
in aio.py. A failed RPC is thrown back into the generator at the step that made it, so retries, recovery
and exactly-once generation are ordinary Python here. `bind` turns these classes into a transport's: each
method marked @operation or @streaming becomes a blocking method / iterator, or a coroutine / async iterator,
with the same signature and docstring.
"""

import functools
from dataclasses import dataclass

import grpc

from kvshard.client._common import (
    CalibrationResult,
    GenerateProgress,
    RetryPolicy,
    SessionOptions,
    append_call,
    auth_metadata,
    calibrate_request,
    channel_credentials,
    create_request,
    delete_recover,
    from_tensor,
    generate_request,
    retryable,
    to_tensor,
    trim_call,
)
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc

# ---- steps ------------------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One attempt of a unary RPC; the transport answers with the response or throws the grpc.RpcError."""

    method: str
    request: object
    timeout: float | None
    metadata: tuple


@dataclass
class Pause:
    seconds: float


@dataclass
class OpenStream:
    """Start a server-streaming RPC; the transport answers with a handle for NextMessage."""

    method: str
    request: object
    timeout: float | None
    metadata: tuple


@dataclass
class NextMessage:
    """The stream's next message, or None at its end."""

    stream: object


@dataclass
class Emit:
    """A value for the caller of a streaming operation (a generated token, a listed session)."""

    value: object


def operation(method):
    """Mark a step generator as a public method that returns its result."""
    method.transport_kind = "operation"
    return method


def streaming(method):
    """Mark a step generator as a public method that yields what it emits."""
    method.transport_kind = "streaming"
    return method


def bind(behaviour: type, run, stream) -> type:
    """`behaviour` with every marked method wrapped by run(client, steps) or stream(client, steps), which a
    transport provides; the transport's public classes subclass the result."""
    wrapped = {}
    for attr, method in vars(behaviour).items():
        kind = getattr(method.fget if isinstance(method, property) else method, "transport_kind", None)
        if isinstance(method, property) and kind:
            wrapped[attr] = property(_wrap(method.fget, run), doc=method.__doc__)
        elif kind:
            wrapped[attr] = _wrap(method, run if kind == "operation" else stream)
    return type(behaviour.__name__, (behaviour,), wrapped)


def _wrap(method, drive):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return drive(self.client, method(self, *args, **kwargs))

    return call


def relay(steps, emit):
    """Run `steps` inside another generator of steps and return their result; each value they emit goes
    through emit(value), and what that returns (unless None) is emitted onward."""
    reply, error = None, None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(reply)
        except StopIteration as done:
            return done.value
        reply, error = None, None
        if isinstance(step, Emit):
            onward = emit(step.value)
            if onward is None:
                continue
            step = Emit(onward)
        try:
            reply = yield step
        except grpc.RpcError as raised:
            error = raised


def collected(steps):
    """Steps that run a streaming operation's steps and return the list of what they emitted."""
    values = []
    yield from relay(steps, values.append)
    return values


# ---- the behaviour ----------------------------------------------------------------------------------------------


class ClientBehaviour:
    """A connection to one kvshard server.

    token: bearer token (tenant); tls: None (plaintext), True, a root-certificate PEM path/bytes or
    grpc.ChannelCredentials; timeout: default deadline of unary calls in seconds (streams: per call);
    retry: a RetryPolicy (the default keeps trying for about a minute, which rides out a restart).
    """

    # The transport's classes for what the calls return; set by sync.py / aio.py.
    Cache: type
    Session: type
    Chat: type

    def __init__(self, target: str, token: str | None = None, tls=None, timeout: float = 30.0, retry=None):
        self.target = target
        self.channel = self.open_channel(target, channel_credentials(tls))
        self.stub = pb_grpc.KVShardStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    @property
    def client(self):
        return self

    def call(self, method: str, request, timeout: float | None = None, recover=None, retry: bool = True):
        """Steps of a unary call, retried on UNAVAILABLE (unless retry=False). After a retry, recover(error)
        may return a substitute answer (or steps producing one) for an error that only says the earlier
        attempt was applied."""
        delays = self.retry.delays() if retry else iter(())
        retried = False
        while True:
            try:
                return (yield Call(method, request, timeout or self.timeout, self.call_metadata(request)))
            except grpc.RpcError as error:
                answer = recover(error) if retried and recover is not None else None
                if answer is not None:
                    return (yield from answer) if hasattr(answer, "send") else answer
                delay = next(delays, None) if retryable(error, recover) else None
                if delay is None:
                    raise
                yield Pause(delay)
                retried = True

    def call_metadata(self, request) -> tuple:
        """Auth, plus the session id a proxy can route on (deploy/ hashes it to keep a session on one shard)."""
        session_id = getattr(request, "session_id", "")
        return self.metadata + (("kvshard-session", session_id),) if session_id else self.metadata

    # ---- sessions -------------------------------------------------------------------------------------------

    @operation
    def server_info(self) -> pb.ServerInfoResponse:
        return (yield from self.call("ServerInfo", pb.ServerInfoRequest()))

    @operation
    def create_session(self, session_id: str | None = None, **options):
        """A model session for generate(). options: method, key_bits, value_bits, sink_tokens, window, seed, profile,
        budget_bits, planned_tokens (CacheConfig's fields; none: the server's default profile), labels."""
        return self.Session(self, (yield from self._create(pb.MODEL, None, session_id, SessionOptions(**options))))

    @operation
    def create_cache(self, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options):
        """A one-layer raw cache session, used like a local CompressedKVCache."""
        return (yield from self._create_caches(1, head_dim, n_kv_heads, session_id, options))[0]

    @operation
    def create_caches(self, layers: int, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options):
        """A raw session of `layers` caches, one RemoteKVCache per layer."""
        return (yield from self._create_caches(layers, head_dim, n_kv_heads, session_id, options))

    def _create_caches(self, layers, head_dim, n_kv_heads, session_id, options):
        shape = pb.RawShape(layers=layers, n_kv_heads=n_kv_heads, head_dim=head_dim)
        info = yield from self._create(pb.RAW, shape, session_id, SessionOptions(**options))
        return [self.Cache(self, info, layer) for layer in range(layers)]

    def _create(self, kind, shape, session_id, options: SessionOptions):
        request = create_request(kind, shape, session_id, options)

        def recover(error):
            # Our own earlier attempt took the id: fetch what it created.
            return self._get_session(request.session_id) if error.code() == grpc.StatusCode.ALREADY_EXISTS else None

        return (yield from self.call("CreateSession", request, recover=recover))

    @operation
    def get_session(self, session_id: str, include_token_ids: bool = False) -> pb.Session:
        return (yield from self._get_session(session_id, include_token_ids))

    def _get_session(self, session_id, include_token_ids=False):
        request = pb.GetSessionRequest(session_id=session_id, include_token_ids=include_token_ids)
        return (yield from self.call("GetSession", request))

    @operation
    def session(self, session_id: str):
        """An existing session: a RemoteSession, or a list of RemoteKVCache for a raw one."""
        info = yield from self._get_session(session_id)
        if info.kind == pb.RAW:
            return [self.Cache(self, info, layer) for layer in range(info.shape.layers)]
        return self.Session(self, info)

    @streaming
    def list_sessions(self, page_size: int = 50):
        """Every session (of this tenant), fetched a page at a time."""
        token = ""
        while True:
            page = yield from self.call("ListSessions", pb.ListSessionsRequest(page_size=page_size, page_token=token))
            for session in page.sessions:
                yield Emit(session)
            token = page.next_page_token
            if not token:
                return

    @operation
    def delete_session(self, session_id: str) -> None:
        yield from self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), recover=delete_recover)

    @operation
    def calibrate(self, target_avg_bits: float = 4.0, method: str = "turboquant_mse", bit_choices=(), beta: float = 0.0,
                  prompts=(), apply: bool = False, mode: str = "kl", timeout: float | None = None, **options) -> CalibrationResult:
        """RateQuant on the served model; apply=True also creates a model session with the allocation."""
        request = calibrate_request(target_avg_bits, method, bit_choices, beta, prompts, apply, mode, SessionOptions(**options))
        # Applying creates a session, which a blind retry would do twice: only plain calibration retries.
        answer = yield from self.call("Calibrate", request, timeout, retry=not apply)
        session = self.Session(self, answer.session) if answer.HasField("session") else None
        return CalibrationResult(list(answer.sensitivities), list(answer.key_bits), answer.average_bits, answer.beta, session)


class RemoteKVCacheBehaviour:
    """One layer of a raw session, with the CompressedKVCache API: append, attend, trim, memory_bytes, nbytes, len.

    Arrays may be MLX or numpy; attend answers in the type and dtype of the query. `offset` (and len) are the
    layer's tokens as of this object's last call; appends send it as expected_offset, so retries are safe and
    a concurrent writer is detected (grpc ABORTED) instead of interleaved.
    """

    def __init__(self, client, info: pb.Session, layer: int):
        self.client = client
        self.session_id = info.session_id
        self.layer = layer
        self.offset = info.layer_offsets[layer]

    @operation
    def append(self, keys, values, timeout: float | None = None) -> None:
        """keys, values: (n_kv_heads, tokens, head_dim), or (tokens, head_dim) for one head."""
        request, recover = append_call(self.session_id, self.layer, keys, values, self.offset)
        self.offset = (yield from self.client.call("Append", request, timeout, recover=recover)).offset

    @operation
    def attend(self, queries, timeout: float | None = None):
        """queries: (n_q_heads, tokens, head_dim), n_q_heads a multiple of n_kv_heads (GQA); the output has
        the queries' shape."""
        request = pb.AttendRequest(session_id=self.session_id, layer=self.layer, queries=to_tensor(queries))
        answer = yield from self.client.call("Attend", request, timeout)
        self.offset = answer.offset
        return from_tensor(answer.output, queries)

    @operation
    def trim(self, n: int, timeout: float | None = None) -> int:
        request, recover = trim_call(self.session_id, n, self.offset, self.layer)
        answer = yield from self.client.call("Trim", request, timeout, recover=recover)
        self.offset = answer.offset
        return answer.trimmed

    @operation
    def memory_bytes(self) -> int:
        """Bytes the session's caches hold on the server (all layers of the session)."""
        return (yield from self.client._get_session(self.session_id)).memory_bytes

    @property
    @operation
    def nbytes(self) -> int:
        """memory_bytes(), as mlx_lm caches name it."""
        return (yield from self.client._get_session(self.session_id)).memory_bytes

    @operation
    def refresh(self) -> None:
        self.offset = (yield from self.client._get_session(self.session_id)).layer_offsets[self.layer]

    def __len__(self) -> int:
        return self.offset

    def __bool__(self) -> bool:
        # An object for a session is always something, however few tokens it holds (len may be 0).
        return True

    @operation
    def delete(self) -> None:
        yield from self.client.call("DeleteSession", pb.DeleteSessionRequest(session_id=self.session_id), recover=delete_recover)


class RemoteSessionBehaviour:
    """A model session: generate() streams tokens, each call continuing the conversation."""

    def __init__(self, client, info: pb.Session):
        self.client = client
        self.session_id = info.session_id
        self.info = info
        self.offset = info.offset

    @operation
    def refresh(self) -> pb.Session:
        return (yield from self._refresh())

    def _refresh(self):
        self.info = yield from self.client._get_session(self.session_id)
        self.offset = self.info.offset
        return self.info

    @streaming
    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs):
        """Stream the tokens of one turn. kwargs: tokens, messages, resume, replay_from, max_tokens (default: the
        server's, 64), temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos. A broken
        stream (UNAVAILABLE) is resumed without repeating or losing tokens."""
        return (yield from self._generate(prompt, timeout, kwargs))

    def _generate(self, prompt, timeout, kwargs):
        request = generate_request(self.session_id, prompt=prompt, **kwargs)
        request.expected_offset = self.offset
        progress = GenerateProgress(request)
        delays = self.client.retry.delays()
        next_request = request
        while next_request is not None:
            try:
                stream = yield OpenStream("Generate", next_request, timeout, self.client.call_metadata(next_request))
                while (message := (yield NextMessage(stream))) is not None:
                    token = progress.accept(message)
                    if token is not None:
                        self.offset = token.offset
                        yield Emit(token)
                return
            except grpc.RpcError as error:
                delay = next(delays, None) if retryable(error) else None
                if delay is None:
                    raise
                yield Pause(delay)
                info = yield from self._refresh()
                try:
                    next_request = progress.next_request(info)
                except LookupError:
                    raise error from None

    @operation
    def generate_text(self, prompt: str | None = None, **kwargs) -> str:
        """generate()'s tokens joined into one string."""
        timeout = kwargs.pop("timeout", None)
        return "".join(token.text for token in (yield from collected(self._generate(prompt, timeout, kwargs))))

    def chat(self, system: str | None = None):
        return self.client.Chat(self, system)

    @operation
    def trim(self, n: int) -> int:
        request, recover = trim_call(self.session_id, n, self.offset)
        answer = yield from self.client.call("Trim", request, recover=recover)
        self.offset = answer.offset
        return answer.trimmed

    @operation
    def token_ids(self) -> list[int]:
        return list((yield from self.client._get_session(self.session_id, include_token_ids=True)).token_ids)

    @operation
    def memory_bytes(self) -> int:
        return (yield from self._refresh()).memory_bytes

    @property
    @operation
    def nbytes(self) -> int:
        """memory_bytes(), as mlx_lm caches name it."""
        return (yield from self._refresh()).memory_bytes

    def __len__(self) -> int:
        return self.offset

    def __bool__(self) -> bool:
        # A fresh session has no tokens (len 0) but is still a session: `if result.session:` must hold.
        return True

    @operation
    def delete(self) -> None:
        yield from self.client.call("DeleteSession", pb.DeleteSessionRequest(session_id=self.session_id), recover=delete_recover)


class ChatBehaviour:
    """Multi-turn chat on one session: each send() is one Generate call rendered with the chat template."""

    def __init__(self, session, system: str | None = None):
        self.session = session
        self.client = session.client
        self.system = system
        self.history: list[dict] = []

    @streaming
    def stream(self, content: str, **kwargs):
        """The reply's text, piece by piece."""
        return (yield from self._turn(content, kwargs))

    @operation
    def send(self, content: str, **kwargs) -> str:
        """The whole reply."""
        return "".join((yield from collected(self._turn(content, kwargs))))

    def _turn(self, content, kwargs):
        messages = [{"role": "user", "content": content}]
        if not self.history and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        timeout = kwargs.pop("timeout", None)
        reply = []

        def text(token):
            reply.append(token.text)
            return token.text

        yield from relay(self.session._generate(None, timeout, {"messages": messages, **kwargs}), text)
        self.history += messages + [{"role": "assistant", "content": "".join(reply)}]
