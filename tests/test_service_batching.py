"""Continuous batching: a batched decode step against the same sessions' unbatched steps (the real embedded model,
caches of different lengths and budgets), and the shard's scheduler over real sockets: streams joining and leaving
mid-stream, a long prompt fed in chunks among decoding streams, cancelling one of several, seeded sampling per
stream, the batch-size limit and the scheduler's metrics."""

import os
import statistics
import subprocess
import sys
import threading
import urllib.request

import grpc
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from conftest import ShardProcess, child_env, free_port
from kvshard.quant import KVCacheBuilder, KVCacheConfig, install_attention_hook
from kvshard.quant.batch_arena import BatchArena
from kvshard.quant.batch_view import batch_views
from kvshard.quant.models import model_fingerprint
from kvshard.service.generation import PREFILL_CHUNK, Decoder, Sampling, decode_batch
from kvshard.service.model import ServedModel
from kvshard.service.sessions import Limits, Session, resolve_spec, snapshots
from kvshard.service import cli, worker
from kvshard.service.scheduler import CHUNK_SHARE, DECODE_BLAS_THREADS, MIN_CHUNK, ChunkCost, chunk_tokens
from kvshard.wire import kvshard_pb2 as pb

# Logits of the batched pass may differ from one row's pass by the summation order of the matmuls.
LOGIT_TOLERANCE = 1e-3
CONFIGS = [  # one row each: different methods, bits, fp16 sinks and windows, and a plain fp16 mlx_lm cache
    KVCacheConfig(method="turboquant_mse", bit_width_inlier=4, seed=42),
    KVCacheConfig(method="turboquant_mse", bit_width_inlier=3, bit_width_value=2, seed=7),
    KVCacheConfig(method="turboquant_mse", bit_width_inlier=4, window=16, sink_tokens=4, seed=42),
    KVCacheConfig(method="turboquant_prod", bit_width_inlier=4, seed=3),
    None,
]
LENGTHS = [37, 90, 61, 140, 75]


def _prefilled(model, config, length: int, salt: int) -> list:
    caches = [KVCache() for _ in model.layers] if config is None else KVCacheBuilder.for_model(model, config)
    tokens = mx.array([[(31 * i + 17 * salt) % 4000 + 50 for i in range(length)]])
    mx.eval(model(tokens, cache=caches))
    return caches


@pytest.fixture(scope="module")
def rows(smollm):
    model, _ = smollm
    install_attention_hook(model)
    return model, [_prefilled(model, c, n, i) for i, (c, n) in enumerate(zip(CONFIGS, LENGTHS, strict=True))]


@pytest.fixture(scope="module")
def alike(smollm):
    """Sessions whose caches code alike (one configuration, different lengths): one encode call per layer for
    the whole batch, and on a GPU one attention call."""
    model, _ = smollm
    install_attention_hook(model)
    return model, [_prefilled(model, CONFIGS[0], n, i) for i, n in enumerate(LENGTHS[:3])]


def _step_alone(model, caches, token: int) -> mx.array:
    logits = model(mx.array([[token]]), cache=caches)[0, -1].astype(mx.float32)
    mx.eval(logits)
    return logits


def _step_batched(model, sessions, tokens: list[int]) -> mx.array:
    logits = model(mx.array([[t] for t in tokens]), cache=batch_views(sessions))[:, -1].astype(mx.float32)
    mx.eval(logits)
    return logits


def _trim(sessions, n: int = 1) -> None:
    for caches in sessions:
        for cache in caches:
            cache.trim(n)


@pytest.mark.parametrize("batch", ["rows", "alike"])
def test_batched_step_logits_equal_unbatched_steps(batch, request):
    model, sessions = request.getfixturevalue(batch)
    tokens = [11, 222, 3333, 444, 55][: len(sessions)]
    lengths = [c[0].offset for c in sessions]
    batched = _step_batched(model, sessions, tokens)
    assert [c[0].offset for c in sessions] == [n + 1 for n in lengths]
    after_batch = [c[5].state for c in sessions]
    _trim(sessions)
    alone = mx.stack([_step_alone(model, caches, t) for caches, t in zip(sessions, tokens, strict=True)])
    assert mx.abs(batched - alone).max().item() <= LOGIT_TOLERANCE
    # Each row's cache took the same token as alone: the same codes, fp16 tokens and offsets.
    for held, caches in zip(after_batch, sessions, strict=True):
        again = caches[5].state
        for a, b in zip(tree_flatten(held), tree_flatten(again), strict=True):
            assert a[0] == b[0] and (a[1] == b[1] if isinstance(a[1], str) else mx.array_equal(a[1], b[1]))
    _trim(sessions)


