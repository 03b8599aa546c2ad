"""Bit packing of b-bit codes (1 <= b <= 8) into bytes, vectorized over every leading axis.

Codes are laid out little-endian bit by bit: code j of a row occupies bits [j·b, (j+1)·b) of the row's bit
stream, and bit k of the stream is bit (k mod 8) of byte k // 8. Rows are padded to whole bytes.
"""

import mlx.core as mx

_BYTE_WEIGHTS = mx.array([1 << i for i in range(8)], dtype=mx.uint32)


def packed_size(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits occupy."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack(codes: mx.array, bits: int) -> mx.array:
    """(..., n) integer codes < 2**bits -> (..., packed_size(n, bits)) uint8."""
    _check_bits(bits)
    if bits == 8:
        return codes.astype(mx.uint8)
    *lead, n = codes.shape
    per_byte = 8 // bits
    if 8 % bits == 0 and n % per_byte == 0:
        # 1, 2 and 4 bits: whole codes per byte, one shift per slot.
        grouped = codes.astype(mx.uint32).reshape(*lead, n // per_byte, per_byte)
        shifts = mx.arange(0, 8, bits, dtype=mx.uint32)
        return (grouped << shifts).sum(axis=-1).astype(mx.uint8)
    return pack_runs([(codes, bits)])  # codes straddle bytes: the general bit stream


def unpack(packed: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of `pack`: (..., packed_size(n, bits)) uint8 -> (..., n) uint8 codes."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :n]
    per_byte = 8 // bits
    if 8 % bits == 0 and n % per_byte == 0:
        shifts = mx.arange(0, 8, bits, dtype=mx.uint8)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], n)
    return unpack_runs(packed, [(n, bits)])[0]


def _stream(codes: mx.array, bits: int) -> mx.array:
    """(..., n) codes -> (..., n·bits) bits, little-endian per code."""
    shifts = mx.arange(bits, dtype=mx.uint32)
    return ((codes.astype(mx.uint32)[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], -1)


def pack_runs(runs: list[tuple[mx.array, int]]) -> mx.array:
    """Runs of codes with their own widths, [(codes (..., n_r), bits_r), …], in ONE bit stream: bytes are
    padded once at the end, not once per run (a run of 3 codes of 5 bits would otherwise waste a byte)."""
    for _, bits in runs:
        _check_bits(bits)
    stream = mx.concatenate([_stream(codes, bits) for codes, bits in runs], axis=-1)
    *lead, total = stream.shape
    pad = packed_size(total, 1) * 8 - total
    if pad:
        stream = mx.concatenate([stream, mx.zeros((*lead, pad), dtype=mx.uint32)], axis=-1)
    return (stream.reshape(*lead, -1, 8) * _BYTE_WEIGHTS).sum(axis=-1).astype(mx.uint8)


def unpack_runs(packed: mx.array, runs: list[tuple[int, int]]) -> list[mx.array]:
    """Inverse of `pack_runs` for runs [(n_r, bits_r), …]: one (..., n_r) uint8 array per run."""
    *lead, nbytes = packed.shape
    stream = ((packed.astype(mx.uint32)[..., None] >> mx.arange(8, dtype=mx.uint32)) & 1).reshape(*lead, nbytes * 8)
    out, start = [], 0
    for n, bits in runs:
        _check_bits(bits)
        part = stream[..., start : start + n * bits].reshape(*lead, n, bits)
        out.append((part * mx.array([1 << i for i in range(bits)], dtype=mx.uint32)).sum(axis=-1).astype(mx.uint8))
        start += n * bits
    return out
