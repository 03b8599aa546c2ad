"""Sessions: a durable record plus live compressed caches, and the map of hot ones.

Session methods that touch caches run on the MLX thread (the manager's `mlx` executor); everything else runs
on the event loop. A mutating RPC checks its request first (nothing has changed if a check fails), then
hands the change and its commit to `SessionManager.mutate`, which runs both to the end even when the caller is
cancelled, and drops the hot copy if either fails. So a call that did not answer OK left the session as the
store holds it: either as before, or wholly applied and committed (a cancelled call), which a retry with the
same expected_offset recognises. Dropping a hot session from memory is always safe.
"""

import asyncio
import collections
import dataclasses
import functools
import os
import re
import socket
import time
import uuid
import weakref
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig
from kvshard.quant.batch_arena import settle_leased
from kvshard.quant.codebooks import CHANGED_FROM_BITS, CODEBOOK_VERSION
from kvshard.quant.sliding import exact_trim_limit, restore_cache
from kvshard.service import logs, memory
from kvshard.service.auth import DEFAULT_TENANT
from kvshard.service.commits import CommitGroup
from kvshard.service.metrics import CACHE_OBSERVERS
from kvshard.service.errors import FailedPrecondition, LeaseHeld, LimitExceeded, OffsetMismatch, SessionNotFound
from kvshard.service.store import LayerDelta, Lease, SessionRecord, SessionStore
from kvshard.service.store.codec import join_state, split_states
from kvshard.service.worker import SerialExecutor, run_to_completion

_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TENANT_SEPARATOR = "~"  # not an id character, so a tenant-scoped key cannot be forged through an id
_MAX_LAYERS = 256
ADMISSION_WAIT_S = 30  # how long a call waits for memory to fit the budget before RESOURCE_EXHAUSTED
RESUME_PROGRESS_TOKENS = 8192  # sessions at least this long log one line per layer restored (32K tokens: ~1 s)
_MAX_KV_HEADS = 256
_MAX_HEAD_DIM = 1024
# Sliding-window layers (Gemma 3) hold their window as codes (quant/sliding.py): a commit after the window moved
# rewrites that layer's codes whole (at most the window), so what a session stores and holds stays bounded.
SERVICE_SLIDING = "compressed"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Limits:
    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    max_session_tokens: int = 16384
    max_append_tokens: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    max_sessions: int = 10000
    max_tenant_sessions: int = 0  # sessions one tenant may hold (0: only max_sessions)
    max_tenant_bytes: int = 0  # bytes one tenant's sessions may store (0: no quota)
    max_attend_cost: int = 1 << 26  # query heads x query tokens x layer tokens of one Attend
    attend_slice_cost: int = 1 << 18  # an Attend runs on the MLX thread in slices of at most this cost
    append_slice_cost: int = 1 << 18  # an Append encodes on the MLX thread in slices of at most this many elements (heads x tokens x head_dim)
    memory_budget_bytes: int = 1 << 30
    min_bits: int = 1
    max_bits: int = 8
    session_ttl_s: int = 0
    checkpoint_tokens: int = 8  # a streaming Generate commits every this many tokens


@dataclass
class SessionSpec:
    """A validated CreateSession request."""

    kind: str  # "model" or "raw"
    config: KVCacheConfig  # bits per layer; a profile session's names its profile (Session.new plans it)
    shape: dict  # layers, n_kv_heads, head_dim
    session_id: str = ""
    labels: dict = dataclasses.field(default_factory=dict)


def check_session_id(session_id: str, field: str = "session_id") -> str:
    """The id, or ValueError that names the field without echoing an unbounded value."""
    if not session_id:
        raise ValueError(f"{field}: required")
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"{field}: must be 1-64 characters of [A-Za-z0-9_.-], got {len(session_id)} characters")
    return session_id


def store_key(tenant: str, session_id: str) -> str:
    """Ids are per tenant: the store and the hot map key a session by tenant and id."""
    return session_id if tenant == DEFAULT_TENANT else f"{tenant}{_TENANT_SEPARATOR}{session_id}"


def public_id(record: SessionRecord) -> str:
    return record.session_id.removeprefix(f"{record.tenant}{_TENANT_SEPARATOR}")