def test_arena_step_equals_unbatched_steps(alike):
    """Sessions coded alike decode in the batch arena (one buffer per layer): the logits equal each session's
    step alone, each cache holds afterwards the very codes it codes alone (read back from the arena), and its
    bytes grew by what the arena reports for one token."""
    model, sessions = alike
    arena = BatchArena()
    tokens = [11, 222, 3333]
    held = [sum(c.nbytes for c in caches) for caches in sessions]
    assert all(arena.fits(caches) for caches in sessions)
    views = arena.views(arena.join(sessions))
    logits = model(mx.array([[t] for t in tokens]), cache=views)[:, -1].astype(mx.float32)
    mx.eval(logits)
    grown = arena.bytes_per_token()
    assert [sum(c.nbytes for c in caches) for caches in sessions] == [n + grown for n in held]
    for caches in sessions:
        arena.release(caches)
    after_batch = [c[5].state for c in sessions]
    _trim(sessions)
    alone = mx.stack([_step_alone(model, caches, t) for caches, t in zip(sessions, tokens, strict=True)])
    assert mx.abs(logits - alone).max().item() <= LOGIT_TOLERANCE
    for held_state, caches in zip(after_batch, sessions, strict=True):
        for a, b in zip(tree_flatten(held_state), tree_flatten(caches[5].state), strict=True):
            assert a[0] == b[0] and (a[1] == b[1] if isinstance(a[1], str) else mx.array_equal(a[1], b[1]))
    _trim(sessions)


def test_greedy_streams_agree_with_unbatched_runs(rows):
    """Greedy continuations, batched vs each session alone: the same tokens, except after a step whose top two
    logits are within the tolerance (counted; none is expected, but such a tie may legitimately flip)."""
    model, sessions = rows
    steps = 12
    first = [101, 202, 303, 404, 505]
    batched, tokens = [], list(first)
    for _ in range(steps):
        tokens = _step_batched(model, sessions, tokens).argmax(-1).tolist()
        batched.append(tokens)
    _trim(sessions, steps)
    near_ties = 0
    for row, caches in enumerate(sessions):
        token = first[row]
        for step in range(steps):
            logits = _step_alone(model, caches, token)
            top2 = mx.topk(logits, 2).tolist()
            token = int(logits.argmax().item())
            if token != batched[step][row]:
                assert abs(top2[0] - top2[1]) <= LOGIT_TOLERANCE, f"row {row} step {step}: not a near tie"
                near_ties += 1
                _trim([caches], step + 1)
                break
        else:
            _trim([caches], steps)
    assert near_ties <= 1


def test_rows_keep_their_own_positions(rows):
    """The view hands the model an offset per row (RoPE), and each row appends only to its own cache."""
    model, sessions = rows
    views = batch_views(sessions)
    assert views[0].offset.tolist() == LENGTHS
    with pytest.raises(ValueError, match="keys: batch of 2 rows"):
        views[0].update_and_fetch(mx.zeros((2, 3, 1, 64)), mx.zeros((2, 3, 1, 64)))
    assert [c[0].offset for c in sessions] == LENGTHS
    with pytest.raises(ValueError, match="same number of layers"):
        batch_views([sessions[0], sessions[1][:3]])


