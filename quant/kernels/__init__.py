"""Fused attention over TurboQuant-MSE codes: CUDA and Metal kernels, and the CPU fast path.

Every path computes what `attention.compressed_attention`'s portable loop computes, for one code segment:
softmax(q·K̂ᵀ·scale)·V̂ with K̂, V̂ never materialised in fp16. The query is rotated once (⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩),
scores come from the packed codes, values are accumulated in the rotated domain and un-rotated once.
Each path returns the normalised output and the log-sum-exp of its scores, so that code segments and fp16
segments (sinks, recent window) merge exactly.

GPU (CUDA through `mx.fast.cuda_kernel`, Metal through `mx.fast.metal_kernel`), flash-decoding in two passes:
  1. split: one block per (batch, kv head, slice of the context). A group of LPT lanes reads one token's packed
     key and value bytes with one vector load each; each lane owns C = D / LPT coordinates, looks its codes up
     in the centroids (shared memory), and holds those C coordinates of every query row of the GQA group
     (R = query heads per kv head × query length), so K/V are read once for the whole group. Lanes of a token
     reduce the score with shuffles; online softmax per token slot; the block merges its slots and warps and
     writes (m, l, Σ p·v̂) for its slice.
  2. combine: one block per (batch, kv head, row) merges the slices, normalises, un-rotates (randomized
     Hadamard in shared memory) and writes the output in the query's dtype, plus the row's log-sum-exp.
The query rotation happens inside the split kernel too, so a decode step is two launches; on CUDA,
GPU_SINGLE_LAUNCH makes it one (the last split block of each kv head, found with an atomic ticket, merges the
slices with float4 loads and un-rotates one row per warp). Tickets are slots of one persistent zeroed buffer
that the last block cleans, so no fill kernel runs per call. Appends encode keys and values in one launch
(`encode_pair`: norm, randomized Hadamard rounds by warp shuffles, boundary count, packing). The Metal
kernels mirror the CUDA-core ones line for line and have not been run on Apple hardware.

CUDA tensor-core kernel (`CUDA_MMA_SPLIT`; 4-bit keys and values, head_dim 64 or 128, <= 8 query rows per kv
head, sm_80+): the CUDA-core split kernel above is bound by instruction issue (per token and lane, 2·C
centroid look-ups and 2·C·R fp32 FMAs), so this one moves the products to mma.sync m16n8k16 (fp16 in, fp32
accumulate). Per 16 tokens a warp computes Sᵀ = K̂·Qᵀ (keys dequantized straight into A fragments), an fp32
online softmax in base 2, transposes fp16 P·‖v‖ in registers (movmatrix) into the B fragment of
Oᵀ += V̂ᵀ·Pᵀ, whose A fragments pair two tokens' codes at one coordinate. Dequantization is one byte permute
plus one shared-memory load per code byte (two centroids) from a 256-entry fp16x2 table held once per lane
(64 KB per block, conflict-free). Three steps' codes sit in registers so two are in flight while one is
computed. Products round the query, centroids and P·‖v‖ to fp16, as fp16 SDPA rounds q, K and V: the output
differs from the fp32 portable path by up to ~1e-3 of its magnitude. tests/cuda_emulator.h runs this
kernel's source on the CPU (warp shuffles, mma, movmatrix emulated) so CI checks it without a GPU.

Where the time goes (Llama-3.1-8B decode shape, globaltimer stamps per block on an H100): at 128K tokens the
kernel runs ~0.1 ms (~70 µs of streaming at ~2 TB/s, ~12 µs of set-up: tables, query rotation, the first
loads queuing behind every block's; ~7 µs of final merge); at 32K ~37 µs. The host side is as large at 32K:
building the call's graph (~20-30 µs, a third of it the cache's slicing) and MLX's per-call evaluation.
"""

import itertools
import math
import os
import re
import shutil
from functools import lru_cache

import mlx.core as mx

from .cpu import CPU_ENCODE_MIN_ELEMENTS, CPU_MIN_TOKENS, cpu_code_attention, cpu_encode, cpu_supported

ENV_BACKEND = "KVSHARD_ATTENTION"  # auto | pure | cpu | cuda | metal | prefill
BACKENDS = ("auto", "pure", "cpu", "cuda", "metal", "prefill")
FUSED_METHOD = "turboquant_mse"

GPU_WARPS = 4  # warps per split block
GPU_UNROLL = 4  # token steps whose loads are issued together, per lane group (tuned on an H200)
GPU_TARGET_BLOCKS = 256  # split blocks per call to aim for (tuned on an H200: 256-512 about equal)
GPU_COMBINE_THREADS = 128
GPU_COORDS = None  # coordinates per lane; None picks by group size (benchmarks sweep it)
GPU_SINGLE_LAUNCH = True  # CUDA: split and combine in one launch (the last block merges); else two launches
# CUDA tensor-core kernel (`CUDA_MMA_SPLIT`), taken where it covers the case: 4-bit keys and values, head_dim 64
# or 128, at most 8 query rows per kv head (GQA group x query length), compute capability 8.0 or newer.
GPU_MMA = True
GPU_MMA_WARPS = 4  # warps per split block
GPU_MMA_UNROLL = 1  # 16-token steps per warp step (three steps' codes in registers: two are in flight)
GPU_MMA_TARGET_BLOCKS = 396  # split blocks per call to aim for (3 resident per SM on a 132-SM H100/H200)
MMA_TABLE_BYTES = 256 * 64 * 4  # per block: a 256-entry fp16x2 centroid-pair table per lane, keys and values


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


def _is_mse(method) -> bool:
    return getattr(method, "name", None) == FUSED_METHOD


# ---- GPU ------------------------------------------------------------------------------------------------


def gpu_plan(head_dim: int, rows: int, key_bits: int, value_bits: int) -> dict | None:
    """Launch shape for the split kernel, or None when the fused kernel does not cover this case.

    C (coordinates per lane) is chosen so a lane's codes are one 4-, 8- or 16-byte load and its registers
    (C·R query values + C·R accumulators) stay within budget."""
    return _gpu_plan(head_dim, rows, key_bits, value_bits, GPU_COORDS, GPU_WARPS)


