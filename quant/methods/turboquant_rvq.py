"""Residual VQ: TurboQuant-MSE with b bits, then the residual quantized again with b bits by a codebook
fitted to the residual's real spread (the seed scaled stage 2 for the input's spread and wasted it). 2b bits
per coordinate plus the fp16 norm."""

import mlx.core as mx

from ..codebooks import residual_codebook, sphere_codebook
from ..packing import pack, unpack
from ..rotation import make_rotation
from .common import RotatedDomainMethod, check_bits, packed_field, unit_and_norm

NAME = "turboquant_rvq"


class TurboQuantRVQ(RotatedDomainMethod):
    name = NAME

    def __init__(self, head_dim: int, bits: int, seed: int = 42):
        self.head_dim, self.bits, self.seed = head_dim, check_bits(bits, 1, 4, NAME), seed
        self.rotation = make_rotation(head_dim, seed)
        self.first = sphere_codebook(head_dim, bits)
        self.second = residual_codebook(head_dim, bits, bits)
        self.layout = {
            "idx1": packed_field(head_dim, bits),
            "idx2": packed_field(head_dim, bits),
            "norm": (1, "float16"),
        }
        self.rotated_dim = head_dim

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        unit, norm = unit_and_norm(x)
        y = self.rotation.rotate(unit)
        idx1 = self.first.quantize(y)
        idx2 = self.second.quantize(y - self.first.lookup(idx1))
        return {"idx1": pack(idx1, self.bits), "idx2": pack(idx2, self.bits), "norm": norm}

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        y = self.first.lookup(unpack(codes["idx1"], self.bits, self.head_dim))
        y = y + self.second.lookup(unpack(codes["idx2"], self.bits, self.head_dim))
        return y * codes["norm"].astype(mx.float32)

    def rotate_query(self, q: mx.array) -> mx.array:
        return self.rotation.rotate(q)

    def unrotate(self, y: mx.array) -> mx.array:
        return self.rotation.unrotate(y)