def test_prefill_chunks_are_sized_by_cost():
    """Seconds per prefill token grow with the position (here 1 ms + 1 µs per position); with a decode step
    waiting, a chunk and the step fit CHUNK_SHARE of the prompt's average chunk, later chunks being smaller."""
    cost = ChunkCost()
    assert cost.per_token(0) is None and chunk_tokens(cost, 100, 4100, 612, 0.1) == PREFILL_CHUNK
    per_token = lambda p: 1e-3 + 1e-6 * p  # noqa: E731
    for start in range(0, 4096, 256):
        cost.add(start, 256, 256 * per_token(start + 128))
    assert cost.per_token(2000) == pytest.approx(per_token(2000), rel=1e-6)
    average_chunk = PREFILL_CHUNK * per_token(2100)  # the prompt [100, 4100) alone
    decode_s = 0.3
    sizes = {}
    for start in (1000, 3800):
        n = sizes[start] = chunk_tokens(cost, 100, 4100, start, decode_s)
        assert n * per_token(start + n / 2) + decode_s <= CHUNK_SHARE * average_chunk * 1.01
    assert MIN_CHUNK <= sizes[3800] < sizes[1000] < PREFILL_CHUNK
    assert chunk_tokens(cost, 0, 4000, 0, 0.5) < PREFILL_CHUNK  # a fresh session's first chunk is sized alike
    assert chunk_tokens(cost, 100, 4100, 1000, 10.0) == MIN_CHUNK  # a prompt always advances


def _fresh_decoder(served, prompt: list[int]) -> Decoder:
    config = KVCacheConfig(method="turboquant_mse", key_bits=4, value_bits=4, seed=42)
    session = Session.new(resolve_spec("model", served.shape, config, Limits()), "default", served)
    return Decoder(served, session, list(prompt), Sampling(), {"generated_tokens": 0})


