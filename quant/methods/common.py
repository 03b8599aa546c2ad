"""Pieces every method shares: splitting off the norm, packed code fields, and the verbs derived from
each method's rotated-domain decode."""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ..packing import packed_size


@dataclass(frozen=True, eq=False)
class FusedSpec:
    """What the fused kernels need of a method (`fused_spec()`), so that they never look at its name or fields.

    Codes are {"idx": b-bit codes of one codebook packed little-endian, one row per token; "norm": fp16 scale},
    and x̂ = unrotate(norm · centroids[idx]). `signs`: the rotation is `rounds` randomized-Hadamard rounds
    ((rounds, D) ±1) that the kernels apply themselves; None: the kernels score and accumulate in the coded
    domain as given and the method's own rotate_query / unrotate run around them (klt's per-head transform,
    query-aware key scales). `boundaries` are the codebook's, for the encode kernel, which takes either a rotation
    it applies itself (signs) or, with `refit`, vectors that `to_coded` put in the coded domain, whose kept scale
    is the least-squares gain of the chosen centroids (klt).

    The coded-layout kernel (mma_coded.cu) reads codes of any layout from the last four fields: `runs`, the code
    stream's runs ((coordinates, bits), …) with one codebook each in `run_centroids`; `log_scale_center` when the
    scale is a log byte, 2^((n − 128)/16 + centre), else None (fp16); `synthesis` (H or 1, d, m), x̂ = S·ẑ, so
    keys can be decoded into model space (where keys coded before RoPE get their RoPE back). `bits` is None when
    the runs differ in width (only that kernel covers them)."""

    bits: int | None
    centroids: mx.array | None
    boundaries: mx.array | None
    signs: mx.array | None
    refit: bool = False
    to_coded: Callable | None = None
    runs: tuple = ()
    run_centroids: tuple = ()
    log_scale_center: float | None = None
    synthesis: mx.array | None = None


def unit_and_norm(x: mx.array) -> tuple[mx.array, mx.array]:
    """x = norm · unit. The norm is stored in fp16; the unit vector is what the codebooks are fitted to."""
    x = x.astype(mx.float32)
    norm = mx.linalg.norm(x, axis=-1, keepdims=True)
    unit = x / mx.maximum(norm, 1e-12)
    return unit, norm.astype(mx.float16)


def packed_field(n: int, bits: int) -> tuple[int, str]:
    """Per-token width and dtype of a field holding n packed codes of `bits` bits."""
    return packed_size(n, bits), "uint8"


def check_bits(bits, low: int, high: int, method: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"bits for {method} must be an integer in {low}..{high}, got {bits!r}")
    return bits


class RotatedDomainMethod:
    """Every method reconstructs x̂ = unrotate(decode_rotated(codes)) for a linear `unrotate` whose adjoint is
    `rotate_query`. So ⟨q, x̂⟩ = ⟨rotate_query(q), decode_rotated(codes)⟩, and a weighted sum of decoded
    values can be accumulated in the rotated domain and un-rotated once."""

    # field -> (entries per token, dtype name): names, not mx.Dtype, which cannot be pickled or deep-copied.
    layout: dict[str, tuple[int, str]]

    def decode(self, codes: dict[str, mx.array]) -> mx.array:
        return self.unrotate(self.decode_rotated(codes))

    def score(self, q: mx.array, codes: dict[str, mx.array]) -> mx.array:
        """q·k̂ for queries (..., Lq, d) against codes (..., T, ·) -> (..., Lq, T)."""
        return self.rotate_query(q) @ self.decode_rotated(codes).swapaxes(-1, -2)

    def fused_spec(self) -> FusedSpec | None:
        """None: no fused kernel covers this method's codes (the portable path does)."""
        return None

    def bytes_per_token(self) -> int:
        return sum(width * getattr(mx, dtype).size for width, dtype in self.layout.values())
