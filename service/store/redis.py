"""Shared session store on Redis, for several shards serving the same sessions.

Keys (prefix `kvshard:`): `session:{id}` hash (record, token_ids, tenant), `tails:{id}` hash layer -> tail,
`blocks:{id}:{layer}` hash start -> block, `tenant:{tenant}` sorted set of ids (score 0, paged by lex order),
`updated` sorted set id -> updated_at_ms. Commits are MULTI/EXEC transactions. An OK is durable in Redis'
sense: run redis-server with `appendonly yes` and `appendfsync always` for the same guarantee as SQLite.
"""

from urllib.parse import urlparse

import redis

from kvshard.service.errors import SessionConflict, SessionExists
from kvshard.service.store.base import LayerDelta, SessionRecord
from kvshard.service.store.sqlite import pack_tokens, unpack_tokens

PREFIX = "kvshard:"


def _session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


def _tails_key(session_id: str) -> str:
    return f"{PREFIX}tails:{session_id}"


def _blocks_key(session_id: str, layer: int) -> str:
    return f"{PREFIX}blocks:{session_id}:{layer}"


def _tenant_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}"


_UPDATED = PREFIX + "updated"


class RedisStore:
    kind = "redis"
    shared = True  # several shards may serve the same sessions

    def __init__(self, client: redis.Redis):
        self._redis = client
        self._redis.ping()

    @classmethod
    def from_url(cls, url: str) -> "RedisStore":
        if not urlparse(url).hostname:
            raise ValueError(f"store: expected redis://host:port/db, got {url!r}")
        return cls(redis.Redis.from_url(url))

    def create(self, record: SessionRecord, deltas: list[LayerDelta]) -> None:
        key = _session_key(record.session_id)
        with self._redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    raise SessionExists(record.session_id)
                pipe.multi()
                self._write(pipe, record, deltas)
                pipe.zadd(_tenant_key(record.tenant), {record.session_id: 0})
                pipe.execute()
            except redis.WatchError:
                raise SessionExists(record.session_id) from None

    def commit(self, record: SessionRecord, deltas: list[LayerDelta]) -> None:
        key = _session_key(record.session_id)
        with self._redis.pipeline() as pipe:
            try:
                # Optimistic: the transaction fails if another shard commits this session meanwhile.
                pipe.watch(key)
                if pipe.hget(key, "version") != str(record.version - 1).encode():
                    raise SessionConflict(record.session_id)
                stale = {d.layer: self._starts_from(pipe, record.session_id, d.layer, d.keep_until) for d in deltas}
                pipe.multi()
                for layer, starts in stale.items():
                    if starts:
                        pipe.hdel(_blocks_key(record.session_id, layer), *starts)
                self._write(pipe, record, deltas)
                pipe.execute()
            except redis.WatchError:
                raise SessionConflict(record.session_id) from None

    def version(self, session_id: str) -> int | None:
        value = self._redis.hget(_session_key(session_id), "version")
        return None if value is None else int(value)

    @staticmethod
    def _starts_from(client, session_id: str, layer: int, keep_until: int) -> list[bytes]:
        return [s for s in client.hkeys(_blocks_key(session_id, layer)) if int(s) >= keep_until]

    def _write(self, pipe, record: SessionRecord, deltas: list[LayerDelta]) -> None:
        sid = record.session_id
        pipe.hset(
            _session_key(sid),
            mapping={
                "record": record.to_json(),
                "token_ids": pack_tokens(record.token_ids),
                "tenant": record.tenant,
                "version": record.version,
            },
        )
        pipe.zadd(_UPDATED, {sid: record.updated_at_ms})
        for delta in deltas:
            if delta.block is not None:
                pipe.hset(_blocks_key(sid, delta.layer), str(delta.keep_until), delta.block)
            pipe.hset(_tails_key(sid), str(delta.layer), delta.tail)

    def load_record(self, session_id: str) -> SessionRecord | None:
        fields = self._redis.hmget(_session_key(session_id), "record", "token_ids")
        if fields[0] is None:
            return None
        return SessionRecord.from_json(fields[0].decode(), unpack_tokens(fields[1]), self.stored_bytes(session_id))

    def stored_bytes(self, session_id: str) -> int:
        fields = self._redis.hmget(_session_key(session_id), "record", "token_ids")
        if fields[0] is None:
            return 0
        layers = SessionRecord.from_json(fields[0].decode(), [], 0).shape["layers"]
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hvals(_tails_key(session_id))
            for layer in range(layers):
                pipe.hvals(_blocks_key(session_id, layer))
            values = pipe.execute()
        return len(fields[0]) + len(fields[1]) + sum(len(v) for group in values for v in group)

    def load_layers(self, session_id: str, layers: int) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(_tails_key(session_id))
            for layer in range(layers):
                pipe.hgetall(_blocks_key(session_id, layer))
            tails, *blocks = pipe.execute()
        return [
            (tails[str(layer).encode()], sorted((int(start), data) for start, data in blocks[layer].items()))
            for layer in range(layers)
        ]

    def delete(self, session_id: str) -> bool:
        fields = self._redis.hmget(_session_key(session_id), "record", "tenant")
        if fields[0] is None:
            return False
        layers = SessionRecord.from_json(fields[0].decode(), [], 0).shape["layers"]
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_session_key(session_id), _tails_key(session_id), *(_blocks_key(session_id, n) for n in range(layers)))
            pipe.zrem(_tenant_key(fields[1].decode()), session_id)
            pipe.zrem(_UPDATED, session_id)
            pipe.execute()
        return True

    def page(self, tenant: str, after: str, limit: int) -> list[SessionRecord]:
        low = f"({after}" if after else "-"
        ids = [i.decode() for i in self._redis.zrangebylex(_tenant_key(tenant), low, "+", start=0, num=limit)]
        records = []
        for session_id in ids:
            fields = self._redis.hmget(_session_key(session_id), "record", "token_ids")
            if fields[0] is not None:
                records.append(SessionRecord.from_json(fields[0].decode(), [], self.stored_bytes(session_id)))
        return records

    def count(self) -> int:
        return self._redis.zcard(_UPDATED)

    def idle_since(self, before_ms: int) -> list[str]:
        return [i.decode() for i in self._redis.zrangebyscore(_UPDATED, "-inf", f"({before_ms}")]

    def total_bytes(self) -> int:
        total = 0
        for key in self._redis.scan_iter(match=PREFIX + "*"):
            if key != _UPDATED.encode() and not key.startswith((PREFIX + "tenant:").encode()):
                total += self._redis.memory_usage(key) or 0
        return total

    def close(self) -> None:
        self._redis.close()
