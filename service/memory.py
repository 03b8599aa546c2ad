"""What `--memory-budget` covers, and the process settings that make the shard's resident memory follow it.

The budget covers four things, all counted by the SessionManager before they are allocated:
- hot sessions: the bytes their caches hold (`held_bytes`: code buffers at their preallocated capacity, which a
  Trim keeps, in whole pages where malloc maps them, plus what the CPU kernels derived from their methods and
  the layers' Python objects), not only the tokens' share that `memory_bytes` reports;
- the working memory of the calls in flight (`working_bytes`: a multiple of the request's message size, for
  the copies a call keeps alive at once), reserved when the request arrives, before its body is parsed, and
  held until its answer is sent;
- a session being loaded (`load_bytes` of its stored size), until it is hot;
- MLX's cache of freed buffers, capped at `mlx_cache_bytes(budget)`.
What it does not cover is the idle process (Python, MLX, gRPC, the model's weights), which the operator measures
once; gRPC's buffers for requests not yet handed over; and a model's forward-pass activations, which the prompt
turn bounds (256 tokens per turn).

glibc hands large freed blocks back to the system only when they were mmapped, and by default it raises its
mmap threshold every time one is freed (up to 32 MiB), after which such blocks come from heaps that fragment and
do not shrink: RSS then keeps the high-water mark of every freed session and message. A fixed threshold and
two arenas keep RSS near what is alive; `trim` returns the free pages the heaps still keep.
"""

import ctypes
import ctypes.util
import os

import mlx.core as mx

from kvshard.quant.kernels import cpu

# Copies of a request's payload alive at once during its call, measured as the peak RSS one call adds per byte of
# its message on an idle shard (/proc/PID/clear_refs, VmHWM): an Append 3.7-3.8 (the body gRPC hands over, the parsed
# message, the MLX copy, its slices' encode), an Attend 8.0-8.6 (its output is as large as its queries, in float32
# inside: as MLX arrays, numpy, and answer bytes), a refused request 4.4.
WORKING_FACTORS = {"Attend": 9}
WORKING_FACTOR = 4  # every other RPC
LOAD_FACTOR = 3  # a session's load: its stored rows, their MLX copies, the joined codes
CALL_FLOOR_BYTES = 16 << 10  # a call with a tiny body still builds messages, a log line and MLX scalars
MLX_CACHE_SHARE = 8  # MLX keeps at most 1/8 of the budget in freed buffers
MMAP_THRESHOLD = 32 << 10  # fixed (mallopt disables glibc's dynamic rise): a session layer's code arrays are mmapped
ARENAS = 2
LAYER_OBJECT_BYTES = 16 << 10  # a cache layer's Python objects (the cache, its methods, the kernels' layouts of them), measured 1-29 KB
_CHUNK_HEADER = 16
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def working_bytes(method: str, message_bytes: int) -> int:
    """The working memory reserved for a `method` call whose request message is `message_bytes` long."""
    return CALL_FLOOR_BYTES + WORKING_FACTORS.get(method, WORKING_FACTOR) * message_bytes


def load_bytes(stored_bytes: int) -> int:
    """What loading a session of `stored_bytes` holds at once: the rows read from the store, their arrays, and
    the arrays they are joined into (which then stay, as the hot session)."""
    return CALL_FLOOR_BYTES + LOAD_FACTOR * stored_bytes


def mlx_cache_bytes(budget: int) -> int:
    return budget // MLX_CACHE_SHARE


def held_bytes(cache) -> int:
    """Bytes a CompressedKVCache's arrays occupy: its code buffers whole (preallocated in steps of 256 tokens,
    and kept after a trim), plus sinks, window, key mean and scales, plus what the CPU kernels derived from its
    methods once it was attended (per-head rotation matrices: 2 x heads x head_dim^2 floats a layer, half a
    1K-token layer's codes at 4 bits)."""
    codes = [a for group in (cache.key_codes or {}, cache.value_codes or {}) for a in group.values()]
    held = (cache.sink_keys, cache.sink_values, cache.window_keys, cache.window_values, cache.key_mean, cache.key_scale)
    derived = sum(cpu.derived_bytes(m) for m in {id(m): m for m in (cache.key_quantizer, cache.value_quantizer)}.values())
    arrays = sum(allocated(a.nbytes) for a in codes) + sum(allocated(a.nbytes) for a in held if a is not None)
    return LAYER_OBJECT_BYTES + arrays + derived


def allocated(nbytes: int) -> int:
    """What malloc takes for an nbytes buffer: a block at or over MMAP_THRESHOLD is mapped in whole pages (a
    1K-token layer's four code arrays waste up to 16 KB so, measured as RSS over MLX's count)."""
    if nbytes >= MMAP_THRESHOLD:
        return -(-(nbytes + _CHUNK_HEADER) // _PAGE) * _PAGE
    return nbytes + _CHUNK_HEADER


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """The process's resident set size (Linux /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()  # None off glibc (musl, macOS): the settings below are then glibc's business only


def configure(budget: int) -> None:
    """Cap MLX's buffer cache inside the budget and make glibc return freed large blocks (call once, early)."""
    mx.set_cache_limit(mlx_cache_bytes(budget))
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_ARENA_MAX, ARENAS)


def warm_up() -> None:
    """(MLX thread) A small cache's append, attention and trim: the first ones page in code and start OpenBLAS's
    and MLX's thread buffers, once per process. Done before the RSS that the budget is counted from is read."""
    from kvshard.quant import KVCacheConfig

    cache = KVCacheConfig().make_cache(0, 1, 64, 1)
    keys = mx.random.normal((1, 16, 64))
    cache.append(keys, keys)
    mx.eval(cache.attend(mx.random.normal((2, 4, 64))))
    cache.trim(8)


def trim() -> None:
    """Give the heaps' free pages back to the system (glibc's malloc_trim; milliseconds for a heap of this size)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