def test_a_fresh_prompt_fed_in_pieces_takes_its_key_mean_from_a_whole_first_chunk(smollm):
    """Beside decoding streams a fresh prompt's first chunk comes in pieces; its caches hold them in fp16 until
    PREFILL_CHUNK tokens are in, so every layer's key mean is the whole first chunk's (as when fed alone), not the
    first piece's. (Its codes are not bit-identical: the later pieces attend over the earlier ones' exact fp16 K/V,
    a whole chunk over its own codes, so deeper layers' keys differ by about the coding error.)"""
    model, tokenizer = smollm
    install_attention_hook(model)
    served = ServedModel("smollm2-135m", model, tokenizer, model_fingerprint(model),
                         dict(layers=len(model.layers), n_kv_heads=3, head_dim=64), model.args.vocab_size,
                         frozenset(), {}, "")
    prompt = [(37 * i + 11) % 4000 + 50 for i in range(PREFILL_CHUNK + 44)]
    whole, pieces = _fresh_decoder(served, prompt), _fresh_decoder(served, prompt)
    assert whole.step() is None and isinstance(whole.step(), int)
    for _ in range(PREFILL_CHUNK // 64):
        assert pieces.step(64) is None
    assert isinstance(pieces.step(64), int)
    first_piece = _fresh_decoder(served, prompt[:64])
    first_piece.step()
    gaps = []  # per layer: (pieces' key mean, the first piece's) off the whole chunk's, relative to its largest entry
    for a, b, c in zip(whole.session.caches, pieces.session.caches, first_piece.session.caches, strict=True):
        mean = a.key_mean.astype(mx.float32)
        gap = lambda other: (mx.abs(mean - other.key_mean).max() / mx.abs(mean).max()).item()  # noqa: E731
        gaps.append((gap(b), gap(c)))
        assert a.n_encoded == b.n_encoded == len(prompt) and b.window_keys is None
    # The first piece alone is 15-37% off in every layer. The pieces' gap is the coding error's echo through the
    # layers: 0 in layer 0, then growing with depth (up to 3.8% on one CPU, 5.1% on another: which BLAS kernels
    # round differently), so its bound is on the median, with every layer still far closer than the first piece.
    assert gaps[0][0] == 0 and statistics.median(b for b, _ in gaps) < 0.02, gaps
    assert all(c > 3 * b and b < 0.1 for b, c in gaps), gaps


def test_snapshots_of_sessions_in_one_pass_equal_each_session_s_own(smollm):
    """sessions.snapshots (what finish_in_turn takes for the streams ending in one turn: one host copy for all)
    gives each session the record and deltas its own snapshot gives, from the arena's codes too."""
    model, tokenizer = smollm
    install_attention_hook(model)
    served = ServedModel("smollm2-135m", model, tokenizer, model_fingerprint(model),
                         dict(layers=len(model.layers), n_kv_heads=3, head_dim=64), model.args.vocab_size,
                         frozenset(), {}, "")
    decoders = [_fresh_decoder(served, [(31 * i + 7 * k) % 4000 + 50 for i in range(n)]) for k, n in enumerate((40, 75))]
    arena = BatchArena()
    for decoder in decoders:
        assert isinstance(decoder.step(), int)
        decoder.session.committed(*decoder.session.snapshot())  # as a commit does: later deltas start past it
    for _ in range(3):
        assert all(isinstance(t, int) for t in decode_batch(decoders, arena))
    together = snapshots([d.session for d in decoders])  # (their newest codes still in the arena)
    alone = [d.session.snapshot() for d in decoders]
    for (record_a, deltas_a), (record_b, deltas_b) in zip(together, alone, strict=True):
        assert record_a.token_ids == record_b.token_ids and record_a.layer_offsets == record_b.layer_offsets
        assert record_a.version == record_b.version
        assert [(d.layer, d.keep_until, d.block, d.tail) for d in deltas_a] == \
               [(d.layer, d.keep_until, d.block, d.tail) for d in deltas_b]
        assert all(d.keep_until > 0 and d.block for d in deltas_a)  # only the codes since the commit


@pytest.mark.skipif(worker._openblas() is None, reason="no OpenBLAS in this process (it is LD_PRELOADed on Linux)")
def test_decode_steps_take_one_blas_thread_and_give_the_count_back():
    """The scheduler's decode steps run OpenBLAS on DECODE_BLAS_THREADS threads; the count before comes back after,
    also when the step raises."""
    library = worker._openblas()
    before = library.openblas_get_num_threads()
    seen = []
    with pytest.raises(RuntimeError):
        with worker.blas_threads(DECODE_BLAS_THREADS):
            seen.append(library.openblas_get_num_threads())
            raise RuntimeError("a failed step")
    assert seen == [DECODE_BLAS_THREADS] and library.openblas_get_num_threads() == before


def test_matmul_rows_get_the_same_bits_alone_and_batched():
    """A row's product is the same bits alone and among others: the batched step's equality with unbatched steps
    rests on it (one differing bit can code a K/V coordinate differently). OpenBLAS's AVX-512 kernels break it
    (3e-5 apart at 576 x 576), so `make test` and `kvshard serve` pin its Haswell kernels (service/cli.py)."""
    mx.random.seed(0)
    for k, n in [(576, 576), (1536, 576), (576, 192), (576, 1536)]:
        w, x = mx.random.normal((n, k)), mx.random.normal((5, 1, k))
        together = x @ w.T
        for i in range(5):
            assert mx.array_equal(together[i], (x[i : i + 1] @ w.T)[0]), (k, n, i, os.environ.get("OPENBLAS_CORETYPE"))


def test_served_processes_get_openblas_with_row_invariant_kernels(monkeypatch):
    """openblas_env (what `kvshard serve` re-executes with, and the tests' child processes get) preloads OpenBLAS
    and pins OPENBLAS_CORETYPE where the CPU has AVX2, keeping a choice the caller made."""
    if not os.path.exists(cli.OPENBLAS):
        pytest.skip("Debian's OpenBLAS is not installed")
    monkeypatch.setattr(cli, "has_avx2", lambda: True)
    assert cli.openblas_env({"PATH": "/bin"}) == {"PATH": "/bin", "LD_PRELOAD": cli.OPENBLAS, "OPENBLAS_CORETYPE": "Haswell"}
    assert cli.openblas_env({"OPENBLAS_CORETYPE": "Zen"})["OPENBLAS_CORETYPE"] == "Zen"
    assert cli.openblas_env({"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == f"{cli.OPENBLAS}:/x.so"
    monkeypatch.setattr(cli, "has_avx2", lambda: False)
    assert "OPENBLAS_CORETYPE" not in cli.openblas_env({})
    monkeypatch.undo()
    if cli.has_avx2():  # a real child: the library it loads reports the kernels it took
        probe = ("import ctypes; from kvshard.service.worker import _openblas; f = _openblas().openblas_get_corename; "
                 "f.restype = ctypes.c_char_p; print(f().decode())")
        out = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, timeout=60)
        assert out.stdout.strip().lower() == "haswell", out


# ---- the shard ------------------------------------------------------------------------------------------------

MAX_BATCH = 3


@pytest.fixture(scope="module")
def shard(module_tmp):
    server = ShardProcess(module_tmp, "--max-tokens", "64", "--max-prompt-tokens", "700", "--checkpoint-tokens", "4",
                          "--metrics-port", str(free_port()), "--max-batch-size", str(MAX_BATCH)).start()
    server.metrics_port = int(server.args[server.args.index("--metrics-port") + 1])
    yield server
    server.stop()


def _prompt(n: int) -> str:
    return " ".join(["river", "stone", "light", "garden", "winter", "market"][i % 6] for i in range(n))


def _run(client, prompt: str, max_tokens: int, **sampling) -> list[int]:
    session = client.create_session(key_bits=4)
    return [t.token_id for t in session.generate(prompt, max_tokens=max_tokens, **sampling)]


def _concurrently(jobs: list) -> list:
    results = [None] * len(jobs)
    errors = []

    def run(i, job):
        try:
            results[i] = job()
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    return results


def _metric(shard, name: str) -> dict:
    """{labels: value} of one metric family from the shard's /metrics page."""
    page = urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in page.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


def test_streams_join_and_leave_mid_stream_and_match_solo_runs(client, shard):
    """Short and long streams overlap: one ends early, one arrives late with a prompt fed in three chunks (>512
    tokens) while the others decode; every stream's greedy tokens equal its run alone."""
    jobs = [(_prompt(20), 24), (_prompt(60), 6), (_prompt(35), 20), (_prompt(560), 8)]
    solo = [_run(client, prompt, n) for prompt, n in jobs]
    late = threading.Event()

    def stream(i):
        prompt, n = jobs[i]
        if i == 3:
            late.wait(120)  # joins while the others are decoding
        session = client.create_session(key_bits=4)
        tokens = []
        for token in session.generate(prompt, max_tokens=n):
            tokens.append(token.token_id)
            if i == 0 and len(tokens) == 3:
                late.set()
        info = session.refresh()
        assert info.committed_offset == info.offset and info.last_generate.finished
        return tokens

    before = _metric(shard, "kvshard_batch_size_count").get("", 0)
    assert _concurrently([lambda i=i: stream(i) for i in range(4)]) == solo
    assert _metric(shard, "kvshard_batch_size_count")[""] > before


def _mlx_jobs(shard, job: str) -> float:
    """How many jobs of this name the shard's MLX thread ran (kvshard_worker_job_seconds)."""
    counts = _metric(shard, "kvshard_worker_job_seconds_count")
    return sum(v for k, v in counts.items() if 'worker="kvshard-mlx"' in k and f'job="{job}"' in k)


def test_a_stream_ending_on_a_token_commits_what_its_last_turn_took(client, shard):
    """A stream that max_tokens or a stop token ends leaves the batch arena and has its commit snapshot taken in
    the turn that sampled its last token, with no job of its own that the next turn could run ahead of; the store
    holds the finished call before the last token arrives. A stop string, which only the text shows, takes the
    jobs of its own."""
    prompt = _prompt(30)
    tokens = _run(client, prompt, 3)  # (3 tokens: no checkpoint at --checkpoint-tokens 4)
    cases = [(dict(max_tokens=3), pb.LENGTH, 3), (dict(max_tokens=12, stop_token_ids=[tokens[1]]), pb.STOP, 2)]
    for kwargs, reason, count in cases:
        before = _mlx_jobs(shard, "snapshot"), _mlx_jobs(shard, "BatchArena.release")
        session = client.create_session(key_bits=4)
        streamed = list(session.generate(prompt, **kwargs))
        assert [t.token_id for t in streamed] == tokens[:count]
        assert streamed[-1].committed_offset == streamed[-1].offset  # durable before the last token came
        info = session.refresh()
        assert info.last_generate.finished and info.last_generate.finish_reason == reason
        assert info.last_generate.generated_tokens == count and info.committed_offset == info.offset
        assert (_mlx_jobs(shard, "snapshot"), _mlx_jobs(shard, "BatchArena.release")) == before, kwargs
    text = client.create_session(key_bits=4).generate_text(prompt, max_tokens=3)
    stop = text[len(client.create_session(key_bits=4).generate_text(prompt, max_tokens=1)):][:2]
    before = _mlx_jobs(shard, "snapshot")
    session = client.create_session(key_bits=4)
    streamed = list(session.generate(prompt, max_tokens=12, stop=[stop]))
    info = session.refresh()
    assert info.last_generate.finished and info.last_generate.finish_reason == pb.STOP and len(streamed) == 2
    assert streamed[-1].committed_offset == streamed[-1].offset == info.committed_offset
    assert _mlx_jobs(shard, "snapshot") == before + 1


def test_cancelling_one_stream_leaves_the_others_alone(client):
    prompts = [_prompt(25), _prompt(45), _prompt(30)]
    solo = [_run(client, p, 16) for p in prompts[1:]]
    cancelled = client.create_session(key_bits=4)

    def cut_short():
        call = client.stub.Generate(pb.GenerateRequest(session_id=cancelled.session_id, prompt=prompts[0], max_tokens=64))
        seen = 0
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                seen += 1
                if seen == 3:
                    call.cancel()
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        return seen

    results = _concurrently([cut_short] + [lambda p=p: _run(client, p, 16) for p in prompts[1:]])
    assert results[1:] == solo
    info = cancelled.refresh()
    # What it generated before the cut is kept and committed; it says where to resume.
    assert info.offset == info.committed_offset and 3 <= info.last_generate.generated_tokens < 64
    assert not info.last_generate.finished


def test_seeded_sampling_is_reproducible_per_stream_under_batching(client):
    streams = [(_prompt(15), dict(temperature=0.9, top_k=50, seed=s)) for s in (1, 2, 3, 4)]
    solo = [_run(client, p, 10, **kw) for p, kw in streams]
    batched = _concurrently([lambda p=p, kw=kw: _run(client, p, 10, **kw) for p, kw in streams])
    assert batched == solo
    assert len({tuple(t) for t in solo}) > 1  # the seeds really differ


def test_batch_size_never_exceeds_the_flag(client, shard):
    """Four streams at once against --max-batch-size 3: batches of more than one are seen, never of four."""
    before = _metric(shard, "kvshard_batch_size_bucket"), _metric(shard, "kvshard_batch_size_count")[""]
    parts_before = _metric(shard, "kvshard_scheduler_seconds_count")
    _concurrently([lambda n=n: _run(client, _prompt(n), 12) for n in (10, 20, 30, 40)])
    buckets = {k: v - before[0].get(k, 0) for k, v in _metric(shard, "kvshard_batch_size_bucket").items()}
    total = _metric(shard, "kvshard_batch_size_count")[""] - before[1]
    assert total > 0 and buckets['{le="3.0"}'] == total and buckets['{le="1.0"}'] < total
    assert _metric(shard, "kvshard_queue_wait_seconds_count")[""] >= total
    parts = {k: v - parts_before.get(k, 0) for k, v in _metric(shard, "kvshard_scheduler_seconds_count").items()}
    # Every batched decode step is timed once; so is each turn's hand-off; turns while streams generate have gaps.
    assert parts['{part="decode_step"}'] == total and parts['{part="hand_off"}'] >= total
    assert parts['{part="between_turns"}'] >= 1
    assert _metric(shard, "kvshard_stream_tokens_per_second_count")[""] > 0
    assert "" in _metric(shard, "kvshard_generate_tokens_per_second")


def test_a_random_weight_model_is_served_over_grpc_with_its_own_fingerprint(tmp_path):
    """`kvshard serve --model random:tiny` (service/random_model.py): seeded random weights of a named shape, so the
    fingerprint is the same at every load, and a byte-level tokenizer; concurrent Generate streams batch over it and a
    greedy stream gives the same tokens alone."""
    from kvshard.client import NO_RETRY, Client
    from kvshard.service.random_model import load_random

    server = ShardProcess(tmp_path, "--model", "random:tiny", "--max-tokens", "16", "--max-batch-size", "4").start()
    try:
        with Client(server.target, retry=NO_RETRY) as client:
            info = client.server_info()
            model, tokenizer = load_random("random:tiny")
            assert info.model == "random:tiny" and info.model_fingerprint == model_fingerprint(model)
            assert (info.model_shape.layers, info.model_shape.n_kv_heads, info.model_shape.head_dim) == (2, 2, 64)
            prompts = [f"stream {i}: héllo" for i in range(4)]
            together = _concurrently([lambda p=p: _run(client, p, 12) for p in prompts])
            assert [len(tokens) for tokens in together] == [12] * 4
            assert _run(client, prompts[0], 12) == together[0]
            assert tokenizer.encode(prompts[0], add_special_tokens=False)[:6] == list(b"stream")
    finally:
        server.stop()
