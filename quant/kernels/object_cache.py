"""A per-object cache that does not keep its objects alive."""

import weakref


class ObjectCache:
    """Reads and writes like a dict of key -> (obj, value), the key made from id(obj), but holds obj weakly: an
    entry goes when its object does. The CPU kernels cache what they derive from a method or a codebook array per object; a shard drops and
    reloads sessions (whose caches own their methods) all day, and a plain dict would keep every one of them, and
    what was derived from it, for the life of the process."""

    def __init__(self):
        self._entries = {}

    def get(self, key, default=None):
        entry = self._entries.get(key)
        obj = None if entry is None else entry[0]()
        return default if obj is None else (obj, entry[1])

    def __setitem__(self, key, pair) -> None:
        obj, value = pair
        self._entries[key] = (weakref.ref(obj, lambda _, key=key: self._entries.pop(key, None)), value)

    def __len__(self) -> int:
        return len(self._entries)
