"""Query-aware channel scaling of keys, wrapped around any method.

The score error of a quantized key is q·e. With e spread evenly over coordinates (the rotation does that),
E[(q·e)²] ∝ Σ_j σq_j² · Σ_j σk_j² for per-channel spreads σq, σk. Quantizing k·a and scoring with q/a leaves
q·k unchanged and, for a_j² ∝ σq_j / σk_j, lowers that product to (Σ_j σq_j σk_j)² — the Cauchy-Schwarz
minimum. The scales are per KV head and channel, measured once on the model (`calibrate_key_scales`).
"""

import mlx.core as mx

from .common import FusedSpec, RotatedDomainMethod


class ScaledKeys(RotatedDomainMethod):
    """`inner` applied to k·scale; queries are divided by the same scale. scale: (H, D), one row per KV head."""

    def __init__(self, inner, scale: mx.array):
        self.inner, self.scale = inner, scale.astype(mx.float32)
        self._per_head = self.scale[:, None, :]  # broadcasts over (B, H, T, D)
        self.name, self.bits, self.head_dim = f"{inner.name}+scaled", inner.bits, inner.head_dim
        self.layout, self.rotated_dim = inner.layout, inner.rotated_dim

    def _heads(self, x: mx.array) -> mx.array:
        # Queries arrive grouped as (B, H, group, L, D): the head axis is 1 either way, and the scale follows it.
        return self._per_head if x.ndim == 4 else self._per_head[:, None]

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        return self.inner.encode(x.astype(mx.float32) * self._heads(x))

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        return self.inner.decode_rotated(codes)

    def rotate_query(self, q: mx.array) -> mx.array:
        return self.inner.rotate_query(q.astype(mx.float32) / self._heads(q))

    def unrotate(self, y: mx.array) -> mx.array:
        return self.inner.unrotate(y) / self._heads(y)

    def fused_spec(self) -> FusedSpec | None:
        """The inner codes, with the scaled query rotated outside the kernels (this class's rotate_query)."""
        inner = self.inner.fused_spec()
        return None if inner is None else FusedSpec(inner.bits, inner.centroids, inner.boundaries, None)
