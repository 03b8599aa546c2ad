"""asyncio twin of the blocking client: the same classes and arguments, with awaitable methods and
async-iterator generation."""

import asyncio
from collections.abc import AsyncIterator

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


class AsyncClient:
    """See kvshard.client.Client; use inside a running event loop (`async with AsyncClient(...) as c`)."""

    def __init__(self, target: str, token: str | None = None, tls=None, timeout: float = 30.0, retry: RetryPolicy | None = None):
        credentials = channel_credentials(tls)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVShardStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def call(self, method: str, request, timeout: float | None = None, recover=None, retry: bool = True):
        delays = self.retry.delays() if retry else iter(())
        retried = False
        while True:
            try:
                return await getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=call_metadata(self.metadata, request))
            except grpc.aio.AioRpcError as error:
                if retried and recover is not None:
                    answer = await recover(error)
                    if answer is not None:
                        return answer
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                retried = True

    async def server_info(self) -> pb.ServerInfoResponse:
        return await self.call("ServerInfo", pb.ServerInfoRequest())

    async def create_session(self, session_id: str | None = None, **options) -> "AsyncRemoteSession":
        return AsyncRemoteSession(self, await self._create(pb.MODEL, None, session_id, SessionOptions(**options)))

    async def create_cache(self, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options) -> "AsyncRemoteKVCache":
        return (await self.create_caches(1, head_dim, n_kv_heads, session_id, **options))[0]

    async def create_caches(self, layers: int, head_dim: int, n_kv_heads: int, session_id: str | None = None, **options) -> list["AsyncRemoteKVCache"]:
        shape = pb.RawShape(layers=layers, n_kv_heads=n_kv_heads, head_dim=head_dim)
        info = await self._create(pb.RAW, shape, session_id, SessionOptions(**options))
        return [AsyncRemoteKVCache(self, info, layer) for layer in range(layers)]

    async def _create(self, kind, shape, session_id, options: SessionOptions) -> pb.Session:
        request = create_request(kind, shape, session_id, options)

        async def recover(error):
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return await self.get_session(request.session_id)
            return None

        return await self.call("CreateSession", request, recover=recover)

    async def get_session(self, session_id: str, include_token_ids: bool = False) -> pb.Session:
        return await self.call("GetSession", pb.GetSessionRequest(session_id=session_id, include_token_ids=include_token_ids))

    async def session(self, session_id: str):
        info = await self.get_session(session_id)
        if info.kind == pb.RAW:
            return [AsyncRemoteKVCache(self, info, layer) for layer in range(info.shape.layers)]
        return AsyncRemoteSession(self, info)

    async def list_sessions(self, page_size: int = 50) -> AsyncIterator[pb.Session]:
        token = ""
        while True:
            page = await self.call("ListSessions", pb.ListSessionsRequest(page_size=page_size, page_token=token))
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def delete_session(self, session_id: str) -> None:
        await self.call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), recover=_pure(delete_recover))

    async def calibrate(self, target_avg_bits: float = 4.0, method: str = "turboquant_mse", bit_choices=(), beta: float = 0.0,
                        prompts=(), apply: bool = False, mode: str = "kl", timeout: float | None = None, **options) -> CalibrationResult:
        request = calibrate_request(target_avg_bits, method, bit_choices, beta, prompts, apply, mode, SessionOptions(**options))
        answer = await self.call("Calibrate", request, timeout, retry=not apply)
        session = AsyncRemoteSession(self, answer.session) if answer.HasField("session") else None
        return CalibrationResult(list(answer.sensitivities), list(answer.key_bits), answer.average_bits, answer.beta, session)


def _pure(recover):
    async def call(error):
        return recover(error)

    return call


