"""A per-object cache that does not keep its objects alive."""

import weakref


class ObjectCache:
    """What was derived from an object, kept per object (and per extra key parts) while the object lives: an
    entry goes when its object does. The CPU kernels cache what they derive from a method or a codebook array
    per object; a shard drops and reloads sessions (whose caches own their methods) all day, and a plain dict
    would keep every one of them, and what was derived from it, for the life of the process."""

    def __init__(self):
        self._entries = {}

    def derive(self, obj, make, *extra):
        """make() the first time obj (with these extra key parts) is asked for, the kept value after that."""
        key = (id(obj), *extra)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is obj:
            return entry[1]
        value = make()
        self._entries[key] = (weakref.ref(obj, lambda _, key=key: self._entries.pop(key, None)), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
