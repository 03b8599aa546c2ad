"""Scalar codebooks: Lloyd-Max quantizers for the laws that rotated unit vectors actually follow.

A coordinate of a uniformly random unit vector in d dimensions has density ∝ (1 − x²)^((d−3)/2) on [−1, 1]
(≈ N(0, 1/d) for large d; we use the exact law, which matters for small head dims). Codebooks are computed
once per (law, bits) on a fine grid in float64 — deterministic, so codes are reproducible across processes.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .precompute import precomputable

_GRID = 40001
_ITERATIONS = 300


@dataclass(frozen=True)
class Codebook:
    centroids: mx.array  # (2**bits,) float32, ascending
    boundaries: mx.array  # (2**bits - 1,) float32, midpoints between centroids
    bits: int

    def quantize(self, y: mx.array) -> mx.array:
        """Index of the nearest centroid, by counting the boundaries below each value."""
        return (y[..., None] > self.boundaries).sum(axis=-1).astype(mx.uint8)

    def lookup(self, idx: mx.array) -> mx.array:
        return self.centroids[idx]


def lloyd_max(values: np.ndarray, weights: np.ndarray, bits: int) -> np.ndarray:
    """Optimal 2**bits-level scalar quantizer for a discrete law (values with weights), by Lloyd iteration."""
    order = np.argsort(values)
    values, weights = values[order], weights[order] / weights.sum()
    cdf = np.cumsum(weights)
    levels = 1 << bits
    # From 5 bits on, start from the quantiles of the law's density^(1/3), the optimal density of levels at high
    # rate (Panter-Dite): Lloyd then converges in < 100 steps. From the law's own quantiles the tails start far too
    # sparse and Lloyd crawls: after _ITERATIONS steps the 6 / 7 / 8-bit codebooks still had 1.19 / 1.78 / 2.82 times
    # the optimum's distortion (klt plans give keys' strongest coordinates 6-8 bits). Below 5 bits the law's own
    # quantiles converge, and those codebooks stay as they were, so are the codes of sessions already stored.
    start = np.cbrt(weights) if bits >= 5 else weights
    centroids = np.interp((np.arange(levels) + 0.5) / levels, np.cumsum(start) / start.sum(), values)
    weighted = np.cumsum(weights * values)
    for _ in range(_ITERATIONS):
        edges = np.searchsorted(values, (centroids[1:] + centroids[:-1]) / 2)
        cuts = np.concatenate([[0], edges, [len(values)]])
        mass = np.diff(np.concatenate([[0.0], cdf])[cuts])
        moment = np.diff(np.concatenate([[0.0], weighted])[cuts])
        updated = np.where(mass > 0, moment / np.maximum(mass, 1e-300), centroids)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return np.sort(centroids)


def expected_distortion(values: np.ndarray, weights: np.ndarray, centroids: np.ndarray) -> float:
    """E[(x − Q(x))²] of a codebook under a discrete law."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    nearest = centroids[np.searchsorted(boundaries, values)]
    return float(np.sum(weights * (values - nearest) ** 2) / np.sum(weights))


def sphere_coordinate_law(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid and density of one coordinate of a uniform unit vector in `dim` dimensions."""
    x = np.linspace(-1.0, 1.0, _GRID)[1:-1]
    log_density = 0.5 * (dim - 3) * np.log1p(-x * x)
    return x, np.exp(log_density - log_density.max())


def _symmetric(centroids: np.ndarray) -> np.ndarray:
    """Symmetric laws have symmetric optimal codebooks; remove the grid's tiny tilt (the 0 point falls in the
    upper cell) so that x and −x quantize to mirror codes."""
    return (centroids - centroids[::-1]) / 2


def _to_codebook(centroids: np.ndarray, bits: int) -> Codebook:
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(mx.array(centroids.astype(np.float32)), mx.array(boundaries.astype(np.float32)), bits)


@precomputable()
def sphere_codebook(dim: int, bits: int) -> Codebook:
    """Lloyd-Max codebook for a coordinate of a rotated unit vector (TurboQuant's stage-1 codebook)."""
    values, weights = sphere_coordinate_law(dim)
    return _to_codebook(_symmetric(lloyd_max(values, weights, bits)), bits)


@precomputable()
def wide_codebook(dim: int, bits: int) -> Codebook:
    """Lloyd-Max codebook for a Laplace law of the sphere law's variance (1/dim): its levels reach ~10 standard
    deviations at 8 bits where the sphere law's stop at ~4.5. For `klt`'s strongest coordinates: they are rotated
    only among the few of their run, so token classes stay apart (on Gemma 3 layer 1, commas sit at ~6 σ of a
    top pre-RoPE key coordinate) and the sphere law's levels clip them."""
    values = np.linspace(-1.0, 1.0, 2 * _GRID - 1)[1:-1]
    weights = np.exp(-np.sqrt(2.0 * dim) * np.abs(values))
    return _to_codebook(_symmetric(lloyd_max(values, weights, bits)), bits)


@precomputable()
def residual_codebook(dim: int, first_bits: int, bits: int) -> Codebook:
    """Codebook fitted to the real law of the stage-1 residual x − Q₁(x) (RVQ's second stage).

    The residual is a mixture of the coordinate law folded into each stage-1 cell; its spread is far
    narrower than the input's, so a codebook scaled for the input would waste most of its levels.
    """
    values, weights = sphere_coordinate_law(dim)
    first = _symmetric(lloyd_max(values, weights, first_bits))
    boundaries = (first[1:] + first[:-1]) / 2
    residual = values - first[np.searchsorted(boundaries, values)]
    return _to_codebook(_symmetric(lloyd_max(residual, weights, bits)), bits)


@precomputable()
def polar_angle_codebook(pair_dim: int, bits: int) -> Codebook:
    """Codebook for ψ = atan2(‖b‖, ‖a‖) with a, b independent Gaussian vectors of `pair_dim` coordinates each.

    Its density on [0, π/2] is ∝ sin^(n−1)(2ψ) with n = pair_dim; PolarQuant's levels ≥ 2 use these.
    """
    psi = np.linspace(0.0, np.pi / 2, _GRID)[1:-1]
    density = np.sin(2 * psi) ** (pair_dim - 1)
    return _to_codebook(lloyd_max(psi, density, bits), bits)


def uniform_angle_codebook(bits: int) -> Codebook:
    """Level-1 PolarQuant angles are uniform on [−π, π): the uniform quantizer is the Lloyd-Max one."""
    levels = 1 << bits
    width = 2 * np.pi / levels
    centroids = -np.pi + width * (np.arange(levels) + 0.5)
    return _to_codebook(centroids, bits)
