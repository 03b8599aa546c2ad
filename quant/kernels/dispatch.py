"""The one place an attention path is chosen.

Paths: "pure" (the portable loop in quant/attention.py), "prefill" (a GPU under a mask over codes: decode the
layer once and run MLX's fused SDPA), "cpu" (the CPU fast path), "mma" (the CUDA tensor-core kernel), "mma_coded"
(the CUDA tensor-core kernel for any coded layout: klt's mixed bits, log-scale bytes, keys coded before RoPE),
"cuda" and "metal" (the CUDA-core kernel and its Metal twin). `append_kernel` says whether a decode step's append
runs inside the CUDA kernel's launch (the cache asks it). Kernels learn what they need of a method from its
`fused_spec()` (quant/methods/common.py) and nothing else. `backend=` or the environment variable
KVSHARD_ATTENTION=pure|cpu|cuda|metal|prefill forces a path (tests compare them); a forced path that does not
cover the case raises ValueError.
"""

import os
from functools import lru_cache

import mlx.core as mx

from . import gpu
from .cpu import cpu_supported

ENV_BACKEND = "KVSHARD_ATTENTION"  # auto | pure | cpu | cuda | metal | prefill
BACKENDS = ("auto", "pure", "cpu", "cuda", "metal", "prefill")
GPU_PATHS = ("mma", "mma_coded", "cuda", "metal")


def requested_backend(backend: str | None) -> str:
    choice = backend or os.environ.get(ENV_BACKEND) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    return choice


def gpu_backend() -> str | None:
    """The fused-kernel flavour for the default device, or None when it is the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    return _gpu_kind()


@lru_cache(maxsize=None)
def _gpu_kind() -> str | None:
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@lru_cache(maxsize=None)
def _tensor_cores() -> bool:
    """mma.sync m16n8k16 with fp16 inputs and movmatrix: compute capability 8.0 or newer."""
    try:
        return int(mx.device_info().get("compute_capability_major", 0)) >= 8
    except Exception:  # noqa: BLE001 (device_info differs across MLX versions and backends)
        return False


def gpu_kernel(queries, segment, key_method, value_method, honour_env: bool = False) -> str | None:
    """The GPU kernel ("mma", "mma_coded", "cuda" or "metal") that covers attention of these queries over one code
    segment on this device, or None. Keys coded before RoPE are decoded to model space and turned by RoPE in the
    kernel (their rotation differs per token): only mma_coded covers them.
    honour_env: also None when KVSHARD_ATTENTION asks for a path other than this GPU's (the decode step's
    quick check, before `choose`)."""
    kind = gpu_backend()
    if kind is None:
        return None
    if honour_env and os.environ.get(ENV_BACKEND, "auto") not in ("auto", kind):
        return None
    _, n_q_heads, L, D = queries.shape
    rows = (n_q_heads // segment.n_kv_heads) * L
    if segment.key_rope is not None:  # each token's rotation differs: only the kernel that decodes keys covers them
        return _coded_kernel(kind, key_method, value_method, D, rows, len(segment.key_rope[0]))
    return _kernel_for(kind, key_method, value_method, D, rows)


def _coded_kernel(kind: str, key_method, value_method, D: int, rows: int, rope_pairs: int | None) -> str | None:
    covered = kind == "cuda" and _tensor_cores() and gpu.coded_supported(key_method, value_method, D, rows, rope_pairs)
    return "mma_coded" if covered else None


@lru_cache(maxsize=64)
def _kernel_for(kind: str, key_method, value_method, D: int, rows: int) -> str | None:
    kspec, vspec = key_method.fused_spec(), value_method.fused_spec()
    if kspec is None or vspec is None:
        return None
    dim = key_method.rotated_dim
    if kspec.bits is None or vspec.bits is None or value_method.rotated_dim != dim or (
            kspec.signs is not None and dim != D):
        return _coded_kernel(kind, key_method, value_method, D, rows, None)
    if kind == "cuda" and gpu.mma_supported(dim, rows, kspec.bits, vspec.bits) and _tensor_cores():
        return "mma"
    if gpu.gpu_plan(dim, rows, kspec.bits, vspec.bits) is not None:
        return kind
    return _coded_kernel(kind, key_method, value_method, D, rows, None)  # e.g. 3 bits a coordinate


def append_kernel(queries, mask, n_kv_heads: int, key_method, value_method) -> str | None:
    """The CUDA kernel ("mma" or "cuda") whose single launch both appends a decode step's new token to a code
    segment (coding it in place) and attends over the segment, or None: one query token, no mask, and both
    methods coded with their rotation in the kernel (gpu.append_supported)."""
    _, n_q_heads, L, D = queries.shape
    if L != 1 or mask is not None or gpu_backend() != "cuda" or os.environ.get(ENV_BACKEND, "auto") not in ("auto", "cuda"):
        return None
    if not gpu.append_supported(key_method, value_method):
        return None
    kernel = _kernel_for("cuda", key_method, value_method, D, n_q_heads // n_kv_heads)
    return kernel if kernel in ("mma", "cuda") else None


def choose(backend, queries, segments, key_method, value_method, mask) -> str:
    """The path for softmax(q·Kᵀ + mask)·V over these segments (quant/attention.py runs it)."""
    choice = requested_backend(backend)
    codes = [(start, seg) for start, seg in _starts(segments) if seg.is_codes and seg.length]
    if choice == "pure" or (choice == "auto" and not codes):
        return "pure"
    if choice == "prefill":
        return "prefill"
    L, total = queries.shape[2], sum(s.length for s in segments)
    masked = any(masks_codes(mask, L, total, start, seg.length) for start, seg in codes)
    if choice == "cpu":
        if not cpu_supported(key_method, value_method):
            raise ValueError("backend 'cpu' covers turboquant_mse and klt keys and values (and needs a C compiler)")
        return "cpu"
    gpu_kind = gpu_backend()
    if choice == "auto":
        if gpu_kind is None:
            tokens = sum(seg.length for _, seg in codes)
            return "cpu" if cpu_supported(key_method, value_method, tokens) else "pure"
        if masked:
            return "prefill"
        kernel = _common_kernel(queries, codes, key_method, value_method)
        return kernel or "pure"
    if gpu_kind != choice:
        raise ValueError(f"backend {choice!r} needs the default device to be a {choice} GPU")
    if masked:
        raise ValueError(f"backend {choice!r} does not take a mask over code tokens")
    kernel = _common_kernel(queries, codes, key_method, value_method)
    if kernel is None:
        raise ValueError(f"backend {choice!r} does not cover this method, head_dim, bits or group size")
    return kernel


def _common_kernel(queries, codes, key_method, value_method) -> str | None:
    kernels = {gpu_kernel(queries, seg, key_method, value_method) for _, seg in codes}
    return kernels.pop() if len(kernels) == 1 else None


def _starts(segments):
    start = 0
    for segment in segments:
        yield start, segment
        start += segment.length


def masks_codes(mask, n_queries: int, total: int, start: int, length: int) -> bool:
    """Whether the mask hides any of key positions [start, start + length) from any query."""
    if mask is None:
        return False
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        return start + length > total - n_queries + 1
    return True
