"""Weight quantization with the KV cache's machinery: each row of a linear layer is cut into groups of
`group_size` weights; a group is normalised, rotated (the seeded randomized Hadamard of quant/rotation.py) and
every coordinate coded with the Lloyd-Max codebook of a rotated unit vector (quant/codebooks.py), like a key.

A QuantizedLinear holds only the packed codes, one fp16 scale per group and the bias: bits + 16 / group_size
bits per weight. It keeps no dequantized copy: each call rebuilds the rotated-domain weight, multiplies the
rotated input by it and lets it go (y = x Wᵀ = (x Π_gᵀ)(Ŵ_rot)ᵀ, the rotation applied per group of inputs).
The rebuild is one compiled elementwise kernel from packed bytes to scaled centroids (see `_weight_decoder`),
2.2-6.6x faster than unpacking and looking codes up with MLX's CPU gather (~60 ns a weight); writing the whole
weight each call still bounds decode speed (benchmarks/weights.py --layer-only).

Encoding works on row chunks and finds codes by binary search over the codebook's boundaries, so its
temporaries are a few times one chunk, never a (rows, cols, 2**bits) tensor.
"""

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .codebooks import Codebook, sphere_codebook
from .packing import pack, packed_size, unpack
from .rotation import make_rotation

GROUP_SIZE = 64
ENCODE_CHUNK_WEIGHTS = 1 << 21  # weights encoded per step; bounds encode's temporaries to a few 8 MiB arrays


def nearest_index(codebook: Codebook, y: mx.array) -> mx.array:
    """Index of the nearest centroid (the number of boundaries below y, as Codebook.quantize counts them) by
    binary search: `bits` compare-and-gather steps over y's own shape, no (..., 2**bits) temporary."""
    boundaries = codebook.boundaries
    idx = mx.zeros(y.shape, dtype=mx.uint32)
    step = 1 << (codebook.bits - 1)
    while step:
        idx = idx + mx.where(y > boundaries[idx + (step - 1)], step, 0).astype(mx.uint32)
        step >>= 1
    return idx.astype(mx.uint8)


def _check_layout(in_features: int, bits, group_size) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} must divide the layer's input features ({in_features})")


