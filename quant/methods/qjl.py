"""QJL: a 1-bit Johnson-Lindenstrauss sketch. Keep sign(S k) bit-packed and ‖k‖ in fp16; then
√(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩ is an unbiased estimate of ⟨q, k⟩ (S: m×d, iid N(0, 1)).
`bits` sets the sketch length m = bits · d, i.e. the bits spent per coordinate."""

import math

import mlx.core as mx

from ..packing import pack, unpack
from ..rotation import gaussian_sketch
from .common import RotatedDomainMethod, check_bits, packed_field, unit_and_norm

NAME = "qjl"


def sign_bits(projected: mx.array) -> mx.array:
    return (projected >= 0).astype(mx.uint8)


def signs_from_bits(bits: mx.array) -> mx.array:
    return bits.astype(mx.float32) * 2 - 1


class QJL(RotatedDomainMethod):
    name = NAME

    def __init__(self, head_dim: int, bits: int = 1, seed: int = 42):
        self.head_dim, self.bits, self.seed = head_dim, check_bits(bits, 1, 8, NAME), seed
        self.sketch_dim = bits * head_dim
        self.sketch = gaussian_sketch(self.sketch_dim, head_dim, seed)
        self.scale = math.sqrt(math.pi / 2) / self.sketch_dim
        self.layout = {"signs": packed_field(self.sketch_dim, 1), "norm": (1, "float16")}
        self.rotated_dim = self.sketch_dim

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        unit, norm = unit_and_norm(x)
        return {"signs": pack(sign_bits(unit @ self.sketch.T), 1), "norm": norm}

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        signs = signs_from_bits(unpack(codes["signs"], 1, self.sketch_dim))
        return signs * (self.scale * codes["norm"].astype(mx.float32))

    def rotate_query(self, q: mx.array) -> mx.array:
        return q.astype(mx.float32) @ self.sketch.T

    def unrotate(self, y: mx.array) -> mx.array:
        return y @ self.sketch
