"""Shared session store on Redis or a Redis Cluster, for several shards serving the same sessions.

Every key of one session carries the session id as a hash tag, so they share one Cluster slot and each commit
is one atomic Lua script on one node: `kvshard:{id}:session` hash (record, token_ids, tenant, version, fence),
`kvshard:{id}:tails` hash layer -> tail, `kvshard:{id}:blocks:{layer}` hash start -> block and
`kvshard:{id}:lease` (owner and fencing token, with a TTL). Two indexes live in slots of their own and are
written beside the session, not inside its transaction: `kvshard:tenant:{tenant}` (ids, paged in lex order;
an id is added before its session is created, so a session is never missing from its tenant's listing, and
entries whose session does not exist are skipped) and `kvshard:updated` (id -> updated_at_ms, for the TTL
sweep and the session count).

Ownership: a shard holds a session's lease while it uses it. Taking a lease that is free issues the next
fencing token (a counter in the session hash); a commit carries the token and the script refuses it unless
the token is still the latest issued, so a shard that lost its lease (paused, partitioned) can never write
again, even if it wakes up before the new owner has written anything.

Durability: an OK means Redis executed the script. Run redis-server with `appendonly yes` and `appendfsync
always` for SQLite's guarantee on one node. On a Redis Cluster, replication to a master's replicas is
asynchronous: a master killed right after it acknowledged a commit can lose that commit when a replica is
promoted. `wait_replicas=N` makes each commit WAIT (up to wait_timeout_ms) until N replicas have it before the
RPC answers OK, which closes that window for one failure while the replicas are up; when fewer confirm in time
(a promoted master with no replica left) the commit still answers OK, since it is applied on the master.
`min-replicas-to-write` on the masters makes them refuse writes instead. Redis offers no consensus: a network
split can still lose acknowledged writes.
"""

import functools
from urllib.parse import parse_qs, urlencode, urlparse

import redis
import redis.cluster

from kvshard.service.errors import Fenced, LeaseHeld, QuotaExceeded, SessionConflict, SessionExists, StoreUnavailable
from kvshard.service.store.base import LayerDelta, Lease, SessionRecord, written_bytes
from kvshard.service.store.sqlite import pack_tokens, unpack_tokens

PREFIX = "kvshard:"
_UPDATED = PREFIX + "updated"


def _keys(session_id: str) -> tuple[str, str, str]:
    """(record hash, tails hash, lease) of a session: one hash tag, so one Cluster slot."""
    tag = f"{PREFIX}{{{session_id}}}:"
    return tag + "session", tag + "tails", tag + "lease"


def _blocks_key(session_id: str, layer: int) -> str:
    return f"{PREFIX}{{{session_id}}}:blocks:{layer}"


def _tenant_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{{{tenant}}}"


def _usage_key(tenant: str) -> str:
    """The bytes a tenant's sessions store: a counter in the tenant index's slot."""
    return _tenant_key(tenant) + ":bytes"


# KEYS: session, tails, lease, blocks of each changed layer. ARGV: record, token_ids, tenant, version,
# fencing token, owner, lease ms, then per changed layer: keep_until, block ("" for none), tail, layer.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'EXISTS' end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'token_ids', ARGV[2], 'tenant', ARGV[3], 'version', ARGV[4], 'fence', 1)
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], ARGV[6] .. ' 1', 'PX', ARGV[7]) end
for i = 4, #KEYS do
  local a = 8 + (i - 4) * 4
  if ARGV[a + 1] ~= '' then redis.call('HSET', KEYS[i], ARGV[a], ARGV[a + 1]) end
  redis.call('HSET', KEYS[2], ARGV[a + 3], ARGV[a + 2])
end
return 'OK'
"""

# The fencing check comes first: a fenced shard is told so even when its version would also be stale.
_COMMIT = """
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[5] then return 'FENCED' end
if redis.call('HGET', KEYS[1], 'version') ~= tostring(tonumber(ARGV[4]) - 1) then return 'CONFLICT' end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'token_ids', ARGV[2], 'version', ARGV[4])
if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[6] .. ' ' .. ARGV[5], 'PX', ARGV[7]) end
for i = 4, #KEYS do
  local a = 8 + (i - 4) * 4
  local keep = tonumber(ARGV[a])
  for _, start in ipairs(redis.call('HKEYS', KEYS[i])) do
    if tonumber(start) >= keep then redis.call('HDEL', KEYS[i], start) end
  end
  if ARGV[a + 1] ~= '' then redis.call('HSET', KEYS[i], ARGV[a], ARGV[a + 1]) end
  redis.call('HSET', KEYS[2], ARGV[a + 3], ARGV[a + 2])
