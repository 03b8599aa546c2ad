"""The asyncio transport: AsyncClient, AsyncRemoteKVCache, AsyncRemoteSession, AsyncChat — the blocking
classes' methods and arguments, as coroutines and async iterators.

The behaviour is _behaviour.py's; this file only performs its steps with grpc.aio's stubs."""

import asyncio
from contextlib import aclosing

import grpc

from kvshard.client._behaviour import (
    Call,
    ChatBehaviour,
    ClientBehaviour,
    Emit,
    NextMessage,
    OpenStream,
    Pause,
    RemoteKVCacheBehaviour,
    RemoteSessionBehaviour,
    bind,
)
from kvshard.client._common import CHANNEL_OPTIONS


async def _perform(client, step):
    if isinstance(step, Call):
        return await getattr(client.stub, step.method)(step.request, timeout=step.timeout, metadata=step.metadata)
    if isinstance(step, Pause):
        return await asyncio.sleep(step.seconds)
    if isinstance(step, OpenStream):
        return getattr(client.stub, step.method)(step.request, timeout=step.timeout, metadata=step.metadata)
    if isinstance(step, NextMessage):
        message = await step.stream.read()
        return None if message is grpc.aio.EOF else message
    raise TypeError(f"not a step: {step!r}")


class _Done:
    def __init__(self, value):
        self.value = value


async def _drive(client, steps):
    """Perform `steps`, yielding what they emit and last their result (as _Done). Open streams are cancelled."""
    opened, reply, error = [], None, None
    try:
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as done:
                yield _Done(done.value)
                return
            reply, error = None, None
            if isinstance(step, Emit):
                yield step.value
                continue
            try:
                reply = await _perform(client, step)
                if isinstance(step, OpenStream):
                    opened.append(reply)
            except grpc.RpcError as raised:
                error = raised
    finally:
        steps.close()
        for stream in opened:
            stream.cancel()


async def _run(client, steps):
    async with aclosing(_drive(client, steps)) as driver:
        async for item in driver:
            if isinstance(item, _Done):
                return item.value
            raise TypeError(f"an operation emitted {item!r}")


async def _stream(client, steps):
    async with aclosing(_drive(client, steps)) as driver:
        async for item in driver:
            if isinstance(item, _Done):
                return
            yield item


class AsyncRemoteKVCache(bind(RemoteKVCacheBehaviour, _run, _stream)):
    """See kvshard.client.RemoteKVCache; every method is awaited (`await cache.nbytes` too)."""


class AsyncRemoteSession(bind(RemoteSessionBehaviour, _run, _stream)):
    """See kvshard.client.RemoteSession; `async for token in session.generate(...)`."""


class AsyncChat(bind(ChatBehaviour, _run, _stream)):
    """See kvshard.client.Chat; `await chat.send(...)`, `async for text in chat.stream(...)`."""


class AsyncClient(bind(ClientBehaviour, _run, _stream)):
    """See kvshard.client.Client; use inside a running event loop (`async with AsyncClient(...) as client`)."""

    Cache, Session, Chat = AsyncRemoteKVCache, AsyncRemoteSession, AsyncChat

    def open_channel(self, target, credentials):
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
