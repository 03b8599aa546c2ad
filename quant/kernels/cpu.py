"""The CPU fast path: attention over TurboQuant-MSE codes and the appends' encode, in MLX ops.

CPU: MLX's gather runs at tens of ns per element on this CPU, so table look-ups (per-query LUTs, centroid
gathers) lose to fp32 SDPA. What wins is decoding a cache-resident block of codes with a compiled select
tree (b levels of `where` on the code's bits: exact centroids, fused by mx.compile into one loop), one
slice of coordinates per code slot of a byte, then BLAS matmuls against the matching slices of the rotated
query. Blocks have a fixed size so compiled functions are traced once; the last block overlaps the one
before it and masks what was already counted.
"""

from functools import lru_cache

import mlx.core as mx

CPU_BLOCK = 1024  # tokens per CPU block: one block of decoded fp32 coordinates stays in cache
# On the CPU, MLX builds each compiled function with the system C++ compiler the first time it meets it
# (~10 s on a small machine; cached on disk afterwards). Below these sizes the eager paths are about as fast,
# so short contexts and small appends (tests, single-token decode steps) never pay that compile.
CPU_MIN_TOKENS = 1024
CPU_ENCODE_MIN_ELEMENTS = 1 << 16


def _is_mse(method) -> bool:
    return getattr(method, "name", None) == "turboquant_mse"


_FLOATS = {}


def _floats(array: mx.array) -> tuple:
    """A codebook array as Python floats, read once: `tolist()` is a device-to-host sync, which at every
    append or attention call would stall MLX's asynchronous pipeline. Keyed by the (long-lived) array."""
    hit = _FLOATS.get(id(array))
    if hit is None or hit[0] is not array:
        hit = _FLOATS[id(array)] = (array, tuple(float(v) for v in array.tolist()))
    return hit[1]


def cpu_supported(key_method, value_method, tokens: int | None = None) -> bool:
    """Whether the CPU fast path covers these methods (and, given `tokens`, whether it is worth taking)."""
    return (
        (tokens is None or tokens >= CPU_MIN_TOKENS)
        and _is_mse(key_method)
        and _is_mse(value_method)
        and key_method.bits in (1, 2, 4)
        and value_method.bits in (1, 2, 4)
    )


