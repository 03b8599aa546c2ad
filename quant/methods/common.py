"""Pieces every method shares: splitting off the norm, packed code fields, and the verbs derived from
each method's rotated-domain decode."""

import mlx.core as mx

from ..packing import packed_size


def unit_and_norm(x: mx.array) -> tuple[mx.array, mx.array]:
    """x = norm · unit. The norm is stored in fp16; the unit vector is what the codebooks are fitted to."""
    x = x.astype(mx.float32)
    norm = mx.linalg.norm(x, axis=-1, keepdims=True)
    unit = x / mx.maximum(norm, 1e-12)
    return unit, norm.astype(mx.float16)


def packed_field(n: int, bits: int) -> tuple[int, mx.Dtype]:
    """Per-token width and dtype of a field holding n packed codes of `bits` bits."""
    return packed_size(n, bits), mx.uint8


def check_bits(bits, low: int, high: int, method: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"bits for {method} must be an integer in {low}..{high}, got {bits!r}")
    return bits


class RotatedDomainMethod:
    """Every method reconstructs x̂ = unrotate(decode_rotated(codes)) for a linear `unrotate` whose adjoint is
    `rotate_query`. So ⟨q, x̂⟩ = ⟨rotate_query(q), decode_rotated(codes)⟩, and a weighted sum of decoded
    values can be accumulated in the rotated domain and un-rotated once."""

    layout: dict[str, tuple[int, mx.Dtype]]

    def decode(self, codes: dict[str, mx.array]) -> mx.array:
        return self.unrotate(self.decode_rotated(codes))

    def score(self, q: mx.array, codes: dict[str, mx.array]) -> mx.array:
        """q·k̂ for queries (..., Lq, d) against codes (..., T, ·) -> (..., Lq, T)."""
        return self.rotate_query(q) @ self.decode_rotated(codes).swapaxes(-1, -2)

    def bytes_per_token(self) -> int:
        return sum(width * dtype.size for width, dtype in self.layout.values())