def encode_rows(weight: mx.array, bits: int, group_size: int = GROUP_SIZE, seed: int = 42):
    """(out, in) weights -> (packed codes (out, packed_size(in, bits)) uint8, scales (out, in / group) fp16).

    The scale of a group is the least-squares gain ⟨y, c⟩ / ⟨c, c⟩ of its rotated weights y against the chosen
    centroids c (not ‖y‖): the same bytes as a norm, and a smaller error."""
    rows, cols = weight.shape
    _check_layout(cols, bits, group_size)
    rotation, codebook = make_rotation(group_size, seed), sphere_codebook(group_size, bits)
    chunk = max(1, ENCODE_CHUNK_WEIGHTS // cols)
    codes, scales = [], []
    for start in range(0, rows, chunk):
        groups = weight[start : start + chunk].astype(mx.float32).reshape(-1, cols // group_size, group_size)
        norm = mx.linalg.norm(groups, axis=-1, keepdims=True)
        unit = rotation.rotate(groups / mx.maximum(norm, 1e-30))
        idx = nearest_index(codebook, unit)
        centroids = codebook.lookup(idx)
        gain = (unit * centroids).sum(axis=-1) / mx.maximum((centroids * centroids).sum(axis=-1), 1e-30)
        codes.append(pack(idx.reshape(-1, cols), bits))
        scales.append((gain * norm[..., 0]).astype(mx.float16))
        mx.eval(codes[-1], scales[-1])  # one chunk's temporaries at a time
    return mx.concatenate(codes), mx.concatenate(scales)


@functools.cache
def _weight_decoder(group_size: int, bits: int, in_features: int):
    """(packed codes, fp16 scales) -> the rotated-domain fp32 weight, compiled into one fused elementwise kernel.

    Codes are read without a gather: where in_features is a multiple of 8, each run of `bits` bytes holds 8 whole
    codes (packing.py's little-endian bit stream), so one word per run and 8 shifts give them; the centroid of a
    code is then picked by a tree of selects on its bits, lowest bit first (2**bits - 1 selects of constants)."""
    centroids = [mx.array(c, dtype=mx.float32) for c in sphere_codebook(group_size, bits).centroids.tolist()]
    word_type = mx.uint32 if bits <= 4 else mx.uint64
    shifts = mx.arange(0, 8 * bits, bits).astype(word_type)

    def codes_of(packed):
        if in_features % 8:
            return unpack(packed, bits, in_features)
        runs = packed.reshape(packed.shape[0], -1, bits).astype(word_type)
        word = runs[..., 0]
        for k in range(1, bits):
            word = word | (runs[..., k] << (8 * k))
        return ((word[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], in_features)

    def decode(packed, scales):
        idx, level, values = codes_of(packed), 0, centroids
        while len(values) > 1:
            bit = ((idx >> level) & 1).astype(mx.bool_)
            values = [mx.where(bit, values[k + 1], values[k]) for k in range(0, len(values), 2)]
            level += 1
        groups = values[0].reshape(packed.shape[0], -1, group_size)
        return (groups * scales[..., None].astype(mx.float32)).reshape(packed.shape[0], in_features)

    return mx.compile(decode)


class QuantizedLinear(nn.Module):
    """A linear layer stored as rotated Lloyd-Max codes: `from_linear(layer, bits)` or `quantize_model`."""

    def __init__(self, codes: mx.array, scales: mx.array, in_features: int, bits: int, group_size: int = GROUP_SIZE,
                 seed: int = 42, bias: mx.array | None = None):
        super().__init__()
        _check_layout(in_features, bits, group_size)
        out_features = scales.shape[0]
        if codes.shape != (out_features, packed_size(in_features, bits)) or codes.dtype != mx.uint8:
            raise ValueError(f"codes must be uint8 of shape {(out_features, packed_size(in_features, bits))}, "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        if scales.shape != (out_features, in_features // group_size):
            raise ValueError(f"scales must have shape {(out_features, in_features // group_size)}, got {tuple(scales.shape)}")
        self.in_features, self.bits, self.group_size, self.seed = in_features, bits, group_size, seed
        self.codes, self.scales = codes, scales
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int = 4, group_size: int = GROUP_SIZE, seed: int = 42):
        codes, scales = encode_rows(layer.weight, bits, group_size, seed)
        return cls(codes, scales, layer.weight.shape[1], bits, group_size, seed, layer.get("bias"))

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, fp16 scales and the bias (the rotation's signs and the codebook are
        a few hundred bytes per (group_size, bits, seed), shared by every layer)."""
        return sum(a.nbytes for a in (self.codes, self.scales, self.get("bias")) if a is not None)

    @property
    def effective_bits(self) -> float:
        """8 · bytes held / weights, the bias included."""
        return 8 * self.nbytes / (self.out_features * self.in_features)

    def rotated_weight(self, dtype=mx.float32) -> mx.array:
        """The (out, in) weight in the rotated domain of each input group, rebuilt from the codes."""
        return _weight_decoder(self.group_size, self.bits, self.in_features)(self.codes, self.scales).astype(dtype)

    def dequantize(self, dtype=mx.float32) -> mx.array:
        """The dense (out, in) weight this layer computes with."""
        rotated = self.rotated_weight().reshape(self.out_features, -1, self.group_size)
        return make_rotation(self.group_size, self.seed).unrotate(rotated).reshape(self.out_features, -1).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        *lead, n = x.shape
        if n != self.in_features:
            raise ValueError(f"input must have {self.in_features} features, got {n}")
        rotated = make_rotation(self.group_size, self.seed).rotate(x.reshape(*lead, -1, self.group_size))
        y = rotated.reshape(*lead, n).astype(x.dtype) @ self.rotated_weight(x.dtype).T
        return y + self.bias if "bias" in self else y

    def _extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = GROUP_SIZE, seed: int = 42,
                   class_predicate=None) -> nn.Module:
    """Replace the model's nn.Linear layers (those `class_predicate(path, module)` accepts, default all) by
    QuantizedLinear, in place; embeddings and norms stay as they are. Returns the model."""
    predicate = class_predicate or (lambda path, module: True)
    replacements = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and predicate(path, module):
            if module.weight.shape[1] % group_size:
                raise ValueError(f"group_size {group_size} must divide {path}'s input features "
                                 f"({module.weight.shape[1]}); exclude it with class_predicate")
            replacements.append((path, QuantizedLinear.from_linear(module, bits, group_size, seed)))
    model.update_modules(tree_unflatten(replacements))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weights as held: QuantizedLinear (ours), MLX's nn.QuantizedLinear (packed
    weight, scales, biases) or dense nn.Linear; biases included."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, nn.QuantizedLinear, nn.Linear)):
            total += sum(a.nbytes for _, a in tree_flatten(module.parameters()))
    return total
