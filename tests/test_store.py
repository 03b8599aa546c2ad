"""Session store: exact restore of every method's codes, compressed bytes, atomic commits, Redis parity."""

import asyncio
import sqlite3
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from kvshard.quant import METHODS, KVCacheConfig
from kvshard.service.errors import Fenced, LeaseHeld, LimitExceeded, QuotaExceeded, SessionConflict, SessionExists, SessionNotFound, status_for
from kvshard.service.memory import MLX_CACHE_SHARE
from kvshard.service.sessions import Limits, SessionManager, resolve_spec, store_key
from kvshard.service.store import Lease, open_store
from kvshard.service.worker import SerialExecutor
from redis_servers import RedisCluster, RedisNode

HEADS, DIM = 3, 64
LIMITS = Limits()


def kv(rng, tokens):
    return [rng.standard_normal((HEADS, tokens, DIM)).astype(np.float32) for _ in range(2)]


def code_arrays(cache) -> dict:
    state = cache.state
    return {f"{g}/{k}": np.array(v) for g in ("key_codes", "value_codes") for k, v in state.get(g, {}).items()} | {
        k: np.array(state[k]) for k in ("sink_keys", "window_keys", "key_mean") if k in state
    }


class Harness:
    """A SessionManager over a store, driven from one event loop, as the server does."""

    def __init__(self, store, lease_ttl_s=10.0):
        self.store = store
        self.mlx, self.io = SerialExecutor("test-mlx"), SerialExecutor("test-io")
        self.manager = SessionManager(store, self.mlx, self.io, None, LIMITS, lease_ttl_s)

    async def create(self, method="turboquant_mse", bits=4, layers=2, sinks=0, window=0, session_id=""):
        config = KVCacheConfig(method=method, key_bits=bits, sink_tokens=sinks, window=window)
        spec = resolve_spec("raw", dict(layers=layers, n_kv_heads=HEADS, head_dim=DIM), config, LIMITS, session_id)
        return await self.manager.create("default", spec)

    async def append(self, session_id, layer, k, v):
        async with self.manager.open("default", session_id) as session:
            session.check_append(layer, k, v, LIMITS, None)
            await self.manager.mutate(session, session.append, layer, k, v)

    async def filled(self, rng, *tokens):
        """One-layer sessions holding these many tokens each."""
        sessions = [await self.create(layers=1) for _ in tokens]
        for session, n in zip(sessions, tokens):
            await self.append(session.session_id, 0, *kv(rng, n))
        return sessions

    async def touch(self, session_id):
        async with self.manager.open("default", session_id):
            pass

    async def trim(self, session_id, n, layer=None):
        async with self.manager.open("default", session_id) as session:
            await self.mlx.run(session.trim, n, layer)
            await self.manager.commit(session)

    async def cold(self, session_id):
        return await self.cold_of("default", session_id)

    async def cold_of(self, tenant, session_id):
        """The session as a fresh process would load it."""
        self.manager.hot.clear()
        async with self.manager.open(tenant, session_id) as session:
            return session

    def close(self):
        self.mlx.shutdown()
        self.io.shutdown()
        self.store.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/store.sqlite3"


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_identical_for_every_method(sqlite_url, method):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(0)
        live = await h.create(method, bits=3, sinks=2, window=4)
        for tokens in (5, 7, 20, 1, 3):  # crosses the key-mean warm-up, the sinks and the window
            await h.append(live.session_id, 0, *kv(rng, tokens))
        await h.trim(live.session_id, 6, layer=0)  # trims rewrite the tail block
        await h.append(live.session_id, 0, *kv(rng, 4))
        await h.append(live.session_id, 1, *kv(rng, 9))
        q = rng.standard_normal((9, 2, DIM)).astype(np.float32)
        expected = [await h.mlx.run(live.attend, layer, q) for layer in (0, 1)]
        expected_codes = [await h.mlx.run(code_arrays, c) for c in live.caches]
        restored = await h.cold(live.session_id)
        assert restored is not live and restored.record.layer_offsets == [34, 9]
        for layer in (0, 1):
            assert np.array_equal(await h.mlx.run(restored.attend, layer, q), expected[layer])
            codes = await h.mlx.run(code_arrays, restored.caches[layer])
            assert codes.keys() == expected_codes[layer].keys()
            for name, array in codes.items():
                assert np.array_equal(array, expected_codes[layer][name]), name
        h.close()

    asyncio.run(scenario())