class AsyncRemoteKVCache:
    """See kvshard.client.RemoteKVCache."""

    def __init__(self, client: AsyncClient, info: pb.Session, layer: int):
        self.client = client
        self.session_id = info.session_id
        self.layer = layer
        self.offset = info.layer_offsets[layer]

    async def append(self, keys, values, timeout: float | None = None) -> None:
        request, recover = append_call(self.session_id, self.layer, keys, values, self.offset)
        self.offset = (await self.client.call("Append", request, timeout, recover=_pure(recover))).offset

    async def attend(self, queries, timeout: float | None = None):
        request = pb.AttendRequest(session_id=self.session_id, layer=self.layer, queries=to_tensor(queries))
        answer = await self.client.call("Attend", request, timeout)
        self.offset = answer.offset
        return from_tensor(answer.output, queries)

    async def trim(self, n: int, timeout: float | None = None) -> int:
        request, recover = trim_call(self.session_id, n, self.offset, self.layer)
        answer = await self.client.call("Trim", request, timeout, recover=_pure(recover))
        self.offset = answer.offset
        return answer.trimmed

    async def memory_bytes(self) -> int:
        return (await self.client.get_session(self.session_id)).memory_bytes

    async def refresh(self) -> None:
        self.offset = (await self.client.get_session(self.session_id)).layer_offsets[self.layer]

    def __len__(self) -> int:
        return self.offset

    async def delete(self) -> None:
        await self.client.delete_session(self.session_id)


class AsyncRemoteSession:
    """See kvshard.client.RemoteSession."""

    def __init__(self, client: AsyncClient, info: pb.Session):
        self.client = client
        self.session_id = info.session_id
        self.info = info
        self.offset = info.offset

    async def refresh(self) -> pb.Session:
        self.info = await self.client.get_session(self.session_id)
        self.offset = self.info.offset
        return self.info

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> AsyncIterator[GeneratedToken]:
        request = generate_request(self.session_id, prompt=prompt, **kwargs)
        request.expected_offset = self.offset
        progress = GenerateProgress(request)
        delays = self.client.retry.delays()
        next_request = request
        while next_request is not None:
            try:
                async for message in self.client.stub.Generate(next_request, timeout=timeout, metadata=call_metadata(self.client.metadata, next_request)):
                    token = progress.accept(message)
                    if token is not None:
                        self.offset = token.offset
                        yield token
                return
            except grpc.aio.AioRpcError as error:
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                info = await self.refresh()
                try:
                    next_request = progress.next_request(info)
                except LookupError:
                    raise error from None

    async def generate_text(self, prompt: str | None = None, **kwargs) -> str:
        return "".join([token.text async for token in self.generate(prompt, **kwargs)])

    def chat(self, system: str | None = None) -> "AsyncChat":
        return AsyncChat(self, system)

    async def trim(self, n: int) -> int:
        request, recover = trim_call(self.session_id, n, self.offset)
        answer = await self.client.call("Trim", request, recover=_pure(recover))
        self.offset = answer.offset
        return answer.trimmed

    async def token_ids(self) -> list[int]:
        return list((await self.client.get_session(self.session_id, include_token_ids=True)).token_ids)

    async def memory_bytes(self) -> int:
        return (await self.refresh()).memory_bytes

    def __len__(self) -> int:
        return self.offset

    async def delete(self) -> None:
        await self.client.delete_session(self.session_id)


class AsyncChat:
    """See kvshard.client.Chat."""

    def __init__(self, session: AsyncRemoteSession, system: str | None = None):
        self.session = session
        self.system = system
        self.history: list[dict] = []

    async def stream(self, content: str, **kwargs) -> AsyncIterator[str]:
        messages = [{"role": "user", "content": content}]
        if not self.history and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        reply = []
        async for token in self.session.generate(messages=messages, **kwargs):
            reply.append(token.text)
            yield token.text
        self.history += messages + [{"role": "assistant", "content": "".join(reply)}]

    async def send(self, content: str, **kwargs) -> str:
        return "".join([text async for text in self.stream(content, **kwargs)])
