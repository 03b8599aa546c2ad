"""What a session store keeps, and the small interface every backend implements.

Per session: one record (config, shape, offsets, token ids, model fingerprint, version), and per layer a tail
blob plus code blocks keyed by the token index they start at. A commit is atomic: new blocks, rewritten tails
and the record land together or not at all, so the store always holds a state some OK RPC acknowledged.
"""

import json
from dataclasses import dataclass, field, fields
from typing import Protocol

FORMAT_VERSION = 1


@dataclass
class SessionRecord:
    session_id: str
    tenant: str
    kind: str  # "model" or "raw"
    config: dict  # KVCacheConfig.to_dict() (older sessions: method, per-layer bits, sink_tokens, window, seed)
    shape: dict  # layers, n_kv_heads, head_dim
    model_fingerprint: str = ""
    token_ids: list[int] = field(default_factory=list)  # model sessions: the conversation so far
    layer_offsets: list[int] = field(default_factory=list)
    last_generate: dict | None = None
    labels: dict = field(default_factory=dict)
    memory_bytes: int = 0  # bytes the caches held at the last commit
    version: int = 0  # commits so far
    created_at_ms: int = 0
    updated_at_ms: int = 0
    stored_bytes: int = 0  # filled in by the store on reads
    format: int = FORMAT_VERSION
    codebooks: int = 1  # quant.codebooks.CODEBOOK_VERSION its codes were made with (sessions stored before it: 1)

    @property
    def offset(self) -> int:
        if self.kind == "model":
            return len(self.token_ids)
        return min(self.layer_offsets, default=0)

    def to_json(self) -> str:
        """Everything but the token ids, which are stored as packed uint32. (Not `asdict`: it deep-copies the
        conversation's token list on every commit, most of a commit's host time at a few thousand tokens.)"""
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("token_ids", "stored_bytes")}
        return json.dumps(kept, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, token_ids: list[int], stored_bytes: int) -> "SessionRecord":
        fields = json.loads(text)
        if fields.get("format") != FORMAT_VERSION:
            raise ValueError(f"session store format {fields.get('format')!r} is not {FORMAT_VERSION}")
        return cls(**fields, token_ids=token_ids, stored_bytes=stored_bytes)


@dataclass
class LayerDelta:
    """What one commit changes in one layer: blocks from `keep_until` on are replaced by `block` (which starts
    at keep_until, or is None when no codes follow), and the tail is rewritten."""

    layer: int
    keep_until: int
    block: bytes | None
    tail: bytes


def written_bytes(record: SessionRecord, deltas: list[LayerDelta]) -> int:
    """Bytes a create or commit writes: the record, its token ids (uint32) and each delta's tail and block. What a
    store counts as a session's stored bytes, so a tenant's quota is checked before anything is written."""
    return len(record.to_json().encode()) + 4 * len(record.token_ids) + sum(len(d.tail) + len(d.block or b"") for d in deltas)


@dataclass
class Lease:
    """A shard's claim on a session in a shared store: the store sets `token` (the fencing token) when it
    grants the lease, and refuses commits whose token is no longer the latest it issued."""

    owner: str
    ttl_ms: int
    token: int = 0


class SessionStore(Protocol):
    kind: str
    shared: bool  # other shards may write it: shards lease the sessions they serve and fence their commits

    def create(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        """Insert a new session; SessionExists if the id is taken. Shared stores lease it to the creator.
        QuotaExceeded, writing nothing, if the tenant would then store more than tenant_quota bytes (0: no quota)."""

    def commit(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        """Apply the deltas and replace the record, atomically, if the stored version is record.version - 1;
        SessionConflict otherwise (another writer got there first). Shared stores also refuse (Fenced) a
        commit whose lease token is no longer the latest they issued. A commit that grows the session is
        refused (QuotaExceeded, nothing written) if the tenant would then store more than tenant_quota bytes."""

    # Shared stores only (shared = True): the session manager calls these, and passes leases to create/commit.
    def lease(self, session_id: str, lease: Lease) -> int | None:
        """Take or extend the session's lease for lease.owner, setting lease.token; the stored version, None if
        there is no such session; LeaseHeld if another owner holds it."""

    def renew(self, session_id: str, lease: Lease, release: bool = False) -> bool:
        """Extend (or release) the lease if it is still lease.owner's with lease.token."""

    def version(self, session_id: str) -> int | None:
        """The stored version (commit count) of a session, None if it does not exist."""

    def load_record(self, session_id: str) -> SessionRecord | None: ...

    def load_layers(self, session_id: str, layers: int) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
        """Per layer: (tail, [(start, block), ...] in token order)."""

    def stored_bytes(self, session_id: str) -> int:
        """Bytes the store holds for the session: record, token ids, tails and code blocks."""

    def delete(self, session_id: str) -> bool: ...

    def page(self, tenant: str, after: str, limit: int) -> list[SessionRecord]:
        """Records of a tenant with ids > after, in id order, without token ids."""

    def count(self, tenant: str | None = None) -> int:
        """Sessions in the store, or those of one tenant."""

    def idle_since(self, before_ms: int) -> list[str]:
        """Ids of sessions last updated before this time."""

    def tenant_bytes(self, tenant: str) -> int:
        """Bytes the tenant's sessions hold, as its quota counts them."""

    def total_bytes(self) -> int: ...

    def close(self) -> None:
        """Flush and release; later calls are errors."""
