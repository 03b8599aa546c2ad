"""kvshard.client — talk to a kvshard server.

    from kvshard.client import Client
    with Client("127.0.0.1:50051") as client:
        cache = client.create_cache(head_dim=64, n_kv_heads=3, key_bits=4)    # a remote CompressedKVCache
        cache.append(k, v); out = cache.attend(q); len(cache); cache.memory_bytes()
        session = client.create_session(key_bits=4)                           # a model session
        for token in session.generate("Hello", max_tokens=8): print(token.text, end="")
        chat = session.chat(); chat.send("Hi!"); chat.send("And then?")

AsyncClient is the asyncio twin with the same methods.
"""

from kvshard.client._common import NO_RETRY, CalibrationResult, GeneratedToken, RetryPolicy
from kvshard.client.aio import AsyncChat, AsyncClient, AsyncRemoteKVCache, AsyncRemoteSession
from kvshard.client.sync import Chat, Client, RemoteKVCache, RemoteSession

__all__ = [
    "AsyncChat",
    "AsyncClient",
    "AsyncRemoteKVCache",
    "AsyncRemoteSession",
    "CalibrationResult",
    "Chat",
    "Client",
    "GeneratedToken",
    "NO_RETRY",
    "RemoteKVCache",
    "RemoteSession",
    "RetryPolicy",
]
