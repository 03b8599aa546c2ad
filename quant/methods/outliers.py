"""Outlier channels, wrapped around turboquant_mse: in every key, the n coordinates of largest magnitude go to a
second, exact stream (fp16 value + uint8 channel index) and are zeroed in what the inner method codes.

Keys have a few large channels; a rotation spreads one of them over every coordinate, where it inflates the
norm the codebook is scaled by. Taking them out first leaves a flatter vector to code, at n · 24 bits per key.
Detection is one argpartition over the last axis: no per-token loop. Scores stay in the rotated domain:
⟨q, k⟩ = ⟨Πq, Π k_inlier⟩ + ⟨Πq, Π k_outlier⟩, so the exact stream is rotated into the decoded keys.
"""

import mlx.core as mx

from .common import RotatedDomainMethod


class OutlierChannels(RotatedDomainMethod):
    def __init__(self, inner, n: int):
        if inner.name != "turboquant_mse":
            raise ValueError(f"outlier channels wrap turboquant_mse keys (an orthogonal rotation), got {inner.name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < min(inner.head_dim, 256):
            raise ValueError(f"outlier_channels: must be an integer in 1..{min(inner.head_dim, 256) - 1}, got {n!r}")
        self.inner, self.n = inner, n
        # A distinct name keeps method-specific fast paths (which know nothing of the second stream) away.
        self.name, self.bits, self.head_dim = f"{inner.name}+outliers", inner.bits, inner.head_dim
        self.layout = {**inner.layout, "outlier_idx": (n, "uint8"), "outlier_val": (n, "float16")}
        self.rotated_dim = inner.rotated_dim

    def split(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(indices of the n largest |x|, their values in fp16, x with them zeroed)."""
        x = x.astype(mx.float32)
        idx = mx.argpartition(-mx.abs(x), kth=self.n - 1, axis=-1)[..., : self.n]
        values = mx.take_along_axis(x, idx, axis=-1).astype(mx.float16)
        inliers = mx.put_along_axis(x, idx, mx.zeros(idx.shape, dtype=x.dtype), axis=-1)
        return idx.astype(mx.uint8), values, inliers

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        idx, values, inliers = self.split(x)
        return {**self.inner.encode(inliers), "outlier_idx": idx, "outlier_val": values}

    def _outliers(self, codes: dict[str, mx.array]) -> mx.array:
        idx = codes["outlier_idx"].astype(mx.int32)
        dense = mx.zeros((*idx.shape[:-1], self.head_dim), dtype=mx.float32)
        return mx.put_along_axis(dense, idx, codes["outlier_val"].astype(mx.float32), axis=-1)

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        inner = {name: codes[name] for name in self.inner.layout}
        return self.inner.decode_rotated(inner) + self.inner.rotate_query(self._outliers(codes))

    def rotate_query(self, q: mx.array) -> mx.array:
        return self.inner.rotate_query(q)

    def unrotate(self, y: mx.array) -> mx.array:
        return self.inner.unrotate(y)