def resolve_spec(
    kind: str, shape: dict, requested: KVCacheConfig, limits: Limits, session_id: str = "", labels: dict | None = None,
) -> SessionSpec:
    """Check a session's configuration against the limits, naming the wire field of whatever is wrong, and expand
    per-layer bits (a profile's session has none: the profile plans them)."""
    if session_id:
        check_session_id(session_id)
    for name, low, high in (("layers", 1, _MAX_LAYERS), ("n_kv_heads", 1, _MAX_KV_HEADS), ("head_dim", 2, _MAX_HEAD_DIM)):
        if not low <= shape[name] <= high:
            raise ValueError(f"raw.{name}: must be in [{low}, {high}], got {shape[name]}")
    layers = shape["layers"]
    per_layer = {}
    bit_fields = () if requested.profile else (("key_bits", requested.key_bits), ("value_bits", requested.value_bits or requested.key_bits))
    for field, bits in bit_fields:
        bits = bits if isinstance(bits, list) else [bits]
        if len(bits) not in (1, layers):
            raise ValueError(f"cache.{field}: give one value or one per layer ({layers}), got {len(bits)}")
        for i, b in enumerate(bits):
            if not limits.min_bits <= b <= limits.max_bits:
                raise ValueError(f"cache.{field}[{i}]: {b} bits is out of range [{limits.min_bits}, {limits.max_bits}]")
        per_layer[field] = bits * layers if len(bits) == 1 else bits
    for field in ("sink_tokens", "window"):
        if getattr(requested, field) > limits.max_session_tokens:
            raise ValueError(f"cache.{field}: {getattr(requested, field)} exceeds max_session_tokens {limits.max_session_tokens}")
    config = dataclasses.replace(requested, **per_layer, sliding=SERVICE_SLIDING)
    return SessionSpec(kind=kind, config=config, shape=dict(shape), session_id=session_id, labels=dict(labels or {}))


def cache_config(config: KVCacheConfig, model=None) -> KVCacheConfig:
    """What a session's caches are built from: its config, with a profile session's plans from the served model."""
    if config.profile:
        config = config.resolve_profile(model.profiles)
    return dataclasses.replace(config, sliding=SERVICE_SLIDING)


def _expect_kv_shape(field: str, shape: tuple, n_kv_heads: int, head_dim: int) -> int:
    """Token count of a (H, L, D) or (1, H, L, D) tensor, or ValueError naming the field."""
    fits = len(shape) in (3, 4) and (len(shape) == 3 or shape[0] == 1) and shape[-3] == n_kv_heads and shape[-1] == head_dim
    if not fits:
        raise ValueError(
            f"{field}.shape: must be ({n_kv_heads}, tokens, {head_dim}) or (1, {n_kv_heads}, tokens, {head_dim}), got {list(shape)}"
        )
    return shape[-2]


def _check_codebooks(record: SessionRecord) -> None:
    """Codes decode only with the codebooks they were made with; a session of older codebooks resumes when none of
    its widths changed since (every width below CHANGED_FROM_BITS, no profile plans), else FAILED_PRECONDITION."""
    if record.codebooks == CODEBOOK_VERSION:
        return
    config = record.config
    widths = [b for name in ("key_bits", "value_bits") for b in (config.get(name) if isinstance(config.get(name), list)
                                                                    else [config.get(name) or 0])]
    if config.get("profile") or max(widths) >= CHANGED_FROM_BITS:
        raise FailedPrecondition(
            f"session_id: the session's codes were made with codebook version {record.codebooks} and this server "
            f"decodes with version {CODEBOOK_VERSION} (its {CHANGED_FROM_BITS}-8-bit codebooks changed): "
            "create a new session"
        )


