"""Cache state <-> bytes for the store.

A CompressedKVCache state is split in two: the code arrays, append-only along the token axis (axis 2), which
are stored as blocks by token range and never rewritten; and the small tail (meta, fp16 sinks, fp16 window,
key mean), rewritten on every commit. Arrays are packed as a JSON header followed by their raw bytes, so a
block holds exactly the packed codes and norms — the compressed size, not fp16.
"""

import json
import math
import struct

import mlx.core as mx
import numpy as np

CODE_GROUPS = ("key_codes", "value_codes")
_TOKEN_AXIS = 2
_HEADER_LEN = struct.Struct("<I")
# mx dtypes that numpy cannot hold are read back through an unsigned view of the same width (written as bytes).
_VIEWS = {mx.bfloat16: mx.uint16}


def pack_arrays(arrays: dict[str, mx.array]) -> bytes:
    return _pack(arrays, iter(host_bytes(list(arrays.values()))))


def _pack(arrays: dict[str, mx.array], data) -> bytes:
    """A JSON header, then each array's bytes (taken in order from the iterator `data`)."""
    header, chunks = [], []
    for name, array in arrays.items():
        chunk = next(data)
        header.append({"name": name, "dtype": str(array.dtype).removeprefix("mlx.core."), "shape": list(array.shape), "nbytes": len(chunk)})
        chunks.append(chunk)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(len(head)) + head + b"".join(chunks)


def host_bytes(arrays: list[mx.array], join: bool | None = None) -> list[bytes]:
    """Each array's bytes in C order. On a GPU (join=None) they come to the host in one copy, viewed as bytes and
    joined on the device first (each np.array is its own transfer and wait there: 80 for a 16-layer commit)."""
    flat = [array.reshape(-1).view(mx.uint8) for array in arrays]
    if join is None:
        join = mx.default_device() != mx.cpu  # on the CPU they are in host memory already: a join is one copy more
    if not flat or not join:
        mx.eval(flat)  # one evaluation: np.array of each evaluated it alone (150 arrays of a commit: 41 ms, now 2.5)
        return [np.array(array).tobytes() for array in flat]
    joined = memoryview(np.array(mx.concatenate(flat)))
    out, position = [], 0
    for array in flat:
        out.append(bytes(joined[position : position + array.size]))
        position += array.size
    return out


def unpack_arrays(blob: bytes) -> dict[str, mx.array]:
    (head_len,) = _HEADER_LEN.unpack_from(blob)
    position = _HEADER_LEN.size + head_len
    arrays = {}
    for entry in json.loads(blob[_HEADER_LEN.size : position]):
        dtype = getattr(mx, entry["dtype"])
        stored = _VIEWS.get(dtype, dtype)
        raw = np.frombuffer(blob, dtype=_numpy_dtype(stored), count=math.prod(entry["shape"]), offset=position)
        array = mx.array(raw.reshape(entry["shape"]))
        arrays[entry["name"]] = array.view(dtype) if dtype in _VIEWS else array
        position += entry["nbytes"]
    return arrays


def split_states(states: list[tuple[dict, int]]) -> list[tuple[bytes, bytes | None]]:
    """Per cache's (state, start): (tail, block of its codes for tokens [start, n_encoded)). Every array of them
    comes to the host in one copy (host_bytes): a commit's snapshot runs on the MLX thread between decode steps."""
    parts = []
    for state, start in states:
        tail = {name: value for name, value in state.items() if name not in CODE_GROUPS and name != "meta"}
        codes = {f"{group}/{name}": array[:, :, start:] for group in CODE_GROUPS
                 for name, array in state.get(group, {}).items() if array.shape[_TOKEN_AXIS] > start}
        parts.append((state["meta"], tail, codes))
    data = iter(host_bytes([a for _, tail, codes in parts for a in (*tail.values(), *codes.values())]))
    out = []
    for meta, tail, codes in parts:  # (in host_bytes' order: each cache's tail arrays, then its codes)
        tail_blob = json.dumps({"meta": meta}).encode() + b"\n" + _pack(tail, data)
        out.append((tail_blob, _pack(codes, data) if codes else None))
    return out


def join_state(tail_blob: bytes, blocks: list[bytes]) -> dict:
    """The state dict again, from a tail and the code blocks in token order."""
    head, _, packed = tail_blob.partition(b"\n")
    state = {"meta": json.loads(head)["meta"], **unpack_arrays(packed)}
    parts: dict[str, list[mx.array]] = {}
    for block in blocks:
        for key, array in unpack_arrays(block).items():
            parts.setdefault(key, []).append(array)
    for key, arrays in parts.items():
        group, name = key.split("/", 1)
        joined = arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=_TOKEN_AXIS)
        state.setdefault(group, {})[name] = joined
    return state


def _numpy_dtype(dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("mlx.core."))
