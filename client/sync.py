"""Blocking client: Client, RemoteKVCache (the cache API, remotely), RemoteSession (generation), Chat."""

import time
from collections.abc import Iterator

import grpc

from kvshard.client._common import (
    CHANNEL_OPTIONS,
    CalibrationResult,
    GeneratedToken,
    GenerateProgress,
    RetryPolicy,
    SessionOptions,
    append_call,
    auth_metadata,
    call_metadata,
    calibrate_request,
    channel_credentials,
    create_request,
    delete_recover,
    from_tensor,
    generate_request,
    to_tensor,
    trim_call,
)
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc


class Client:
    """A connection to one kvshard server.

    token: bearer token (tenant); tls: None (plaintext), True, a root-certificate PEM path/bytes or
    grpc.ChannelCredentials; timeout: default deadline of unary calls in seconds (streams: per call).
    """

    def __init__(self, target: str, token: str | None = None, tls=None, timeout: float = 30.0, retry: RetryPolicy | None = None):
        credentials = channel_credentials(tls)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVShardStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method: str, request, timeout: float | None = None, recover=None, retry: bool = True):
        """A unary call, retried on UNAVAILABLE (unless retry=False). After a retry, recover(error) may return
        a substitute answer for an error that only says the earlier attempt was applied."""
        delays = self.retry.delays() if retry else iter(())
        retried = False
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=call_metadata(self.metadata, request))
            except grpc.RpcError as error:
                if retried and recover is not None:
                    answer = recover(error)
                    if answer is not None:
                        return answer
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise
                time.sleep(delay)
                retried = True

    # ---- sessions -------------------------------------------------------------------------------------------

    def server_info(self) -> pb.ServerInfoResponse:
        return self.call("ServerInfo", pb.ServerInfoRequest())

    def create_session(self, session_id: str | None = None, **options) -> "RemoteSession":
        """A model session for generate(). options: method, key_bits, value_bits, sink_tokens, window, seed, labels."""
        return RemoteSession(self, self._create(pb.MODEL, None, session_id, SessionOptions(**options)))

    def create_cache(self, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options) -> "RemoteKVCache":
        """A one-layer raw cache session, used like a local CompressedKVCache."""
        return self.create_caches(1, head_dim, n_kv_heads, session_id, **options)[0]

    def create_caches(self, layers: int, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options) -> list["RemoteKVCache"]:
        """A raw session of `layers` caches, one RemoteKVCache per layer."""
        shape = pb.RawShape(layers=layers, n_kv_heads=n_kv_heads, head_dim=head_dim)
        info = self._create(pb.RAW, shape, session_id, SessionOptions(**options))
        return [RemoteKVCache(self, info, layer) for layer in range(layers)]

    def _create(self, kind, shape, session_id, options: SessionOptions) -> pb.Session:
        request = create_request(kind, shape, session_id, options)

        def recover(error):
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return self.get_session(request.session_id)
            return None

        return self.call("CreateSession", request, recover=recover)

    def get_session(self, session_id: str, include_token_ids: bool = False) -> pb.Session:
        return self.call("GetSession", pb.GetSessionRequest(session_id=session_id, include_token_ids=include_token_ids))

    def session(self, session_id: str):
        """An existing session: a RemoteSession, or a list of RemoteKVCache for a raw one."""
        info = self.get_session(session_id)
        if info.kind == pb.RAW:
            return [RemoteKVCache(self, info, layer) for layer in range(info.shape.layers)]
        return RemoteSession(self, info)

    def list_sessions(self, page_size: int = 50) -> Iterator[pb.Session]:
        token = ""
        while True:
            page = self.call("ListSessions", pb.ListSessionsRequest(page_size=page_size, page_token=token))
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> None:
        self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), recover=delete_recover)

    def calibrate(self, target_avg_bits: float = 4.0, method: str = "turboquant_mse", bit_choices=(), beta: float = 0.0,
                  prompts=(), apply: bool = False, mode: str = "kl", timeout: float | None = None, **options) -> CalibrationResult:
        """RateQuant on the served model; apply=True also creates a model session with the allocation."""
        request = calibrate_request(target_avg_bits, method, bit_choices, beta, prompts, apply, mode, SessionOptions(**options))
        # Applying creates a session, which a blind retry would do twice: only plain calibration retries.
        answer = self.call("Calibrate", request, timeout, retry=not apply)
        session = RemoteSession(self, answer.session) if answer.HasField("session") else None
        return CalibrationResult(list(answer.sensitivities), list(answer.key_bits), answer.average_bits, answer.beta, session)