class Session:
    """A hot session. `record` is its durable metadata, kept current; `caches` hold one layer each."""

    def __init__(self, record: SessionRecord, caches: list, block_starts: list[list[int]]):
        self.record = record
        self.caches = caches
        for cache in caches:
            cache.observers = list(CACHE_OBSERVERS)
        # Persisted code blocks per layer: block i covers [starts[i], starts[i + 1]), the last one up to
        # encoded_until. Codes are append-only, so a commit only adds the range past the last block.
        self.block_starts = block_starts
        self.encoded_until = [c.n_encoded for c in caches]
        # Tokens each sliding-window layer had dropped at the last commit: once it drops more, its codes have moved.
        self.dropped_until = [getattr(c, "n_dropped", 0) for c in caches]
        self.dirty: set[int] = set()
        self.memory_bytes = sum(c.nbytes for c in caches)
        self.held_bytes = sum(memory.held_bytes(c) for c in caches)  # what the budget counts (memory.py)
        self.committed_offset = record.offset
        self.committed_tokens = len(record.token_ids)
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.lease: Lease | None = None  # shared stores: this shard's claim, whose token fences its commits

    @property
    def session_id(self) -> str:
        """The store key (tenant-scoped); `public_id` is what the tenant calls it."""
        return self.record.session_id

    @property
    def public_id(self) -> str:
        return public_id(self.record)

    @property
    def offset(self) -> int:
        return self.record.offset

    def offset_of(self, layer: int | None) -> int:
        """The session's offset, or one layer's."""
        return self.offset if layer is None else self.record.layer_offsets[layer]

    # ---- construction (MLX thread) ----------------------------------------------------------------------

    @classmethod
    def new(cls, spec: SessionSpec, tenant: str, model=None) -> "Session":
        config = cache_config(spec.config, model)
        if spec.kind == "model":
            caches = KVCacheBuilder.for_model(model.model, config)
        else:
            layers = spec.shape["layers"]
            caches = [config.make_cache(i, layers, spec.shape["head_dim"], spec.shape["n_kv_heads"]) for i in range(layers)]
        stamp = now_ms()
        record = SessionRecord(
            session_id=store_key(tenant, spec.session_id or uuid.uuid4().hex),
            tenant=tenant,
            kind=spec.kind,
            config=spec.config.to_dict(),
            shape=spec.shape,
            model_fingerprint=model.fingerprint if spec.kind == "model" else "",
            layer_offsets=[0] * len(caches),
            labels=spec.labels,
            codebooks=CODEBOOK_VERSION,
            created_at_ms=stamp,
            updated_at_ms=stamp,
        )
        session = cls(record, caches, [[] for _ in caches])
        session.dirty = set(range(len(caches)))
        return session

    @classmethod
    def restore(cls, record: SessionRecord, layers: list[tuple[bytes, list[tuple[int, bytes]]]]) -> "Session":
        # A long session's resume is the one slow step an operator waits on after a restart: log each layer.
        report = record.offset >= RESUME_PROGRESS_TOKENS
        start, caches = time.monotonic(), []
        for done, (tail, blocks) in enumerate(layers, 1):
            cache = restore_cache(join_state(tail, [b for _, b in blocks]))
            # Join the blocks now, so the stored bytes can be freed and the session's first call does not pay for it.
            mx.eval([cache.state.get(group, {}) for group in ("key_codes", "value_codes")])
            caches.append(cache)
            if report:
                logs.logger().info("resuming", session=record.session_id, tokens=record.offset,
                                   layers=f"{done}/{len(layers)}", seconds=round(time.monotonic() - start, 3))
        return cls(record, caches, [[start for start, _ in blocks] for _, blocks in layers])

    # ---- raw cache operations -----------------------------------------------------------------------------
    # check_* run on the event loop with the session held and change nothing; the verbs run on the MLX thread.
    # Request checks come before the offset check, and the offset check before checks against the session's
    # state, so a malformed retry is told so, and a retry of an applied call is recognised (ABORTED).

    def check_layer(self, layer: int) -> CompressedKVCache:
        if not 0 <= layer < len(self.caches):
            raise ValueError(f"layer: {layer} is out of range, the session has {len(self.caches)} layers")
        return self.caches[layer]

    def check_raw(self, rpc: str) -> None:
        if self.record.kind != "raw":
            raise FailedPrecondition(f"session_id: {rpc} needs a raw cache session; this is a model session (use Generate)")

    def check_offset(self, expected: int | None, layer: int | None = None) -> None:
        if expected is not None and expected != self.offset_of(layer):
            raise OffsetMismatch(expected, self.offset_of(layer))

    def check_memory(self, limits: Limits) -> None:
        if self.held_bytes > limits.memory_budget_bytes:
            raise LimitExceeded(
                f"memory_budget_bytes: the session holds {self.held_bytes} bytes, over the budget "
                f"{limits.memory_budget_bytes}; trim or delete it"
            )

    def check_append(self, layer: int, keys: np.ndarray, values: np.ndarray, limits: Limits, expected_offset: int | None) -> None:
        self.check_raw("Append")
        cache = self.check_layer(layer)
        heads, dim = self.record.shape["n_kv_heads"], self.record.shape["head_dim"]
        tokens = _expect_kv_shape("keys", keys.shape, heads, dim)
        _expect_kv_shape("values", values.shape, heads, dim)
        if keys.shape != values.shape:
            raise ValueError(f"values.shape: must equal keys.shape {list(keys.shape)}, got {list(values.shape)}")
        if tokens > limits.max_append_tokens:
            raise LimitExceeded(f"keys.shape: {tokens} tokens exceed max_append_tokens {limits.max_append_tokens}")
        self.check_offset(expected_offset, layer)
        if cache.offset + tokens > limits.max_session_tokens:
            raise LimitExceeded(
                f"keys.shape: layer {layer} would hold {cache.offset + tokens} tokens, over max_session_tokens {limits.max_session_tokens}"
            )
        self.check_memory(limits)

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> int:
        """Append (H, L, D) keys and values to one layer (checked by check_append)."""
        cache = self.caches[layer]
        cache.append(mx.array(keys), mx.array(values))
        self._changed([layer])
        return cache.offset

    def check_attend(self, layer: int, queries: np.ndarray, limits: Limits) -> None:
        self.check_raw("Attend")
        cache = self.check_layer(layer)
        heads, dim = self.record.shape["n_kv_heads"], self.record.shape["head_dim"]
        shape = queries.shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1) or shape[-1] != dim or shape[-3] % heads:
            raise ValueError(
                f"queries.shape: must be (n_q_heads, tokens, {dim}) or (1, n_q_heads, tokens, {dim}) with n_q_heads a multiple of {heads}, got {list(shape)}"
            )
        if shape[-2] > limits.max_append_tokens:
            raise LimitExceeded(f"queries.shape: {shape[-2]} tokens exceed max_append_tokens {limits.max_append_tokens}")
        if cache.offset == 0:
            raise FailedPrecondition(f"layer: layer {layer} holds no tokens; Append before Attend")
        cost = shape[-3] * shape[-2] * cache.offset
        if cost > limits.max_attend_cost:
            raise LimitExceeded(
                f"queries.shape: {shape[-3]} heads x {shape[-2]} tokens over {cache.offset} layer tokens cost {cost}, "
                f"over max_attend_cost {limits.max_attend_cost}"
            )

    def attend(self, layer: int, queries: np.ndarray) -> np.ndarray:
        out = np.array(self.caches[layer].attend(mx.array(queries)).astype(mx.float32))
        self.held_bytes = sum(memory.held_bytes(c) for c in self.caches)  # the kernels' first attend derives from its methods
        return out

    def check_trim(self, n: int, layer: int | None, expected_offset: int | None) -> None:
        if layer is not None:
            self.check_layer(layer)
            if self.record.kind == "model":
                raise ValueError("layer: a model session trims every layer together; leave layer unset")
        self.check_offset(expected_offset, layer)
        limit = exact_trim_limit(self.caches, len(self.record.token_ids)) if self.record.kind == "model" else None
        if limit is not None and n > limit:
            raise FailedPrecondition(
                f"n: this session's sliding-window layers no longer hold the tokens a trim of {n} would bring back into "
                f"their window; trim at most {limit}")

    def trim(self, n: int, layer: int | None) -> int:
        """Drop the last n tokens of one layer or of every layer (MODEL sessions: of the conversation)."""
        if self.record.kind == "model":
            tokens = self.record.token_ids
            trimmed = min(n, len(tokens))
            keep = len(tokens) - trimmed
            for cache in self.caches:
                cache.trim(max(cache.offset - keep, 0))
            del tokens[keep:]
            self.record.last_generate = None
            self._changed(range(len(self.caches)))
            return trimmed
        targets = range(len(self.caches)) if layer is None else [layer]
        trimmed = [self.caches[i].trim(min(n, self.caches[i].offset)) for i in targets]
        self._changed(targets)
        return max(trimmed)

    def _changed(self, layers) -> None:
        """Bookkeeping after a mutation (MLX thread)."""
        self.dirty.update(layers)
        self.record.layer_offsets = [c.offset for c in self.caches]
        self.memory_bytes = sum(c.nbytes for c in self.caches)
        self.held_bytes = sum(memory.held_bytes(c) for c in self.caches)

    def mark_all_changed(self) -> None:
        self._changed(range(len(self.caches)))

    # ---- commits ------------------------------------------------------------------------------------------

    def snapshot(self, only_if_changed: bool = False) -> tuple[SessionRecord, list[LayerDelta]] | None:
        """(MLX thread) The record and the per-layer deltas that bring the store up to this state; None when
        only_if_changed and nothing changed since the last commit."""
        if only_if_changed and self.unchanged_since_commit():
            return None
        return snapshots([self])[0]

    def unchanged_since_commit(self) -> bool:
        return not self.dirty and self.committed_tokens == len(self.record.token_ids)

    def _splits(self) -> tuple[list[int], list[tuple[dict, int]]]:
        """The changed layers and, per layer, (its cache's state, the first token of its codes the store lacks)."""
        layers = sorted(self.dirty)
        splits = []
        for layer in layers:
            cache, starts = self.caches[layer], self.block_starts[layer]
            n = cache.n_encoded
            ends = starts[1:] + [self.encoded_until[layer]]
            keep_until = max((end for end in ends if end <= n), default=0)
            if getattr(cache, "n_dropped", 0) != self.dropped_until[layer]:
                keep_until = 0
            splits.append((cache.state, keep_until))
        return layers, splits

    def _snapshot_of(self, layers, splits, parts) -> tuple[SessionRecord, list[LayerDelta]]:
        deltas = [LayerDelta(layer=layer, keep_until=keep_until, block=block, tail=tail)
                  for layer, (_, keep_until), (tail, block) in zip(layers, splits, parts, strict=True)]
        record = dataclasses.replace(
            self.record,
            token_ids=list(self.record.token_ids),
            layer_offsets=list(self.record.layer_offsets),
            last_generate=dict(self.record.last_generate) if self.record.last_generate else None,
            memory_bytes=self.memory_bytes,
            version=self.record.version + 1,
            updated_at_ms=now_ms(),
        )
        return record, deltas

    def committed(self, record: SessionRecord, deltas: list[LayerDelta]) -> None:
        """(event loop) The store now holds `record` and `deltas`."""
        for delta in deltas:
            starts = [s for s in self.block_starts[delta.layer] if s < delta.keep_until]
            if delta.block is not None:
                starts.append(delta.keep_until)
            self.block_starts[delta.layer] = starts
            self.encoded_until[delta.layer] = self.caches[delta.layer].n_encoded
            self.dropped_until[delta.layer] = getattr(self.caches[delta.layer], "n_dropped", 0)
            self.dirty.discard(delta.layer)
        self.record.version = record.version
        self.record.updated_at_ms = record.updated_at_ms
        self.committed_offset = record.offset
        self.committed_tokens = len(record.token_ids)


