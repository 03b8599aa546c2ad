"""Seeded random rotations Π that spread a vector's energy evenly over its coordinates.

After rotation every coordinate of a unit vector follows (nearly) the same law, which is what lets one scalar
codebook serve all coordinates. Power-of-two head dims use three rounds of a randomized Hadamard transform
(H·D₃·H·D₂·H·D₁, O(d log d)): one round is not random enough for sparse inputs (a basis vector comes out with
only ±1/√d entries, and its distortion breaks TurboQuant's bound); three behave like a uniform rotation.
others (80, 96, 192 occur in real models) use a dense orthogonal matrix from the QR of a seeded Gaussian.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .precompute import precomputable


HADAMARD_ROUNDS = 3


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Rotation:
    """y = Π x and x = Πᵀ y along the last axis. Π is exactly orthogonal, so norms and inner products survive."""

    dim: int
    signs: mx.array | None  # (ROUNDS, d) ±1 diagonals of the randomized Hadamard rounds
    matrix: mx.array | None  # dense orthogonal Π for non-power-of-two dims

    def rotate(self, x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        if self.signs is None:
            return x @ self.matrix.T
        for signs in self.signs:
            x = mx.hadamard_transform(x * signs)
        return x

    def unrotate(self, y: mx.array) -> mx.array:
        y = y.astype(mx.float32)
        if self.signs is None:
            return y @ self.matrix
        for signs in self.signs[::-1]:
            y = mx.hadamard_transform(y) * signs
        return y


@precomputable(maxsize=256)
def make_rotation(dim: int, seed: int) -> Rotation:
    if dim < 2:
        raise ValueError(f"head_dim must be >= 2, got {dim}")
    rng = np.random.default_rng(seed)
    if _is_power_of_two(dim):
        signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(HADAMARD_ROUNDS, dim))
        return Rotation(dim, mx.array(signs), None)
    gaussian = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    # Fix the signs so the draw is Haar-distributed, not biased by the QR convention.
    q = q * np.sign(np.diag(r))
    return Rotation(dim, None, mx.array(q.astype(np.float32)))


@precomputable(maxsize=256)
def gaussian_sketch(rows: int, dim: int, seed: int) -> mx.array:
    """S with iid N(0, 1) entries, the QJL projection. Seeded apart from the rotation drawn with the same seed."""
    rng = np.random.default_rng([seed, 0x514A4C])  # "QJL"
    return mx.array(rng.standard_normal((rows, dim)).astype(np.float32))