def _select_tree(codes: mx.array, values, bits: int) -> mx.array:
    """values[codes] without a gather: one `where` level per bit of the code."""
    level = list(values)
    for k in range(bits):
        bit = (codes & (1 << k)) > 0
        level = [mx.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


@lru_cache(maxsize=None)
def _centroid_decoder(centroids: tuple, bits: int):
    """Compiled codes -> centroids ((..., n) uint8 -> (..., n) fp32). The centroids are constants of the
    compiled kernel (as inputs the fused loop runs ~10x slower); MLX compiles it once per codebook and
    caches the binary on disk. Its input is always a fresh contiguous array, so one variant is built."""
    return mx.compile(lambda codes: _select_tree(codes, centroids, bits))


def _decoders(method) -> list:
    """One callable per code slot of a byte; slot k of byte i holds coordinate i·(8/bits) + k."""
    bits = method.bits
    decode = _centroid_decoder(_floats(method.codebook.centroids), bits)
    mask = (1 << bits) - 1
    return [lambda packed, shift=k * bits: decode((packed >> shift) & mask) for k in range(8 // bits)]


def _cpu_blocks(length: int):
    """(start, size, first_new) per block: fixed-size blocks; the last overlaps its predecessor and counts
    only tokens from first_new on. Contexts shorter than a block use one block rounded up to a power of two."""
    if length >= CPU_BLOCK:
        blocks = [(s, CPU_BLOCK, s) for s in range(0, length - CPU_BLOCK + 1, CPU_BLOCK)]
        done = blocks[-1][0] + CPU_BLOCK
        if done < length:
            blocks.append((length - CPU_BLOCK, CPU_BLOCK, done))
        return blocks
    return [(0, max(64, 1 << (length - 1).bit_length()), 0)]


def _take_block(codes: dict, start: int, size: int, length: int) -> dict:
    """Tokens [start, start + size) of a code dict, zero-padded past `length` (only for short contexts)."""
    stop = min(start + size, length)
    out = {}
    for name, a in codes.items():
        block = a[:, :, start:stop]
        if stop - start < size:
            pad = mx.zeros((*a.shape[:2], size - (stop - start), a.shape[3]), dtype=a.dtype)
            block = mx.concatenate([block, pad], axis=2)
        out[name] = block
    return out


def cpu_code_attention(q, segment, key_method, value_method, allowed_for):
    """One code segment on the CPU fast path.

    q: (B, Hkv, g, L, D) fp32, already scaled. allowed_for(start, size) gives the caller's mask for key
    positions [start, start + size) of the segment (None, bool or additive), shaped for (B, Hkv, g, L, t).
    Returns (out (B, Hkv, g, L, D) fp32, lse (B, Hkv, g, L, 1))."""
    from ..attention import _apply_mask  # noqa: PLC0415 (attention imports this module)

    B, H, g, L, D = q.shape
    R = g * L
    q_rot = key_method.rotate_query(q).reshape(B, H, R, D)
    key_slots, value_slots = 8 // key_method.bits, 8 // value_method.bits
    q_slots = [q_rot[..., k::key_slots] for k in range(key_slots)]
    key_decoders, value_decoders = _decoders(key_method), _decoders(value_method)
    length = segment.length

    running_max = mx.full((B, H, R, 1), -mx.inf)
    denominator = mx.zeros((B, H, R, 1))
    acc = [mx.zeros((B, H, R, D // value_slots)) for _ in range(value_slots)]
    for start, size, first_new in _cpu_blocks(length):
        kc = _take_block(segment.key_codes, start, size, length)
        vc = _take_block(segment.value_codes, start, size, length)
        scores = sum(qs @ dec(kc["idx"]).swapaxes(-1, -2) for qs, dec in zip(q_slots, key_decoders))
        scores = scores * kc["norm"].astype(mx.float32).swapaxes(-1, -2)
        scores = scores.reshape(B, H, g, L, size)
        real = min(size, length - start)
        allowed = allowed_for(start, real)
        if real < size:
            allowed = _pad_mask(allowed, size - real)
        scores = _apply_mask(scores, allowed)
        if first_new > start or real < size:
            positions = mx.arange(start, start + size)
            scores = mx.where((positions >= first_new) & (positions < length), scores, -mx.inf)
        scores = scores.reshape(B, H, R, size)
        block_max = mx.maximum(running_max, scores.max(axis=-1, keepdims=True))
        safe_max = mx.where(mx.isinf(block_max), 0.0, block_max)
        correction = mx.exp(running_max - safe_max)
        weights = mx.exp(scores - safe_max)
        denominator = denominator * correction + weights.sum(axis=-1, keepdims=True)
        weights = weights * vc["norm"].astype(mx.float32).swapaxes(-1, -2)
        acc = [a * correction + weights @ dec(vc["idx"]) for a, dec in zip(acc, value_decoders)]
        running_max = block_max

    rotated = mx.stack(acc, axis=-1).reshape(B, H, R, D) if value_slots > 1 else acc[0]
    out = value_method.unrotate(rotated) / mx.maximum(denominator, 1e-30)
    lse = mx.where(mx.isinf(running_max), 0.0, running_max) + mx.log(denominator)
    if segment.key_mean is not None:
        lse = lse + (q.reshape(B, H, R, D) * segment.key_mean.astype(mx.float32)).sum(-1, keepdims=True)
    return out.reshape(B, H, g, L, D), lse.reshape(B, H, g, L, 1)


def _pad_mask(allowed, pad: int):
    """Extend a block mask over `pad` padded key positions (which the caller masks out anyway)."""
    if allowed is None:
        return None
    filler = mx.zeros((*allowed.shape[:-1], pad), dtype=allowed.dtype)
    return mx.concatenate([allowed, filler], axis=-1)


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
