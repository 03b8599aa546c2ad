"""A per-object cache that does not keep its objects alive."""

import weakref

import numpy as np


class ObjectCache:
    """What was derived from an object, kept per object (and per extra key parts) while the object lives: an
    entry goes when its object does. The CPU kernels cache what they derive from a method or a codebook array
    per object; a shard drops and reloads sessions (whose caches own their methods) all day, and a plain dict
    would keep every one of them, and what was derived from it, for the life of the process."""

    def __init__(self):
        self._entries = {}
        self._keys = {}  # id(obj) -> its entries' keys, so what is held for one object is found without a scan

    def derive(self, obj, make, *extra):
        """make() the first time obj (with these extra key parts) is asked for, the kept value after that."""
        key = (id(obj), *extra)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is obj:
            return entry[1]
        value = make()
        self._entries[key] = (weakref.ref(obj, lambda _, key=key: self._forget(key)), value)
        self._keys.setdefault(key[0], set()).add(key)
        return value

    def _forget(self, key) -> None:
        self._entries.pop(key, None)
        keys = self._keys.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[key[0]]

    def nbytes(self, obj) -> int:
        """Bytes of the numpy arrays derived from obj (values that are arrays, or tuples of them)."""
        total = 0
        for key in tuple(self._keys.get(id(obj), ())):  # a weakref callback may change it from another thread
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is obj:
                value = entry[1]
                total += sum(v.nbytes for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, np.ndarray))
        return total

    def __len__(self) -> int:
        return len(self._entries)
