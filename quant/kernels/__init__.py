"""Fused attention and encode over packed codes: the GPU kernels and the CPU fast path.

Every path computes what `attention.compressed_attention`'s portable loop computes, for one code segment:
softmax(q·K̂ᵀ·scale)·V̂ with K̂, V̂ never materialised in fp16. The query is rotated once (⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩),
scores come from the packed codes, values are accumulated in the rotated domain and un-rotated once.
Each path returns the normalised output and the log-sum-exp of its scores, so that code segments and fp16
segments (sinks, recent window) merge exactly.

dispatch.py is the one place a path is chosen; gpu.py launches the GPU kernels, whose sources are src/*.cu,
*.cuh (cuda.py builds them) and src/*.metal (metal.py); cpu.py is the CPU fast path (a native kernel,
src/cpu_attention.c). Methods tell the GPU kernels what they need through `fused_spec()`.
"""

import os

import mlx.core as mx

from . import gpu
from .cpu import (CPU_ENCODE_MIN_ELEMENTS, CPU_MIN_TOKENS, SMALL_APPEND_TOKENS, cpu_attention,  # noqa: F401
                  cpu_encode, cpu_supported, native_encode, rotate_rows)
from .dispatch import BACKENDS, ENV_BACKEND, gpu_backend, requested_backend  # noqa: F401 (the package's API)


def encode(method, x: mx.array) -> dict:
    """method.encode(x) for the cache's appends. On a GPU, methods the encode kernel covers encode in one launch
    (`gpu.encode`); klt's layouts, which no encode kernel covers, encode a decode step's few tokens through
    mx.compile (`gpu.compiled_encode`). On the CPU the native kernel encodes what it covers (`native_encode`: klt, turboquant_mse).
    Elsewhere it is `cpu_encode`: method.encode, bit for bit, with fewer and fused passes."""
    kind, portable = gpu_backend(), os.environ.get(ENV_BACKEND) == "pure"
    if kind is not None and gpu.encode_supported(method) and not portable:
        return gpu.encode(method, x, kind)
    if kind is not None and not portable and x.shape[2] <= gpu.COMPILED_ENCODE_TOKENS and gpu.has_layout(method):
        return gpu.compiled_encode(method)(x)
    codes = native_encode(method, x) if kind is None and not portable else None
    if codes is not None:
        return codes
    if kind is None and x.size < CPU_ENCODE_MIN_ELEMENTS:
        return method.encode(x)
    return cpu_encode(method, x)


def encode_pair(key_method, keys: mx.array, value_method, values: mx.array) -> tuple[dict, dict]:
    """encode(key_method, keys), encode(value_method, values); on CUDA in one launch."""
    if (gpu_backend() == "cuda" and os.environ.get(ENV_BACKEND) != "pure" and keys.shape == values.shape
            and gpu.pair_covers(key_method, value_method)):
        return gpu.encode_pair(key_method, keys, value_method, values)
    return encode(key_method, keys), encode(value_method, values)
