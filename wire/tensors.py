"""Tensors on the wire: {shape, dtype, little-endian bytes} <-> numpy.

Decoding checks everything a byte buffer can get wrong (dtype, shape, byte length, NaN/Inf) and names the
field. bfloat16 has no numpy type: it is widened to float32 exactly (bf16 is the top half of an f32).
"""

import math

import numpy as np

from kvshard.wire import kvshard_pb2 as pb

_WIRE_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.BFLOAT16: np.dtype("<u2")}
_MAX_DIMS = 4


def to_numpy(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A validated float32/float16 array from a wire tensor; ValueError naming `field` otherwise."""
    if tensor.dtype not in _WIRE_DTYPES:
        raise ValueError(f"{field}.dtype: must be FLOAT32, FLOAT16 or BFLOAT16, got {pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype}")
    shape = tuple(tensor.shape)
    if not 1 <= len(shape) <= _MAX_DIMS or 0 in shape:
        raise ValueError(f"{field}.shape: must have 1 to {_MAX_DIMS} non-zero dimensions, got {list(shape)}")
    wire = _WIRE_DTYPES[tensor.dtype]
    expected = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"{field}.data: {len(tensor.data)} bytes, expected {expected} for shape {list(shape)} {pb.DType.Name(tensor.dtype)}"
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if tensor.dtype == pb.BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{field}.data: contains NaN or Inf")
    return array


def from_numpy(array: np.ndarray, dtype: int) -> pb.Tensor:
    """A wire tensor of `dtype`; bfloat16 is rounded to nearest-even from float32."""
    if dtype == pb.BFLOAT16:
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        data = rounded.astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[dtype]).tobytes()
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=data)