def snapshots(sessions: list["Session"]) -> list[tuple[SessionRecord, list[LayerDelta]]]:
    """(MLX thread) Each session's snapshot (Session.snapshot), all of them in one pass: the arena's newer codes
    of every changed layer come back in two evaluations, and every array of every session reaches the host in
    one copy (service/store/codec.py), where layer by layer each took its own, and session by session (streams
    ending in one turn, generation.finish_in_turn) each took one wait for the GPU: 32 sessions' last tokens
    waited 246-279 ms on an H100."""
    settle_leased([session.caches[layer] for session in sessions for layer in session.dirty])
    taken = [session._splits() for session in sessions]
    parts = iter(split_states([split for _, splits in taken for split in splits]))
    return [session._snapshot_of(layers, splits, [next(parts) for _ in splits])
            for session, (layers, splits) in zip(sessions, taken, strict=True)]


class SessionManager:
    """Hot sessions under a byte budget (least recently used dropped first), loaded from the store on use.

    The budget counts every hot session at its held bytes, in use or not, the working memory of the calls in
    flight (`reserve_call`, reserved before a request is parsed, held until its answer is sent) and of the
    sessions being loaded, with a share left to MLX's buffer cache (service/memory.py): idle sessions are
    dropped to make room, a load waits for room, and a session is not loaded at all while the ones in use
    leave no room for it (RESOURCE_EXHAUSTED, retryable). A change that
    would make one session alone hold more than the budget is refused. One session stored over the budget
    (a lowered budget, or a Generate turn that crossed it) is still served while no other session is in
    use, and dropped from memory after each call, so it can be trimmed or deleted.

    On a shared store a shard leases each session it serves: calls take the lease (waiting up to one TTL for
    another shard's to run out, as a dead shard's does), commits carry its fencing token and extend it, and
    `renew_leases` keeps it while a long call runs. An idle session's lease runs out one TTL after its last
    use, so another shard can take the session over."""

    def __init__(self, store: SessionStore, mlx: SerialExecutor, io: SerialExecutor, model, limits: Limits, lease_ttl_s: float = 10.0):
        self.store = store
        self.mlx = mlx
        self.io = io
        self.commits = CommitGroup(store, io)  # commits arriving together share one write (service/commits.py)
        self.model = model
        self.limits = limits
        self.lease_ttl_s = lease_ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.hot: OrderedDict[str, Session] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.working = 0  # bytes the calls in flight and the sessions being loaded hold (reserve_call, _load)
        self.resident_base: int | None = None  # the process's RSS when it started serving (resident_growth)
        self._calls_queue: collections.deque = collections.deque()  # calls waiting for working memory, in arrival order
        self._call_waiters: list[asyncio.Future] = []
        self._load_waiters: list[asyncio.Future] = []

    # ---- lookups ------------------------------------------------------------------------------------------

    async def create(self, tenant: str, spec: SessionSpec) -> Session:
        if spec.kind == "model" and self.model is None:
            raise FailedPrecondition("kind: this server serves no model; create a RAW session")
        session = await self.mlx.run(Session.new, spec, tenant, self.model)
        record, deltas = await self.mlx.run(session.snapshot)
        session.lease = self._new_lease()
        await run_to_completion(self.io.run(self._insert, record, deltas, session.lease))
        session.committed(record, deltas)
        self._locks[session.session_id] = session.lock
        self.hot[session.session_id] = session
        self._evict()
        return session

    def _insert(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None) -> None:
        """(store thread) Count and insert in one turn of the store thread, so concurrent creates cannot all
        pass the count."""
        limits = self.limits
        if limits.max_sessions and self.store.count() >= limits.max_sessions:
            raise LimitExceeded(f"max_sessions: the server holds {limits.max_sessions} sessions already")
        if limits.max_tenant_sessions and self.store.count(record.tenant) >= limits.max_tenant_sessions:
            raise LimitExceeded(f"max_tenant_sessions: the tenant holds {limits.max_tenant_sessions} sessions already")
        self.store.create(record, deltas, lease, limits.max_tenant_bytes)

    @asynccontextmanager
    async def open(self, tenant: str, session_id: str):
        """The session, loaded if cold, held exclusively for the duration: calls on one session run in order."""
        key = store_key(tenant, session_id)
        lock = self._lock_for(key)
        async with lock:
            session = self.hot.get(key)
            if session is not None and session.record.tenant != tenant:
                raise SessionNotFound(session_id)
            if self.store.shared:
                if session is None:
                    await self._record(tenant, session_id)  # an unknown or another tenant's session takes no lease
                # The lease comes before the read: once it is ours, no other shard's commit can land.
                lease, version = await self._take_lease(key)
                if session is not None and version != session.record.version:
                    self.hot.pop(key)  # another shard moved it on: this copy is stale
                    session = None
            if session is None:
                session = await self._load(tenant, session_id, lock)
            if self.store.shared:
                session.lease = lease
            self.hot.move_to_end(key)
            try:
                yield session
            finally:
                session.last_used = time.monotonic()
        self._evict()
        self._wake()

    def _new_lease(self) -> Lease | None:
        return Lease(self.owner, int(self.lease_ttl_s * 1000)) if self.store.shared else None

    async def _take_lease(self, session_id: str) -> tuple[Lease, int | None]:
        """(lease, stored version). Waits while another shard holds the lease, at most one TTL: a dead
        shard's lease runs out by then; a live one still serving the session answers LeaseHeld (retryable)."""
        lease = self._new_lease()
        deadline = time.monotonic() + self.lease_ttl_s
        while True:
            try:
                return lease, await self.io.run(self.store.lease, session_id, lease)
            except LeaseHeld as held:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(held.expires_in_ms / 1000 + 0.01, left, 0.5))

    async def renew_leases(self) -> None:
        """Keep the leases of sessions with a call in flight (a long Generate commits only every few tokens).
        A session whose lease was taken over is dropped: its in-flight call's next commit is refused."""
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            for session_id, session in list(self.hot.items()):
                if session.lease is not None and session.lock.locked() and not await self.io.run(self.store.renew, session_id, session.lease):
                    self.hot.pop(session_id, None)

    async def release_leases(self) -> None:
        """On shutdown: hand every lease back, so other shards take the sessions over at once."""
        for session_id, session in list(self.hot.items()):
            if session.lease is not None:
                await self.io.run(self.store.renew, session_id, session.lease, True)

    def _lock_for(self, key: str) -> asyncio.Lock:
        # Weak values: a lock lives while a caller waits on it or a hot session holds it.
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def _load(self, tenant: str, session_id: str, lock: asyncio.Lock) -> Session:
        record = await self._record(tenant, session_id)
        if record.kind == "model":
            if self.model is None:
                raise FailedPrecondition("session_id: a model session, and this server serves no model")
            if record.model_fingerprint != self.model.fingerprint:
                raise FailedPrecondition(
                    f"session_id: the session belongs to model {record.model_fingerprint[:16]}…, "
                    f"this server serves {self.model.fingerprint[:16]}…"
                )
            self._check_profile(KVCacheConfig.from_dict(record.config))
        _check_codebooks(record)
        need = memory.load_bytes(record.memory_bytes)
        in_use = self._in_use_bytes()
        if in_use and in_use + need > self.room:
            raise LimitExceeded(
                f"memory_budget_bytes: sessions in use hold {in_use} bytes; loading this one ({record.memory_bytes} "
                f"bytes, {need} while it loads) would exceed the budget {self.limits.memory_budget_bytes}; retry later"
            )
        # Alone (nothing else in use) a session over the budget still loads: it is served alone (class docstring).
        release = await self._hold(need) if in_use + need <= self.room else None
        try:
            layers = await self.io.run(self.store.load_layers, record.session_id, record.shape["layers"])
            session = await self.mlx.run(Session.restore, record, layers)
            del layers  # the rows read are freed before the load's share of the budget is given back
            session.lock = lock
            self.hot[record.session_id] = session  # counted as hot from here: the load's share goes back
        finally:
            if release is not None:
                release()
        self._evict()  # idle sessions make room for it now, not after its call
        return session

    def _check_profile(self, config: KVCacheConfig) -> None:
        """A session made from a profile resumes only where that name still means the same profile (its plans
        travel in the cache state, but a recalibrated profile of the same name would silently differ)."""
        name, fingerprint = config.profile, config.profile_fingerprint
        profile = self.model.profiles.get(name) if name else None
        if profile is not None and profile.fingerprint != fingerprint:
            raise FailedPrecondition(
                f"session_id: the session was made with profile {name!r} {fingerprint[:16]}…, "
                f"this server's {name!r} is {profile.fingerprint[:16]}…"
            )

    async def _record(self, tenant: str, session_id: str) -> SessionRecord:
        record = await self.io.run(self.store.load_record, store_key(tenant, session_id))
        if record is None or record.tenant != tenant:
            raise SessionNotFound(session_id)
        if self.limits.session_ttl_s and record.updated_at_ms < now_ms() - 1000 * self.limits.session_ttl_s:
            await self.io.run(self.store.delete, record.session_id)
            raise SessionNotFound(session_id)
        return record

    async def describe(self, tenant: str, session_id: str) -> tuple[SessionRecord, Session | None]:
        """The live record of a hot session, else the stored one; takes no lock, so it answers mid-Generate."""
        session = self.hot.get(store_key(tenant, session_id))
        if session is not None:
            session.record.stored_bytes = await self.io.run(self.store.stored_bytes, session.session_id)
            return session.record, session
        return await self._record(tenant, session_id), None

    async def list(self, tenant: str, page_size: int, after: str) -> tuple[list[SessionRecord], str]:
        records = await self.io.run(self.store.page, tenant, store_key(tenant, after) if after else "", page_size + 1)
        more = len(records) > page_size
        records = records[:page_size]
        return records, (public_id(records[-1]) if more else "")

    async def delete(self, tenant: str, session_id: str) -> None:
        key = store_key(tenant, session_id)
        async with self._lock_for(key):
            await self.describe(tenant, session_id)
            self.hot.pop(key, None)
            await run_to_completion(self.io.run(self.store.delete, key))

    # ---- changes, commits and memory ----------------------------------------------------------------------

    async def mutate(self, session: Session, change, *args):
        """Apply change(*args) on the MLX thread and commit it, as one unit: a cancelled caller waits for both
        (holding the session), so the call ends wholly applied and committed or not at all."""
        return await run_to_completion(self._apply(session, self.mlx.run(change, *args)))

    async def append(self, session: Session, layer: int, keys: np.ndarray, values: np.ndarray) -> int:
        """Append (checked by check_append) in slices of at most append_slice_cost elements (heads x tokens x
        head_dim), each its own turn on the MLX thread, so a large Append cannot hold the thread while other
        sessions wait; then one commit. All or nothing as `mutate`: a slice that fails drops the hot copy and
        nothing was committed. Codes are per token once a cache has estimated its key mean, so the slices encode
        exactly what one call would; until then (a fresh cache's first Append) the call is one turn, since the
        mean comes from all the tokens its first call brings."""
        cache = session.caches[layer]
        if cache.center_keys and cache.key_mean is None:
            return await self.mutate(session, session.append, layer, keys, values)
        step = max(1, self.limits.append_slice_cost // (keys.shape[-3] * keys.shape[-1]))

        async def in_slices() -> int:
            for start in range(0, max(keys.shape[-2], 1), step):  # an empty Append is one (empty) turn, as before
                offset = await self.mlx.run(session.append, layer, keys[..., start : start + step, :], values[..., start : start + step, :])
            return offset

        return await run_to_completion(self._apply(session, in_slices()))

    async def _apply(self, session: Session, change):
        """Await `change` (the session's mutation on the MLX thread), then check the budget and commit."""
        before = session.held_bytes
        try:
            result = await change
            if session.held_bytes > before:  # growing past the budget is refused; shrinking never is
                session.check_memory(self.limits)
                self._make_room()
        except BaseException:
            # The caches may be partly changed: drop them; the next call loads the state before this one.
            self.hot.pop(session.session_id, None)
            raise
        await self.commit(session)
        return result

    async def attend(self, session: Session, layer: int, queries: np.ndarray) -> np.ndarray:
        """Attention in slices of query tokens, each at most attend_slice_cost and its own turn on the MLX
        thread, so one large Attend cannot hold the thread while other sessions wait. Query rows attend
        independently (no causal mask): the slices are the whole."""
        cost_per_token = queries.shape[-3] * session.offset_of(layer)
        step = max(1, self.limits.attend_slice_cost // cost_per_token)
        tokens = queries.shape[-2]
        if tokens <= step:
            return await self.mlx.run(session.attend, layer, queries)
        parts = [await self.mlx.run(session.attend, layer, queries[..., i : i + step, :]) for i in range(0, tokens, step)]
        return np.concatenate(parts, axis=-2)

    async def commit(self, session: Session, only_if_changed: bool = False, snapshot=None) -> None:
        """Make the session's state durable. If the store fails, the hot copy (now ahead of the store) is
        dropped, so the next call sees exactly what the store holds. snapshot: the session's snapshot, taken on
        the MLX thread since its last change (generation.finish_in_turn), or None to take one now."""
        if only_if_changed and session.unchanged_since_commit():  # (no job of the session runs: we hold it)
            return
        if snapshot is None:
            snapshot = await self.mlx.run(session.snapshot, only_if_changed, job="snapshot")
        if snapshot is None:
            return
        record, deltas = snapshot
        try:
            await self.commits.commit(record, deltas, session.lease, self.limits.max_tenant_bytes)
        except BaseException:
            self.hot.pop(session.session_id, None)
            raise
        session.committed(record, deltas)

    def hot_bytes(self) -> int:
        return sum(s.held_bytes for s in self.hot.values())

    def _in_use_bytes(self) -> int:
        return sum(s.held_bytes for s in self.hot.values() if s.lock.locked())

    @property
    def room(self) -> int:
        """What the budget leaves for hot sessions and calls' working memory, MLX's buffer cache having its share."""
        budget = self.limits.memory_budget_bytes
        return budget - memory.mlx_cache_bytes(budget)

    @property
    def calls_room(self) -> int:
        """The most the calls in flight may hold together: half the room, so hot sessions keep the other half."""
        return self.room // 2

    async def reserve_call(self, method: str, message_bytes: int):
        """Reserve a call's working memory (memory.working_bytes of its request's size) against the budget before
        its body is parsed; returns the function that gives it back, which the caller runs once the RPC is done
        (its answer sent: the answer's copies are part of it). The body is in memory already: it is counted at
        once. The rest waits its turn, calls being admitted in arrival order, up to ADMISSION_WAIT_S for calls to
        end or idle sessions to be dropped. Calls together hold at most half the room, so sessions always keep
        the other half. A call that could never fit, or did not in time, is RESOURCE_EXHAUSTED
        memory_budget_bytes and changes nothing."""
        need = memory.working_bytes(method, message_bytes)
        if need > self.calls_room:
            raise LimitExceeded(
                f"memory_budget_bytes: a {message_bytes}-byte request needs about {need} bytes of working memory, more "
                f"than the budget {self.limits.memory_budget_bytes} leaves for a call ({self.calls_room}); send smaller requests"
            )
        return await self._hold(need, now=message_bytes, queue=self._calls_queue)

    async def _hold(self, need: int, now: int = 0, queue: collections.deque | None = None):
        """Count `need` bytes as working memory: `now` of them at once, the rest once they fit (a call: at the head
        of `queue` and within calls_room); the release function, or LimitExceeded after ADMISSION_WAIT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADMISSION_WAIT_S
        self.working += now
        held, turn = now, object()
        if queue is not None:
            queue.append(turn)
        try:
            while not self._admits(need - held, turn, queue):
                left = deadline - loop.time()
                if left <= 0:
                    raise self._no_room(need)
                waiter = loop.create_future()
                (self._load_waiters if queue is None else self._call_waiters).append(waiter)
                try:
                    await asyncio.wait_for(waiter, left)
                except TimeoutError:
                    pass
        except BaseException:
            self._release(held)
            raise
        finally:
            if queue is not None:
                queue.remove(turn)
                self._wake()  # the next in line may fit now
        self.working += need - held
        return functools.partial(self._release, need)

    def _admits(self, extra: int, turn: object, queue: collections.deque | None) -> bool:
        if queue is not None and (queue[0] is not turn or self.working + extra > self.calls_room):
            return False
        return self._fits(extra)

    def _release(self, held: int) -> None:
        self.working -= held
        self._wake()

    def _no_room(self, need: int) -> LimitExceeded:
        return LimitExceeded(
            f"memory_budget_bytes: sessions in use hold {self._in_use_bytes()} bytes and calls in flight {self.working}; "
            f"this call's {need} bytes of working memory did not fit the budget {self.limits.memory_budget_bytes} "
            f"within {ADMISSION_WAIT_S} s; retry later"
        )

    def watch_resident(self) -> None:
        """Count the process's RSS growth from now on (the kvshard_resident_growth_bytes gauge)."""
        self.resident_base = memory.resident_bytes()

    def resident_growth(self) -> int:
        return 0 if self.resident_base is None else memory.resident_bytes() - self.resident_base

    def _fits(self, extra: int) -> bool:
        """Whether `extra` more bytes fit the budget (hot sessions, working memory, MLX's cache share), dropping
        idle sessions to make room only when that makes them fit."""
        idle = sum(s.held_bytes for s in self.hot.values() if not s.lock.locked())
        if self.hot_bytes() - idle + self.working + extra > self.room:
            return False
        self._evict(extra)
        return True

    def _wake(self) -> None:
        """Room may have appeared (a call ended, a session went idle): waiters look again, loads first (they
        belong to calls already admitted, which end sooner for it)."""
        waiters = self._load_waiters + self._call_waiters
        self._load_waiters, self._call_waiters = [], []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _make_room(self) -> None:
        """Drop idle sessions until the hot ones and the calls in flight fit; LimitExceeded if those in use alone do not."""
        if not self._fits(0):
            raise LimitExceeded(
                f"memory_budget_bytes: sessions in use would hold {self.hot_bytes()} bytes with calls in flight holding "
                f"{self.working}, over the budget {self.limits.memory_budget_bytes}; retry later"
            )

    def _evict(self, extra: int = 0) -> None:
        """Drop least recently used idle sessions until hot sessions, calls in flight and `extra` fit the room."""
        total = self.hot_bytes() + self.working + extra
        for session_id, session in list(self.hot.items()):
            if total <= self.room:
                break
            if session.lock.locked():
                continue
            del self.hot[session_id]
            total -= session.held_bytes

    async def expire_idle(self) -> int:
        """Delete sessions idle longer than the TTL; returns how many."""
        if not self.limits.session_ttl_s:
            return 0
        horizon = now_ms() - 1000 * self.limits.session_ttl_s
        expired = 0
        for session_id in await self.io.run(self.store.idle_since, horizon):
            session = self.hot.get(session_id)
            if session is not None and (session.lock.locked() or time.monotonic() - session.last_used < self.limits.session_ttl_s):
                continue
            self.hot.pop(session_id, None)
            expired += await self.io.run(self.store.delete, session_id)
        return expired
