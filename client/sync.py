"""The blocking transport: Client, RemoteKVCache (the cache API, remotely), RemoteSession (generation), Chat.

The behaviour is _behaviour.py's; this file only performs its steps with grpc's blocking stubs."""

import time

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


def _perform(client, step):
    if isinstance(step, (Call, OpenStream)):
        return getattr(client.stub, step.method)(step.request, timeout=step.timeout, metadata=step.metadata)
    if isinstance(step, Pause):
        return time.sleep(step.seconds)
    if isinstance(step, NextMessage):
        return next(step.stream, None)
    raise TypeError(f"not a step: {step!r}")


def _drive(client, steps):
    """Perform `steps`, yielding what they emit; returns their result. Streams left open are cancelled."""
    opened, reply, error = [], None, None
    try:
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            if isinstance(step, Emit):
                yield step.value
                continue
            try:
                reply = _perform(client, step)
                if isinstance(step, OpenStream):
                    opened.append(reply)
            except grpc.RpcError as raised:
                error = raised
    finally:
        steps.close()
        for stream in opened:
            stream.cancel()


def _run(client, steps):
    driver = _drive(client, steps)
    try:
        emitted = next(driver)
    except StopIteration as done:
        return done.value
    raise TypeError(f"an operation emitted {emitted!r}")


class RemoteKVCache(bind(RemoteKVCacheBehaviour, _run, _drive)):
    __doc__ = RemoteKVCacheBehaviour.__doc__


class RemoteSession(bind(RemoteSessionBehaviour, _run, _drive)):
    __doc__ = RemoteSessionBehaviour.__doc__


class Chat(bind(ChatBehaviour, _run, _drive)):
    __doc__ = ChatBehaviour.__doc__


class Client(bind(ClientBehaviour, _run, _drive)):
    __doc__ = ClientBehaviour.__doc__ + "\n    Blocking; `with Client(target) as client:` closes it at the end.\n"
    Cache, Session, Chat = RemoteKVCache, RemoteSession, Chat

    def open_channel(self, target, credentials):
        if credentials is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
