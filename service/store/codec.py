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
# mx dtypes that numpy cannot hold are stored through an unsigned view of the same width.
_VIEWS = {mx.bfloat16: mx.uint16}


def pack_arrays(arrays: dict[str, mx.array]) -> bytes:
    header, chunks = [], []
    for name, array in arrays.items():
        view = array.view(_VIEWS[array.dtype]) if array.dtype in _VIEWS else array
        data = np.array(view).tobytes()
        header.append({"name": name, "dtype": str(array.dtype).removeprefix("mlx.core."), "shape": list(array.shape), "nbytes": len(data)})
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(len(head)) + head + b"".join(chunks)


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


def split_state(state: dict, start: int) -> tuple[bytes, bytes | None]:
    """(tail, block of the codes for tokens [start, n_encoded)) of one cache's state."""
    tail = {name: value for name, value in state.items() if name not in CODE_GROUPS and name != "meta"}
    meta = state["meta"]
    codes = {}
    for group in CODE_GROUPS:
        for name, array in state.get(group, {}).items():
            if array.shape[_TOKEN_AXIS] > start:
                codes[f"{group}/{name}"] = array[:, :, start:]
    tail_blob = json.dumps({"meta": meta}).encode() + b"\n" + pack_arrays(tail)
    return tail_blob, (pack_arrays(codes) if codes else None)


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