def test_stored_bytes_are_the_compressed_size(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(1)
        session = await h.create(bits=4, layers=1)
        for _ in range(4):
            await h.append(session.session_id, 0, *kv(rng, 64))
        blocks = sqlite3.connect(sqlite_url.removeprefix("sqlite:///")).execute("SELECT SUM(LENGTH(data)) FROM blocks").fetchone()[0]
        fp16 = 2 * 256 * HEADS * DIM * 2  # keys and values of 256 tokens
        # 4-bit codes + one fp16 norm per vector: (64·4/8 + 2) / (64·2) ≈ 27% of fp16, plus block headers.
        assert blocks < 0.3 * fp16, (blocks, fp16)
        record = await h.io.run(h.store.load_record, session.session_id)
        assert record.stored_bytes < 0.32 * fp16
        assert record.memory_bytes == session.memory_bytes
        h.close()

    asyncio.run(scenario())


def test_appends_only_add_blocks_and_trim_replaces_the_tail(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(2)
        session = await h.create(layers=1)
        db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        for tokens in (16, 8, 8):
            await h.append(session.session_id, 0, *kv(rng, tokens))
        first = db.execute("SELECT start, data FROM blocks ORDER BY start").fetchall()
        assert [start for start, _ in first] == [0, 16, 24]  # one block per commit, never rewritten
        await h.trim(session.session_id, 4)
        after = db.execute("SELECT start, data FROM blocks ORDER BY start").fetchall()
        assert after[:2] == first[:2] and after[2][0] == 24 and len(after[2][1]) < len(first[2][1])
        h.close()

    asyncio.run(scenario())


def test_a_failed_commit_leaves_the_store_and_drops_the_hot_copy(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(3)
        session = await h.create(layers=1)
        await h.append(session.session_id, 0, *kv(rng, 10))
        real_commit = h.store.commit

        def failing_commit(record, deltas, *lease_and_quota):
            h.store._db.execute("BEGIN IMMEDIATE")
            h.store._db.execute("DELETE FROM blocks")
            h.store._db.execute("ROLLBACK")
            raise OSError("disk full")

        h.store.commit = failing_commit
        with pytest.raises(OSError):
            await h.append(session.session_id, 0, *kv(rng, 5))
        h.store.commit = real_commit
        assert session.session_id not in h.manager.hot
        restored = await h.cold(session.session_id)
        assert restored.record.layer_offsets == [10]
        h.close()

    asyncio.run(scenario())


def test_commits_that_arrive_together_share_one_transaction_and_keep_their_own_outcomes(sqlite_url):
    """Group commit (service/commits.py): commits queued while the store thread is busy are written in one SQLite
    transaction; one of them refused (a stale version) leaves its stored session as it was, and the others land."""
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(4)
        sessions = await h.filled(rng, 6, 6, 6, 6)
        groups, commit_many = [], h.store.commit_many
        h.store.commit_many = lambda commits: groups.append(len(commits)) or commit_many(commits)
        stale = sessions[2].session_id
        db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        stale_blocks = db.execute("SELECT layer, start, data FROM blocks WHERE session_id = ?", (stale,)).fetchall()
        db.execute("UPDATE sessions SET version = version + 1 WHERE session_id = ?", (stale,))  # another writer's
        stale_record = db.execute("SELECT record FROM sessions WHERE session_id = ?", (stale,)).fetchone()
        busy = threading.Event()
        blocker = asyncio.ensure_future(h.io.run(busy.wait))  # the store thread busy: the commits queue
        appends = [asyncio.ensure_future(h.append(s.session_id, 0, *kv(rng, 3))) for s in sessions]
        while len(h.manager.commits._group._queued) < len(sessions):
            await asyncio.sleep(0.01)
        busy.set()
        await blocker
        outcomes = await asyncio.gather(*appends, return_exceptions=True)
        assert groups == [len(sessions)]
        assert [type(o) for o in outcomes] == [type(None), type(None), SessionConflict, type(None)]
        assert db.execute("SELECT layer, start, data FROM blocks WHERE session_id = ?", (stale,)).fetchall() == stale_blocks
        assert db.execute("SELECT record FROM sessions WHERE session_id = ?", (stale,)).fetchone() == stale_record
        assert stale not in h.manager.hot
        for session in sessions[:2] + sessions[3:]:
            assert (await h.cold(session.session_id)).record.layer_offsets == [9]
        h.close()

    asyncio.run(scenario())


def test_ids_tenants_paging_and_delete(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        ids = [(await h.create(session_id=f"s{i:02d}")).session_id for i in range(5)]
        with pytest.raises(SessionExists):
            await h.create(session_id="s00")
        page, token = await h.manager.list("default", 2, "")
        assert [r.session_id for r in page] == ids[:2] and token == "s01"
        page, token = await h.manager.list("default", 3, token)
        assert [r.session_id for r in page] == ids[2:] and token == ""
        assert (await h.manager.list("someone-else", 10, ""))[0] == []
        with pytest.raises(SessionNotFound):
            await h.manager.describe("someone-else", "s00")
        await h.manager.delete("default", "s00")
        with pytest.raises(SessionNotFound):
            await h.cold("s00")
        assert h.store.count() == 4
        h.close()

    asyncio.run(scenario())


def budget_with_room(room: int) -> int:
    """A --memory-budget that leaves `room` bytes for sessions (MLX's buffer cache has its share: service/memory.py)."""
    return -(-room * MLX_CACHE_SHARE // (MLX_CACHE_SHARE - 1))


def test_memory_budget_drops_least_recently_used(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(4)
        a, b = await h.filled(rng, 256, 256)  # whole 256-token code buffers: held as they are stored
        h.manager.limits = Limits(memory_budget_bytes=budget_with_room(b.held_bytes * 3 // 2))  # room for one of the two
        await h.touch(b.session_id)  # b is used last; a goes
        assert list(h.manager.hot) == [b.session_id]
        async with h.manager.open("default", a.session_id) as reloaded:  # reloaded on use
            assert reloaded.record.layer_offsets == [256]
        assert list(h.manager.hot) == [a.session_id]
        h.close()

    asyncio.run(scenario())


def test_sessions_in_use_count_against_the_budget(sqlite_url):
    """A session is not loaded while those in use leave no room for it (idle ones are dropped for it)."""

    async def refused():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(12)
        a, b, c = await h.filled(rng, 256, 256, 256)
        h.manager.limits = Limits(memory_budget_bytes=budget_with_room(a.held_bytes * 3 // 2))  # room for one session and a half
        await h.touch(c.session_id)  # c is used last: only c stays hot
        assert list(h.manager.hot) == [c.session_id]
        async with h.manager.open("default", a.session_id):  # idle c makes room for a as it loads
            assert list(h.manager.hot) == [a.session_id]
            with pytest.raises(LimitExceeded, match="memory_budget_bytes: sessions in use"):
                async with h.manager.open("default", b.session_id):
                    pass
            assert list(h.manager.hot) == [a.session_id]
        async with h.manager.open("default", b.session_id):  # a is idle again: b loads, a goes
            assert list(h.manager.hot) == [b.session_id]
        h.close()

    asyncio.run(refused())


def test_one_session_over_the_budget_is_served_alone_and_may_only_shrink(sqlite_url):
    """The README's rule for a session stored over the budget (a lowered budget): it is served while no other
    session is in use, dropped from memory after each call, refused any growth, and may be trimmed."""

    async def scenario():
        h = Harness(open_store(sqlite_url))
        rng = np.random.default_rng(13)
        big, small = await h.filled(rng, 64, 4)
        h.manager.limits = Limits(memory_budget_bytes=budget_with_room(big.memory_bytes // 2))
        h.manager.hot.clear()
        q = rng.standard_normal((HEADS, 1, DIM)).astype(np.float32)
        async with h.manager.open("default", big.session_id) as session:
            assert np.isfinite(await h.manager.attend(session, 0, q)).all()
            with pytest.raises(LimitExceeded, match="memory_budget_bytes: sessions in use"):
                async with h.manager.open("default", small.session_id):
                    pass
        assert big.session_id not in h.manager.hot  # dropped after the call
        with pytest.raises(LimitExceeded, match="memory_budget_bytes"):
            await h.append(big.session_id, 0, *kv(rng, 1))
        assert h.store.load_record(big.session_id).layer_offsets == [64]
        await h.trim(big.session_id, 48)
        assert h.store.load_record(big.session_id).layer_offsets == [16]
        async with h.manager.open("default", small.session_id) as session:  # others are served again
            assert np.isfinite(await h.manager.attend(session, 0, q)).all()
        h.close()

    asyncio.run(scenario())


def test_max_sessions_is_enforced(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        h.manager.limits = Limits(max_sessions=2)
        await h.create()
        await h.create()
        with pytest.raises(LimitExceeded, match="max_sessions"):
            await h.create()
        h.close()

    asyncio.run(scenario())


def test_idle_sessions_expire(sqlite_url):
    async def scenario():
        h = Harness(open_store(sqlite_url))
        h.manager.limits = Limits(session_ttl_s=1)
        session = await h.create(layers=1)
        h.manager.hot.clear()
        time.sleep(1.1)
        assert await h.manager.expire_idle() == 1
        with pytest.raises(SessionNotFound):
            await h.manager.describe("default", session.session_id)
        h.close()

    asyncio.run(scenario())


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def any_store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.sqlite3"
    else:
        yield from redis_store(request.param, request, tmp_path)


def test_a_tenant_quota_refuses_a_growing_write_whole_and_counts_every_byte(any_store_url):
    """--max-tenant-bytes: a write that would take the tenant past its quota is refused before anything is
    written (store bytes identical, hot copy dropped), other tenants carry on, shrinking and deleting always
    work, and the tenant's count equals the sum of its sessions' stored bytes after every step."""
    async def scenario():
        h = Harness(open_store(any_store_url))
        rng = np.random.default_rng(10)
        shape = dict(layers=2, n_kv_heads=HEADS, head_dim=DIM)

        async def create(tenant, session_id):
            return await h.manager.create(tenant, resolve_spec("raw", shape, KVCacheConfig(key_bits=4, seed=42), LIMITS, session_id))

        async def append(tenant, session_id, tokens):
            async with h.manager.open(tenant, session_id) as session:
                await h.manager.mutate(session, session.append, 0, *kv(rng, tokens))

        def counted(tenant, ids):
            keys = [store_key(tenant, i) for i in ids]
            assert h.store.tenant_bytes(tenant) == sum(h.store.stored_bytes(k) for k in keys) > 0
            return h.store.tenant_bytes(tenant)

        await create("alice", "a1")
        await append("alice", "a1", 64)
        used = counted("alice", ["a1"])
        h.manager.limits = Limits(max_tenant_bytes=used + 2000)  # room for a few tokens, not for 64 more
        await append("alice", "a1", 2)
        used = counted("alice", ["a1"])
        key = store_key("alice", "a1")
        before = (h.store.load_record(key).to_json(), h.store.load_layers(key, 2), h.store.version(key))
        with pytest.raises(QuotaExceeded, match="max_tenant_bytes") as refused:
            await append("alice", "a1", 64)
        assert status_for(refused.value)[0].name == "RESOURCE_EXHAUSTED"
        assert (h.store.load_record(key).to_json(), h.store.load_layers(key, 2), h.store.version(key)) == before
        assert key not in h.manager.hot and counted("alice", ["a1"]) == used
        assert (await h.cold_of("alice", "a1")).record.layer_offsets == [66, 0]
        h.manager.limits = Limits(max_tenant_bytes=used)
        with pytest.raises(QuotaExceeded):  # a new session's record and tails are bytes too
            await create("alice", "a2")
        assert h.store.load_record(store_key("alice", "a2")) is None and counted("alice", ["a1"]) == used
        await create("bob", "b1")  # another tenant's quota is its own
        await append("bob", "b1", 8)
        counted("bob", ["b1"])
        h.manager.limits = Limits(max_tenant_bytes=used // 2)  # a lowered quota: alice is over it, and may shrink
        async with h.manager.open("alice", "a1") as session:
            await h.manager.mutate(session, session.trim, 40, None)
        assert counted("alice", ["a1"]) < used
        await h.manager.delete("alice", "a1")
        assert h.store.tenant_bytes("alice") == 0
        h.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def redis_cluster(module_tmp):
    cluster = RedisCluster(module_tmp / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_url(request, tmp_path):
    """The same suite against one Redis and a 3-master Redis Cluster (emptied for each test)."""
    yield from redis_store(request.param, request, tmp_path)


def redis_store(kind, request, tmp_path):
    if kind == "redis":
        node = RedisNode(tmp_path / "redis")
        yield f"redis://127.0.0.1:{node.port}/0"
        node.stop()
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        yield cluster.url


def two_shards(redis_url: str, first_ttl_s: float = 0.3) -> tuple[Harness, Harness]:
    """Two session managers on one store; short leases, so each waits little for the other's to run out."""
    return Harness(open_store(redis_url), lease_ttl_s=first_ttl_s), Harness(open_store(redis_url), lease_ttl_s=0.3)


def test_redis_store_restores_exactly_and_pages(redis_url):
    async def scenario():
        h = Harness(open_store(redis_url))
        rng = np.random.default_rng(5)
        live = await h.create("turboquant_prod", bits=3, window=4, session_id="r1")
        await h.create(session_id="r0")
        for tokens in (9, 3, 20):
            await h.append("r1", 0, *kv(rng, tokens))
        await h.trim("r1", 5, layer=0)
        await h.append("r1", 0, *kv(rng, 2))
        q = rng.standard_normal((3, 1, DIM)).astype(np.float32)
        expected = await h.mlx.run(live.attend, 0, q)
        restored = await h.cold("r1")
        assert np.array_equal(await h.mlx.run(restored.attend, 0, q), expected)
        assert restored.record.layer_offsets == [29, 0]
        page, token = await h.manager.list("default", 1, "")
        assert [r.session_id for r in page] == ["r0"] and token == "r0"
        assert h.store.stored_bytes("r1") > 0 and h.store.count() == 2
        with pytest.raises(SessionExists):
            await h.create(session_id="r1")
        await h.manager.delete("default", "r1")
        assert h.store.load_record("r1") is None and h.store.count() == 1
        h.close()

    asyncio.run(scenario())


def test_two_shards_on_one_redis_never_use_a_stale_copy(redis_url):
    async def scenario():
        a, b = two_shards(redis_url)
        rng = np.random.default_rng(7)
        await a.create(layers=1, session_id="shared")
        await a.append("shared", 0, *kv(rng, 3))
        await b.append("shared", 0, *kv(rng, 2))  # b loads it: 5 tokens
        await a.append("shared", 0, *kv(rng, 4))  # a's hot copy is stale: it reloads, then appends: 9
        async with b.manager.open("default", "shared") as session:
            assert session.record.layer_offsets == [9]
            b_session = session
        b.manager.hot["shared"] = b_session
        b_session.record.version -= 1  # pretend b missed a commit: its next commit must be refused
        with pytest.raises(SessionConflict):
            await b.manager.commit(b_session)
        assert "shared" not in b.manager.hot
        a.close()
        b.close()

    asyncio.run(scenario())


def test_a_shard_that_lost_its_lease_is_fenced_even_before_the_new_owner_writes(redis_url):
    async def scenario():
        a, b = two_shards(redis_url)
        rng = np.random.default_rng(8)
        await a.create(layers=1, session_id="fenced")
        await a.append("fenced", 0, *kv(rng, 3))
        async with a.manager.open("default", "fenced") as paused:
            pass  # a holds the session, then stalls past its lease (a GC pause, SIGSTOP, a partition)
        async with b.manager.open("default", "fenced") as taken:  # waits out a's lease, takes the next token
            assert taken.lease.token == paused.lease.token + 1
        stored = a.store.version("fenced")
        await a.mlx.run(paused.append, 0, *kv(rng, 4))
        with pytest.raises(Fenced):  # its version is still current: only the fencing token stops it
            await a.manager.commit(paused)
        assert "fenced" not in a.manager.hot
        assert a.store.version("fenced") == stored and a.store.load_record("fenced").layer_offsets == [3]
        await b.append("fenced", 0, *kv(rng, 2))  # the new owner carries on from what the store holds
        assert (await b.cold("fenced")).record.layer_offsets == [5]
        a.close()
        b.close()

    asyncio.run(scenario())


def test_a_live_lease_makes_another_shard_wait_then_answer_retryable(redis_url):

    async def scenario():
        owner, other = two_shards(redis_url, first_ttl_s=30)
        await owner.create(layers=1, session_id="busy")
        started = time.monotonic()
        with pytest.raises(LeaseHeld) as held:
            async with other.manager.open("default", "busy"):
                pass
        assert 0.3 <= time.monotonic() - started < 5  # it waited one of its own TTLs, not the owner's
        assert status_for(held.value)[0].name == "UNAVAILABLE" and "busy" not in other.manager.hot
        await owner.manager.release_leases()  # a shard shutting down hands its leases back: no wait
        started = time.monotonic()
        async with other.manager.open("default", "busy") as session:
            assert session.lease.token == 2
        assert time.monotonic() - started < 0.3
        owner.close()
        other.close()

    asyncio.run(scenario())


def test_a_session_keeps_to_one_slot_and_a_tenant_lists_across_slots(redis_url):
    import redis

    async def scenario():
        h = Harness(open_store(redis_url))
        rng = np.random.default_rng(9)
        ids = sorted(f"t{i:02d}-{rng.integers(1 << 30)}" for i in range(12))
        for session_id in ids:
            await h.create(session_id=session_id)
        await h.append(ids[0], 1, *kv(rng, 40))
        h.store._redis.zadd("kvshard:tenant:{default}", {ids[3] + "x": 0})  # an index entry without a session
        other = Harness(open_store(redis_url))
        await other.manager.create("someone-else", resolve_spec("raw", dict(layers=1, n_kv_heads=HEADS, head_dim=DIM), KVCacheConfig(seed=1), LIMITS, "zz"))
        listed, token = [], ""
        while True:
            page, token = await h.manager.list("default", 5, token)
            assert len(page) == 5 or not token
            listed += [r.session_id for r in page]
            if not token:
                break
        assert listed == ids
        keys = list(h.store._redis.scan_iter(match="kvshard:{" + ids[0] + "}*"))
        assert any(key.endswith(b":blocks:1") for key in keys) and len(keys) == 4  # session, tails, lease, blocks
        if isinstance(h.store._redis, redis.cluster.RedisCluster):
            assert len({h.store._redis.keyslot(key) for key in keys}) == 1
            assert len({h.store._redis.keyslot(f"kvshard:{{{i}}}:session") // 5462 for i in ids}) > 1  # over several masters
        h.close()
        other.close()

    asyncio.run(scenario())


def test_mx_bfloat16_survives_the_codec():
    from kvshard.service.store.codec import pack_arrays, unpack_arrays

    arrays = {"a": mx.array([[1.5, -2.25]], dtype=mx.bfloat16), "b": mx.arange(6, dtype=mx.uint32).reshape(1, 2, 3)}
    back = unpack_arrays(pack_arrays(arrays))
    assert back["a"].dtype == mx.bfloat16 and mx.array_equal(back["a"], arrays["a"]).item()
    assert back["b"].dtype == mx.uint32 and mx.array_equal(back["b"], arrays["b"]).item()


def test_arrays_reach_the_host_byte_for_byte_whether_joined_on_the_device_or_not():
    """host_bytes: strided slices and mixed dtypes (as a commit's code slices and norms are) give the same bytes as
    numpy's C-order copy, through one joined transfer (the GPU path) or one copy per array."""
    from kvshard.service.store.codec import host_bytes

    codes = mx.arange(2 * 3 * 10, dtype=mx.uint32).reshape(2, 3, 10)[:, :, 4:]
    norms = (mx.arange(3 * 7, dtype=mx.float16).reshape(1, 3, 7) / 3)[:, :, 2:]
    arrays = [codes, norms, mx.array([[1.5, -2.25]], dtype=mx.bfloat16), mx.zeros((1, 3, 0), dtype=mx.uint8)]
    expected = [np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes() for a in arrays]
    assert host_bytes(arrays, join=True) == host_bytes(arrays, join=False) == expected


def test_a_server_on_redis_survives_a_restart(tmp_path, redis_url):
    from conftest import ShardProcess
    from kvshard.client import Client

    rng = np.random.default_rng(6)
    k, v = kv(rng, 12)
    first = ShardProcess(tmp_path, "--model", "none", "--lease-ttl", "1", store=redis_url).start()
    cache = Client(first.target).create_cache(head_dim=DIM, n_kv_heads=HEADS, key_bits=3, window=2)
    cache.append(k, v)
    q = rng.standard_normal((HEADS, 1, DIM)).astype(np.float32)
    before = cache.attend(q)
    first.kill9()
    second = ShardProcess(tmp_path, "--model", "none", "--lease-ttl", "1", store=redis_url).start()
    client = Client(second.target)
    (again,) = client.session(cache.session_id)
    assert len(again) == 12 and np.array_equal(again.attend(q), before)
    assert client.server_info().store == "redis"
    second.stop()
