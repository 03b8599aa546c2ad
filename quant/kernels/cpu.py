"""The CPU fast path: attention over packed codes and the appends' encode, in a native kernel.

Attention (`cpu_attention`): src/cpu_attention.c, compiled with src/cpu_encode.c by the system C compiler on
first use (-O3 -march=native, OpenMP over the cores; without a compiler the portable path runs instead),
called through ctypes on the evaluated MLX arrays, zero-copy. It reads the packed codes of a segment directly:
per block of 64 tokens it decodes them (one run of 1, 2 or 4 bits in place with constant shifts, other layouts
group by group over the block's tokens from 64-bit windows, 8 codes a vector op: register permutes to 6 bits
with AVX-512, else gathers), scores them against the rotated query, runs the online softmax and accumulates
values in their rotated domain; the query is rotated and the output un-rotated once, by the method's own maps
read as per-head matrices and applied in numpy. Keys coded before RoPE (klt plans) are mapped back by the
per-head synthesis (register tiles of 6 tokens x 16 outputs; x 32 in 512-bit registers where the CPU has
AVX-512), shifted by the key mean and turned by RoPE inside the kernel. fp16 segments (sinks, window) go through
the same kernel as an fp16 layout; the exact merge of the segments runs in numpy beside it: one evaluation of
the inputs, one MLX array out. Covered: every method whose codes are runs of Lloyd-Max coordinates with one
scale per token (turboquant_mse at 1-8 bits, klt), also inside query-aware key scales.

Encode (`native_encode`): the method's transform in MLX (klt's matmul, turboquant's rotation), then nearest
centroids, klt's scale refits and the bit stream in src/cpu_encode.c: one call per append where the methods'
MLX ops are ~20 (turboquant_mse) to a few hundred (klt) small ops, the most of a decode step's append.

Why native: MLX's CPU ops run one pass over memory per op, so attention over codes paid a pass for every
unpack, select, scale and matmul of every block, where fp16 SDPA pays a few. The kernel keeps each block in
L1 and reads every code byte once.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..methods.common import unit_and_norm
from ..methods.klt import KLT
from ..methods.scaled import ScaledKeys
from ..methods.turboquant_mse import TurboQuantMSE
from .object_cache import ObjectCache

# Threads of the native kernel. A parallel call ends at a barrier that waits for every thread, and on a shared
# machine the second core is often busy, so waking a thread costs more than it saves on a small call (a decode
# step over 8K tokens of turboquant_mse codes takes ~2-3 ms per layer on one core). A call that needs at least
# PARALLEL_WORK multiply-adds uses the cores the process may run on (at most MAX_THREADS): keys coded before RoPE
# are synthesised, d x m multiply-adds per key and KV head (~100 M a SmolLM2 layer at 8K tokens, ~8 ms on one
# core), so those calls go parallel from ~3K tokens; plain codes (~0.4 M per 1K tokens and head) from ~35K.
# KVSHARD_CPU_THREADS=N fixes the count. benchmarks/decode_cpu_e2e.py measures 1 and 2 threads side by side.
# The batch arena's calls (one per layer over every co-decoding session's rows) run while the service holds
# OpenBLAS to one thread (service/scheduler.py), so no idle BLAS worker spins on the other core: they go
# parallel from ROWS_PARALLEL_WORK, counted over the rows' own lengths: 8 rows of 4-bit SmolLM2 codes on this
# 2-core machine, quiet, 2 threads against 1: 0.86x at 400 tokens in all, 1.01x at 1K, 1.24x at 2K, 1.6-1.7x
# from 4K to 18K (2026-12-06).
ENV_THREADS = "KVSHARD_CPU_THREADS"
ENV_CACHE = "KVSHARD_KERNEL_CACHE"  # where the compiled kernel is kept; default ~/.cache/kvshard/kernels
SOURCES = tuple(Path(__file__).with_name("src") / name for name in ("cpu_attention.c", "cpu_encode.c"))
# Tried in order: this machine's vector units, then AVX2 + FMA, then the compiler's default target.
ARCH_FLAGS = (("-march=native",), ("-mavx2", "-mfma"), ())
PARALLEL_WORK = 40_000_000
ROWS_PARALLEL_WORK = 2_000_000
MAX_THREADS = 8
CHUNK_TOKENS = 256  # the smallest slice of the context one thread takes (slices merge their partial softmaxes)
MAX_DIM, MAX_BYTES = 512, 1024  # per token: coordinates and code bytes the kernel's buffers hold
# Below this many coded tokens the portable path costs about what the kernel's call does.
CPU_MIN_TOKENS = 256
# MLX builds each compiled encode function with the system C++ compiler the first time it meets it (~10 s on a
# small machine; cached on disk afterwards). Below this size the eager path is about as fast, so small appends
# (tests, single-token decode steps) never pay that compile.
CPU_ENCODE_MIN_ELEMENTS = 1 << 16


def _is_mse(method) -> bool:
    return isinstance(method, TurboQuantMSE)


_FLOATS = ObjectCache()


def _floats(array: mx.array) -> tuple:
    """A codebook array as Python floats, read once: `tolist()` is a device-to-host sync, which at every
    append or attention call would stall MLX's asynchronous pipeline. Keyed by the (long-lived) array."""
    return _FLOATS.derive(array, lambda: tuple(float(v) for v in array.tolist()))