end
return 'OK'
"""

# KEYS: session, lease. ARGV: owner, lease ms. -> {'OK', token, version} | {'HELD', owner, ms left} | {'MISSING'}
_LEASE = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {'MISSING'} end
local current = redis.call('GET', KEYS[2])
if current then
  local owner, token = string.match(current, '^(.*) (%d+)$')
  if owner ~= ARGV[1] then return {'HELD', owner, tostring(redis.call('PTTL', KEYS[2]))} end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {'OK', token, version}
end
local token = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return {'OK', tostring(token), version}
"""

# KEYS: lease. ARGV: 'owner token', lease ms (0: release). -> 1 if the lease was still that owner's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: session, tails, blocks of each changed layer. ARGV: per changed layer: keep_until, layer.
# -> the bytes a commit of those deltas overwrites (record, token ids, the layers' tails and blocks from keep_until).
_REPLACED = """
local total = redis.call('HSTRLEN', KEYS[1], 'record') + redis.call('HSTRLEN', KEYS[1], 'token_ids')
for i = 3, #KEYS do
  local keep, layer = tonumber(ARGV[(i - 3) * 2 + 1]), ARGV[(i - 3) * 2 + 2]
  total = total + redis.call('HSTRLEN', KEYS[2], layer)
  for _, start in ipairs(redis.call('HKEYS', KEYS[i])) do
    if tonumber(start) >= keep then total = total + redis.call('HSTRLEN', KEYS[i], start) end
  end
end
return total
"""

# KEYS: a tenant's usage counter. ARGV: bytes to add, quota (0: none). -> {1, new total} or, when adding would
# pass the quota, {0, total} and nothing added: the check and the reservation are one step.
_RESERVE = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
local grown, quota = tonumber(ARGV[1]), tonumber(ARGV[2])
if grown > 0 and quota > 0 and held + grown > quota then return {0, held} end
return {1, redis.call('INCRBY', KEYS[1], grown)}
"""

# KEYS: tails, blocks of every layer. -> {tails as a flat hash, blocks of layer 0, ...}
_LOAD = """
local out = {redis.call('HGETALL', KEYS[1])}
for i = 2, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"""

_SIZE = """
local total = 0
for i = 1, #KEYS do
  for _, value in ipairs(redis.call('HVALS', KEYS[i])) do total = total + #value end
