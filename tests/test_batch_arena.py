"""The batch arena (quant/batch_arena.py) against each row's own cache: one decode step of many rows in one buffer
per layer gives each row the attention and the codes that row's cache gives alone; rows join, leave (their slot
free for the next to join) and sit out steps; a cache's readers (state, trim, deepcopy, nbytes) see its codes
from the arena; a cache that moved behind the arena's back (a trim) joins again from its own codes. Also the CPU
kernel's per-row-length entry point against one call per row."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kvshard.quant import CompressedKVCache, kernels
from kvshard.quant.attention import CodeSegment
from kvshard.quant.batch_arena import BatchArena, SlidingWindowLayer, codes_only
from kvshard.quant.kernels import cpu

H, D, Q_HEADS = 3, 64, 9
SCALE = D**-0.5
LENGTHS = [37, 300, 129, 520]  # on both sides of the single-cache path's switch to the kernel (256 tokens)
# Attention of one cache alone (the portable loop below 256 tokens, the kernel above) against the arena's kernel
# call: both fp32 over the same codes, summed in other orders.
TOLERANCE = 2e-4


def _cache(length: int, seed: int, **config) -> CompressedKVCache:
    cache = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=4, value_bits=4, seed=42, **config)
    rng = np.random.default_rng(seed)
    cache.append(mx.array(rng.normal(size=(1, H, length, D)).astype(np.float32)),
                 mx.array(rng.normal(size=(1, H, length, D)).astype(np.float32)))
    return cache


def _rows(lengths=LENGTHS):
    """Per row: a cache for the arena and its twin that steps alone, each coded from the same tokens (not a deep
    copy: on CUDA a copy's first step takes two launches, encode then attend, where a decoding cache takes the
    one append launch that the arena's step takes too)."""
    return [_cache(n, seed) for seed, n in enumerate(lengths)], [_cache(n, seed) for seed, n in enumerate(lengths)]


def _token(rng, rows: int):
    shape = (rows, H, 1, D)
    return (mx.array(rng.normal(size=shape).astype(np.float32)), mx.array(rng.normal(size=shape).astype(np.float32)),
            mx.array(rng.normal(size=(rows, Q_HEADS, 1, D)).astype(np.float32)))


def _arena_step(arena, members, rows: list[int], keys, values, queries) -> mx.array:
    slots = arena.join([members[r] for r in rows])
    view = arena.views(slots)[0]
    view.update_and_fetch(keys, values)
    return view.attention(queries, SCALE)


def _alone_step(twins, rows: list[int], keys, values, queries) -> mx.array:
    out = []
    for b, r in enumerate(rows):
        twins[r].read_by_hook = True  # as the model's hook marks it: on CUDA its append codes in the attention launch
        twins[r].update_and_fetch(keys[b : b + 1], values[b : b + 1])
        out.append(twins[r].attention(queries[b : b + 1], SCALE))
    return mx.concatenate(out, axis=0)


def _same_state(a: CompressedKVCache, b: CompressedKVCache) -> None:
    for (name_a, x), (name_b, y) in zip(tree_flatten(a.state), tree_flatten(b.state), strict=True):
        assert name_a == name_b
        assert x == y if isinstance(x, str) else mx.array_equal(x, y), name_a


def test_steps_equal_each_row_alone_with_rows_joining_leaving_and_sitting_out():
    caches, twins = _rows()
    members = [[c] for c in caches]
    arena, rng = BatchArena(), np.random.default_rng(7)
    steps = [[0, 1, 2, 3], [0, 1, 2, 3], [3, 0], [1, 2, 3, 0], [2, 1]]  # a subset in another order; rows sitting out
    for step, rows in enumerate(steps):
        if step == 3:
            arena.release(members[0])  # slot 0 leaves and is free; the row joins again next step, into it
            assert caches[0]._lease is None and arena.members[0] is None
        keys, values, queries = _token(rng, len(rows))
        together = _arena_step(arena, members, rows, keys, values, queries)
        alone = _alone_step(twins, rows, keys, values, queries)
        assert mx.abs(together - alone).max().item() <= TOLERANCE, f"step {step}"
        assert [caches[r].offset for r in rows] == [twins[r].offset for r in rows]
    for cache, twin in zip(caches, twins, strict=True):
        assert cache.nbytes == twin.nbytes  # reads the codes: they come back from the arena first
        _same_state(cache, twin)  # the same codes, bit for bit, as one cache coding its tokens alone


def test_sessions_leaving_together_get_their_codes_and_the_others_keep_stepping():
    """release_many: rows 0 and 2 of five leave in one call (their slots free, nobody moves); every leaver holds
    the codes its twin coded alone, the rows left step on as alone, and a session joining later takes the lowest
    free slot, from its own codes."""
    lengths = LENGTHS + [64]
    caches, twins = _rows(lengths)
    members = [[c] for c in caches]
    arena, rng = BatchArena(), np.random.default_rng(11)
    everyone = list(range(len(lengths)))
    for _ in range(2):
        keys, values, queries = _token(rng, len(everyone))
        together = _arena_step(arena, members, everyone, keys, values, queries)
        alone = _alone_step(twins, everyone, keys, values, queries)
        assert mx.abs(together - alone).max().item() <= TOLERANCE  # (evaluated, as the service evaluates every step)
    slots_before = [arena.slot_of(m) for m in members]
    arena.release_many([members[2], members[0], members[2]])  # a session named twice leaves once
    assert all(caches[r]._lease is None for r in (0, 2)) and arena.members[0] is None and arena.members[2] is None
    assert [arena.slot_of(members[r]) for r in (1, 3, 4)] == [slots_before[r] for r in (1, 3, 4)]  # nobody moved
    for r in (0, 2):
        _same_state(caches[r], twins[r])
    staying = [4, 1, 3]
    for _ in range(2):
        keys, values, queries = _token(rng, len(staying))
        together = _arena_step(arena, members, staying, keys, values, queries)
        alone = _alone_step(twins, staying, keys, values, queries)
        assert mx.abs(together - alone).max().item() <= TOLERANCE
    # Row 2 comes back (its cache holds its codes again): the lowest free slot, 0, with row 0's old codes under it.
    rows = [2, 4, 1, 3]
    for _ in range(2):
        keys, values, queries = _token(rng, len(rows))
        together = _arena_step(arena, members, rows, keys, values, queries)
        alone = _alone_step(twins, rows, keys, values, queries)
        assert mx.abs(together - alone).max().item() <= TOLERANCE
    assert arena.slot_of(members[2]) == 0 and arena.members[2] is None
    arena.release_many([members[r] for r in rows])
    assert not arena.members and all(not layer.caches for layer in arena.layers)
    for r in rows:
        _same_state(caches[r], twins[r])


@pytest.mark.xfail(kernels.gpu_backend() == "cuda", strict=True,
                   reason="on the H200 (2026-12-02, three runs) the step after the trim differs by 0.36: the side that is "
                   "wrong is the twins' (caches stepping alone, whose two earlier append launches' outputs were never "
                   "evaluated), not the arena's: against the portable attention over each cache's codes the arena row "
                   "is within 3e-4, the twin of an untrimmed row off by 0.15, and the codes agree bit for bit; the next "
                   "step agrees again. The service evaluates every step's output, so it never takes this path. If this "
                   "passes, drop the xfail")
def test_readers_see_the_arena_codes_and_a_trimmed_row_joins_again():
    caches, twins = _rows(LENGTHS[:3])
    members = [[c] for c in caches]
    arena, rng = BatchArena(), np.random.default_rng(3)
    for _ in range(2):
        keys, values, queries = _token(rng, 3)
        _arena_step(arena, members, [0, 1, 2], keys, values, queries)
        _alone_step(twins, [0, 1, 2], keys, values, queries)
    twin_copy = copy.deepcopy(caches[1])  # a copy holds every code, and no lease
    assert twin_copy._lease is None and caches[1]._lease is not None
    _same_state(twin_copy, twins[1])
    # A trim behind the arena's back (the cache's own verb): the row joins again from the trimmed cache.
    assert caches[2].trim(5) == 5 and twins[2].trim(5) == 5
    for _ in range(2):
        keys, values, queries = _token(rng, 3)
        together = _arena_step(arena, members, [0, 1, 2], keys, values, queries)
        alone = _alone_step(twins, [0, 1, 2], keys, values, queries)
        assert mx.abs(together - alone).max().item() <= TOLERANCE
    for member in members:
        arena.release(member)
    assert not arena.members
    for row, (cache, twin) in enumerate(zip(caches, twins, strict=True)):
        assert cache._lease is None
        if row == 2 and kernels.gpu_backend() == "cuda":
            # After its trim the twin coded its next token by the encode launch (a trim stops in-place appends),
            # the arena by the append launch, and on CUDA those differ (the xfail test below): same size only.
            assert (cache.offset, cache.n_encoded, cache.nbytes) == (twin.offset, twin.n_encoded, twin.nbytes)
            continue
        _same_state(cache, twin)


def test_only_caches_of_codes_coded_alike_fit():
    arena = BatchArena()
    assert arena.fits([_cache(40, 0)])
    assert not codes_only(_cache(40, 0, window=16))  # an fp16 window waits beside the codes
    assert not codes_only(_cache(40, 0, sink_tokens=4))
    assert not codes_only(CompressedKVCache(head_dim=D, n_kv_heads=H))  # holds nothing yet
    arena.join([[_cache(40, 0)]])
    # 2-bit codes: a width that both the CPU kernel and the CUDA append launch cover (3 bits the latter does not)
    other_bits = CompressedKVCache(head_dim=D, n_kv_heads=H, key_bits=2, value_bits=2, seed=42)
    rng = np.random.default_rng(0)
    other_bits.append(mx.array(rng.normal(size=(1, H, 20, D)).astype(np.float32)),
                      mx.array(rng.normal(size=(1, H, 20, D)).astype(np.float32)))
    assert codes_only(other_bits) and not arena.fits([other_bits])  # codes of other widths: not one buffer
    assert arena.fits([_cache(50, 2)])
    arena.release(arena.members[0])  # empty: the next batch may code otherwise, in buffers of its own
    assert arena.fits([other_bits]) and arena.join([[other_bits]]) == [0]
    assert arena.layers[0].key_method is other_bits.key_quantizer
    with pytest.raises(SlidingWindowLayer, match="window_size"):  # Gemma's sliding layers: not served
        arena.views([0])[0].make_mask(1, window_size=512)
    arena.model_slides = True  # what decode_batch sets on that error: the model's sessions step alone
    assert not arena.fits([_cache(50, 2)])


@pytest.mark.skipif(kernels.gpu_backend() != "cuda", reason="the append launch is CUDA's")
@pytest.mark.xfail(strict=True, reason="on the H200 (2026-12-01) the two caches' codes differ, with k − μ in fp16 or "
                   "in fp32 before the encode launch, and also when a token after a state read took the append launch "
                   "into copied buffers (c9a0fb2, reverted). Candidate cause, fixed 2026-12-02 but not yet run on a "
                   "GPU: each step's in-place launch ran only if its output was evaluated, and this test discards them "
                   "(now mx.depends chains each launch to the last). If this passes, drop the xfail and the CUDA case "
                   "in test_readers_see_the_arena_codes_and_a_trimmed_row_joins_again")
def test_a_token_gets_the_same_codes_from_the_append_launch_and_the_encode_launch():
    """A decoding cache's tokens are coded by the attention's append launch; after its state was read (a commit,
    a trim, a copy) the next one is coded by the encode launch. A token should get the same codes either way."""
    decoding, committed = _cache(300, 0), _cache(300, 0)
    rng = np.random.default_rng(5)
    for _ in range(40):
        keys, values, queries = _token(rng, 1)
        _ = committed.state  # read: its next append is not coded in place
        _alone_step([decoding, committed], [0], keys, values, queries)
        _alone_step([decoding, committed], [1], keys, values, queries)
    _same_state(decoding, committed)


@pytest.mark.skipif(cpu.native_library() is None, reason="no C compiler for the CPU kernel")
def test_cpu_kernel_rows_of_their_own_lengths_equal_one_call_per_row():
    """kvshard_attend_rows over one buffer with per-row lengths (a row of none included) against kvshard_attend on
    each row cut to its length."""
    caches = [_cache(n, seed) for seed, n in enumerate([300, 40, 129, 700])]
    lengths = [300, 0, 129, 700]  # row 1 attends none of its tokens
    capacity = 768
    method_k, method_v = caches[0].key_quantizer, caches[0].value_quantizer
    buffers = {}
    for side in ("key_codes", "value_codes"):
        buffers[side] = {}
        for name, a in getattr(caches[0], side).items():
            full = np.zeros((len(caches), H, capacity, a.shape[3]), np.asarray(a).dtype)
            for b, cache in enumerate(caches):
                held = np.asarray(getattr(cache, side)[name][:, :, : lengths[b]])
                full[b, :, : lengths[b]] = held[0]
            buffers[side][name] = full
    rng = np.random.default_rng(1)
    q = mx.array(rng.normal(size=(len(caches), H, Q_HEADS // H, 1, D)).astype(np.float32) * SCALE)
    segment = CodeSegment(buffers["key_codes"], buffers["value_codes"], None, max(lengths))
    together = cpu.cpu_rows_attention(q, segment, method_k, method_v, np.asarray(lengths, np.int32))
    for b, cache in enumerate(caches):
        if lengths[b] == 0:
            assert mx.all(together[b] == 0).item()  # attends nothing: output 0
            continue
        one = CodeSegment({n: a[b : b + 1, :, : lengths[b]] for n, a in buffers["key_codes"].items()},
                          {n: a[b : b + 1, :, : lengths[b]] for n, a in buffers["value_codes"].items()}, None, lengths[b])
        alone = cpu.cpu_attention(q[b : b + 1], [one], method_k, method_v, lambda start, n: None)  # kvshard_attend
        assert mx.abs(together[b] - alone[0]).max().item() <= 1e-6
    with pytest.raises(RuntimeError, match="refused"):
        cpu.cpu_rows_attention(q, segment, method_k, method_v, np.asarray([800, 0, 1, 1], np.int32))


@pytest.mark.skipif(cpu.native_library() is None, reason="no C compiler for the CPU kernel")
def test_cpu_rows_calls_count_their_rows_tokens_for_threads_and_agree_with_one_thread(monkeypatch):
    """The rows entry point's thread count follows the tokens the rows hold (not rows x the longest row) against
    ROWS_PARALLEL_WORK; on two threads it answers as on one."""
    caches = [_cache(n, seed) for seed, n in enumerate([700, 40, 129])]
    layer_arena = BatchArena()
    slots = layer_arena.join([[c] for c in caches])
    layer = layer_arena.layers[0]
    rng = np.random.default_rng(2)
    q = mx.array(rng.normal(size=(3, H, Q_HEADS // H, 1, D)).astype(np.float32) * SCALE)
    segment = CodeSegment(layer.codes["key_codes"], layer.codes["value_codes"], None, max(layer.lengths))
    lengths = np.asarray(layer.lengths, np.int32)
    work = H * int(lengths.sum()) * (Q_HEADS // H) * 2 * D  # scores and values of every query row
    assert slots == [0, 1, 2] and work < H * 3 * 700 * (Q_HEADS // H) * 2 * D
    monkeypatch.delenv(cpu.ENV_THREADS, raising=False)
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    chosen, real = [], cpu._threads
    monkeypatch.setattr(cpu, "_threads", lambda work=0, *limit: chosen.append(real(work, *limit)) or chosen[-1])
    outputs = []
    for limit in (work + 1, work):
        monkeypatch.setattr(cpu, "ROWS_PARALLEL_WORK", limit)
        outputs.append(cpu.cpu_rows_attention(q, segment, layer.key_method, layer.value_method, lengths))
    assert chosen == [1, 2]
    assert mx.abs(outputs[0] - outputs[1]).max().item() <= 1e-6
