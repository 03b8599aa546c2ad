"""KLT transform coding: a calibrated linear transform per KV head, then bits where the energy is.

A random rotation spreads a vector's energy evenly, so every coordinate needs the same bits. Real keys and
values are far from isotropic: a few directions carry most of the energy (and, for keys, of what the
queries look at). Transform coding exploits that. A calibrated analysis matrix (per KV head) maps x to
decorrelated coordinates y with expected energies λ₁ ≥ λ₂ ≥ …; coordinate i gets bᵢ bits by reverse
water-filling (more where λ is large, none where it is small); runs of coordinates with equal bits are
randomly rotated among themselves and scaled to unit expected spread, so that, as in TurboQuant, the coded
vector z is close to isotropic: each coordinate of z/‖z‖ is Lloyd-Max coded with the codebook of the
m-dimensional sphere law at its own bit width (a plan's runs from its wide_bits on: a wider law's), and one
scale per token is kept (fp16, or a log-scale byte): the least-squares gain of the chosen centroids rather than
‖z‖ (see `encode`). Coordinates with 0 bits are dropped.

x̂ = S ẑ for a fixed synthesis matrix S (d × m), so this is a RotatedDomainMethod: scores are ⟨Sᵀq, ẑ⟩ and
values are accumulated as ẑ and mapped back once. For keys the analysis includes the query metric Σq^½, so
that the error that is minimised is the score error E[(q·e)²], not ‖e‖² (`calibrate/klt.py`).

Keys are best coded as they were before RoPE: there they have a fixed, low-rank structure that RoPE's
position-dependent rotation smears over every dimension. A key plan may therefore carry the model's RoPE; the
cache (not this method, whose verbs know no positions) un-rotates keys by position before `encode` and
rotates decoded keys back, and such keys are scored decoded, block by block, rather than in the coded domain
(quant/attention.py). On SmolLM2 this took ΔPPL at 2.5 bits from +17.4% to +5.9% (README, "Quality").

Without a plan (uncalibrated) the analysis is the identity and every coordinate gets `bits`: TurboQuant-MSE
(the same seeded rotation, as a matrix) with the refitted scale.

A plan is only as good as its calibration: moments from a few hundred tokens of one repeated sentence gave a
plan far worse than plain TurboQuant (tests/test_quant_klt.py calibrates as `kvshard eval` does).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..codebooks import sphere_codebook, wide_codebook
from ..packing import pack_runs, packed_size, unpack_runs
from ..rotation import make_rotation
from .common import FusedSpec, RotatedDomainMethod, check_bits

NAME = "klt"
# A calibrated plan's runs of this many bits or more are coded with the wide (Laplace-law) codebook. Their
# coordinates are the strongest, mixed only within their short run, and need not be Gaussian: on Gemma 3's layer 1
# the sphere law's 8-bit levels clipped a key coordinate (commas) at 2.5 times its outermost level, 375 times the
# expected error, and its 3.5-bit plan scored worse than its 2.5-bit one. The wide codebook costs 1.45 times the
# distortion on a Gaussian coordinate, which at 7-8 bits is small beside the clipping it removes. A plan's default;
# a profile may turn it off (Profile.wide_codebook): SmolLM2's keys are not clipped and would pay the 1.45.
WIDE_BITS = 7


@dataclass(frozen=True)
class KLTPlan:
    """What calibration decides for one layer's keys or values.

    analysis: (H, d, d), y = analysis[h] @ x gives head h's decorrelated coordinates, in order of
    energies: (H, d), the expected energy of each coordinate (descending per head);
    coordinate_bits: d ints, non-increasing, 0..8 — shared by the heads so every token has one layout;
    rope_frequencies, rope_traditional: for keys, the model's RoPE (quant/rope.py) when the plan codes keys as
    they were before RoPE — the cache un-rotates them by position before coding and rotates them back after
    decoding; None codes keys as given;
    wide_bits: runs of this many bits or more use the wide codebook (codebooks.wide_codebook); None: none do."""

    analysis: np.ndarray
    energies: np.ndarray
    coordinate_bits: tuple
    norm_bits: int = 16  # 16: the token's norm in fp16; 8: a log-scale byte (steps of 2^(1/16), ±8 octaves)
    rope_frequencies: np.ndarray | None = None
    rope_traditional: bool = False
    wide_bits: int | None = WIDE_BITS

    def __post_init__(self):
        # Held in float32, the precision a cache's state stores them in, so a restored cache decodes the same.
        analysis, energies = np.asarray(self.analysis, np.float32), np.asarray(self.energies, np.float32)
        object.__setattr__(self, "analysis", analysis)
        object.__setattr__(self, "energies", energies)
        if analysis.ndim != 3 or analysis.shape[1] != analysis.shape[2]:
            raise ValueError(f"analysis must have shape (kv_heads, head_dim, head_dim), got {analysis.shape}")
        if energies.shape != analysis.shape[:2] or not np.all(np.isfinite(energies)) or np.any(energies < 0):
            raise ValueError(f"energies must be finite, >= 0 and of shape {analysis.shape[:2]}, got {energies.shape}")
        bits = list(self.coordinate_bits)
        if len(bits) != analysis.shape[1] or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b <= 8 for b in bits):
            raise ValueError(f"coordinate_bits must be {analysis.shape[1]} integers in 0..8, got {bits}")
        if bits[0] < 1 or any(a < b for a, b in zip(bits, bits[1:])):
            raise ValueError(f"coordinate_bits must be non-increasing with at least one coded coordinate, got {bits}")
        if self.norm_bits not in (8, 16):
            raise ValueError(f"norm_bits must be 8 or 16, got {self.norm_bits!r}")
        if self.rope_frequencies is not None:
            omega = np.asarray(self.rope_frequencies, np.float64)
            object.__setattr__(self, "rope_frequencies", omega)
            if omega.ndim != 1 or not 0 < 2 * omega.size <= analysis.shape[1] or not np.all(np.isfinite(omega)):
                raise ValueError(
                    f"rope_frequencies must be 1 to {analysis.shape[1] // 2} finite angles per position, got {omega.shape}"
                )
        if not isinstance(self.rope_traditional, bool):
            raise ValueError(f"rope_traditional must be a bool, got {self.rope_traditional!r}")
        wide = self.wide_bits
        if wide is not None and (isinstance(wide, bool) or not isinstance(wide, (int, np.integer)) or not 1 <= wide <= 8):
            raise ValueError(f"wide_bits must be None or an integer in 1..8, got {self.wide_bits!r}")

    @property
    def mean_bits(self) -> float:
        return float(np.mean(self.coordinate_bits))


def rotation_plan(plan: KLTPlan, seed: int = 42) -> KLTPlan:
    """A plan of the same bits per token as `plan`, spread as evenly as whole bits allow over a seeded random
    rotation of x instead of the calibrated transform (TurboQuant's coding, with KLT's layout and scale byte).

    What it is for: values of Gemma 3's sliding-window layers (Profile.config). Once <bos> has left a 512-token
    window, those layers put their spare attention on many small, near-null values (in the passkey filler, tokens
    that recur every sentence), whose energy lies in the directions calibration found weak and gave the fewest
    bits or none: coded 25-60% wrong each, all alike, and heavily attended, they moved those layers' attention
    outputs by 9-19% at 5.5 bits, where turboquant_mse's 4-bit values moved them 2-5% and this plan's, at the
    5.5-bit plans' bytes, 0.7-1.5% (benchmarks/gemma_attended_values.py). A rotation gives up the calibrated
    transform's gain on typical tokens (tests/test_quant_klt.py); README, "A second model", has the end-to-end
    effect."""
    heads, d = plan.energies.shape
    low, extra = divmod(int(sum(plan.coordinate_bits)), d)
    bits = (low + 1,) * extra + (low,) * (d - extra)
    rotation = np.broadcast_to(_rotation_matrix(d, seed), (heads, d, d))
    # A rotation spreads a head's energy evenly: each coordinate expects the mean, which keeps the scale byte
    # centred on typical tokens.
    energies = np.broadcast_to(plan.energies.mean(axis=1, keepdims=True), (heads, d))
    return KLTPlan(rotation, energies, bits, norm_bits=plan.norm_bits, wide_bits=None)


def _groups(bits: list[int]) -> list[tuple[int, int, int]]:
    """(start, stop, bits) of every run of equal, non-zero bits."""
    runs, start = [], 0
    for i in range(1, len(bits) + 1):
        if i == len(bits) or bits[i] != bits[start]:
            if bits[start]:
                runs.append((start, i, bits[start]))
            start = i
    return runs


def _rotation_matrix(dim: int, seed: int) -> np.ndarray:
    if dim == 1:
        return np.ones((1, 1))
    return np.array(make_rotation(dim, seed).rotate(mx.eye(dim)), dtype=np.float64).T


class KLT(RotatedDomainMethod):
    name = NAME

    def __init__(self, head_dim: int, bits: int, seed: int = 42, plan: KLTPlan | None = None):
        self.head_dim, self.seed = head_dim, seed
        if plan is None:
            check_bits(bits, 1, 8, NAME)
            plan = KLTPlan(np.eye(head_dim)[None], np.ones((1, head_dim)), (bits,) * head_dim, wide_bits=None)
        elif plan.analysis.shape[1] != head_dim:
            raise ValueError(f"plan head_dim must be {head_dim}, got {plan.analysis.shape[1]}")
        self.plan = plan
        bits_list = [int(b) for b in plan.coordinate_bits]
        self.groups = _groups(bits_list)
        self.rotated_dim = m = sum(stop - start for start, stop, _ in self.groups)
        self.bits = plan.mean_bits
        wide = plan.wide_bits
        self.codebooks = [(wide_codebook if wide is not None and b >= wide else sphere_codebook)(max(m, 2), b)
                          for _, _, b in self.groups]
        self._runs = [(stop - start, b) for start, stop, b in self.groups]
        # One bit stream for all runs: exactly Σ bᵢ bits per token, padded to a byte once.
        norm_dtype = "uint8" if plan.norm_bits == 8 else "float16"
        self.layout = {"idx": (packed_size(sum(n * b for n, b in self._runs), 1), "uint8"), "norm": (1, norm_dtype)}
        # A calibrated z has ‖z‖ ≈ √m for a typical token: the log-scale byte codes the scale's ratio to that.
        self._log_norm_center = 0.5 * np.log2(m)
        encode, synthesis, run_energy = self._matrices(
            np.asarray(plan.analysis, np.float64), np.asarray(plan.energies, np.float64), m
        )
        # (H, d, m) for x @ A: per-head matrices broadcast over (B, H, T, d) rows.
        self._encode = mx.array(encode.transpose(0, 2, 1).astype(np.float32))
        self._synthesis = mx.array(synthesis.astype(np.float32))  # (H, d, m): x̂ = S ẑ
        self._energy = mx.array(run_energy.astype(np.float32))[:, None]  # (H, 1, m): weights of z's coordinates
        self._fused = self._fused_spec()

    def fused_spec(self) -> FusedSpec:
        """The codes' layout: runs of coordinates with their bits and codebooks, the scale's coding and the
        synthesis. With one bit width and an fp16 scale the codes are also TurboQuant's layout in z, so the
        TurboQuant kernels score them with the transform applied to the query outside (rotate_query)."""
        return self._fused

    def _fused_spec(self) -> FusedSpec:
        layout = dict(runs=tuple(self._runs), run_centroids=tuple(cb.centroids for cb in self.codebooks),
                      log_scale_center=None if self.plan.norm_bits == 16 else float(self._log_norm_center),
                      synthesis=self._synthesis)
        if len(self.groups) != 1 or self.plan.norm_bits != 16:
            return FusedSpec(None, None, None, None, **layout)
        codebook = self.codebooks[0]
        return FusedSpec(self.groups[0][2], codebook.centroids, codebook.boundaries, None, True, self.to_coded,
                         **layout)

    def _matrices(self, analysis: np.ndarray, energies: np.ndarray, m: int):
        heads, d = energies.shape
        mix = np.zeros((m, m))
        for g, (start, stop, _) in enumerate(self.groups):
            mix[start:stop, start:stop] = _rotation_matrix(stop - start, self.seed + g)
        # After its run's rotation, each coordinate of a run expects the run's mean energy.
        run_energy = np.ones((heads, m))
        for start, stop, _ in self.groups:
            run_energy[:, start:stop] = np.maximum(energies[:, start:stop].mean(axis=1, keepdims=True), 1e-20)
        spread = np.sqrt(run_energy)
        encode, synthesis = np.zeros((heads, m, d)), np.zeros((heads, d, m))
        for h in range(heads):
            encode[h] = (mix / spread[h][:, None]) @ analysis[h, :m]
            synthesis[h] = np.linalg.inv(analysis[h])[:, :m] @ mix.T * spread[h][None, :]
        return encode, synthesis, run_energy / run_energy.mean(axis=1, keepdims=True)

    def _per_head(self, a: mx.array, x: mx.array) -> mx.array:
        # x is (B, H, T, ·) or, for grouped queries, (B, H, group, L, ·); a is (H or 1, ·, ·). One matrix for every
        # head (an uncalibrated plan) is a plain 2-D product: a broadcast batch of one costs a GPU copy.
        if a.shape[0] == 1:
            return a[0]
        return a if x.ndim == 4 else a[:, None]

    def to_coded(self, x: mx.array) -> mx.array:
        """z: the coded coordinates of x, before their scale and codes are chosen."""
        return x.astype(mx.float32) @ self._per_head(self._encode, x)

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        z = self.to_coded(x)
        energy = self._energy if x.ndim == 4 else self._energy[:, None]
        # Codes and scale, chosen for this token. The scale stored is not ‖z‖ but the least-squares gain of
        # the chosen centroids ĉ: the error that counts is x's, where coordinate i of z weighs its run's
        # energy ℓᵢ, so g = Σ ℓ z ĉ / Σ ℓ ĉ² minimises ‖x − x̂‖ (in the query metric, for keys). Then the codes
        # are chosen again for z / g (nearest centroid per coordinate is exact for a fixed g) and g refitted:
        # one round of this coordinate descent lowered ΔPPL at 2.5 bits from +18.9% to +17.6%; more rounds
        # did not help.
        scale = mx.linalg.norm(z, axis=-1, keepdims=True)
        for _ in range(2):
            unit = z / mx.maximum(scale, 1e-30)
            idx = [cb.quantize(unit[..., start:stop]) for (start, stop, _), cb in zip(self.groups, self.codebooks)]
            centroids = mx.concatenate([cb.lookup(i) for i, cb in zip(idx, self.codebooks)], axis=-1)
            scale = (energy * z * centroids).sum(axis=-1, keepdims=True) / mx.maximum(
                (energy * centroids * centroids).sum(axis=-1, keepdims=True), 1e-30
            )
        runs = [(i, b) for i, (_, _, b) in zip(idx, self.groups)]
        return {"idx": pack_runs(runs), "norm": self._encode_norm(scale)}

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        indices = unpack_runs(codes["idx"], self._runs)
        parts = [codebook.lookup(idx) for idx, codebook in zip(indices, self.codebooks)]
        unit = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return unit * self._decode_norm(codes["norm"])

    def _encode_norm(self, gain: mx.array) -> mx.array:
        if self.plan.norm_bits == 16:
            return gain.astype(mx.float16)
        log_gain = mx.log2(mx.maximum(gain, 1e-30))  # g ≥ 0: ⟨z, ĉ⟩ > 0 as each ĉᵢ has zᵢ's sign
        return mx.clip(mx.round((log_gain - self._log_norm_center) * 16 + 128), 0, 255).astype(mx.uint8)

    def _decode_norm(self, norm: mx.array) -> mx.array:
        if self.plan.norm_bits == 8:
            return mx.power(2.0, (norm.astype(mx.float32) - 128) / 16 + self._log_norm_center)
        return norm.astype(mx.float32)

    def rotate_query(self, q: mx.array) -> mx.array:
        return q.astype(mx.float32) @ self._per_head(self._synthesis, q)

    def unrotate(self, y: mx.array) -> mx.array:
        return y.astype(mx.float32) @ self._per_head(self._synthesis, y).swapaxes(-1, -2)
