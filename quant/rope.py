"""Rotary position embeddings as data: read a model's RoPE off its attention module, and rotate or un-rotate
keys by position, so a cache can code keys as they were before RoPE.

Why: RoPE turns each pair of a key's coordinates by an angle that grows with the token's position. Before
RoPE, keys have a fixed, strongly correlated (low-rank) structure; after it, pairs of different frequencies
decorrelate over positions and each pair's two coordinates share its energy, so a transform calibrated on
post-RoPE keys sees a much flatter spectrum, and one that drifts past the calibrated positions. On
SmolLM2-135M the water-filling prediction is ~0.9 fewer bits per key coordinate at equal score error before
RoPE than after (calibrate/klt.py).

A RoPE is described by its angular frequencies ω (radians per position, one per rotated pair) and its pair
layout: `traditional` pairs (2i, 2i+1), otherwise (i, i + dims/2) with dims = 2·len(ω). Angles are p·ω.
"""

import math

import mlx.core as mx
import numpy as np


def rope_frequencies(rope, head_dim: int) -> tuple[np.ndarray, bool] | None:
    """(ω, traditional) of an mlx_lm RoPE module (nn.RoPE, Llama3RoPE, …), or None when it is not a plain
    rotation by p·ω (a magnitude scale as in YaRN, angles not linear in position, no `dims`/`traditional`).

    Read by applying the module to unit probes at positions 1 and 2 rather than re-deriving each scaling
    scheme's formula: what is measured is what the model does."""
    dims, traditional = getattr(rope, "dims", None), getattr(rope, "traditional", None)
    if not isinstance(dims, int) or not isinstance(traditional, bool) or dims % 2 or not 0 < dims <= head_dim:
        return None
    first = np.arange(0, dims, 2) if traditional else np.arange(dims // 2)
    second = first + 1 if traditional else first + dims // 2
    probe = np.zeros((1, 1, 1, head_dim), np.float32)
    probe[..., first] = 1.0
    angles = []
    for position in (1, 2):
        out = np.array(rope(mx.array(probe), offset=position).astype(mx.float32), np.float64)[0, 0, 0]
        if not np.allclose(np.hypot(out[first], out[second]), 1.0, atol=1e-4):
            return None
        angles.append(np.arctan2(out[second], out[first]))
    omega = angles[0]
    if not np.allclose(np.angle(np.exp(1j * (angles[1] - 2 * omega))), 0.0, atol=1e-4):
        return None
    return omega, traditional


def rotate(x: mx.array, offset, frequencies: np.ndarray, traditional: bool, inverse: bool = False) -> mx.array:
    """RoPE (or its inverse) of x (B, …, T, D) at positions offset + 0..T−1; offset an int or a (B,) array.
    Pairs with ω = 0 are left as they are."""
    omega = np.asarray(frequencies, np.float64)
    # mx.fast.rope's `freqs` are periods: angle = position / freq. A negative period turns the other way.
    with np.errstate(divide="ignore"):
        periods = np.where(omega == 0, math.inf, 1.0 / omega) * (-1.0 if inverse else 1.0)
    return mx.fast.rope(
        x, 2 * len(omega), traditional=traditional, base=None, scale=1.0, offset=offset,
        freqs=mx.array(periods.astype(np.float32)),
    )
