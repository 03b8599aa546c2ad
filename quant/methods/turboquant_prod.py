"""TurboQuant (prod): a (b−1)-bit TurboQuant-MSE stage, then 1-bit QJL on its residual. The MSE stage alone
under-estimates inner products (its reconstruction is shrunk toward the centroids); the QJL term corrects
that without bias, at the price of variance — which softmax may or may not forgive (measure it)."""

import math

import mlx.core as mx

from ..codebooks import sphere_codebook
from ..packing import pack, unpack
from ..rotation import gaussian_sketch, make_rotation
from .common import RotatedDomainMethod, check_bits, packed_field, unit_and_norm
from .qjl import sign_bits, signs_from_bits

NAME = "turboquant_prod"


class TurboQuantProd(RotatedDomainMethod):
    name = NAME

    def __init__(self, head_dim: int, bits: int, seed: int = 42):
        self.head_dim, self.bits, self.seed = head_dim, check_bits(bits, 2, 8, NAME), seed
        self.rotation = make_rotation(head_dim, seed)
        self.codebook = sphere_codebook(head_dim, bits - 1)
        self.sketch = gaussian_sketch(head_dim, head_dim, seed)
        self.scale = math.sqrt(math.pi / 2) / head_dim
        self.layout = {
            "idx": packed_field(head_dim, bits - 1),
            "signs": packed_field(head_dim, 1),
            "norm": (1, "float16"),
            "residual_norm": (1, "float16"),
        }
        self.rotated_dim = 2 * head_dim  # [Πx, S·Πx]: the MSE part and the sketch part side by side

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        unit, norm = unit_and_norm(x)
        y = self.rotation.rotate(unit)
        idx = self.codebook.quantize(y)
        residual = y - self.codebook.lookup(idx)
        residual_norm = mx.linalg.norm(residual, axis=-1, keepdims=True)
        return {
            "idx": pack(idx, self.bits - 1),
            "signs": pack(sign_bits(residual @ self.sketch.T), 1),
            "norm": norm,
            "residual_norm": residual_norm.astype(mx.float16),
        }

    def decode_rotated(self, codes: dict[str, mx.array]) -> mx.array:
        norm = codes["norm"].astype(mx.float32)
        mse_part = self.codebook.lookup(unpack(codes["idx"], self.bits - 1, self.head_dim))
        signs = signs_from_bits(unpack(codes["signs"], 1, self.head_dim))
        sketch_part = signs * (self.scale * codes["residual_norm"].astype(mx.float32))
        return mx.concatenate([mse_part, sketch_part], axis=-1) * norm

    def rotate_query(self, q: mx.array) -> mx.array:
        y = self.rotation.rotate(q)
        return mx.concatenate([y, y @ self.sketch.T], axis=-1)

    def unrotate(self, z: mx.array) -> mx.array:
        d = self.head_dim
        return self.rotation.unrotate(z[..., :d] + z[..., d:] @ self.sketch)