@lru_cache(maxsize=None)
def _gpu_plan(D: int, R: int, key_bits: int, value_bits: int, coords, warps: int) -> dict | None:
    if key_bits not in (1, 2, 4, 8) or value_bits not in (1, 2, 4, 8):
        return None
    if D < 16 or D > 256 or D & (D - 1) or R < 1:
        return None
    if coords:
        C = coords
    else:
        C = 1 << max(0, int(math.log2(max(1, 64 // R))))
        C = min(C, D)
        while C * max(key_bits, value_bits) > 128 and C > 1:
            C //= 2
        while C * min(key_bits, value_bits) < 32 and C < D:
            C *= 2
    lanes = D // C
    if (
        D % C
        or C * R > 128
        or C * min(key_bits, value_bits) < 32
        or C * max(key_bits, value_bits) > 128
        or not 1 <= lanes <= 32
        or R * D * (warps + 1) * 4 > 44 * 1024
    ):
        return None
    return {"C": C, "LPT": lanes}


def mma_supported(head_dim: int, rows: int, key_bits: int, value_bits: int) -> bool:
    """Whether the CUDA tensor-core kernel covers this case (the caller has checked for a CUDA device)."""
    return (GPU_MMA and key_bits == 4 and value_bits == 4 and head_dim in (64, 128) and 1 <= rows <= 8
            and _tensor_cores())


def _mma_splits(batch: int, n_kv_heads: int, tokens: int) -> int:
    """Split blocks per (batch, kv head): near the target grid, each with at least one iteration per warp.
    Tokens per split are worked out in the kernel, so a growing context does not recompile it."""
    per_iteration = 16 * GPU_MMA_UNROLL * GPU_MMA_WARPS
    wanted = max(1, GPU_MMA_TARGET_BLOCKS // (batch * n_kv_heads))
    return max(1, min(wanted, -(-tokens // per_iteration)))


def gpu_supported(queries, segment, key_method, value_method) -> bool:
    idx = segment.key_codes.get("idx")  # other methods' codes are laid out differently
    if idx is None or segment.key_rope is not None:  # keys coded before RoPE cannot be scored as codes
        return False
    _, n_q_heads, L, D = queries.shape
    return _gpu_covers(key_method, value_method, D, (n_q_heads // idx.shape[1]) * L, GPU_COORDS, GPU_WARPS)


@lru_cache(maxsize=64)
def _gpu_covers(key_method, value_method, D: int, rows: int, coords, warps) -> bool:
    if not (_is_mse(key_method) and _is_mse(value_method)):
        return False
    if key_method.rotation.signs is None or value_method.rotation.signs is None:
        return False  # non-power-of-two head dims rotate with a dense matrix: portable path
    return _gpu_plan(D, rows, key_method.bits, value_method.bits, coords, warps) is not None


def _splits(batch: int, n_kv_heads: int, tokens: int) -> int:
    """Tokens per split block: the smallest power of two ≥ 64 that keeps the grid near the target."""
    per_split = 64
    while per_split < 4096 and batch * n_kv_heads * -(-tokens // per_split) > GPU_TARGET_BLOCKS:
        per_split *= 2
    return per_split


@lru_cache(maxsize=None)
def _scale_param(scale: float) -> mx.array:
    return mx.array([scale], dtype=mx.float32)


@lru_cache(maxsize=None)
def _placeholder() -> mx.array:
    return mx.zeros((1, 1, 1, 1), dtype=mx.float16)


# Single-launch tickets: one int per (batch, kv head) counts the split blocks that have finished; the last one
# merges and sets it back to 0. Launches take slots of one zeroed buffer in turn (a slice is a view: no fill
# kernel per call), so two launches share a slot only TICKET_SLOTS / TICKET_STRIDE launches apart, and the
# earlier has long finished and cleaned it by then.
TICKET_STRIDE = 256
TICKET_SLOTS = 1 << 18
_ticket_turn = itertools.count()


@lru_cache(maxsize=None)
def _ticket_buffer() -> mx.array:
    buffer = mx.zeros((TICKET_SLOTS,), dtype=mx.int32)
    mx.eval(buffer)
    return buffer


@lru_cache(maxsize=None)
def _ticket_slots(n: int) -> list:
    buffer = _ticket_buffer()
    slots = [buffer[i : i + n] for i in range(0, TICKET_SLOTS, TICKET_STRIDE)]
    mx.eval(slots)  # views of the buffer, already evaluated: handing one over adds nothing to the graph
    return slots


def _tickets(n: int) -> mx.array:
    if n > TICKET_STRIDE:
        return mx.zeros((n,), dtype=mx.int32)
    slots = _ticket_slots(n)
    return slots[next(_ticket_turn) % len(slots)]


def gpu_attention(queries, segment, key_method, value_method, scale: float, backend: str):
    """One code segment, no mask. queries (B, Hq, L, D) -> (out (B, Hq, L, D) in queries.dtype, lse (B, Hkv, R))."""
    B, n_q_heads, L, D = queries.shape
    kidx, knorm = segment.key_codes["idx"], segment.key_codes["norm"]
    vidx, vnorm = segment.value_codes["idx"], segment.value_codes["norm"]
    n_kv_heads = kidx.shape[1]
    R = (n_q_heads // n_kv_heads) * L
    if backend == "cuda" and mma_supported(D, R, key_method.bits, value_method.bits):
        return _mma_attention(queries, segment, key_method, value_method, scale, R)
    plan = gpu_plan(D, R, key_method.bits, value_method.bits)
    per_split = _splits(B, n_kv_heads, segment.length)
    n_splits = -(-segment.length // per_split)
    kernels_ = _gpu_kernels(backend)
    threads = GPU_WARPS * 32
    has_mean = segment.key_mean is not None
    split_inputs = [
        queries,
        _scale_param(float(scale)),
        key_method.rotation.signs,
        key_method.codebook.centroids,
        value_method.codebook.centroids,
        kidx,
        knorm,
        vidx,
        vnorm,
    ]
    split_template = [
        ("D", D),
        ("R", R),
        ("KB", key_method.bits),
        ("VB", value_method.bits),
        ("LPT", plan["LPT"]),
        ("WARPS", GPU_WARPS),
        ("U", GPU_UNROLL),
        ("TPS", per_split),
        ("ROUNDS", key_method.rotation.signs.shape[0]),
    ]
    partial_shapes = [(B, n_kv_heads, n_splits, R, D), (B, n_kv_heads, n_splits, R, 2)]
    if GPU_SINGLE_LAUNCH and len(kernels_) > 3:
        outs = kernels_[3](
            inputs=split_inputs + [
                value_method.rotation.signs,
                segment.key_mean if has_mean else _placeholder(),
                _tickets(B * n_kv_heads),
            ],
            template=split_template + [
                ("HAS_MEAN", has_mean),
                ("VROUNDS", value_method.rotation.signs.shape[0]),
                ("OutT", queries.dtype),
            ],
            grid=(n_splits * threads, n_kv_heads, B),
            threadgroup=(threads, 1, 1),
            output_shapes=partial_shapes + [(B, n_q_heads, L, D), (B, n_kv_heads, R)],
            output_dtypes=[mx.float32, mx.float32, queries.dtype, mx.float32],
        )
        return outs[2], outs[3]
    split_kernel, combine_kernel = kernels_[0], kernels_[1]
    part_o, part_ml = split_kernel(
        inputs=split_inputs,
        template=split_template,
        grid=(n_splits * threads, n_kv_heads, B),
        threadgroup=(threads, 1, 1),
        output_shapes=partial_shapes,
        output_dtypes=[mx.float32, mx.float32],
    )
    out, lse = combine_kernel(
        inputs=[
            queries,
            _scale_param(float(scale)),
            value_method.rotation.signs,
            segment.key_mean if has_mean else _placeholder(),
            part_o,
            part_ml,
        ],
        template=[
            ("D", D),
            ("R", R),
            ("HAS_MEAN", has_mean),
            ("NT", GPU_COMBINE_THREADS),
            ("ROUNDS", value_method.rotation.signs.shape[0]),
            ("OutT", queries.dtype),
        ],
        grid=(R * GPU_COMBINE_THREADS, n_kv_heads, B),
        threadgroup=(GPU_COMBINE_THREADS, 1, 1),
        output_shapes=[(B, n_q_heads, L, D), (B, n_kv_heads, R)],
        output_dtypes=[queries.dtype, mx.float32],
    )
    return out, lse


def _mma_attention(queries, segment, key_method, value_method, scale: float, R: int):
    """The tensor-core kernel: one launch (the last split block of each kv head merges), or split + combine.
    Everything but the context length is looked up once per configuration: this runs at every decode step."""
    B, n_q_heads, L, D = queries.shape
    key_codes, value_codes, mean = segment.key_codes, segment.value_codes, segment.key_mean
    kidx = key_codes["idx"]
    H = kidx.shape[1]
    plan = _mma_plan(key_method, value_method, float(scale), B, n_q_heads, H, L, D, R, queries.dtype,
                     mean is not None, GPU_MMA_WARPS, GPU_MMA_UNROLL, GPU_SINGLE_LAUNCH)
    kernel, head, tail, template, threads, outs = plan
    n_splits = _mma_splits(B, H, segment.length)
    inputs = [queries, *head, kidx, key_codes["norm"], value_codes["idx"], value_codes["norm"]]
    shapes = [(B, H, n_splits, R, D), (B, H, n_splits, R, 2)]
    grid = (n_splits * threads, H, B)
    if GPU_SINGLE_LAUNCH:
        out = kernel(inputs=inputs + [tail[0], mean if mean is not None else tail[1], _tickets(B * H)],
                     template=template, grid=grid, threadgroup=(threads, 1, 1), output_shapes=shapes + outs[0],
                     output_dtypes=outs[1])
        return out[2], out[3]
    part_o, part_ml = kernel(inputs=inputs, template=template, grid=grid, threadgroup=(threads, 1, 1),
                             output_shapes=shapes, output_dtypes=outs[1][:2])
    return _gpu_kernels("cuda")[1](
        inputs=[queries, head[0], tail[0], mean if mean is not None else tail[1], part_o, part_ml],
        template=[("D", D), ("R", R), ("HAS_MEAN", mean is not None), ("NT", GPU_COMBINE_THREADS),
                  ("ROUNDS", tail[0].shape[0]), ("OutT", queries.dtype)],
        grid=(R * GPU_COMBINE_THREADS, H, B),
        threadgroup=(GPU_COMBINE_THREADS, 1, 1),
        output_shapes=outs[0],
        output_dtypes=outs[1][2:],
    )


@lru_cache(maxsize=64)
def _mma_plan(key_method, value_method, scale, B, n_q_heads, H, L, D, R, dtype, has_mean, warps, unroll, single):
    ksigns, vsigns = key_method.rotation.signs, value_method.rotation.signs
    head = (_scale_param(scale), ksigns, key_method.codebook.centroids, value_method.codebook.centroids)
    template = [("D", D), ("R", R), ("WARPS", warps), ("U", unroll), ("ROUNDS", ksigns.shape[0])]
    if single:
        template += [("HAS_MEAN", has_mean), ("VROUNDS", vsigns.shape[0]), ("OutT", dtype)]
    outs = ([(B, n_q_heads, L, D), (B, H, R)], [mx.float32, mx.float32, dtype, mx.float32])
    kernel = _mma_kernel(single, MMA_TABLE_BYTES + R * D * 4)
    return kernel, head, (vsigns, _placeholder()), template, warps * 32, outs


def _compact(source: str) -> str:
    """CUDA source without comments and indentation: MLX copies the whole text into every launch's
    primitive, so a shorter text is host time saved at each decode step."""
    lines = (re.sub(r"\s*//.*$", "", line).strip() for line in source.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"


@lru_cache(maxsize=None)
def _mma_kernel(single: bool, shared_memory: int):
    kind = "mma_attend" if single else "mma_split"
    inputs, outputs, headers, body = _cuda_parts(kind)
    return mx.fast.cuda_kernel(name=f"kvshard_tq_{kind}", input_names=inputs, output_names=outputs, source=body,
                               header="".join(headers), ensure_row_contiguous=False, shared_memory=shared_memory)


SPLIT_INPUTS = ["q", "params", "signs", "kcent", "vcent", "kidx", "knorm", "vidx", "vnorm"]
SPLIT_OUTPUTS = ["part_o", "part_ml"]
COMBINE_INPUTS = ["q", "params", "signs", "kmean", "part_o", "part_ml"]
COMBINE_OUTPUTS = ["out", "lse"]

CUDA_HEADER = r"""
template <int NW>
__device__ __forceinline__ void kvs_load(const uint8_t* p, uint32_t (&w)[NW]) {
  if constexpr (NW == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (NW == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
}

// Code c of a lane's little-endian bit stream (c and BITS are compile-time constants once unrolled).
template <int BITS, int NW>
__device__ __forceinline__ int kvs_code(const uint32_t (&w)[NW], int c) {
  return (w[(c * BITS) >> 5] >> ((c * BITS) & 31)) & ((1 << BITS) - 1);
}

__device__ __forceinline__ float kvs_finite_or_zero(float m) {
  return m == -cuda::std::numeric_limits<float>::infinity() ? 0.0f : m;
}

// One warp's Hadamard transform (Sylvester order, unnormalised) of a row held E = D / 32 coordinates per
// lane: butterflies in registers below E, shuffles above.
template <int D>
__device__ __forceinline__ void kvs_hadamard_row(float (&v)[D / 32], int lane) {
  constexpr int E = D / 32;
#pragma unroll
  for (int len = 1; len < E; len <<= 1)
#pragma unroll
    for (int e = 0; e < E; ++e)
      if ((e & len) == 0) {
        const float a = v[e], c = v[e + len];
        v[e] = a + c;
        v[e + len] = a - c;
      }
#pragma unroll
  for (int len = E; len < D; len <<= 1) {
    const int partner = len / E;
    const bool upper = lane & partner;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float other = __shfl_xor_sync(0xffffffffu, v[e], partner);
      v[e] = upper ? other - v[e] : v[e] + other;
    }
  }
}

// TurboQuant-MSE encode of one row (vector) by one warp: lane l holds coordinates [l·E, (l+1)·E), E = D / 32.
// Norm by warp reduction; the rotation's rounds as in-register butterflies (partners closer than E) and
// shuffles (farther); then the count of boundaries below each coordinate, packed little-endian into the
// lane's E·BITS/8 bytes. Rows past the end return (whole warps, so the shuffles stay converged).
template <int D, int BITS, int ROUNDS, typename T, typename S, typename St>
__device__ __forceinline__ void kvs_encode_row(const T* x, const S& shape, const St& strides, const float* signs,
                                               const float* sb, uint8_t* idx, __half* norm, int64_t row, int lane) {
  constexpr int E = D / 32;
  constexpr int BYTES = E * BITS / 8;
  const int H = shape[1], T_ = shape[2];
  if (row >= static_cast<int64_t>(shape[0]) * H * T_) return;
  const int t = row % T_, h = (row / T_) % H;
  const int64_t b = row / (static_cast<int64_t>(T_) * H);
  const int64_t base = b * strides[0] + h * strides[1] + t * strides[2];
  float v[E];
  float ss = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] = static_cast<float>(x[base + (lane * E + e) * strides[3]]);
    ss += v[e] * v[e];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float nrm = sqrtf(ss);
  const float inv = 1.0f / fmaxf(nrm, 1e-12f);
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] *= inv;
#pragma unroll
  for (int rd = 0; rd < ROUNDS; ++rd) {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] *= signs[rd * D + lane * E + e];
    kvs_hadamard_row<D>(v, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] *= rsqrtf(static_cast<float>(D));
  }
  uint32_t packed = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    uint32_t code = 0;
#pragma unroll
    for (int i = 0; i < (1 << BITS) - 1; ++i) code += v[e] > sb[i] ? 1u : 0u;
    packed |= code << (e * BITS);
  }
  uint8_t* out = idx + row * (D * BITS / 8) + lane * BYTES;
#pragma unroll
  for (int i = 0; i < BYTES; ++i) out[i] = static_cast<uint8_t>(packed >> (8 * i));
  if (lane == 0) norm[row] = static_cast<__half>(nrm);
}

// The rotation's rounds (±1 diagonal, then Hadamard; unnormalised) on a warp's row, the signs already in
// registers (sg[round][e]).
template <int D, int ROUNDS>
__device__ __forceinline__ void kvs_rotate_row(float (&v)[D / 32], const float (&sg)[ROUNDS][D / 32], int lane) {
#pragma unroll
  for (int rd = 0; rd < ROUNDS; ++rd) {
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] *= sg[rd][e];
    kvs_hadamard_row<D>(v, lane);
  }
}

// The inverse: rounds in reverse, each a Hadamard then its ±1 diagonal (unnormalised).
template <int D, int ROUNDS>
__device__ __forceinline__ void kvs_unrotate_row(float (&v)[D / 32], const float* signs, int lane) {
#pragma unroll
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    kvs_hadamard_row<D>(v, lane);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] *= signs[rd * D + lane * (D / 32) + e];
  }
}

// A split block's result from its warps' (Σ p·v̂ per row and coordinate, (m, l) per row) in shared memory:
// (m, l, Σ p·v̂) of the block's slice. BASE2: the warps' m are in base 2; written in natural-log units.
template <int R, int D, int WARPS, int NT, bool BASE2>
__device__ __forceinline__ void kvs_merge_warps(const float* wacc, const float* wml, float* part_o, float* part_ml,
                                                int64_t row0, int tid) {
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  auto weight = [](float m, float base) { return BASE2 ? exp2f(m - base) : __expf(m - base); };
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D;
    float mb = NEG_INF;
    for (int w = 0; w < WARPS; ++w) mb = fmaxf(mb, wml[(w * R + r) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float v = 0.0f;
    for (int w = 0; w < WARPS; ++w) v += wacc[(w * R + r) * D + i % D] * weight(wml[(w * R + r) * 2], ms);
    part_o[row0 * D + i] = v;
  }
  if (tid < R) {
    float mb = NEG_INF;
    for (int w = 0; w < WARPS; ++w) mb = fmaxf(mb, wml[(w * R + tid) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float lb = 0.0f;
    for (int w = 0; w < WARPS; ++w) lb += wml[(w * R + tid) * 2 + 1] * weight(wml[(w * R + tid) * 2], ms);
    part_ml[(row0 + tid) * 2] = BASE2 ? mb * 0.6931471805599453f : mb;
    part_ml[(row0 + tid) * 2 + 1] = lb;
  }
}

template <int NT>
__device__ __forceinline__ float kvs_block_max(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < NT / 32; ++i) v = fmaxf(v, red[i]);
  __syncthreads();
  return v;
}

template <int NT>
__device__ __forceinline__ float kvs_block_sum(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < NT / 32; ++i) v += red[i];
  __syncthreads();
  return v;
}
"""

CUDA_SPLIT = r"""
  constexpr int C = D / LPT;            // coordinates per lane
  constexpr int TPW = 32 / LPT;         // tokens per warp step
  constexpr int NT = WARPS * 32;
  constexpr int KWORDS = C * KB / 32;
  constexpr int VWORDS = C * VB / 32;
  constexpr int STEP = WARPS * TPW * U;
  constexpr unsigned FULL = 0xffffffffu;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();

  __shared__ float sq[R * D];
  __shared__ float sck[1 << KB];
  __shared__ float scv[1 << VB];
  __shared__ float sacc[WARPS * R * D];
  __shared__ float sml[WARPS * R * 2];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int grp = lane / LPT;
  const int sub = lane % LPT;
  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int H = gridDim.y;
  const int n_splits = gridDim.x;
  const int T = kidx_shape[2];
  const int L = q_shape[2];
  const int G = R / L;

  for (int i = tid; i < (1 << KB); i += NT) sck[i] = kcent[i];
  for (int i = tid; i < (1 << VB); i += NT) scv[i] = vcent[i];
  const float scale = params[0];
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D, d = i % D;
    const int hq = h * G + r / L, pos = r % L;
    const float x = static_cast<float>(
        q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]);
    sq[i] = x * scale;
  }
  __syncthreads();
  // The key rotation: ROUNDS of (±1 diagonal, then Hadamard in Sylvester order as mx.hadamard_transform),
  // in place; the 1/√D of every round is applied once at the end.
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int i = tid; i < R * D; i += NT) sq[i] *= signs[rd * D + i % D];
    __syncthreads();
    for (int len = 1; len < D; len <<= 1) {
      for (int i = tid; i < R * D / 2; i += NT) {
        const int r = i / (D / 2), k = i % (D / 2);
        const int lo = r * D + (k / len) * 2 * len + (k % len);
        const float a = sq[lo], c = sq[lo + len];
        sq[lo] = a + c;
        sq[lo + len] = a - c;
      }
      __syncthreads();
    }
  }
  const float hnorm = powf(static_cast<float>(D), -0.5f * ROUNDS);
  float qr[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) qr[r][c] = sq[r * D + sub * C + c] * hnorm;

  const int start = split * TPS;
  const int end = min(start + TPS, T);
  const uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + sub * (C * KB / 8);
  const uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + sub * (C * VB / 8);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2];
  const auto* knp = knorm + b * knorm_strides[0] + h * knorm_strides[1];
  const auto* vnp = vnorm + b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];

  float m[R], l[R], acc[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
  }

  for (int t0 = start + warp * TPW * U; t0 < end; t0 += STEP) {
    uint32_t kw[U][KWORDS], vw[U][VWORDS];
    float kn[U], vn[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * TPW + grp;
      if (t < end) {
        kvs_load<KWORDS>(kp + t * kt, kw[u]);
        kvs_load<VWORDS>(vp + t * vt, vw[u]);
        kn[u] = static_cast<float>(knp[t * knt]);
        vn[u] = static_cast<float>(vnp[t * vnt]);
      } else {
#pragma unroll
        for (int i = 0; i < KWORDS; ++i) kw[u][i] = 0u;
#pragma unroll
        for (int i = 0; i < VWORDS; ++i) vw[u][i] = 0u;
        kn[u] = 0.0f;
        vn[u] = 0.0f;
      }
    }
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) kc[c] = sck[kvs_code<KB>(kw[u], c)];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float a = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) a = fmaf(qr[r][c], kc[c], a);
        s[u][r] = a;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int off = LPT / 2; off > 0; off >>= 1) s[u][r] += __shfl_xor_sync(FULL, s[u][r], off);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool valid = t0 + u * TPW + grp < end;
#pragma unroll
      for (int r = 0; r < R; ++r) s[u][r] = valid ? s[u][r] * kn[u] : NEG_INF;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mnew = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) mnew = fmaxf(mnew, s[u][r]);
      const float ms = kvs_finite_or_zero(mnew);
      const float corr = __expf(m[r] - ms);
      l[r] *= corr;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] *= corr;
      m[r] = mnew;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][r] = __expf(s[u][r] - ms);
        l[r] += s[u][r];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) vc[c] = scv[kvs_code<VB>(vw[u], c)];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pv = s[u][r] * vn[u];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = fmaf(pv, vc[c], acc[r][c]);
      }
    }
  }

  // Merge the token slots of the warp (lanes with the same `sub`), then the warps of the block.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mw = m[r];
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) mw = fmaxf(mw, __shfl_xor_sync(FULL, mw, off));
    const float f = __expf(m[r] - kvs_finite_or_zero(mw));
    float lw = l[r] * f;
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) lw += __shfl_xor_sync(FULL, lw, off);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      float a = acc[r][c] * f;
#pragma unroll
      for (int off = LPT; off < 32; off <<= 1) a += __shfl_xor_sync(FULL, a, off);
      acc[r][c] = a;
    }
    m[r] = mw;
    l[r] = lw;
  }
  if (grp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int c = 0; c < C; ++c) sacc[(warp * R + r) * D + sub * C + c] = acc[r][c];
      if (sub == 0) {
        sml[(warp * R + r) * 2] = m[r];
        sml[(warp * R + r) * 2 + 1] = l[r];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (static_cast<int64_t>(b * H + h) * n_splits + split) * R;
  kvs_merge_warps<R, D, WARPS, NT, false>(sacc, sml, part_o, part_ml, row0, tid);
"""

# The single-launch variant: the split kernel, then the last block of each (batch, kv head) to finish — found
# with an atomic ticket — merges all splits, un-rotates and writes the output (what the combine kernel does).
ATTEND_INPUTS = SPLIT_INPUTS + ["vsigns", "kmean", "counter"]
ATTEND_OUTPUTS = SPLIT_OUTPUTS + ["out", "lse"]
CUDA_ATTEND_TAIL = r"""
  __shared__ int is_last;
  __shared__ float srm[R], srl[R];
  __shared__ float swt[32 * R];
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* ticket = const_cast<int*>(counter) + (b * H + h);
    is_last = atomicAdd(ticket, 1) == n_splits - 1;
    if (is_last) atomicExch(ticket, 0);  // every block has drawn: the slot is clean for a later launch
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int64_t split0 = static_cast<int64_t>(b * H + h) * n_splits;
  for (int r = warp; r < R; r += WARPS) {
    float mr = NEG_INF;
    for (int s = lane; s < n_splits; s += 32) mr = fmaxf(mr, __ldcg(part_ml + ((split0 + s) * R + r) * 2));
    for (int off = 16; off > 0; off >>= 1) mr = fmaxf(mr, __shfl_xor_sync(FULL, mr, off));
    const float ms = kvs_finite_or_zero(mr);
    float lr = 0.0f;
    for (int s = lane; s < n_splits; s += 32)
      lr += __ldcg(part_ml + ((split0 + s) * R + r) * 2 + 1) * __expf(__ldcg(part_ml + ((split0 + s) * R + r) * 2) - ms);
    for (int off = 16; off > 0; off >>= 1) lr += __shfl_xor_sync(FULL, lr, off);
    if (lane == 0) {
      srm[r] = mr;
      srl[r] = lr;
    }
  }
  __syncthreads();
  // Σ over splits of weight·partial, four coordinates per load, a chunk of splits' weights in shared memory
  // at a time so that the loads of a thread are independent and many are in flight.
  constexpr int QUADS = R * D / 4;
  constexpr int TPER = (QUADS + NT - 1) / NT;
  float4 tacc[TPER];
#pragma unroll
  for (int j = 0; j < TPER; ++j) tacc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s0 = 0; s0 < n_splits; s0 += 32) {
    const int chunk = min(32, n_splits - s0);
    for (int i = tid; i < 32 * R; i += NT) {
      const int k = i / R, r = i % R;
      swt[i] = k < chunk ? __expf(__ldcg(part_ml + ((split0 + s0 + k) * R + r) * 2) - kvs_finite_or_zero(srm[r])) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TPER; ++j) {
      const int i4 = tid + j * NT;
      if (i4 < QUADS) {
        const int r = 4 * i4 / D;
        const float4* po = reinterpret_cast<const float4*>(part_o + (split0 + s0) * R * D) + i4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
        for (int k = 0; k < chunk; ++k) {
          const float4 x = __ldcg(po + k * QUADS);
          const float w = swt[k * R + r];
          v.x += w * x.x;
          v.y += w * x.y;
          v.z += w * x.z;
          v.w += w * x.w;
        }
        tacc[j].x += v.x;
        tacc[j].y += v.y;
        tacc[j].z += v.z;
        tacc[j].w += v.w;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < TPER; ++j) {
    const int i4 = tid + j * NT;
    if (i4 < QUADS) {
      const float l = srl[4 * i4 / D];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      sq[4 * i4] = tacc[j].x * inv;
      sq[4 * i4 + 1] = tacc[j].y * inv;
      sq[4 * i4 + 2] = tacc[j].z * inv;
      sq[4 * i4 + 3] = tacc[j].w * inv;
    }
  }
  __syncthreads();
  // One warp per row: un-rotate with the value rotation's inverse, write the output and the row's lse.
  const float onorm = powf(static_cast<float>(D), -0.5f * VROUNDS);
  const int64_t out0 = static_cast<int64_t>(b * H + h) * R * D;
  for (int r = warp; r < R; r += WARPS) {
    float v[D / 32];
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] = sq[r * D + lane * (D / 32) + e];
    kvs_unrotate_row<D, VROUNDS>(v, vsigns, lane);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) out[out0 + r * D + lane * (D / 32) + e] = static_cast<OutT>(v[e] * onorm);
    float qm = 0.0f;
    if constexpr (HAS_MEAN) {
      const int hq = h * G + r / L, pos = r % L;
      for (int d = lane; d < D; d += 32)
        qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
              static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
      for (int off = 16; off > 0; off >>= 1) qm += __shfl_xor_sync(FULL, qm, off);
      qm *= scale;
    }
    if (lane == 0) lse[(b * H + h) * R + r] = srl[r] > 0.0f ? srm[r] + logf(srl[r]) + qm : NEG_INF;
  }
"""

CUDA_COMBINE = r"""
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  __shared__ float so[D];
  __shared__ float sw[NT];
  __shared__ float red[NT / 32];
  const int tid = threadIdx.x;
  const int r = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int H = gridDim.y;
  const int S = part_ml_shape[2];
  const int L = q_shape[2];
  const int G = R / L;
  const int hq = h * G + r / L, pos = r % L;
  const int64_t split0 = static_cast<int64_t>(b * H + h) * S;

  float mx_ = NEG_INF;
  for (int s = tid; s < S; s += NT) mx_ = fmaxf(mx_, part_ml[((split0 + s) * R + r) * 2]);
  mx_ = kvs_block_max<NT>(mx_, red);
  const float ms = kvs_finite_or_zero(mx_);
  float lsum = 0.0f;
  for (int s = tid; s < S; s += NT)
    lsum += part_ml[((split0 + s) * R + r) * 2 + 1] * __expf(part_ml[((split0 + s) * R + r) * 2] - ms);
  lsum = kvs_block_sum<NT>(lsum, red);
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  // Each output coordinate sums S partials: the splits' weights go to shared memory a chunk at a time, so
  // the loads of a thread are independent (no exp on their path) and the loop unrolls.
  constexpr int PER_THREAD = (D + NT - 1) / NT;
  float acc_d[PER_THREAD];
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) acc_d[j] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += NT) {
    const int chunk = min(NT, S - s0);
    if (tid < chunk) sw[tid] = __expf(part_ml[((split0 + s0 + tid) * R + r) * 2] - ms);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int d = tid + j * NT;
      if (d < D) {
        const float* po = part_o + ((split0 + s0) * R + r) * D + d;
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < chunk; ++k) v += po[static_cast<int64_t>(k) * R * D] * sw[k];
        acc_d[j] += v;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < D) so[tid + j * NT] = acc_d[j] * inv;
  __syncthreads();
  // Un-rotate with the value rotation's inverse: rounds in reverse, each a Hadamard then its ±1 diagonal.
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    for (int len = 1; len < D; len <<= 1) {
      for (int k = tid; k < D / 2; k += NT) {
        const int lo = (k / len) * 2 * len + (k % len);
        const float a = so[lo], c = so[lo + len];
        so[lo] = a + c;
        so[lo + len] = a - c;
      }
      __syncthreads();
    }
    for (int d = tid; d < D; d += NT) so[d] *= signs[rd * D + d];
    __syncthreads();
  }
  const float hnorm = powf(static_cast<float>(D), -0.5f * ROUNDS);
  const int64_t out0 = (static_cast<int64_t>(b * H + h) * R + r) * D;
  for (int d = tid; d < D; d += NT) out[out0 + d] = static_cast<OutT>(so[d] * hnorm);

  float qm = 0.0f;
  if constexpr (HAS_MEAN) {
    // Keys were encoded as k − μ: q·μ is added back to every score of the segment, i.e. to its lse.
    for (int d = tid; d < D; d += NT)
      qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
            static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
    qm = kvs_block_sum<NT>(qm, red) * params[0];
  }
  if (tid == 0) lse[(b * H + h) * R + r] = lsum > 0.0f ? mx_ + logf(lsum) + qm : NEG_INF;
"""

# ---- CUDA tensor-core kernel (4-bit keys and values) ----------------------------------------------------

# The inline-PTX primitives, apart so that tests can run the kernels on a CPU emulator that supplies its own.
CUDA_MMA_ASM = r"""// D += A·B on tensor cores: m16n8k16, fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void kvs_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The transpose of an 8x8 fp16 matrix held one row pair per lane (lane 4g+t: row g, columns 2t, 2t+1).
__device__ __forceinline__ uint32_t kvs_transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float kvs_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

"""

CUDA_MMA_HEADER = r"""
__device__ __forceinline__ uint32_t kvs_half2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The centroid pair (low nibble, high nibble) of byte k of `codes`, as fp16x2, from the calling lane's copy
// of a 256-entry table: one byte permute builds the shared-memory address (code byte in bits 8-15, the
// lane's column in bits 0-7), so a lookup is two instructions and lanes never share a bank.
__device__ __forceinline__ uint32_t kvs_lut(const unsigned char* table, uint32_t codes, uint32_t column, int k) {
  const uint32_t addr = __byte_perm(codes, column, 0x5504 | (k << 4));
  return *reinterpret_cast<const uint32_t*>(table + addr);
}

template <int NW>
__device__ __forceinline__ void kvs_load_codes(const uint8_t* p, int64_t step, bool vec, uint32_t (&w)[NW]) {
  if (vec) {
    kvs_load<NW>(p, w);
  } else {
#pragma unroll
    for (int i = 0; i < NW; ++i)
      w[i] = uint32_t(p[(4 * i) * step]) | (uint32_t(p[(4 * i + 1) * step]) << 8) |
             (uint32_t(p[(4 * i + 2) * step]) << 16) | (uint32_t(p[(4 * i + 3) * step]) << 24);
  }
}

"""

CUDA_MMA_SPLIT = r"""
  // Tensor-core split kernel for 4-bit keys and values, R <= 8 query rows per kv head, D = 64 or 128.
  // Lane 4g+t of a warp. Per 16 tokens: scores Sᵀ (16 tokens x 8 rows) = K̂ (16 x D) · Qᵀ, keys dequantized
  // straight into A fragments (tokens g and g+8, the lane's quarter of their codes); the fp16 probabilities
  // (times the value norms) are transposed in registers into the B fragment of Oᵀ (D x 8 rows) += V̂ᵀ · Pᵀ,
  // whose A fragments pair two tokens' codes at one coordinate. The coordinate order inside a fragment is
  // a fixed permutation, the same for the query and the keys; outputs are written back in natural order.
  constexpr int NT = WARPS * 32;
  constexpr int KSTEPS = D / 16;
  constexpr int KW = D / 32;  // words of one token's key codes per lane: a quarter of the token
  constexpr int VW = D / 64;  // words of one token's value codes per lane: an eighth of the token
  constexpr int MT = D / 16;  // m-tiles of the value product
  constexpr int STEP = 16 * U;
  constexpr int TABLE_BYTES = 256 * 64 * 4;
  constexpr unsigned FULL = 0xffffffffu;
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  extern __shared__ __align__(16) unsigned char kvs_smem[];
  const unsigned char* table = kvs_smem;
  float* sq = reinterpret_cast<float*>(kvs_smem + TABLE_BYTES);  // R x D: rotated query, later the output

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int H = gridDim.y;
  const int n_splits = gridDim.x;
  const int T = kidx_shape[2];
  const int L = q_shape[2];
  const int G = R / L;
  const float scale = params[0];

  const int per = ((T + n_splits - 1) / n_splits + STEP - 1) / STEP * STEP;
  const int start = split * per;
  const int end = min(start + per, T);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2], kd = kidx_strides[3], vd = vidx_strides[3];
  const uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + t * (KW * 4) * kd;
  const uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + g * (VW * 4) * vd;
  const bool vec = kd == 1 && vd == 1 && (reinterpret_cast<uintptr_t>(kp) | static_cast<uintptr_t>(kt)) % (KW * 4) == 0 &&
                   (reinterpret_cast<uintptr_t>(vp) | static_cast<uintptr_t>(vt)) % (VW * 4) == 0;
  const auto* knp = knorm + b * knorm_strides[0] + h * knorm_strides[1];
  const auto* vnp = vnorm + b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];
  const uint32_t kcol = lane * 4, vcol = 128 + lane * 4;

  struct Codes {
    uint32_t k[U][2][KW];  // tokens g, g+8: the lane's quarter of the key codes
    uint32_t v[U][4][VW];  // tokens 2t, 2t+1, 2t+8, 2t+9: the lane's eighth of the value codes
    float kn[U][2], vn[U][2];  // norms of tokens g, g+8
  };
  auto load = [&](int tau, Codes& c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int tok = tau + 16 * u + g + 8 * j;
        if (tok < end) {
          kvs_load_codes<KW>(kp + tok * kt, kd, vec, c.k[u][j]);
          c.kn[u][j] = static_cast<float>(knp[tok * knt]);
          c.vn[u][j] = static_cast<float>(vnp[tok * vnt]);
        } else {
#pragma unroll
          for (int i = 0; i < KW; ++i) c.k[u][j][i] = 0u;
          c.kn[u][j] = 0.0f;
          c.vn[u][j] = 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = tau + 16 * u + 2 * t + (j & 1) + 8 * (j >> 1);
        if (tok < end) {
          kvs_load_codes<VW>(vp + tok * vt, vd, vec, c.v[u][j]);
        } else {
#pragma unroll
          for (int i = 0; i < VW; ++i) c.v[u][j][i] = 0u;
        }
      }
    }
  };

  // The small reads first (centroids, the query, its rotation's signs), then the first two steps' codes: at
  // launch every block floods the memory system, and what the set-up waits for must not queue behind that.
  __shared__ float scent[32];
  const float cent = tid < 32 ? __ldg(tid < 16 ? kcent + tid : vcent + tid - 16) : 0.0f;
  const int r0 = warp;  // the query row this warp rotates (warps >= R have none)
  float v[D / 32], sg[ROUNDS][D / 32];
  if (r0 < R) {
    const int hq = h * G + r0 / L, pos = r0 % L;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      v[e] = static_cast<float>(
          q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + (lane * (D / 32) + e) * q_strides[3]]);
#pragma unroll
      for (int rd = 0; rd < ROUNDS; ++rd) sg[rd][e] = __ldg(signs + rd * D + lane * (D / 32) + e);
    }
  }
  Codes c0, c1, c2;
  int tau = start + warp * STEP;
  if (tau < end) load(tau, c0);
  if (tau + WARPS * STEP < end) load(tau + WARPS * STEP, c1);
  if (tid < 32) scent[tid] = cent;
  __syncthreads();
  // Tables: 256 code bytes x 64 words; words 0-31 are the 32 lanes' copies for keys, 32-63 for values.
  for (int i = tid; i < 256 * 16; i += NT) {
    const int byte = i >> 4, side = (i & 15) < 8 ? 0 : 16;
    const uint32_t w = kvs_half2(scent[side + (byte & 15)], scent[side + (byte >> 4)]);
    reinterpret_cast<uint4*>(kvs_smem)[i] = make_uint4(w, w, w, w);
  }
  // The query rows, rotated by the key rotation, times scale·log2(e) (the softmax runs in base 2).
  for (int r = r0; r < R; r += WARPS) {
    if (r != r0) {
      const int hq = h * G + r / L, pos = r % L;
#pragma unroll
      for (int e = 0; e < D / 32; ++e)
        v[e] = static_cast<float>(
            q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + (lane * (D / 32) + e) * q_strides[3]]);
    }
    kvs_rotate_row<D, ROUNDS>(v, sg, lane);
    const float f = scale * LOG2E * powf(static_cast<float>(D), -0.5f * ROUNDS);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) sq[r * D + lane * (D / 32) + e] = v[e] * f;
  }
  __syncthreads();
  // B fragments of Qᵀ: k-step s, lane (g, t) holds row g at coordinates (D/4)t + 4s + {0, 1} and {2, 3},
  // the coordinates that bytes 2s and 2s+1 of the lane's quarter of a key hold.
  uint32_t qf[KSTEPS][2];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    const int d0 = (D / 4) * t + 4 * s;
    qf[s][0] = g < R ? kvs_half2(sq[g * D + d0], sq[g * D + d0 + 1]) : 0u;
    qf[s][1] = g < R ? kvs_half2(sq[g * D + d0 + 2], sq[g * D + d0 + 3]) : 0u;
  }

  // Oᵀ fragments: o[mt][i] is coordinate (D/8)g + 2mt (i < 2) or that + 1 (i >= 2), row 2t + (i & 1).
  float o[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[mt][i] = 0.0f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // rows 2t, 2t+1 (base 2)
  // Three code buffers: while one step is computed, the next two are in flight.
  auto step = [&](const Codes& cur, int tau, Codes& refill, int tau_refill) {
    if (tau_refill < end) load(tau_refill, refill);
      float s[U][4];  // Sᵀ: (token g, row 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float odd[4];  // two accumulator chains: the k-steps' MMAs overlap
#pragma unroll
        for (int i = 0; i < 4; ++i) s[u][i] = odd[i] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
          const uint32_t w0 = cur.k[u][0][ks / 2], w1 = cur.k[u][1][ks / 2];
          const int k = 2 * (ks % 2);
          kvs_mma(ks % 2 ? odd : s[u], kvs_lut(table, w0, kcol, k), kvs_lut(table, w1, kcol, k),
                  kvs_lut(table, w0, kcol, k + 1), kvs_lut(table, w1, kcol, k + 1), qf[ks][0], qf[ks][1]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) s[u][i] += odd[i];
        const bool in0 = tau + 16 * u + g < end, in1 = tau + 16 * u + g + 8 < end;
        s[u][0] = in0 ? s[u][0] * cur.kn[u][0] : NEG_INF;
        s[u][1] = in0 ? s[u][1] * cur.kn[u][0] : NEG_INF;
        s[u][2] = in1 ? s[u][2] * cur.kn[u][1] : NEG_INF;
        s[u][3] = in1 ? s[u][3] * cur.kn[u][1] : NEG_INF;
      }
      float mx0 = m[0], mx1 = m[1];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        mx0 = fmaxf(mx0, fmaxf(s[u][0], s[u][2]));
        mx1 = fmaxf(mx1, fmaxf(s[u][1], s[u][3]));
      }
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, off));
      }
      const float base0 = kvs_finite_or_zero(mx0), base1 = kvs_finite_or_zero(mx1);
      const float c0 = kvs_exp2(m[0] - base0), c1 = kvs_exp2(m[1] - base1);
      m[0] = mx0;
      m[1] = mx1;
      l[0] *= c0;
      l[1] *= c1;
      if (__any_sync(FULL, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          o[mt][0] *= c0;
          o[mt][1] *= c1;
          o[mt][2] *= c0;
          o[mt][3] *= c1;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p0 = kvs_exp2(s[u][0] - base0), p1 = kvs_exp2(s[u][1] - base1);
        const float p2 = kvs_exp2(s[u][2] - base0), p3 = kvs_exp2(s[u][3] - base1);
        l[0] += p0 + p2;
        l[1] += p1 + p3;
        // Pᵀ fragments: (token g, rows 2t, 2t+1) transposed to (row g, tokens 2t, 2t+1), and tokens + 8.
        const uint32_t pb0 = kvs_transpose8x8(kvs_half2(p0 * cur.vn[u][0], p1 * cur.vn[u][0]));
        const uint32_t pb1 = kvs_transpose8x8(kvs_half2(p2 * cur.vn[u][1], p3 * cur.vn[u][1]));
        // Byte i of lo/hi: code i's low/high nibble of token 2t (low half) and of token 2t+1 (high half).
        uint32_t lo01[VW], hi01[VW], lo89[VW], hi89[VW];
#pragma unroll
        for (int w = 0; w < VW; ++w) {
          lo01[w] = (cur.v[u][0][w] & 0x0F0F0F0Fu) | ((cur.v[u][1][w] << 4) & 0xF0F0F0F0u);
          hi01[w] = ((cur.v[u][0][w] >> 4) & 0x0F0F0F0Fu) | (cur.v[u][1][w] & 0xF0F0F0F0u);
          lo89[w] = (cur.v[u][2][w] & 0x0F0F0F0Fu) | ((cur.v[u][3][w] << 4) & 0xF0F0F0F0u);
          hi89[w] = ((cur.v[u][2][w] >> 4) & 0x0F0F0F0Fu) | (cur.v[u][3][w] & 0xF0F0F0F0u);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int w = mt / 4, k = mt % 4;
          kvs_mma(o[mt], kvs_lut(table, lo01[w], vcol, k), kvs_lut(table, hi01[w], vcol, k),
                  kvs_lut(table, lo89[w], vcol, k), kvs_lut(table, hi89[w], vcol, k), pb0, pb1);
        }
      }
  };
  for (; tau < end; tau += 3 * WARPS * STEP) {
    step(c0, tau, c2, tau + 2 * WARPS * STEP);
    if (tau + WARPS * STEP >= end) break;
    step(c1, tau + WARPS * STEP, c0, tau + 3 * WARPS * STEP);
    if (tau + 2 * WARPS * STEP >= end) break;
    step(c2, tau + 2 * WARPS * STEP, c1, tau + 4 * WARPS * STEP);
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(FULL, l[0], off);
    l[1] += __shfl_xor_sync(FULL, l[1], off);
  }
  __syncthreads();  // the tables are done with: their space takes the warps' partial results
  float* wacc = reinterpret_cast<float*>(kvs_smem);  // WARPS x R x D
  float* wml = wacc + WARPS * R * D;                  // WARPS x R x (m, l)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * t + i;
    if (r < R) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        wacc[(warp * R + r) * D + (D / 8) * g + 2 * mt] = o[mt][i];
        wacc[(warp * R + r) * D + (D / 8) * g + 2 * mt + 1] = o[mt][2 + i];
      }
      if (g == 0) {
        wml[(warp * R + r) * 2] = m[i];
        wml[(warp * R + r) * 2 + 1] = l[i];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (static_cast<int64_t>(b * H + h) * n_splits + split) * R;
  kvs_merge_warps<R, D, WARPS, NT, true>(wacc, wml, part_o, part_ml, row0, tid);
"""

METAL_HEADER = r"""
template <int NW>
inline void kvs_load(const device uint8_t* p, thread uint32_t* w) {
  const device uint32_t* p32 = reinterpret_cast<const device uint32_t*>(p);
  for (int i = 0; i < NW; ++i) w[i] = p32[i];
}

template <int BITS>
inline int kvs_code(const thread uint32_t* w, int c) {
  return (w[(c * BITS) >> 5] >> ((c * BITS) & 31)) & ((1 << BITS) - 1);
}

inline float kvs_finite_or_zero(float m) {
  return m == -INFINITY ? 0.0f : m;
}
"""

METAL_SPLIT = r"""
  constexpr int C = D / LPT;
  constexpr int TPW = 32 / LPT;
  constexpr int NT = WARPS * 32;
  constexpr int KWORDS = C * KB / 32;
  constexpr int VWORDS = C * VB / 32;
  constexpr int STEP = WARPS * TPW * U;

  threadgroup float sq[R * D];
  threadgroup float sck[1 << KB];
  threadgroup float scv[1 << VB];
  threadgroup float sacc[WARPS * R * D];
  threadgroup float sml[WARPS * R * 2];

  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int grp = lane / LPT;
  const int sub = lane % LPT;
  const int split = threadgroup_position_in_grid.x;
  const int h = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int H = threadgroups_per_grid.y;
  const int n_splits = threadgroups_per_grid.x;
  const int T = kidx_shape[2];
  const int L = q_shape[2];
  const int G = R / L;

  for (int i = tid; i < (1 << KB); i += NT) sck[i] = kcent[i];
  for (int i = tid; i < (1 << VB); i += NT) scv[i] = vcent[i];
  const float scale = params[0];
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D, d = i % D;
    const int hq = h * G + r / L, pos = r % L;
    const float x = static_cast<float>(
        q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]);
    sq[i] = x * scale;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int i = tid; i < R * D; i += NT) sq[i] *= signs[rd * D + i % D];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int len = 1; len < D; len <<= 1) {
      for (int i = tid; i < R * D / 2; i += NT) {
        const int r = i / (D / 2), k = i % (D / 2);
        const int lo = r * D + (k / len) * 2 * len + (k % len);
        const float a = sq[lo], c = sq[lo + len];
        sq[lo] = a + c;
        sq[lo + len] = a - c;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  const float hnorm = metal::pow(static_cast<float>(D), -0.5f * ROUNDS);
  float qr[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) qr[r][c] = sq[r * D + sub * C + c] * hnorm;

  const int start = split * TPS;
  const int end = metal::min(start + TPS, T);
  const device uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + sub * (C * KB / 8);
  const device uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + sub * (C * VB / 8);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2];
  const int64_t kn0 = b * knorm_strides[0] + h * knorm_strides[1];
  const int64_t vn0 = b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];

  float m[R], l[R], acc[R][C];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
  }

  for (int t0 = start + warp * TPW * U; t0 < end; t0 += STEP) {
    uint32_t kw[U][KWORDS], vw[U][VWORDS];
    float kn[U], vn[U];
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * TPW + grp;
      if (t < end) {
        kvs_load<KWORDS>(kp + t * kt, kw[u]);
        kvs_load<VWORDS>(vp + t * vt, vw[u]);
        kn[u] = static_cast<float>(knorm[kn0 + t * knt]);
        vn[u] = static_cast<float>(vnorm[vn0 + t * vnt]);
      } else {
        for (int i = 0; i < KWORDS; ++i) kw[u][i] = 0u;
        for (int i = 0; i < VWORDS; ++i) vw[u][i] = 0u;
        kn[u] = 0.0f;
        vn[u] = 0.0f;
      }
    }
    float s[U][R];
    for (int u = 0; u < U; ++u) {
      float kc[C];
      for (int c = 0; c < C; ++c) kc[c] = sck[kvs_code<KB>(kw[u], c)];
      for (int r = 0; r < R; ++r) {
        float a = 0.0f;
        for (int c = 0; c < C; ++c) a = metal::fma(qr[r][c], kc[c], a);
        s[u][r] = a;
      }
    }
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int off = LPT / 2; off > 0; off >>= 1) s[u][r] += simd_shuffle_xor(s[u][r], ushort(off));
    for (int u = 0; u < U; ++u) {
      const bool valid = t0 + u * TPW + grp < end;
      for (int r = 0; r < R; ++r) s[u][r] = valid ? s[u][r] * kn[u] : -INFINITY;
    }
    for (int r = 0; r < R; ++r) {
      float mnew = m[r];
      for (int u = 0; u < U; ++u) mnew = metal::max(mnew, s[u][r]);
      const float ms = kvs_finite_or_zero(mnew);
      const float corr = metal::exp(m[r] - ms);
      l[r] *= corr;
      for (int c = 0; c < C; ++c) acc[r][c] *= corr;
      m[r] = mnew;
      for (int u = 0; u < U; ++u) {
        s[u][r] = metal::exp(s[u][r] - ms);
        l[r] += s[u][r];
      }
    }
    for (int u = 0; u < U; ++u) {
      float vc[C];
      for (int c = 0; c < C; ++c) vc[c] = scv[kvs_code<VB>(vw[u], c)];
      for (int r = 0; r < R; ++r) {
        const float pv = s[u][r] * vn[u];
        for (int c = 0; c < C; ++c) acc[r][c] = metal::fma(pv, vc[c], acc[r][c]);
      }
    }
  }

  for (int r = 0; r < R; ++r) {
    float mw = m[r];
    for (int off = LPT; off < 32; off <<= 1) mw = metal::max(mw, simd_shuffle_xor(mw, ushort(off)));
    const float f = metal::exp(m[r] - kvs_finite_or_zero(mw));
    float lw = l[r] * f;
    for (int off = LPT; off < 32; off <<= 1) lw += simd_shuffle_xor(lw, ushort(off));
    for (int c = 0; c < C; ++c) {
      float a = acc[r][c] * f;
      for (int off = LPT; off < 32; off <<= 1) a += simd_shuffle_xor(a, ushort(off));
      acc[r][c] = a;
    }
    m[r] = mw;
    l[r] = lw;
  }
  if (grp == 0) {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) sacc[(warp * R + r) * D + sub * C + c] = acc[r][c];
      if (sub == 0) {
        sml[(warp * R + r) * 2] = m[r];
        sml[(warp * R + r) * 2 + 1] = l[r];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int64_t row0 = (int64_t(b * H + h) * n_splits + split) * R;
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D;
    float mb = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mb = metal::max(mb, sml[(w * R + r) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float v = 0.0f;
    for (int w = 0; w < WARPS; ++w) v += sacc[(w * R + r) * D + i % D] * metal::exp(sml[(w * R + r) * 2] - ms);
    part_o[row0 * D + i] = v;
  }
  if (tid < R) {
    float mb = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mb = metal::max(mb, sml[(w * R + tid) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float lb = 0.0f;
    for (int w = 0; w < WARPS; ++w) lb += sml[(w * R + tid) * 2 + 1] * metal::exp(sml[(w * R + tid) * 2] - ms);
    part_ml[(row0 + tid) * 2] = mb;
    part_ml[(row0 + tid) * 2 + 1] = lb;
  }
"""

METAL_COMBINE = r"""
  threadgroup float so[D];
  threadgroup float sw[NT];
  threadgroup float red[NT / 32];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int r = threadgroup_position_in_grid.x;
  const int h = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int H = threadgroups_per_grid.y;
  const int S = part_ml_shape[2];
  const int L = q_shape[2];
  const int G = R / L;
  const int hq = h * G + r / L, pos = r % L;
  const int64_t split0 = int64_t(b * H + h) * S;

  float mx_ = -INFINITY;
  for (int s = tid; s < S; s += NT) mx_ = metal::max(mx_, part_ml[((split0 + s) * R + r) * 2]);
  mx_ = simd_max(mx_);
  if (lane == 0) red[warp] = mx_;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  mx_ = red[0];
  for (int i = 1; i < NT / 32; ++i) mx_ = metal::max(mx_, red[i]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float ms = kvs_finite_or_zero(mx_);
  float lsum = 0.0f;
  for (int s = tid; s < S; s += NT)
    lsum += part_ml[((split0 + s) * R + r) * 2 + 1] * metal::exp(part_ml[((split0 + s) * R + r) * 2] - ms);
  lsum = simd_sum(lsum);
  if (lane == 0) red[warp] = lsum;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  lsum = red[0];
  for (int i = 1; i < NT / 32; ++i) lsum += red[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  constexpr int PER_THREAD = (D + NT - 1) / NT;
  float acc_d[PER_THREAD];
  for (int j = 0; j < PER_THREAD; ++j) acc_d[j] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += NT) {
    const int chunk = metal::min(NT, S - s0);
    if (tid < chunk) sw[tid] = metal::exp(part_ml[((split0 + s0 + tid) * R + r) * 2] - ms);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < PER_THREAD; ++j) {
      const int d = tid + j * NT;
      if (d < D) {
        float v = 0.0f;
        for (int k = 0; k < chunk; ++k) v += part_o[((split0 + s0 + k) * R + r) * D + d] * sw[k];
        acc_d[j] += v;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < D) so[tid + j * NT] = acc_d[j] * inv;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    for (int len = 1; len < D; len <<= 1) {
      for (int k = tid; k < D / 2; k += NT) {
        const int lo = (k / len) * 2 * len + (k % len);
        const float a = so[lo], c = so[lo + len];
        so[lo] = a + c;
        so[lo + len] = a - c;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int d = tid; d < D; d += NT) so[d] *= signs[rd * D + d];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float hnorm = metal::pow(static_cast<float>(D), -0.5f * ROUNDS);
  const int64_t out0 = (int64_t(b * H + h) * R + r) * D;
  for (int d = tid; d < D; d += NT) out[out0 + d] = static_cast<OutT>(so[d] * hnorm);

  float qm = 0.0f;
  if (HAS_MEAN) {
    for (int d = tid; d < D; d += NT)
      qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
            static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
    qm = simd_sum(qm);
    if (lane == 0) red[warp] = qm;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    qm = red[0];
    for (int i = 1; i < NT / 32; ++i) qm += red[i];
    qm *= params[0];
  }
  if (tid == 0) lse[(b * H + h) * R + r] = lsum > 0.0f ? mx_ + metal::log(lsum) + qm : -INFINITY;
"""


ENCODE_INPUTS = ["x", "signs", "bounds"]
ENCODE_OUTPUTS = ["idx", "norm"]

# One warp per vector: lane l holds coordinates [l·E, (l+1)·E), E = D / 32. Norm by warp reduction, the
# rotation's rounds as in-register butterflies (partners closer than E) and shuffles (farther), then the
# count of boundaries below each coordinate, packed little-endian into the lane's E·BITS/8 bytes.
CUDA_ENCODE = r"""
  __shared__ float sb[(1 << BITS) - 1];
  for (int i = threadIdx.x; i < (1 << BITS) - 1; i += blockDim.x) sb[i] = bounds[i];
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  kvs_encode_row<D, BITS, ROUNDS>(x, x_shape, x_strides, signs, sb, idx, norm, row, threadIdx.x & 31);
"""

# Keys and values of one append in one launch: the first half of the warps encode keys, the rest values.
ENCODE_PAIR_INPUTS = ["xk", "xv", "ksigns", "vsigns", "kbounds", "vbounds"]
ENCODE_PAIR_OUTPUTS = ["kidx", "knorm", "vidx", "vnorm"]
CUDA_ENCODE_PAIR = r"""
  __shared__ float sbk[(1 << KBITS) - 1];
  __shared__ float sbv[(1 << VBITS) - 1];
  for (int i = threadIdx.x; i < (1 << KBITS) - 1; i += blockDim.x) sbk[i] = kbounds[i];
  for (int i = threadIdx.x; i < (1 << VBITS) - 1; i += blockDim.x) sbv[i] = vbounds[i];
  __syncthreads();
  const int64_t rows = static_cast<int64_t>(xk_shape[0]) * xk_shape[1] * xk_shape[2];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < rows)
    kvs_encode_row<D, KBITS, KROUNDS>(xk, xk_shape, xk_strides, ksigns, sbk, kidx, knorm, row, threadIdx.x & 31);
  else
    kvs_encode_row<D, VBITS, VROUNDS>(xv, xv_shape, xv_strides, vsigns, sbv, vidx, vnorm, row - rows,
                                      threadIdx.x & 31);
"""

METAL_ENCODE = r"""
  constexpr int E = D / 32;
  constexpr int NBOUNDS = (1 << BITS) - 1;
  constexpr int BYTES = E * BITS / 8;
  threadgroup float sb[NBOUNDS];
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int nt = threads_per_threadgroup.x;
  for (int i = thread_position_in_threadgroup.x; i < NBOUNDS; i += nt) sb[i] = bounds[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int H = x_shape[1], T = x_shape[2];
  const int64_t row = int64_t(threadgroup_position_in_grid.x) * (nt / 32) + warp;
  if (row >= int64_t(x_shape[0]) * H * T) return;
  const int t = row % T, h = (row / T) % H, b = row / (int64_t(T) * H);
  const int64_t base = b * x_strides[0] + h * x_strides[1] + t * x_strides[2];
  float v[E];
  float ss = 0.0f;
  for (int e = 0; e < E; ++e) {
    v[e] = static_cast<float>(x[base + (lane * E + e) * x_strides[3]]);
    ss += v[e] * v[e];
  }
  ss = simd_sum(ss);
  const float nrm = metal::sqrt(ss);
  const float inv = 1.0f / metal::max(nrm, 1e-12f);
  for (int e = 0; e < E; ++e) v[e] *= inv;
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int e = 0; e < E; ++e) v[e] *= signs[rd * D + lane * E + e];
    for (int len = 1; len < E; len <<= 1)
      for (int e = 0; e < E; ++e)
        if ((e & len) == 0) {
          const float a = v[e], c = v[e + len];
          v[e] = a + c;
          v[e + len] = a - c;
        }
    for (int len = E; len < D; len <<= 1) {
      const int partner = len / E;
      const bool upper = lane & partner;
      for (int e = 0; e < E; ++e) {
        const float other = simd_shuffle_xor(v[e], ushort(partner));
        v[e] = upper ? other - v[e] : v[e] + other;
      }
    }
    for (int e = 0; e < E; ++e) v[e] *= metal::rsqrt(static_cast<float>(D));
  }
  uint32_t packed = 0;
  for (int e = 0; e < E; ++e) {
    uint32_t code = 0;
    for (int i = 0; i < NBOUNDS; ++i) code += v[e] > sb[i] ? 1u : 0u;
    packed |= code << (e * BITS);
  }
  device uint8_t* out = idx + row * (D * BITS / 8) + lane * BYTES;
  for (int i = 0; i < BYTES; ++i) out[i] = static_cast<uint8_t>(packed >> (8 * i));
  if (lane == 0) norm[row] = static_cast<half>(nrm);
"""


def gpu_encode_supported(method) -> bool:
    if not _is_mse(method) or method.rotation.signs is None:
        return False
    D, bits = method.head_dim, method.bits
    return 32 <= D <= 256 and bits in (1, 2, 4, 8) and (D // 32) * bits % 8 == 0


def gpu_encode(method, x: mx.array, backend: str) -> dict:
    """TurboQuant-MSE encode in one launch: (B, H, n, D) -> {"idx": (B, H, n, D·b/8) uint8, "norm": (B, H, n, 1)}.
    Same arithmetic as the method's encode; summation orders differ, so a coordinate within float rounding of
    a boundary can land on the other side (as between MLX backends)."""
    B, H, n, D = x.shape
    rows = B * H * n
    warps = 4
    idx, norm = _gpu_kernels(backend)[2](
        inputs=[x, method.rotation.signs, method.codebook.boundaries],
        template=[("D", D), ("BITS", method.bits), ("ROUNDS", method.rotation.signs.shape[0])],
        grid=(-(-rows // warps) * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(B, H, n, D * method.bits // 8), (B, H, n, 1)],
        output_dtypes=[mx.uint8, mx.float16],
    )
    return {"idx": idx, "norm": norm}


@lru_cache(maxsize=None)
def _gpu_kernels(backend: str):
    if backend == "cuda":
        make, header, split, combine, encode_ = (
            mx.fast.cuda_kernel, CUDA_HEADER, CUDA_SPLIT, CUDA_COMBINE, CUDA_ENCODE)
    elif backend == "metal":
        make, header, split, combine, encode_ = (
            mx.fast.metal_kernel, METAL_HEADER, METAL_SPLIT, METAL_COMBINE, METAL_ENCODE)
    else:
        raise ValueError(f"backend must be 'cuda' or 'metal', got {backend!r}")
    # Codes are read through their strides: the cache hands over slices of preallocated buffers, and a
    # contiguous copy would cost a full pass over the history at every step.
    return (
        make(name="kvshard_tq_split", input_names=SPLIT_INPUTS, output_names=SPLIT_OUTPUTS, source=split,
             header=header, ensure_row_contiguous=False),
        make(name="kvshard_tq_combine", input_names=COMBINE_INPUTS, output_names=COMBINE_OUTPUTS, source=combine,
             header=header, ensure_row_contiguous=False),
        make(name="kvshard_tq_encode", input_names=ENCODE_INPUTS, output_names=ENCODE_OUTPUTS, source=encode_,
             header=header, ensure_row_contiguous=False),
    ) + (
        (make(name="kvshard_tq_attend", input_names=ATTEND_INPUTS, output_names=ATTEND_OUTPUTS,
              source=split + CUDA_ATTEND_TAIL, header=header, ensure_row_contiguous=False),
         make(name="kvshard_tq_encode_pair", input_names=ENCODE_PAIR_INPUTS, output_names=ENCODE_PAIR_OUTPUTS,
              source=CUDA_ENCODE_PAIR, header=header, ensure_row_contiguous=False))
        if backend == "cuda" else ()
    )


@lru_cache(maxsize=None)
def _cuda_parts(kind: str) -> tuple:
    """(input names, output names, header pieces, body) of a CUDA kernel; the tensor-core kernel's compacted,
    with its inline-PTX piece kept apart (CUDA_MMA_ASM) for tests that supply their own."""
    if kind in ("mma_split", "mma_attend"):
        body = CUDA_MMA_SPLIT + (CUDA_ATTEND_TAIL if kind == "mma_attend" else "")
        names, outputs = (ATTEND_INPUTS, ATTEND_OUTPUTS) if kind == "mma_attend" else (SPLIT_INPUTS, SPLIT_OUTPUTS)
        return names, outputs, (_compact(CUDA_HEADER), CUDA_MMA_ASM, _compact(CUDA_MMA_HEADER)), _compact(body)
    return {
        "split": (SPLIT_INPUTS, SPLIT_OUTPUTS, (CUDA_HEADER,), CUDA_SPLIT),
        "combine": (COMBINE_INPUTS, COMBINE_OUTPUTS, (CUDA_HEADER,), CUDA_COMBINE),
        "encode": (ENCODE_INPUTS, ENCODE_OUTPUTS, (CUDA_HEADER,), CUDA_ENCODE),
        "encode_pair": (ENCODE_PAIR_INPUTS, ENCODE_PAIR_OUTPUTS, (CUDA_HEADER,), CUDA_ENCODE_PAIR),
        "attend": (ATTEND_INPUTS, ATTEND_OUTPUTS, (CUDA_HEADER,), CUDA_SPLIT + CUDA_ATTEND_TAIL),
    }[kind]


def cuda_kernel_function(kind: str, dtypes: dict, template: dict, name: str = "kvshard_check") -> tuple:
    """(header pieces, the `__global__` function) as MLX generates them for one instantiation of a CUDA kernel:
    parameters (pointers, then shapes and strides the body uses), template constants, body."""
    names, outputs, headers, body = _cuda_parts(kind)
    params = []
    for input_name in names:
        params.append(f"    const {dtypes.get(input_name, 'float')}* {input_name}")
        for suffix, kind_ in (("_shape", "Shape"), ("_strides", "Strides")):
            if input_name + suffix in body:
                params.append(f"    const __grid_constant__ {kind_} {input_name}{suffix}")
    for output_name in outputs:
        params.append(f"    {dtypes.get(output_name, 'float')}* {output_name}")
    consts = []
    for key, value in template.items():
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {key} = {value};")
        else:
            consts.append(f"  using {key} = {value};")
    function = (
        f"namespace mlx::core::cu {{\n__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + body + "\n}\n}\n"
    )
    return headers, function


def cuda_translation_unit(kind: str, dtypes: dict, template: dict) -> str:
    """The CUDA source MLX would hand NVRTC for one instantiation, with a stand-in for MLX's device header,
    so `nvcc` can compile-check the kernels on a machine without a GPU (tests/test_kernels.py does)."""
    stand_in = (
        "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
        "#include <cuda/std/array>\n#include <cuda/std/limits>\n"
        "namespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 8>;\n"
        "using Strides = cuda::std::array<int64_t, 8>;\n}\n"
    )
    headers, function = cuda_kernel_function(kind, dtypes, template)
    return stand_in + "".join(headers) + function


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


# ---- encode -------------------------------------------------------------------------------------------


def encode(method, x: mx.array) -> dict:
    """method.encode(x) for the cache's appends. On a GPU, TurboQuant-MSE encodes in one fused kernel
    (`gpu_encode`). Elsewhere it is `cpu_encode`: method.encode, bit for bit, with fewer and fused passes."""
    gpu = gpu_backend()
    if gpu is not None and gpu_encode_supported(method) and os.environ.get(ENV_BACKEND) != "pure":
        return gpu_encode(method, x, gpu)
    if gpu is None and x.size < CPU_ENCODE_MIN_ELEMENTS:
        return method.encode(x)
    return cpu_encode(method, x)


def encode_pair(key_method, keys: mx.array, value_method, values: mx.array) -> tuple[dict, dict]:
    """encode(key_method, keys), encode(value_method, values); on CUDA in one launch."""
    gpu = gpu_backend()
    if (gpu == "cuda" and os.environ.get(ENV_BACKEND) != "pure" and keys.shape == values.shape
            and gpu_encode_supported(key_method) and gpu_encode_supported(value_method)):
        B, H, n, D = keys.shape
        rows, warps = B * H * n, 4
        kidx, knorm, vidx, vnorm = _gpu_kernels(gpu)[4](
            inputs=[keys, values, key_method.rotation.signs, value_method.rotation.signs,
                    key_method.codebook.boundaries, value_method.codebook.boundaries],
            template=[("D", D), ("KBITS", key_method.bits), ("VBITS", value_method.bits),
                      ("KROUNDS", key_method.rotation.signs.shape[0]),
                      ("VROUNDS", value_method.rotation.signs.shape[0])],
            grid=(-(-2 * rows // warps) * warps * 32, 1, 1),
            threadgroup=(warps * 32, 1, 1),
            output_shapes=[(B, H, n, D * key_method.bits // 8), (B, H, n, 1),
                           (B, H, n, D * value_method.bits // 8), (B, H, n, 1)],
            output_dtypes=[mx.uint8, mx.float16, mx.uint8, mx.float16],
        )
        return {"idx": kidx, "norm": knorm}, {"idx": vidx, "norm": vnorm}
    return encode(key_method, keys), encode(value_method, values)