# ---- the native kernel: build and load ---------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvshard" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache directory (once per source, compiler and flags) and return the path.
    Written to a temporary name and renamed, so concurrent processes never load a half-written file."""
    source = b"".join(path.read_bytes() for path in SOURCES)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    errors = []
    for arch in ARCH_FLAGS:
        for threads in (("-fopenmp",), ()):
            flags = ["-O3", "-fPIC", "-shared", "-Wno-psabi", *arch, *threads]
            tag = hashlib.sha256(source + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
            target = _cache_dir() / f"cpu_attention-{tag}.so"
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                result = subprocess.run([compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    os.replace(built, target)
                    return target
                errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


@lru_cache(maxsize=None)
def native_library():
    """The loaded kernel, or None (with one warning saying why) when no C compiler can build it."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("kvshard: no C compiler (gcc/cc, or $CC) found: CPU attention over codes takes the portable "
                      "MLX path, which is several times slower", RuntimeWarning, stacklevel=2)
        return None
    # Idle OpenMP threads sleep rather than spin between calls: MLX and OpenBLAS need the cores in between.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        warnings.warn(f"kvshard: the CPU attention kernel did not build with {compiler} ({err}): CPU attention "
                      "over codes takes the portable MLX path", RuntimeWarning, stacklevel=2)
        return None
    library.kvshard_attend.restype = library.kvshard_attend_rows.restype = library.kvshard_encode.restype = ctypes.c_int
    return library


def _threads(work: int = 0, parallel_work: int = PARALLEL_WORK) -> int:
    """Threads for a kernel call of `work` multiply-adds: KVSHARD_CPU_THREADS when set, else 1 below
    parallel_work and the process's cores (at most MAX_THREADS) from there."""
    value = os.environ.get(ENV_THREADS)
    if value is None:
        return _cores() if work >= parallel_work else 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_THREADS} must be a positive integer, got {value!r}")
    return int(value)


@lru_cache(maxsize=None)
def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


# ---- code layouts ------------------------------------------------------------------------------------------


_i32, _f32 = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)
GROUP_FIELDS = ("group_coord", "group_offset", "group_bits", "group_count", "group_table")


class _Layout(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int32), ("bytes", ctypes.c_int32), ("n_groups", ctypes.c_int32)] + [
        (name, _i32) for name in GROUP_FIELDS] + [
        ("centroids", _f32), ("scale_table", _f32), ("fp16", ctypes.c_int32)]


class _Codes(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("codes_b", "codes_h", "codes_t", "scale_b", "scale_h", "scale_t")]


class _PreRope(ctypes.Structure):
    _fields_ = [("n_pairs", ctypes.c_int32), ("traditional", ctypes.c_int32), ("omega", ctypes.c_void_p),
                ("first_position", ctypes.c_int64), ("synthesis_t", ctypes.c_void_p), ("key_mean", ctypes.c_void_p),
                ("mean_b", ctypes.c_int64), ("mean_h", ctypes.c_int64), ("dim_padded", ctypes.c_int32)]


class _Masking(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("mask_b", "mask_h", "mask_g", "mask_l", "mask_t")] + [
        ("query_len", ctypes.c_int32)]


def _ptr(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)


