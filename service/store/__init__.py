"""Session stores: `sqlite:///path` (embedded default), `redis://host:port/db` and
`redis+cluster://host:port[,host:port...]` (a Redis Cluster)."""

from urllib.parse import urlparse

from kvshard.service.store.base import LayerDelta, Lease, SessionRecord, SessionStore


def open_store(url: str) -> SessionStore:
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        from kvshard.service.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in ("redis", "rediss", "redis+cluster"):
        from kvshard.service.store.redis import RedisStore

        return RedisStore.from_url(url)
    raise ValueError(f"store: unsupported URL {url!r}; use sqlite:///path, redis://host:port/db or redis+cluster://host:port")


__all__ = ["LayerDelta", "Lease", "SessionRecord", "SessionStore", "open_store"]