class RemoteKVCache:
    """One layer of a raw session, with the CompressedKVCache API: append, attend, trim, memory_bytes, len.

    Arrays may be MLX or numpy; attend answers in the type and dtype of the query. `offset` (and len) are the
    layer's tokens as of this object's last call; appends send it as expected_offset, so retries are safe and
    a concurrent writer is detected (grpc ABORTED) instead of interleaved.
    """

    def __init__(self, client: Client, info: pb.Session, layer: int):
        self.client = client
        self.session_id = info.session_id
        self.layer = layer
        self.offset = info.layer_offsets[layer]

    def append(self, keys, values, timeout: float | None = None) -> None:
        request, recover = append_call(self.session_id, self.layer, keys, values, self.offset)
        self.offset = self.client.call("Append", request, timeout, recover=recover).offset

    def attend(self, queries, timeout: float | None = None):
        request = pb.AttendRequest(session_id=self.session_id, layer=self.layer, queries=to_tensor(queries))
        answer = self.client.call("Attend", request, timeout)
        self.offset = answer.offset
        return from_tensor(answer.output, queries)

    def trim(self, n: int, timeout: float | None = None) -> int:
        request, recover = trim_call(self.session_id, n, self.offset, self.layer)
        answer = self.client.call("Trim", request, timeout, recover=recover)
        self.offset = answer.offset
        return answer.trimmed

    def memory_bytes(self) -> int:
        """Bytes the session's caches hold on the server (all layers of the session)."""
        return self.client.get_session(self.session_id).memory_bytes

    @property
    def nbytes(self) -> int:
        return self.memory_bytes()

    def refresh(self) -> None:
        self.offset = self.client.get_session(self.session_id).layer_offsets[self.layer]

    def __len__(self) -> int:
        return self.offset

    def delete(self) -> None:
        self.client.delete_session(self.session_id)


class RemoteSession:
    """A model session: generate() streams tokens, each call continuing the conversation."""

    def __init__(self, client: Client, info: pb.Session):
        self.client = client
        self.session_id = info.session_id
        self.info = info
        self.offset = info.offset

    def refresh(self) -> pb.Session:
        self.info = self.client.get_session(self.session_id)
        self.offset = self.info.offset
        return self.info

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[GeneratedToken]:
        """Stream the tokens of one turn. kwargs: tokens, messages, resume, max_tokens, temperature, top_p, top_k,
        min_p, seed, stop, stop_token_ids, ignore_eos. A broken stream (UNAVAILABLE) is resumed without
        repeating or losing tokens."""
        request = generate_request(self.session_id, prompt=prompt, **kwargs)
        request.expected_offset = self.offset
        progress = GenerateProgress(request)
        delays = self.client.retry.delays()
        next_request = request
        while next_request is not None:
            try:
                for message in self.client.stub.Generate(next_request, timeout=timeout, metadata=call_metadata(self.client.metadata, next_request)):
                    token = progress.accept(message)
                    if token is not None:
                        self.offset = token.offset
                        yield token
                return
            except grpc.RpcError as error:
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise
                time.sleep(delay)
                info = self.refresh()
                try:
                    next_request = progress.next_request(info)
                except LookupError:
                    raise error from None

    def generate_text(self, prompt: str | None = None, **kwargs) -> str:
        return "".join(token.text for token in self.generate(prompt, **kwargs))

    def chat(self, system: str | None = None) -> "Chat":
        return Chat(self, system)

    def trim(self, n: int) -> int:
        request, recover = trim_call(self.session_id, n, self.offset)
        answer = self.client.call("Trim", request, recover=recover)
        self.offset = answer.offset
        return answer.trimmed

    def token_ids(self) -> list[int]:
        return list(self.client.get_session(self.session_id, include_token_ids=True).token_ids)

    def memory_bytes(self) -> int:
        return self.refresh().memory_bytes

    def __len__(self) -> int:
        return self.offset

    def delete(self) -> None:
        self.client.delete_session(self.session_id)


class Chat:
    """Multi-turn chat on one session: each send() is one Generate call rendered with the chat template."""

    def __init__(self, session: RemoteSession, system: str | None = None):
        self.session = session
        self.system = system
        self.history: list[dict] = []

    def stream(self, content: str, **kwargs) -> Iterator[str]:
        messages = [{"role": "user", "content": content}]
        if not self.history and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        reply = []
        for token in self.session.generate(messages=messages, **kwargs):
            reply.append(token.text)
            yield token.text
        self.history += messages + [{"role": "assistant", "content": "".join(reply)}]

    def send(self, content: str, **kwargs) -> str:
        return "".join(self.stream(content, **kwargs))
