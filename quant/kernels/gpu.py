"""Launching the fused GPU kernels: attention over one code segment, and the appends' encode.

Attention is flash-decoding: split blocks of one (batch, kv head, slice of the context) score packed codes in
the rotated domain and accumulate values there; the splits are merged, normalised and un-rotated. Which
kernel runs is decided in dispatch.py; everything a kernel needs of a method comes from `fused_spec()`. When
a spec has no in-kernel rotation (klt's per-head transform, query-aware key scales), the method's own
rotate_query / unrotate run around the kernel and the kernel runs with zero rotation rounds.

CUDA-core kernel (split.cu): a group of LPT lanes reads one token's packed key and value bytes with one vector
load each; each lane owns C = D / LPT coordinates for all R query rows of its kv head. Tensor-core kernel
(mma_split.cu; 4-bit or 2-bit keys and values of one width, head_dim 64 or 128, <= 8 rows, sm_80+): per 16
tokens a warp computes scores and value sums with mma.sync m16n8k16 (fp16 in, fp32 accumulate), centroid pairs
from a per-lane shared-memory table (a code byte at 4 bits, a nibble at 2); products round the query, centroids and
P·‖v‖ to fp16, as fp16 SDPA rounds q, K and V. On CUDA one launch does it all (GPU_SINGLE_LAUNCH: the last split
block of each kv head, found with an atomic ticket, merges); tickets are slots of one persistent zeroed buffer that
the last block cleans. The decode step's launch also appends (mma_append / append): that last block codes the new
token into the cache's preallocated code buffers in place (row `lengths`, which no block of the launch reads) and
attends it from those codes, so a decode step is one launch per layer: no encode launch, no slice updates. With an
fp16 window the cache holds it as a ring that the same launch updates (mma_append_ring / append_ring): the oldest
token is coded, the new one takes its slot, the ring is attended exactly.

Coded-layout kernel (mma_coded.cu, then combine.cu; sm_80+, head_dim 64 or 128, <= 8 rows): codes of any layout a
spec describes by its runs (klt's calibrated plans: per-coordinate bit widths, 8-bit log scales), keys decoded into
model space through the synthesis on tensor cores and, when coded before RoPE, turned by RoPE at their positions;
values summed in the coded domain and mapped back by the method (`coded_attention`). A decode step's merge is one
more launch (coded_merge.cu, `coded_decode`): the splits merged, the values mapped back through the spec's synthesis,
the fp16 sinks and window attended exactly beside them; klt's tokens leaving the window are coded under mx.compile
(`compiled_encode`).
"""

import itertools
import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from . import cuda, metal

GPU_WARPS = 4  # warps per split block
GPU_UNROLL = 4  # token steps whose loads are issued together, per lane group (tuned on an H200)
GPU_TARGET_BLOCKS = 256  # split blocks per call to aim for (tuned on an H200: 256-512 about equal)
GPU_COMBINE_THREADS = 128
GPU_COORDS = None  # coordinates per lane; None picks by group size (benchmarks sweep it)
GPU_SINGLE_LAUNCH = True  # CUDA: split and combine in one launch (the last block merges); else two launches
GPU_MMA = True
GPU_MMA_WARPS = 4  # warps per split block
GPU_MMA_UNROLL = 1  # 16-token steps per warp step
# Code buffers per warp by head_dim: while one 16-token step is computed, the next NB - 1 are in flight. At
# head_dim 64 three left the warps stalled on their loads (Nsight on an H200: 0.55 TB/s, 57% of the stalls
# long-scoreboard, 12 warps per SM); at 128 a fourth buffer would cost the registers of a resident block.
# ptxas (sm_90), 4 bits: 103 / 125 / 128 registers a thread at head_dim 64 with 3 / 4 / 5 buffers, 128 / 164 at
# 128 with 2 / 3; 2 bits: 128 at both defaults.
GPU_MMA_BUFFERS = {64: 5, 128: 3}
# Split blocks per call to aim for (3 resident per SM on a 132-SM H100/H200). 132 was 10-25% faster for one
# layer at batch 1 (benchmarks/tune_mma.py, results/tune_mma_gpu.json) but 1.4-2.1x slower at batch 8, and no
# faster end to end (results/speed_*_gpu_target132.json).
GPU_MMA_TARGET_BLOCKS = 396