class CodeLayout:
    """How a method's per-token codes decode, as the kernel reads them: runs of (coordinates, bits, centroids)
    in one little-endian bit stream (quant/packing.py), cut into groups of up to 8 coordinates, and one scale
    per token (fp16, or klt's log-scale byte, given by `scale_table`: the 256 scales it stands for). Holds the
    numpy arrays the ctypes structure points into."""

    def __init__(self, runs: list, width: int, scale_table: np.ndarray | None = None):
        groups, tables, table_at = [], [], 0  # (first coordinate, bit offset, bits, count, centroids' start)
        coord = offset = 0
        for n, b, centroids in runs:
            table = np.zeros(max(16, 1 << b), np.float32)
            table[: 1 << b] = np.asarray(centroids, np.float32)
            # A group's codes come from one 64-bit window shifted by up to 7 bits: at most 57 bits of codes.
            size = 8 if b <= 4 else min(8, 57 // b)
            groups += [(coord + j, offset + j * b, b, min(size, n - j), table_at) for j in range(0, n, size)]
            tables.append(table)
            table_at += table.size
            coord += n
            offset += n * b
        if (offset + 7) // 8 != width:
            raise ValueError(f"code layout holds {offset} bits per token, the method stores {width} bytes")
        self.arrays = a = {"centroids": np.concatenate(tables)}
        if scale_table is not None:
            a["scale_table"] = np.ascontiguousarray(scale_table, np.float32)
        for k, name in enumerate(GROUP_FIELDS):
            a[name] = np.asarray([group[k] for group in groups], np.int32)
        self.dim = coord
        self.struct = _Layout(coord, width, len(groups), *(_ptr(a[name], _i32) for name in GROUP_FIELDS),
                              _ptr(a["centroids"], _f32), _ptr(a["scale_table"], _f32) if "scale_table" in a else None,
                              0)


class Float16Layout:
    """The kernel's layout of fp16 tokens (sinks, the recent window): the values themselves, no scale."""

    def __init__(self, dim: int):
        self.dim = dim
        self.struct = _Layout(dim, 2 * dim, 0, *([None] * len(GROUP_FIELDS)), None, None, 1)


@lru_cache(maxsize=None)
def _float16_layout(dim: int) -> Float16Layout:
    return Float16Layout(dim)


_LAYOUTS = ObjectCache()


def _scale_table(method: KLT) -> np.ndarray | None:
    """The 256 scales klt's log-scale byte stands for, as the method itself decodes them (the kernels read a
    table, not an exp2 per token); None for fp16 scales."""
    if method.plan.norm_bits != 8:
        return None
    return np.ascontiguousarray(np.asarray(method._decode_norm(mx.arange(256).astype(mx.uint8))), np.float32)


def code_layout(method) -> CodeLayout | None:
    """The layout of a method's codes, or None when the kernel does not cover the method. Cached per method
    object (methods live as long as their caches)."""
    return _LAYOUTS.derive(method, lambda: _make_layout(method))


def _make_layout(method) -> CodeLayout | None:
    if isinstance(method, ScaledKeys):  # the scale acts on the query and the output only; codes are inner's
        return _make_layout(method.inner)
    if isinstance(method, TurboQuantMSE):
        runs = [(method.head_dim, method.bits, np.array(method.codebook.centroids))]
        layout = CodeLayout(runs, method.layout["idx"][0])
    elif isinstance(method, KLT):
        runs = [(n, b, np.array(cb.centroids)) for (n, b), cb in zip(method._runs, method.codebooks)]
        layout = CodeLayout(runs, method.layout["idx"][0], _scale_table(method))
    else:
        return None
    width = method.layout["idx"][0]
    return layout if layout.dim <= MAX_DIM and width <= MAX_BYTES else None


# ---- attention ---------------------------------------------------------------------------------------------


def cpu_supported(key_method, value_method, tokens: int | None = None) -> bool:
    """Whether the native kernel covers these methods (and, given `tokens`, whether it is worth calling)."""
    return (
        (tokens is None or tokens >= CPU_MIN_TOKENS)
        and native_library() is not None
        and code_layout(key_method) is not None
        and code_layout(value_method) is not None
        and key_method.head_dim <= MAX_DIM
    )


def _code_tensor(codes: dict) -> tuple:
    """A segment's (B, H, T, ·) code arrays as the kernel's strided view (no copy), and the arrays kept alive."""
    idx, scale = np.asarray(codes["idx"]), np.asarray(codes["norm"])
    if idx.strides[-1] != 1 or idx.strides[2] < idx.shape[3]:  # the kernel reads each token's bytes as its own
        idx = np.ascontiguousarray(idx)
    item = scale.itemsize
    struct = _Codes(idx.ctypes.data, scale.ctypes.data, *idx.strides[:3],
                    *(stride // item for stride in scale.strides[:3]))
    return struct, (idx, scale)


def _masking(allowed, B: int, H: int, g: int, L: int, T: int) -> tuple:
    """The caller's mask (None, bool or additive; (L, T) or (B, 1 or Hq, L, T)) as an additive fp32 array with
    broadcast strides over (B, H, g, L, T)."""
    if allowed is None:
        return _Masking(None, 0, 0, 0, 0, 0, max(L, 1)), None
    if allowed.dtype == mx.bool_:
        allowed = mx.where(allowed, 0.0, -mx.inf)
    allowed = allowed.astype(mx.float32)
    if allowed.ndim == 4:
        allowed = allowed.reshape(allowed.shape[0], -1, g if allowed.shape[1] > 1 else 1, *allowed.shape[-2:])
    mask = np.broadcast_to(np.asarray(allowed), (B, H, g, L, T))
    strides = [s // 4 for s in mask.strides]
    return _Masking(mask.ctypes.data, *strides, L), mask


_SYNTHESES = ObjectCache()


def _padded_synthesis(key_method, H: int, padded: int) -> np.ndarray:
    """(H, m, padded) fp32: column j of head h's synthesis as row j, zero-padded; built once per method."""
    def make():
        synthesis = np.asarray(key_method._synthesis).transpose(0, 2, 1)  # (H or 1, m, d)
        rows = np.zeros((H, synthesis.shape[1], padded), np.float32)
        rows[..., : synthesis.shape[2]] = synthesis
        return rows

    return _SYNTHESES.derive(key_method, make, H, padded)


def _numpy32(a: mx.array) -> np.ndarray:
    """An evaluated fp16/fp32 MLX array as fp32 numpy (numpy reads both without a copy; bf16 goes through MLX)."""
    return np.asarray(a if a.dtype in (mx.float16, mx.float32) else a.astype(mx.float32)).astype(np.float32, copy=False)


def _pre_rope(segment, key_method, B: int, H: int) -> tuple:
    """The kernel's description of keys coded before RoPE: RoPE's angles, the synthesis per head and the key
    mean, their rows zero-padded to whole pairs of vectors (16 floats)."""
    frequencies, traditional, first_position = segment.key_rope
    omega = np.ascontiguousarray(frequencies, np.float64)
    d = key_method.head_dim
    padded = -(-d // 16) * 16
    synthesis_t = _padded_synthesis(key_method, H, padded)
    mean = None
    if segment.key_mean is not None:
        mean = np.zeros((B, H, padded), np.float32)
        mean[..., :d] = _numpy32(segment.key_mean)[:, :, 0]
    struct = _PreRope(omega.size, int(traditional), omega.ctypes.data, int(first_position), synthesis_t.ctypes.data,
                      None if mean is None else mean.ctypes.data, *((0, 0) if mean is None else
                      (mean.strides[0] // 4, mean.strides[1] // 4)), padded)
    return struct, (omega, synthesis_t, mean)


_MATRICES = ObjectCache()


def _head_matrices(method, side: str, H: int, dim: int) -> np.ndarray:
    """(H, dim, ·) fp32: the method's rotate_query (side "query") or unrotate ("output") as one matrix per head,
    read once per method by applying it to the unit vectors. Both are linear maps of the last axis (a rotation,
    klt's synthesis, a key scale), and a numpy product of one decode step's few rows costs microseconds where
    the method's MLX ops cost tens each on this path."""
    def make():
        basis = mx.broadcast_to(mx.eye(dim)[None, None, None], (1, H, 1, dim, dim))
        mapped = (method.rotate_query if side == "query" else method.unrotate)(basis).astype(mx.float32)
        return np.ascontiguousarray(np.asarray(mapped)[0, :, 0])

    return _MATRICES.derive(method, make, side, H)


def _attend_native(queries: np.ndarray, T: int, key_layout, keys: dict, value_layout, values: dict, rope, allowed,
                   g: int, L: int, lengths=None) -> tuple:
    """The native kernel over T tokens of one segment: (out (B, Hkv, R, value dim) fp32, normalised; lse (B, Hkv,
    R)), numpy. queries: (B, Hkv, R = g·L, ·) fp32 as the kernel scores them; keys, values: the segment's code
    arrays (or fp16 tokens), evaluated; lengths: None, or (B,) tokens row b holds (<= T: kvshard_attend_rows)."""
    B, H, R, _ = queries.shape
    q_np = np.ascontiguousarray(queries, np.float32)
    key_tensor, keep_k = _code_tensor(keys)
    value_tensor, keep_v = _code_tensor(values)
    masking, keep_m = _masking(allowed, B, H, g, L, T)
    out = np.empty((B, H, R, value_layout.dim), np.float32)
    lse = np.empty((B, H, R), np.float32)
    # Multiply-adds per token and KV head: scores and values for every row, and a pre-RoPE key's synthesis.
    per_token = R * (key_layout.dim + value_layout.dim) + (key_layout.dim * q_np.shape[-1] if rope is not None else 0)
    if lengths is None:
        threads = _threads(B * H * T * per_token)
    else:
        threads = _threads(H * int(np.sum(lengths)) * per_token, ROWS_PARALLEL_WORK)
    chunk = max(CHUNK_TOKENS, -(-T // (4 * threads)))
    head = (_ptr(q_np, _f32), B, H, R, q_np.shape[-1], ctypes.c_int64(T))
    tail = (ctypes.byref(key_layout.struct), ctypes.byref(key_tensor), ctypes.byref(value_layout.struct),
            ctypes.byref(value_tensor), ctypes.byref(rope) if rope is not None else None, ctypes.byref(masking), chunk,
            threads, _ptr(out, _f32), _ptr(lse, _f32))
    if lengths is None:
        status = native_library().kvshard_attend(*head, *tail)
    else:
        lengths = np.ascontiguousarray(lengths, np.int32)
        status = native_library().kvshard_attend_rows(*head, _ptr(lengths, _i32), *tail)
    del keep_k, keep_v, keep_m
    if status != 0:
        raise RuntimeError("the CPU attention kernel refused its sizes or ran out of memory")
    return out, lse


def _code_part(q: np.ndarray, segment, key_method, value_method, allowed, lengths=None) -> tuple:
    """One code segment in the native kernel: (out (B, Hkv, g·L, m) fp32 in the values' rotated domain,
    normalised; lse (B, Hkv, g·L)), numpy. q: (B, Hkv, g, L, D) fp32 numpy, scaled; allowed: the mask over the
    segment's positions (None, bool or additive), evaluated; the segment's codes evaluated and read up to its
    length, or row b up to lengths[b] (the code arrays may then be numpy)."""
    B, H, g, L, D = q.shape
    pre_rope = segment.key_rope is not None
    if pre_rope and not isinstance(key_method, KLT):
        raise ValueError("keys coded before RoPE need a klt key method")
    queries = q.reshape(B, H, g * L, D)
    if not pre_rope:
        queries = queries @ _head_matrices(key_method, "query", H, D)[None]
    rope, keep_r = _pre_rope(segment, key_method, B, H) if pre_rope else (None, None)
    out, lse = _attend_native(queries, segment.length, code_layout(key_method), segment.key_codes,
                              code_layout(value_method), segment.value_codes, rope, allowed, g, L, lengths)
    del keep_r
    if segment.key_mean is not None and not pre_rope:  # keys were coded as k - mean: q.mean per row back
        mean = _numpy32(segment.key_mean)[:, :, 0]  # (B, H, D)
        lse = lse + np.einsum("bhrd,bhd->bhr", q.reshape(B, H, g * L, D), mean)
    return out, lse


def cpu_rows_attention(q, segment, key_method, value_method, lengths) -> mx.array:
    """Attention over one code segment whose rows hold lengths[b] tokens each (sessions sharing one buffer,
    quant/batch_arena.py), in one kernel call. q: (B, Hkv, g, L, D) fp32, scaled. Returns (B, Hkv, g, L, D) fp32."""
    B, H, g, L, D = q.shape
    mx.eval(q)
    out, _ = _code_part(np.asarray(q), segment, key_method, value_method, None, lengths)
    out = out @ _head_matrices(value_method, "output", H, value_method.rotated_dim)[None]
    return mx.array(out.reshape(B, H, g, L, D))


def _float16_part(q: np.ndarray, segment, allowed) -> tuple:
    """fp16 tokens (sinks, window) in the native kernel, read as they are held: (out (B, Hkv, g·L, D), lse)."""
    B, H, g, L, D = q.shape
    layout = _float16_layout(D)
    keys, values = (a if a.strides[-1] == 2 else np.ascontiguousarray(a)
                    for a in (np.asarray(segment.keys), np.asarray(segment.values)))
    return _attend_native(q.reshape(B, H, g * L, D), segment.length, layout, {"idx": keys.view(np.uint8), "norm": keys},
                          layout, {"idx": values.view(np.uint8), "norm": values}, None, allowed, g, L)


def _exact_part(q: np.ndarray, segment, allowed) -> tuple:
    """fp16 tokens (sinks, window) in numpy: (out (B, Hkv, g·L, D), lse (B, Hkv, g·L)). q: (B, Hkv, g, L, D)."""
    B, H, g, L, D = q.shape
    keys = _numpy32(segment.keys)  # (B, H, t, D)
    scores = np.einsum("bhgld,bhtd->bhglt", q, keys)
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.ndim == 4:
            allowed = allowed.reshape(allowed.shape[0], -1, g if allowed.shape[1] > 1 else 1, *allowed.shape[-2:])
        scores = np.where(allowed, scores, -np.inf) if allowed.dtype == np.bool_ else scores + allowed
    peak = scores.max(-1, keepdims=True)
    peak = np.where(np.isinf(peak), 0.0, peak)
    weights = np.exp(scores - peak)
    total = weights.sum(-1, keepdims=True)
    values = _numpy32(segment.values)
    out = np.einsum("bhglt,bhtd->bhgld", weights, values) / np.maximum(total, 1e-30)
    with np.errstate(divide="ignore"):
        lse = (peak + np.log(total))[..., 0]
    return out.reshape(B, H, g * L, D), lse.reshape(B, H, g * L)


def cpu_attention(q, segments, key_method, value_method, allowed_for) -> mx.array:
    """Attention over every segment (fp16 and codes) on the CPU: code segments in the native kernel, fp16
    ones, the exact merge of all and the query's rotation and the output's un-rotation in numpy (a few
    microseconds each where MLX ops cost tens on this path): one evaluation of the inputs, one array out.
    q: (B, Hkv, g, L, D) fp32, already scaled; allowed_for(start, size): the caller's mask over positions
    [start, start + size) (None, bool or additive). Code segments may hand over buffers longer than their
    length (the kernel reads `length` tokens). Returns (B, Hkv, g, L, D) fp32."""
    if native_library() is None or code_layout(key_method) is None or code_layout(value_method) is None:
        raise ValueError("the CPU kernel does not cover these methods (or no C compiler built it)")
    B, H, g, L, D = q.shape
    starts = np.cumsum([0] + [s.length for s in segments[:-1]])
    masks = [allowed_for(int(start), s.length) for start, s in zip(starts, segments)]
    held = [(s.key_codes, s.value_codes) if s.is_codes else (s.keys, s.values) for s in segments if s.length]
    mx.eval(q, *[m for m in masks if m is not None], held)
    q_np = np.asarray(q)
    coded, exact = [], []
    for segment, allowed in zip(segments, masks):
        if segment.length == 0:
            continue
        if segment.is_codes:
            coded.append(_code_part(q_np, segment, key_method, value_method, allowed))
        elif segment.keys.dtype == mx.float16 and segment.values.dtype == mx.float16 and D <= MAX_DIM:
            exact.append(_float16_part(q_np, segment, allowed))
        else:
            exact.append(_exact_part(q_np, segment, allowed))
    peak = np.max([lse for _, lse in coded + exact], axis=0)
    peak = np.where(np.isinf(peak), 0.0, peak)
    weights = [np.exp(lse - peak) for _, lse in coded + exact]
    total = np.maximum(sum(weights), 1e-30)
    result = np.zeros((B, H, g * L, D), np.float32)
    if coded:
        rotated = sum(w[..., None] * out for w, (out, _) in zip(weights, coded)) / total[..., None]
        result += rotated @ _head_matrices(value_method, "output", H, value_method.rotated_dim)[None]
    if exact:
        result += sum(w[..., None] * out for w, (out, _) in zip(weights[len(coded):], exact)) / total[..., None]
    return mx.array(result.reshape(B, H, g, L, D))


# ---- encode -------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _quantize_pack(boundaries: tuple, bits: int):
    """Compiled nearest-centroid index (count of boundaries below) and byte packing, for bits dividing 8."""
    slots = 8 // bits

    def quantize_pack(y):
        idx = (y > boundaries[0]).astype(mx.uint8)
        for b in boundaries[1:]:
            idx = idx + (y > b).astype(mx.uint8)
        if slots == 1:
            return idx
        idx = idx.reshape(*y.shape[:-1], y.shape[-1] // slots, slots)
        packed = idx[..., 0]
        for k in range(1, slots):
            packed = packed | (idx[..., k] << (k * bits))
        return packed

    return mx.compile(quantize_pack)


@lru_cache(maxsize=None)
def _unit():
    """x / max(‖x‖, 1e-12) in one compiled pass: unit_and_norm's division."""
    return mx.compile(lambda x, norm: x / mx.maximum(norm, 1e-12))


class _RunEncoder(ctypes.Structure):
    _fields_ = [("m", ctypes.c_int32), ("bytes", ctypes.c_int32), ("n_runs", ctypes.c_int32),
                ("run_count", _i32), ("run_bits", _i32), ("run_table", _i32), ("boundaries", _f32),
                ("centroids", _f32), ("energy", _f32), ("energy_heads", ctypes.c_int32), ("refit", ctypes.c_int32),
                ("scale_table", _f32)]


class RunEncoder:
    """What the native encode (src/cpu_encode.c) needs of a method: its runs' codebooks and, for klt, the energy
    weights of its scale refit and its scale format; numpy arrays and the ctypes structure pointing into them."""

    def __init__(self, method):
        klt = isinstance(method, KLT)
        runs = method._runs if klt else [(method.head_dim, method.bits)]
        codebooks = method.codebooks if klt else [method.codebook]
        sizes = [1 << b for _, b in runs]
        starts = np.cumsum([0] + sizes[:-1]).astype(np.int32)
        boundaries, centroids = (np.zeros(sum(sizes), np.float32) for _ in range(2))
        for start, size, codebook in zip(starts, sizes, codebooks):
            boundaries[start : start + size - 1] = np.asarray(codebook.boundaries, np.float32)
            centroids[start : start + size] = np.asarray(codebook.centroids, np.float32)
        energy = np.ascontiguousarray(np.asarray(method._energy, np.float32)[:, 0]) if klt else np.ones((1, 1), np.float32)
        table = _scale_table(method) if klt else None
        self.arrays = a = {"count": np.asarray([n for n, _ in runs], np.int32),
                           "bits": np.asarray([b for _, b in runs], np.int32), "table": starts,
                           "boundaries": boundaries, "centroids": centroids, "energy": energy}
        if table is not None:
            a["scale_table"] = table
        self.width, self.log_scale = method.layout["idx"][0], table is not None
        self.struct = _RunEncoder(sum(n for n, _ in runs), self.width, len(runs), _ptr(a["count"], _i32),
                                  _ptr(a["bits"], _i32), _ptr(a["table"], _i32), _ptr(boundaries, _f32),
                                  _ptr(centroids, _f32), _ptr(energy, _f32), energy.shape[0], int(klt),
                                  _ptr(table, _f32) if table is not None else None)


_ENCODERS = ObjectCache()


def _run_encoder(method) -> RunEncoder:
    return _ENCODERS.derive(method, lambda: RunEncoder(method))


def _native_encode(method, z, norm_dtype) -> tuple:
    """(codes, scales or None) of the rows of z (B, H, n, m; MLX or numpy) in the native kernel; norm_dtype None:
    codes only."""
    if isinstance(z, mx.array):
        mx.eval(z)
    z = np.ascontiguousarray(np.asarray(z), np.float32)
    B, H, n, _ = z.shape
    encoder = _run_encoder(method)
    codes = np.empty((B, H, n, encoder.width), np.uint8)
    norm = np.empty((B, H, n, 1), norm_dtype) if norm_dtype is not None else None
    status = native_library().kvshard_encode(
        _ptr(z, _f32), ctypes.c_int64(B * H * n), ctypes.c_int64(n), H, ctypes.byref(encoder.struct),
        codes.ctypes.data_as(ctypes.c_void_p), None if norm is None else norm.ctypes.data_as(ctypes.c_void_p))
    if status != 0:
        raise RuntimeError("the CPU encode kernel refused its sizes")
    return codes, norm


# Appends of at most this many tokens (a decode step's) run their small transforms in numpy rather than MLX:
# each MLX op costs tens of microseconds on this path (mx.fast.rope with custom frequencies ~250 µs of CPU for
# one token), a numpy product of a few rows a few.
SMALL_APPEND_TOKENS = 16
_TRANSFORMS = ObjectCache()


def _klt_transform(method: KLT) -> np.ndarray:
    """klt's analysis (H or 1, d, m) as numpy, read once per method."""
    return _TRANSFORMS.derive(method, lambda: np.ascontiguousarray(np.asarray(method._encode), np.float32))


def native_encode(method, x: mx.array) -> dict | None:
    """method.encode(x) with the method's transform in MLX (numpy for a decode step's few tokens) and the rest in
    the native kernel (src/cpu_encode.c), in one call where the method runs from ~20 (turboquant_mse) to a few
    hundred (klt) small MLX ops: a decode step appends one token per layer. turboquant_mse: bit for bit (the
    same comparisons; its norm is MLX's). klt: the same codes and scales but where a value lies within float
    rounding of a boundary (its sums run in another order). None when the kernel does not cover the method
    (or no compiler built it)."""
    if native_library() is None or x.ndim != 4:
        return None
    if isinstance(method, KLT) and method.rotated_dim <= MAX_DIM:
        if x.shape[2] <= SMALL_APPEND_TOKENS:
            z = _numpy32(x) @ _klt_transform(method)
        else:
            z = method.to_coded(x)
        codes, norm = _native_encode(method, z, np.uint8 if method.plan.norm_bits == 8 else np.float16)
        return {"idx": mx.array(codes), "norm": mx.array(norm)}
    if _is_mse(method) and method.head_dim <= MAX_DIM:
        unit, norm = unit_and_norm(x)
        codes, _ = _native_encode(method, method.rotation.rotate(unit), None)
        return {"idx": mx.array(codes), "norm": norm}
    return None


def rotate_rows(x: mx.array, offset: int, frequencies: np.ndarray, traditional: bool, inverse: bool = False) -> mx.array:
    """quant/rope.py's `rotate` of a few tokens in numpy (angles in float64), for a decode step's append: RoPE (or
    its inverse) of x (B, H, T, D) at positions offset + 0..T-1."""
    omega = np.asarray(frequencies, np.float64)
    pairs = omega.size
    angles = (offset + np.arange(x.shape[2]))[:, None] * omega[None] * (-1.0 if inverse else 1.0)  # (T, pairs)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    rows = _numpy32(x)
    out = rows.copy()
    first, second = (slice(0, 2 * pairs, 2), slice(1, 2 * pairs, 2)) if traditional else (
        slice(0, pairs), slice(pairs, 2 * pairs))
    a, b = rows[..., first], rows[..., second]
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return mx.array(out)


def cpu_encode(method, x: mx.array) -> dict:
    """method.encode(x), bit for bit, with fewer and fused passes where the method is TurboQuant-MSE.

    The method normalises (unit_and_norm), rotates (randomized Hadamard) and quantizes by comparing every
    coordinate with every boundary through a (…, D, 2^b − 1) intermediate. Here the division is one fused pass
    and counting boundaries + packing another (the rotation is the method's own). Tests check the codes are
    identical to method.encode."""
    if not _is_mse(method) or method.bits not in (1, 2, 4) or method.head_dim % (8 // method.bits):
        return method.encode(x)
    x32 = x.astype(mx.float32)
    norm = mx.linalg.norm(x32, axis=-1, keepdims=True)
    y = method.rotation.rotate(_unit()(x32, norm))
    return {"idx": _quantize_pack(_floats(method.codebook.boundaries), method.bits)(y), "norm": norm.astype(mx.float16)}


def derived_bytes(method) -> int:
    """Bytes the CPU kernels keep derived from a method object while it lives (its per-head matrices, syntheses
    and transforms): part of its cache's memory, which the service's budget counts."""
    return sum(cache.nbytes(method) for cache in (_LAYOUTS, _SYNTHESES, _MATRICES, _ENCODERS, _TRANSFORMS))
