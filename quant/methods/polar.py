"""PolarQuant: rotate, then in each group of 16 coordinates apply 4 recursive polar levels. Level 1 turns
coordinate pairs into angles on the full circle (uniform after rotation); levels 2-4 turn pairs of radii into
angles in [0, π/2] whose law sharpens with depth (∝ sin^(n−1) 2ψ), each with its own Lloyd-Max codebook.
One fp16 radius per 16 coordinates carries the scale, so no separate norm is stored.

`bits` is level 1's angle bits; deeper levels use max(1, bits // 2), their angles being far more concentrated.
"""

import mlx.core as mx

from ..codebooks import polar_angle_codebook, uniform_angle_codebook
from ..packing import pack, unpack
from ..rotation import make_rotation
from .common import RotatedDomainMethod, check_bits, packed_field

NAME = "polar"
GROUP = 16
LEVELS = 4


def _interleave(even: mx.array, odd: mx.array) -> mx.array:
    return mx.stack([even, odd], axis=-1).reshape(*even.shape[:-1], 2 * even.shape[-1])


class PolarQuant(RotatedDomainMethod):
    name = NAME

    def __init__(self, head_dim: int, bits: int, seed: int = 42):
        if head_dim % GROUP:
            raise ValueError(f"head_dim for {NAME} must be a multiple of {GROUP}, got {head_dim}")
        self.head_dim, self.bits, self.seed = head_dim, check_bits(bits, 1, 8, NAME), seed
        self.rotation = make_rotation(head_dim, seed)
        self.level_bits = [bits] + [max(1, bits // 2)] * (LEVELS - 1)
        self.codebooks = [uniform_angle_codebook(bits)] + [
            polar_angle_codebook(2 ** (level - 1), b) for level, b in zip(range(2, LEVELS + 1), self.level_bits[1:])
        ]
        self.angles_per_level = [head_dim >> level for level in range(1, LEVELS + 1)]
        self.layout = {
            f"level{i + 1}": packed_field(n, b) for i, (n, b) in enumerate(zip(self.angles_per_level, self.level_bits))
        }
        self.layout["radius"] = (head_dim // GROUP, "float16")
        self.rotated_dim = head_dim

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        radii = self.rotation.rotate(x)
        codes = {}
        for level, (codebook, bits) in enumerate(zip(self.codebooks, self.level_bits), start=1):
            even, odd = radii[..., 0::2], radii[..., 1::2]
            codes[f"level{level}"] = pack(codebook.quantize(mx.arctan2(odd, even)), bits)
            radii = mx.sqrt(even * even + odd * odd)
        codes["radius"] = radii.astype(mx.float16)
        return codes

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        radii = codes["radius"].astype(mx.float32)
        for level in range(LEVELS, 0, -1):
            bits, n = self.level_bits[level - 1], self.angles_per_level[level - 1]
            angle = self.codebooks[level - 1].lookup(unpack(codes[f"level{level}"], bits, n))
            radii = _interleave(radii * mx.cos(angle), radii * mx.sin(angle))
        return radii

    def rotate_query(self, q: mx.array) -> mx.array:
        return self.rotation.rotate(q)

    def unrotate(self, y: mx.array) -> mx.array:
        return self.rotation.unrotate(y)