def mma_shared_bytes(D: int, R: int, warps: int, bits: int) -> int:
    """Dynamic shared memory of a tensor-core block, as mma_split.cu lays it out: the centroid-pair table (a
    row of 64 words per code pair: 64 KB at 4 bits, 4 KB at 2) or the warps' partial results, whichever is
    larger, then the rotated query."""
    table = (1 << (2 * bits)) * 64 * 4
    return -(-max(table, warps * R * (D + 2) * 4) // 16) * 16 + R * D * 4


def gpu_plan(head_dim: int, rows: int, key_bits: int, value_bits: int) -> dict | None:
    """Launch shape for the CUDA-core split kernel, or None when it does not cover this case.

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
    """Whether the tensor-core kernel covers this case (dispatch checks the device): keys and values of one
    width, 4 or 2 bits (one centroid-pair table)."""
    return GPU_MMA and key_bits == value_bits and key_bits in (2, 4) and head_dim in (64, 128) and 1 <= rows <= 8


def _mma_splits(batch: int, n_kv_heads: int, tokens: int) -> int:
    """Split blocks per (batch, kv head): near the target grid, each with at least one iteration per warp.
    Tokens per split are worked out in the kernel, so a growing context does not recompile it."""
    per_iteration = 16 * GPU_MMA_UNROLL * GPU_MMA_WARPS
    wanted = max(1, GPU_MMA_TARGET_BLOCKS // (batch * n_kv_heads))
    return max(1, min(wanted, -(-tokens // per_iteration)))


def _splits(batch: int, n_kv_heads: int, tokens: int) -> int:
    """Tokens per split block: the smallest power of two ≥ 64 that keeps the grid near the target."""
    per_split = 64
    while per_split < 4096 and batch * n_kv_heads * -(-tokens // per_split) > GPU_TARGET_BLOCKS:
        per_split *= 2
    return per_split


@lru_cache(maxsize=None)
def _scalar(value: float) -> mx.array:
    return mx.array([value], dtype=mx.float32)


@lru_cache(maxsize=None)
def _placeholder(shape: tuple = (1, 1, 1, 1), dtype=mx.float16) -> mx.array:
    return mx.zeros(shape, dtype=dtype)


@lru_cache(maxsize=4096)
def _ring_slot(slot: int) -> mx.array:
    return mx.array([slot], dtype=mx.int32)


@lru_cache(maxsize=4096)
def row_lengths(length: int, batch: int) -> mx.array:
    """Every row holding `length` tokens, cached: decode steps of all layers share one array per offset."""
    return mx.array([length] * batch, dtype=mx.int32)


# Single-launch tickets: one int per (batch, kv head) counts the split blocks that have finished; the last one
# merges and sets it back to 0. Launches take slots of one zeroed buffer in turn (a slice is a view: no fill
# kernel per call), so two launches share a slot only TICKET_SLOTS / TICKET_STRIDE launches apart, and the
# earlier has long finished and cleaned it by then.
TICKET_STRIDE = 256
TICKET_SLOTS = 1 << 18
_ticket_turn = itertools.count()


@lru_cache(maxsize=None)
def _ticket_slots(n: int) -> list:
    buffer = mx.zeros((TICKET_SLOTS,), dtype=mx.int32)
    slots = [buffer[i : i + n] for i in range(0, TICKET_SLOTS, TICKET_STRIDE)]
    mx.eval(slots)  # views of the buffer, already evaluated: handing one over adds nothing to the graph
    return slots


def _tickets(n: int) -> mx.array:
    if n > TICKET_STRIDE:
        return mx.zeros((n,), dtype=mx.int32)
    slots = _ticket_slots(n)
    return slots[next(_ticket_turn) % len(slots)]


@lru_cache(maxsize=64)
def _specs(key_method, value_method):
    """(key spec, value spec, key signs or a zero-round stand-in, value signs or one, dim) of a method pair."""
    kspec, vspec = key_method.fused_spec(), value_method.fused_spec()
    dim = key_method.rotated_dim
    none = _placeholder((1, dim), mx.float32)
    return kspec, vspec, none if kspec.signs is None else kspec.signs, none if vspec.signs is None else vspec.signs, dim


def append_supported(key_method, value_method) -> bool:
    """Whether the decode step's single launch (mma_append / append) can code the new token itself: both
    methods' rotations in the kernel, of one width the encode covers."""
    return GPU_SINGLE_LAUNCH and _append_supported(key_method, value_method)


@lru_cache(maxsize=64)
def _append_supported(key_method, value_method) -> bool:
    return key_method.rotated_dim == value_method.rotated_dim and all(
        spec is not None and spec.signs is not None and _encodable(m.rotated_dim, spec.bits)
        for m, spec in ((key_method, key_method.fused_spec()), (value_method, value_method.fused_spec())))


def attention(queries, segment, key_method, value_method, scale: float, kernel: str, lengths=None,
              with_lse: bool = False, append=None, ring=None):
    """Attention of (B, Hq, L, D) queries over one code segment, no mask, with the kernel dispatch chose.
    lengths: (B,) int32 tokens held per row (default: all `segment.length`); the code buffers may be longer.
    append: the decode step's new (keys, values), (B, Hkv, 1, D) (dispatch.append_kernel said yes): coded into
    row `lengths` of the segment's buffers in place by the same launch and attended with the rest.
    ring: with append, (keys, values, oldest slot) of a full fp16 window held as a ring, (B, Hkv, W, D): the
    oldest token is the one coded, the new one takes its slot, and the ring is attended exactly.
    Returns (out (B, Hq, L, D) in queries.dtype, lse (B, Hkv, R) or None unless with_lse)."""
    if kernel == "mma_coded":  # merged with fp16 segments (with_lse) in float32: no round trip through fp16
        if not with_lse and coded_merge_supported(value_method, queries.shape[3]):
            return coded_decode(queries, segment, key_method, value_method, scale, lengths=lengths), None
        out, lse = coded_attention(queries, segment, key_method, value_method, scale, lengths)
        return (out, lse) if with_lse else (out.astype(queries.dtype), None)
    B, n_q_heads, L, D = queries.shape
    if lengths is None:
        lengths = row_lengths(segment.length, B)
    if append is not None:
        window = 0 if ring is None else ring[0].shape[2]
        out, lse = append_plan(kernel, queries, segment, key_method, value_method, scale, window)(
            queries, append, lengths, ring)
        return out, lse if with_lse else None
    H = segment.n_kv_heads
    G = n_q_heads // H
    kspec, vspec, ksigns, vsigns, dim = _specs(key_method, value_method)
    q = queries
    if kspec.signs is None:  # the method's transform, outside the kernel: rotate_query takes (B, H, G, L, D)
        q = key_method.rotate_query(queries.reshape(B, H, G, L, D)).reshape(B, n_q_heads, L, dim)
        q = q.astype(queries.dtype)
    has_mean = segment.key_mean is not None and kspec.signs is not None
    out, lse = _launch(kernel, q, segment, kspec, vspec, ksigns, vsigns, float(scale), has_mean, lengths, G * L,
                       queries.dtype)
    if vspec.signs is None:
        out = value_method.unrotate(out.reshape(B, H, G, L, dim)).reshape(B, n_q_heads, L, D).astype(queries.dtype)
    if not with_lse:
        return out, None
    if segment.key_mean is not None and not has_mean:
        # Keys were coded as k − μ: q·μ·scale belongs to every score of a row (the softmax ignores it, a merge
        # with fp16 segments does not).
        qm = (queries.astype(mx.float32).reshape(B, H, G * L, D) * segment.key_mean.astype(mx.float32)).sum(-1)
        lse = lse + qm * scale
    return out, lse


def append_plan(kernel, queries, segment, key_method, value_method, scale: float, window: int = 0):
    """The decode step's single launch that codes the new token into row `lengths` of the segment's buffers and
    attends (dispatch.append_kernel's kernel; with a ring of `window` fp16 tokens, the ring's oldest token is the
    one coded), worked out once for these buffers, this query shape and the split count split_size gives for
    segment.length: a function of (queries, (keys, values), lengths, ring or None) -> (out, lse). A cache reuses
    it while those stay the same, so that a step's host time is one launch's and not its derivation."""
    B, n_q_heads, L, D = queries.shape
    H = segment.n_kv_heads
    kspec, vspec, ksigns, vsigns, _ = _specs(key_method, value_method)
    has_mean = segment.key_mean is not None
    split, kwargs = _launch_shape(kernel, kspec, vspec, ksigns.shape[0], vsigns.shape[0],
                                  (B, H, n_q_heads, L, D, (n_q_heads // H) * L), queries.dtype, has_mean,
                                  split_size(kernel, B, H, segment.length), GPU_SINGLE_LAUNCH, True, window)
    before = [_scalar(float(scale)), ksigns, kspec.centroids, vspec.centroids, segment.key_codes["idx"],
              segment.key_codes["norm"], segment.value_codes["idx"], segment.value_codes["norm"]]
    after = [vsigns, segment.key_mean if has_mean else _placeholder()]
    bounds = [kspec.boundaries, vspec.boundaries]

    def run(queries, append, lengths, ring=None):
        extra = [] if ring is None else [ring[0], ring[1], _ring_slot(ring[2])]
        out = split(inputs=[queries, *before, lengths, *after, _tickets(B * H), *append, *bounds, *extra], **kwargs)
        return out[2], out[3]

    return run


def split_size(kernel: str, batch: int, n_kv_heads: int, tokens: int) -> tuple:
    """(splits per kv head, tokens per split (CUDA-core kernel), warps, unroll) of a "mma" or "cuda" launch."""
    if kernel == "mma":
        return _mma_splits(batch, n_kv_heads, tokens), 0, GPU_MMA_WARPS, GPU_MMA_UNROLL
    per_split = _splits(batch, n_kv_heads, tokens)
    return -(-tokens // per_split), per_split, GPU_WARPS, GPU_UNROLL


def _launch(kernel, q, segment, kspec, vspec, ksigns, vsigns, scale, has_mean, lengths, R, out_dtype):
    B, n_q_heads, L, D = q.shape
    H = segment.n_kv_heads
    codes = [segment.key_codes["idx"], segment.key_codes["norm"], segment.value_codes["idx"],
             segment.value_codes["norm"], lengths]
    head = [q, _scalar(scale), ksigns, kspec.centroids, vspec.centroids]
    mean = segment.key_mean if has_mean else _placeholder()
    split, kwargs = _launch_shape(kernel, kspec, vspec, ksigns.shape[0], vsigns.shape[0], (B, H, n_q_heads, L, D, R),
                                  out_dtype, has_mean, split_size(kernel, B, H, segment.length), GPU_SINGLE_LAUNCH,
                                  False, 0)
    if len(kwargs["output_shapes"]) == 4:  # one launch: the last split block merges
        out = split(inputs=head + codes + [vsigns, mean, _tickets(B * H)], **kwargs)
        return out[2], out[3]
    part_o, part_ml = split(inputs=head + codes, **kwargs)
    vrounds = vsigns.shape[0] if vspec.signs is not None else 0
    combine = cuda.kernel("combine") if kernel in ("mma", "cuda") else metal.kernel("combine")
    return combine(
        inputs=[q, _scalar(scale), vsigns, mean, part_o, part_ml],
        template=[("D", D), ("R", R), ("HAS_MEAN", has_mean), ("NT", GPU_COMBINE_THREADS), ("ROUNDS", vrounds),
                  ("OutT", out_dtype)],
        grid=(R * GPU_COMBINE_THREADS, H, B),
        threadgroup=(GPU_COMBINE_THREADS, 1, 1),
        output_shapes=[(B, n_q_heads, L, D), (B, H, R)],
        output_dtypes=[out_dtype, mx.float32],
    )


@lru_cache(maxsize=1024)
def _launch_shape(kernel, kspec, vspec, krounds, vrounds, shape, out_dtype, has_mean, split_size, single_launch,
                  append, window):
    """(split kernel, its launch arguments but the inputs) for one launch shape, worked out once: the decode
    step's host time is a large part of what it waits for. shape: (B, kv heads, query heads, L, D, rows);
    split_size: (splits per kv head, tokens per split (CUDA-core kernel), warps, unroll); window: the ring's
    tokens when an append holds an fp16 window as a ring, else 0."""
    B, H, n_q_heads, L, D, R = shape
    n_splits, per_split, warps, unroll = split_size
    krounds = krounds if kspec.signs is not None else 0
    vrounds = vrounds if vspec.signs is not None else 0
    if kernel == "mma":
        template = [("D", D), ("R", R), ("WARPS", warps), ("U", unroll), ("NB", GPU_MMA_BUFFERS[D]),
                    ("ROUNDS", krounds), ("KB", kspec.bits), ("VB", vspec.bits)]
        split_kind = "mma_append" if append else "mma_attend" if single_launch else "mma_split"
        if window:
            split_kind, template = "mma_append_ring", template + [("W", window)]
        split = cuda.kernel(split_kind, mma_shared_bytes(D, R, warps, kspec.bits))
    else:
        plan = gpu_plan(D, R, kspec.bits, vspec.bits)
        template = [("D", D), ("R", R), ("KB", kspec.bits), ("VB", vspec.bits), ("LPT", plan["LPT"]),
                    ("WARPS", warps), ("U", unroll), ("TPS", per_split), ("ROUNDS", krounds)]
        split_kind = "append" if append else "attend" if single_launch and kernel == "cuda" else "split"
        if window:
            split_kind, template = "append_ring", template + [("W", window)]
        split = cuda.kernel(split_kind) if kernel == "cuda" else metal.kernel(split_kind)
    threads = warps * 32
    kwargs = {"template": template, "grid": (n_splits * threads, H, B), "threadgroup": (threads, 1, 1),
              "output_shapes": [(B, H, n_splits, R, D), (B, H, n_splits, R, 2)],
              "output_dtypes": [mx.float32, mx.float32]}
    if split_kind.endswith(("attend", "append", "ring")):
        kwargs["template"] = template + [("HAS_MEAN", has_mean), ("VROUNDS", vrounds), ("OutT", out_dtype)]
        kwargs["output_shapes"] += [(B, n_q_heads, L, D), (B, H, R)]
        kwargs["output_dtypes"] += [out_dtype, mx.float32]
    return split, kwargs


# ---- the appends' encode -----------------------------------------------------------------------------------


def encode_supported(method) -> bool:
    """Whether the single encode kernel computes this method's encode: its codes with an in-kernel rotation."""
    spec = method.fused_spec()
    return spec is not None and spec.signs is not None and _encodable(method.head_dim, spec.bits)


@lru_cache(maxsize=64)
def pair_covers(key_method, value_method) -> bool:
    """Whether the pair encode kernel covers both methods: each a rotation in the kernel or klt's refit, both
    of one coded width."""
    return key_method.rotated_dim == value_method.rotated_dim and all(
        spec is not None and (spec.signs is not None or spec.refit) and _encodable(m.rotated_dim, spec.bits)
        for m, spec in ((key_method, key_method.fused_spec()), (value_method, value_method.fused_spec())))


def _encodable(D: int, bits: int) -> bool:
    # A lane packs its D/32 codes into one 32-bit word (kvs_quantize_lane), so head_dim 256 at 8 bits (64 bits a
    # lane) would overflow it: it gave garbage codes on the H200 and takes the portable encode instead. Under a byte,
    # neighbouring lanes pack into one (kvs_store_codes).
    if bits is None:  # runs of several widths
        return False
    lane_bits = (D // 32) * bits
    return (32 <= D <= 256 and D % 32 == 0 and bits in (1, 2, 4, 8) and lane_bits <= 32
            and (lane_bits % 8 == 0 or 8 % lane_bits == 0))


def encode(method, x: mx.array, backend: str) -> dict:
    """Encode in one launch: (B, H, n, D) -> {"idx": (B, H, n, D·b/8) uint8, "norm": (B, H, n, 1)}.
    Same arithmetic as the method's encode; summation orders differ, so a coordinate within float rounding of
    a boundary can land on the other side (as between MLX backends)."""
    B, H, n, D = x.shape
    spec = method.fused_spec()
    rows, warps = B * H * n, 4
    make = cuda.kernel if backend == "cuda" else metal.kernel
    idx, norm = make("encode")(
        inputs=[x, spec.signs, spec.boundaries],
        template=[("D", D), ("BITS", spec.bits), ("ROUNDS", spec.signs.shape[0])],
        grid=(-(-rows // warps) * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(B, H, n, D * spec.bits // 8), (B, H, n, 1)],
        output_dtypes=[mx.uint8, mx.float16],
    )
    return {"idx": idx, "norm": norm}


# Appends of at most this many tokens (a decode step's block leaving the fp16 window) encode klt's layouts through
# mx.compile: one traced graph per shape instead of ~150 small MLX ops a method, each built on the host at every
# block. Larger appends (prefill chunks of many shapes) keep the method's own encode.
COMPILED_ENCODE_TOKENS = 16


def has_layout(method) -> bool:
    """Whether the method's spec describes its codes by runs (klt): the codes mma_coded reads."""
    spec = method.fused_spec()
    return spec is not None and bool(spec.runs)


@lru_cache(maxsize=64)
def compiled_encode(method):
    """method.encode under mx.compile (the method's matrices and codebooks are constants of the trace)."""
    return mx.compile(method.encode)


def encode_pair(key_method, keys: mx.array, value_method, values: mx.array) -> tuple[dict, dict]:
    """Keys and values of one append in one CUDA launch (the first half of the warps encode keys)."""
    kspec, vspec, statics, template = _pair_plan(key_method, value_method)
    xk = kspec.to_coded(keys) if kspec.refit else keys
    xv = vspec.to_coded(values) if vspec.refit else values
    B, H, n, D = xk.shape
    if xv.shape[3] != D:
        raise ValueError(f"the pair encode needs one coded width for keys and values, got {D} and {xv.shape[3]}")
    rows, warps = B * H * n, 4
    kidx, knorm, vidx, vnorm = cuda.kernel("encode_pair")(
        inputs=[xk, xv, *statics], template=[("D", D), *template],
        grid=(-(-2 * rows // warps) * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(B, H, n, D * kspec.bits // 8), (B, H, n, 1), (B, H, n, D * vspec.bits // 8), (B, H, n, 1)],
        output_dtypes=[mx.uint8, mx.float16, mx.uint8, mx.float16],
    )
    return {"idx": kidx, "norm": knorm}, {"idx": vidx, "norm": vnorm}


@lru_cache(maxsize=64)
def _pair_plan(key_method, value_method):
    """What an append's encode launch needs besides the new tokens, worked out once per method pair."""
    kspec, vspec = key_method.fused_spec(), value_method.fused_spec()
    none = _placeholder((1, key_method.rotated_dim), mx.float32)
    ksigns = none if kspec.signs is None else kspec.signs
    vsigns = none if vspec.signs is None else vspec.signs
    statics = [ksigns, vsigns, kspec.boundaries, vspec.boundaries, kspec.centroids, vspec.centroids]
    template = [("KBITS", kspec.bits), ("VBITS", vspec.bits), ("KROUNDS", 0 if kspec.refit else ksigns.shape[0]),
                ("VROUNDS", 0 if vspec.refit else vsigns.shape[0]), ("KREFIT", kspec.refit), ("VREFIT", vspec.refit)]
    return kspec, vspec, statics, template


# ---- the coded-layout kernel: codes of any layout, keys decoded on tensor cores (mma_coded.cu) ----------------

CODED_WARPS = 4
# Split blocks per call to aim for: ~4 resident per SM of an H100/H200 (registers bound them), since a warp waits
# on its next tile's loads while it computes this one's, and more warps hide the rest of that wait.
CODED_TARGET_BLOCKS = 528


def coded_supported(key_method, value_method, head_dim: int, rows: int, rope_pairs: int | None) -> bool:
    """Whether mma_coded covers these methods (dispatch checks the device): both specs describe their codes'
    layout, keys with a synthesis into head_dim-wide model space, runs of at most 8 bits, coded widths of at most
    head_dim, head_dim 64 or 128, <= 8 rows; rope_pairs (keys coded before RoPE): RoPE over every coordinate."""
    return _coded_layout(key_method, value_method, head_dim) is not None and 1 <= rows <= 8 and (
        rope_pairs is None or 2 * rope_pairs == head_dim)


@lru_cache(maxsize=64)
def _coded_layout(key_method, value_method, D: int):
    """What a mma_coded launch needs of a method pair besides the codes, worked out once: (template constants as
    (name, value) pairs,
    synthesis B fragments, key coordinate words, key centroids, value coordinate words, value centroids, value
    coded width, run-time constants for _coded_params), or None when the kernel does not cover the pair."""
    kspec, vspec = key_method.fused_spec(), value_method.fused_spec()
    if D not in (64, 128) or kspec is None or vspec is None or not kspec.runs or not vspec.runs:
        return None
    synthesis = kspec.synthesis
    mk, mv = (sum(n for n, _ in spec.runs) for spec in (kspec, vspec))
    if synthesis is None or synthesis.shape[1:] != (D, mk) or mk > D or mv > 128:
        return None
    if any(not 1 <= b <= 8 for spec in (kspec, vspec) for _, b in spec.runs):
        return None
    MPK, MPV = -(-mk // 16) * 16, -(-mv // 16) * 16

    def words(spec, padded):
        # Per coordinate: bit offset in the token's code row, width, first entry of its run's codebook.
        coords, centroids, offset = [], [], 0
        for (n, bits), table in zip(spec.runs, spec.run_centroids):
            base = sum(len(c) for c in centroids)
            coords += [(offset + i * bits) | (bits << 12) | (base << 16) for i in range(n)]
            centroids.append(np.array(table, np.float32))
            offset += n * bits
        if offset > 8 * 511:
            return None
        # The codebook table padded to a power of two entries, so that a model's layers share a few compiled kernels.
        table = np.concatenate(centroids)
        table = np.pad(table, (0, (1 << max(5, (table.size - 1).bit_length())) - table.size))
        return mx.array(np.array(coords + [0] * (padded - len(coords)), np.int32)), mx.array(table), -(-offset // 8)

    kw, vw = words(kspec, MPK), words(vspec, MPV)
    if kw is None or vw is None:
        return None
    # Sᵀ's B fragments, lane (g, t) of k-step ks and n-tile nt: S[8nt + g, 16ks + 2t + {0, 1}] and [.. + 8 + ..].
    S = np.zeros((synthesis.shape[0], D, MPK), np.float16)
    S[:, :, :mk] = np.array(synthesis, np.float32)
    S = S.reshape(-1, D // 8, 8, MPK // 16, 2, 4, 2)  # heads, nt, g, ks, half, t, pair
    fragments = np.ascontiguousarray(S.transpose(0, 3, 1, 2, 5, 4, 6)).view(np.uint32)  # heads, ks, nt, g, t, half
    template = (("MPK", MPK), ("MPV", MPV), ("NKC", kw[1].size), ("NVC", vw[1].size),
                ("KLOG", kspec.log_scale_center is not None), ("VLOG", vspec.log_scale_center is not None))
    # The launch's run-time constants besides scale and position: log-scale centres, code rows' bytes.
    constants = (kspec.log_scale_center or 0.0, vspec.log_scale_center or 0.0, kw[2], vw[2])
    return template, mx.array(fragments.reshape(fragments.shape[0], -1)), kw[0], kw[1], vw[0], vw[1], mv, constants


def coded_shared_bytes(D: int, R: int, warps: int, MPK: int, MPV: int) -> int:
    """Dynamic shared memory of a mma_coded block, as mma_coded.cu lays it out: Sᵀ's fragments and each warp's
    tile (key and value centroids, code rows, scales), or the warps' partial results, whichever is larger."""
    rows = 16 * MPK + 4 + 16 * MPV + 4  # code rows of at most MPK / MPV bytes
    warp_bytes = -(-((16 * (MPK + 8) + MPV * 24) * 2 + rows + 32 * 4) // 16) * 16
    return max((MPK // 16) * (D // 8) * 32 * 8 + warps * warp_bytes, warps * R * (MPV + 2) * 4)


@lru_cache(maxsize=256)
def _coded_params(scale: float, position: int, kcentre: float, vcentre: float, key_bytes: int,
                  value_bytes: int) -> mx.array:
    """mma_coded's params: scale, log-scale centres, the segment's first position, code rows' bytes."""
    return mx.array([scale, kcentre, vcentre, position, key_bytes, value_bytes], dtype=mx.float32)


@lru_cache(maxsize=64)
def _rope_omega(frequencies: bytes) -> mx.array:
    return mx.array(np.frombuffer(frequencies, np.float64).astype(np.float32))


def coded_attention(queries, segment, key_method, value_method, scale: float, lengths=None):
    """Attention of (B, Hq, L, D) queries over one code segment with mma_coded, then the value method's own
    un-rotation: (out (B, Hq, L, D) float32, lse (B, Hkv, R), natural log, the key mean included)."""
    B, n_q_heads, L, D = queries.shape
    H = segment.n_kv_heads
    R = (n_q_heads // H) * L
    part_o, part_ml, params, MPV, mv = _coded_split(queries, segment, key_method, value_method, scale, lengths)
    out, lse = cuda.kernel("combine")(
        inputs=[queries, params, _placeholder((1, MPV), mx.float32), _placeholder(), part_o, part_ml],
        template=[("D", MPV), ("R", R), ("HAS_MEAN", False), ("NT", GPU_COMBINE_THREADS), ("ROUNDS", 0),
                  ("OutT", mx.float32)],
        grid=(R * GPU_COMBINE_THREADS, H, B), threadgroup=(GPU_COMBINE_THREADS, 1, 1),
        output_shapes=[(B, n_q_heads, L, MPV), (B, H, R)], output_dtypes=[mx.float32, mx.float32])
    if MPV != mv:
        out = out[..., :mv]
    return value_method.unrotate(out.reshape(B, H, n_q_heads // H, L, mv)).reshape(B, n_q_heads, L, D), lse


@lru_cache(maxsize=64)
def coded_merge_supported(value_method, head_dim: int) -> bool:
    """Whether coded_decode covers this value method: its codes map back to model space through the spec's
    synthesis (H or 1, head_dim, coded width), as klt's do."""
    spec = value_method.fused_spec()
    synthesis = None if spec is None else spec.synthesis
    return synthesis is not None and synthesis.ndim == 3 and synthesis.shape[1:] == (
        head_dim, sum(n for n, _ in spec.runs)) and synthesis.dtype == mx.float32


@lru_cache(maxsize=64)
def _synthesis_t(value_method) -> mx.array:
    """The value synthesis transposed, (H or 1, coded width, head_dim) row-contiguous, worked out once."""
    transposed = mx.contiguous(value_method.fused_spec().synthesis.swapaxes(1, 2))
    mx.eval(transposed)
    return transposed


def coded_decode(queries, segment, key_method, value_method, scale: float, exact=(), lengths=None) -> mx.array:
    """A decode step's attention over one code segment and up to two unmasked fp16 segments [(keys, values)] (the
    sinks, the window) in two launches: mma_coded's splits, then coded_merge.cu, which merges them, maps the values
    back through the synthesis (coded_merge_supported) and merges the fp16 tokens exactly. (B, Hq, L, D) in the
    queries' dtype."""
    fp16 = [(k, v) for k, v in exact if k.shape[2]]
    return coded_decode_plan(queries, segment, key_method, value_method, scale, len(fp16), lengths)(queries, fp16)


def coded_decode_plan(queries, segment, key_method, value_method, scale: float, n_exact: int, lengths=None):
    """coded_decode's two launches worked out once for this segment as it stands (its buffers, length and first
    position) and this query shape: a function of (queries, [(keys, values)] of the n_exact non-empty fp16
    segments) -> (B, Hq, L, D). A cache reuses it for every decode step until its codes change (a block leaving
    the window: every WINDOW_BLOCK steps), so that a step's host time is two launches' and not their derivation."""
    if n_exact > 2:
        raise ValueError(f"coded_decode merges at most two fp16 segments, got {n_exact}")
    B, n_q_heads, L, D = queries.shape
    H = segment.n_kv_heads
    R = (n_q_heads // H) * L
    split, split_kwargs, split_inputs, params, MPV, mv = _coded_split_plan(queries, segment, key_method, value_method,
                                                                           scale, lengths)
    merge = cuda.kernel("coded_merge")
    merge_kwargs = {
        "template": [("D", D), ("R", R), ("MPV", MPV), ("MV", mv), ("NT", GPU_COMBINE_THREADS),
                     ("HAS_SINKS", n_exact > 0), ("HAS_WINDOW", n_exact > 1), ("OutT", queries.dtype)],
        "grid": (R * GPU_COMBINE_THREADS, H, B), "threadgroup": (GPU_COMBINE_THREADS, 1, 1),
        "output_shapes": [(B, n_q_heads, L, D)], "output_dtypes": [queries.dtype]}
    synthesis = _synthesis_t(value_method)
    empty = [_placeholder(), _placeholder()] * (2 - n_exact)

    def run(queries, fp16):
        part_o, part_ml = split(inputs=[queries, *split_inputs], **split_kwargs)
        slots = [a for pair in fp16 for a in pair] + empty
        return merge(inputs=[queries, params, synthesis, *slots, part_o, part_ml], **merge_kwargs)[0]

    return run


def _coded_split(queries, segment, key_method, value_method, scale: float, lengths):
    """mma_coded's launch: (part_o, part_ml, params, padded and real value coded widths)."""
    split, kwargs, inputs, params, MPV, mv = _coded_split_plan(queries, segment, key_method, value_method, scale,
                                                               lengths)
    part_o, part_ml = split(inputs=[queries, *inputs], **kwargs)
    return part_o, part_ml, params, MPV, mv


def _coded_split_plan(queries, segment, key_method, value_method, scale: float, lengths):
    """mma_coded's launch but the queries: (kernel, launch arguments, inputs after the queries, params, padded and
    real value coded widths)."""
    B, n_q_heads, L, D = queries.shape
    H = segment.n_kv_heads
    R = (n_q_heads // H) * L
    template, synth, kcoord, kcent, vcoord, vcent, mv, constants = _coded_layout(key_method, value_method, D)
    rope, position = 0, 0
    omega = _placeholder((1,), mx.float32)
    if segment.key_rope is not None:
        frequencies, traditional, position = segment.key_rope
        rope = 2 if traditional else 1
        omega = _rope_omega(np.asarray(frequencies, np.float64).tobytes())
    has_mean = segment.key_mean is not None
    if lengths is None:
        lengths = row_lengths(segment.length, B)
    params = _coded_params(float(scale), int(position), *constants)
    splits = max(1, min(CODED_TARGET_BLOCKS // (B * H), -(-segment.length // (16 * CODED_WARPS))))
    split, kwargs = _coded_launch(template, D, R, rope, has_mean, splits, B, H)
    inputs = [params, synth, segment.key_mean if has_mean else _placeholder(), omega, kcoord, kcent, vcoord, vcent,
              segment.key_codes["idx"], segment.key_codes["norm"], segment.value_codes["idx"],
              segment.value_codes["norm"], lengths]
    return split, kwargs, inputs, params, dict(template)["MPV"], mv


@lru_cache(maxsize=256)
def _coded_launch(template: tuple, D: int, R: int, rope: int, has_mean: bool, splits: int, B: int, H: int):
    t = dict(template)
    threads = CODED_WARPS * 32
    shared = coded_shared_bytes(D, R, CODED_WARPS, t["MPK"], t["MPV"])
    kwargs = {"template": [("D", D), ("R", R), ("WARPS", CODED_WARPS), ("ROPE", rope), ("HAS_MEAN", has_mean),
                           *template],
              "grid": (splits * threads, H, B), "threadgroup": (threads, 1, 1),
              "output_shapes": [(B, H, splits, R, t["MPV"]), (B, H, splits, R, 2)],
              "output_dtypes": [mx.float32, mx.float32]}
    return cuda.kernel("mma_coded", shared), kwargs
