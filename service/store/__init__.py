"""Session stores: `sqlite:///path` (embedded default) and `redis://host:port/db`."""

from urllib.parse import urlparse

from kvshard.service.store.base import LayerDelta, SessionRecord, SessionStore


def open_store(url: str) -> SessionStore:
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        from kvshard.service.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in ("redis", "rediss"):
        from kvshard.service.store.redis import RedisStore

        return RedisStore.from_url(url)
    raise ValueError(f"store: unsupported URL {url!r}; use sqlite:///path or redis://host:port/db")


__all__ = ["LayerDelta", "SessionRecord", "SessionStore", "open_store"]