end
return total
"""


def connect(url: str):
    """`redis://host:port/db` (one Redis) or `redis+cluster://host:port[,host:port...]` (a Redis Cluster)."""
    parsed = urlparse(url)
    if not parsed.hostname:
        raise ValueError(f"store: expected redis://host:port/db or redis+cluster://host:port, got {url!r}")
    if parsed.scheme != "redis+cluster":
        return redis.Redis.from_url(url)
    nodes = [redis.cluster.ClusterNode(*_host_port(part)) for part in parsed.netloc.split(",")]
    return redis.cluster.RedisCluster(startup_nodes=nodes)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store: expected host:port in the cluster URL, got {text!r}")
    return host, int(port)


# What a Redis that is down, failing over or unreachable raises (after redis-py's own retries).
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)


def _unreachable_is_retryable(cls):
    """Every public method of the store raises StoreUnavailable (UNAVAILABLE) when Redis cannot be reached."""

    def wrap(method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except _UNREACHABLE as error:
                raise StoreUnavailable(f"session store: {type(error).__name__}: {error}") from error

        return call

    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_"):
            setattr(cls, name, wrap(value))
    return cls


@_unreachable_is_retryable
class RedisStore:
    kind = "redis"
    shared = True  # several shards may serve the same sessions: they hold leases and fence their commits

    def __init__(self, client, wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        self._redis = client
        self._redis.ping()
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._create = client.register_script(_CREATE)
        self._commit = client.register_script(_COMMIT)
        self._lease = client.register_script(_LEASE)
        self._renew = client.register_script(_RENEW)
        self._load = client.register_script(_LOAD)
        self._size = client.register_script(_SIZE)
        self._replaced = client.register_script(_REPLACED)
        self._reserve = client.register_script(_RESERVE)

    @classmethod
    def from_url(cls, url: str) -> "RedisStore":
        """`?wait_replicas=N` on either URL form makes each commit WAIT for N replicas."""
        parsed = urlparse(url)
        options = parse_qs(parsed.query)
        wait = options.pop("wait_replicas", ["0"])[0]
        if not wait.isdigit():
            raise ValueError(f"store: wait_replicas must be a number of replicas, got {wait!r}")
        return cls(connect(parsed._replace(query=urlencode(options, doseq=True)).geturl()), wait_replicas=int(wait))

    # ---- writes -------------------------------------------------------------------------------------------

    # A tenant's stored bytes are a counter in its own slot (a Cluster cannot sum a tenant's sessions in one
    # step): a write that grows a session first reserves its growth there, atomically against the quota, and
    # hands it back if the session's script then refuses; a shrink or a delete is subtracted once applied. A
    # shard killed between the two steps leaves the counter high, never low: the quota can refuse early, never
    # let a tenant past it.

    def create(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        """Insert a new session; with a lease, it is leased to lease.owner under fencing token 1."""
        grown = written_bytes(record, deltas)
        self._reserve_bytes(record.tenant, grown, tenant_quota)
        self._redis.zadd(_tenant_key(record.tenant), {record.session_id: 0})
        if self._create(keys=self._keys_of(record, deltas), args=self._args_of(record, deltas, "1", lease)) == b"EXISTS":
            self._reserve_bytes(record.tenant, -grown)
            raise SessionExists(record.session_id)
        if lease is not None:
            lease.token = 1
        self._after_write(record)

    def commit(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        """Apply the deltas if the stored version is record.version - 1 (SessionConflict otherwise) and, with a
        lease, if its token is still the latest issued for the session (Fenced otherwise); extends the lease."""
        keys = self._keys_of(record, deltas)
        replaced = self._replaced(keys=[keys[0], keys[1], *keys[3:]], args=[x for d in deltas for x in (d.keep_until, d.layer)])
        grown = written_bytes(record, deltas) - int(replaced)
        if grown > 0:
            self._reserve_bytes(record.tenant, grown, tenant_quota)
        fence = "" if lease is None else str(lease.token)
        answer = self._commit(keys=keys, args=self._args_of(record, deltas, fence, lease))
        if answer in (b"FENCED", b"CONFLICT"):
            if grown > 0:
                self._reserve_bytes(record.tenant, -grown)
            raise Fenced(record.session_id) if answer == b"FENCED" else SessionConflict(record.session_id)
        if grown < 0:
            self._reserve_bytes(record.tenant, grown)
        self._after_write(record)

    def _reserve_bytes(self, tenant: str, grown: int, quota: int = 0) -> None:
        """Add grown (negative: hand back) to the tenant's stored bytes; QuotaExceeded, adding nothing, if it
        would pass the quota."""
        added, held = self._reserve(keys=[_usage_key(tenant)], args=[grown, quota])
        if not added:
            raise QuotaExceeded(tenant, int(held), grown, quota)

    def tenant_bytes(self, tenant: str) -> int:
        return int(self._redis.get(_usage_key(tenant)) or 0)

    @staticmethod
    def _keys_of(record: SessionRecord, deltas: list[LayerDelta]) -> list[str]:
        return [*_keys(record.session_id), *(_blocks_key(record.session_id, d.layer) for d in deltas)]

    @staticmethod
    def _args_of(record: SessionRecord, deltas: list[LayerDelta], fence: str, lease: Lease | None) -> list:
        owner, ttl_ms = (lease.owner, lease.ttl_ms) if lease is not None else ("", 0)
        args = [record.to_json(), pack_tokens(record.token_ids), record.tenant, record.version, fence, owner, ttl_ms]
        for delta in deltas:
            args += [delta.keep_until, delta.block if delta.block is not None else b"", delta.tail, delta.layer]
        return args

    def _after_write(self, record: SessionRecord) -> None:
        self._redis.zadd(_UPDATED, {record.session_id: record.updated_at_ms})
        if self.wait_replicas:
            # The commit's node is the one holding the session's slot: WAIT is routed there by the same key.
            self._wait(_keys(record.session_id)[0])

    def _wait(self, key: str) -> int:
        if isinstance(self._redis, redis.cluster.RedisCluster):
            node = self._redis.get_node_from_key(key)
            return self._redis.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node)
        return self._redis.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)

    # ---- leases -------------------------------------------------------------------------------------------

    def lease(self, session_id: str, lease: Lease) -> int | None:
        """Take or extend the session's lease for lease.owner, setting lease.token: returns the stored version,
        None if there is no such session; LeaseHeld if another owner holds it."""
        answer = self._lease(keys=list(_keys(session_id)[::2]), args=[lease.owner, lease.ttl_ms])
        if answer[0] == b"MISSING":
            return None
        if answer[0] == b"HELD":
            raise LeaseHeld(session_id, answer[1].decode(), int(answer[2]))
        lease.token = int(answer[1])
        return int(answer[2])

    def renew(self, session_id: str, lease: Lease, release: bool = False) -> bool:
        """Extend (or release) the lease if it is still lease.owner's with lease.token."""
        ttl_ms = 0 if release else lease.ttl_ms
        return bool(self._renew(keys=[_keys(session_id)[2]], args=[f"{lease.owner} {lease.token}", ttl_ms]))

    # ---- reads --------------------------------------------------------------------------------------------

    def version(self, session_id: str) -> int | None:
        value = self._redis.hget(_keys(session_id)[0], "version")
        return None if value is None else int(value)

    def load_record(self, session_id: str) -> SessionRecord | None:
        record, token_ids = self._redis.hmget(_keys(session_id)[0], "record", "token_ids")
        if record is None:
            return None
        layers = _layers(record)
        return SessionRecord.from_json(record.decode(), unpack_tokens(token_ids), self._stored_bytes(session_id, layers, record, token_ids))

    def stored_bytes(self, session_id: str) -> int:
        record, token_ids = self._redis.hmget(_keys(session_id)[0], "record", "token_ids")
        return 0 if record is None else self._stored_bytes(session_id, _layers(record), record, token_ids)

    def _stored_bytes(self, session_id: str, layers: int, record: bytes, token_ids: bytes) -> int:
        keys = [_keys(session_id)[1], *(_blocks_key(session_id, n) for n in range(layers))]
        return len(record) + len(token_ids) + int(self._size(keys=keys))

    def load_layers(self, session_id: str, layers: int) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
        keys = [_keys(session_id)[1], *(_blocks_key(session_id, n) for n in range(layers))]
        tails, *blocks = (_pairs(flat) for flat in self._load(keys=keys))
        return [(tails[str(n).encode()], sorted((int(start), data) for start, data in blocks[n].items())) for n in range(layers)]

    def delete(self, session_id: str) -> bool:
        record, tenant, token_ids = self._redis.hmget(_keys(session_id)[0], "record", "tenant", "token_ids")
        if record is None:
            return False
        size = self._stored_bytes(session_id, _layers(record), record, token_ids)
        # One slot: a single DEL is atomic on Redis and on a Cluster. A shard still holding a lease is then
        # fenced (the token counter went with the session).
        self._redis.delete(*_keys(session_id), *(_blocks_key(session_id, n) for n in range(_layers(record))))
        self._redis.zrem(_tenant_key(tenant.decode()), session_id)
        self._redis.zrem(_UPDATED, session_id)
        self._reserve_bytes(tenant.decode(), -size)
        return True

    def page(self, tenant: str, after: str, limit: int) -> list[SessionRecord]:
        """The tenant's index sits in its own slot; each listed id is read from its session's slot, and ids
        whose session does not exist (a create that failed half way, or one racing this call) are skipped."""
        records: list[SessionRecord] = []
        while len(records) < limit:
            low = f"({after}" if after else "-"
            ids = [i.decode() for i in self._redis.zrangebylex(_tenant_key(tenant), low, "+", start=0, num=limit - len(records))]
            if not ids:
                break
            for session_id in ids:
                record, token_ids, owner = self._redis.hmget(_keys(session_id)[0], "record", "token_ids", "tenant")
                if record is not None and owner.decode() == tenant:
                    records.append(SessionRecord.from_json(record.decode(), [], self._stored_bytes(session_id, _layers(record), record, token_ids)))
            after = ids[-1]
        return records

    def count(self, tenant: str | None = None) -> int:
        return self._redis.zcard(_UPDATED if tenant is None else _tenant_key(tenant))

    def idle_since(self, before_ms: int) -> list[str]:
        return [i.decode() for i in self._redis.zrangebyscore(_UPDATED, "-inf", f"({before_ms}")]

    def total_bytes(self) -> int:
        total = 0
        for key in self._redis.scan_iter(match=PREFIX + "{*"):
            total += self._redis.memory_usage(key) or 0
        return total

    def close(self) -> None:
        self._redis.close()


def _layers(record_json: bytes) -> int:
    return SessionRecord.from_json(record_json.decode(), [], 0).shape["layers"]


def _pairs(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2]))
