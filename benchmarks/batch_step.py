"""Where a batched decode step's time goes: one step of 8 sessions in the batch arena against each session's step
alone, with the step split into its parts (real embedded model, the service's Sessions and Decoders, in process).

Eight SmolLM2 sessions (turboquant_mse 4/4 bits) hold contexts of 100 to 4,000 tokens, prefilled as the service
feeds a prompt (256-token chunks). Then, repeated, side by side: the eight decode one step together
(generation.decode_batch over the arena), and each decodes one step alone (the same call with one row). Each
ArenaLayer call is timed with its inputs evaluated first, so a step splits into
  - graph: the model's own ops that the arena's calls wait for (projections, RoPE, norms, the MLP: matmuls),
  - encode: the new tokens' encode and their write into the arena's buffers,
  - attention: the per-row-length kernel call over the rows' codes,
  - rest: everything else (the logits' evaluation after the last layer, sampling, host bookkeeping).
Each repeat runs once per OpenBLAS thread count (--threads, set at run time through openblas_set_num_threads),
so the counts compare side by side; also one 256-token prefill chunk of a fresh session per count, and the model's
matmuls alone (each Linear shape at 1 and 8 rows, and the forward pass with no cache) per count.

    python benchmarks/batch_step.py [--repeats 5] [--threads 2 1] [--out benchmarks/results]  -> batch_step_cpu.json
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from batching import timing_lock  # noqa: E402 (beside this script)
from bench import device_info  # noqa: E402 (benchmarks/bench.py, beside this script)

from kvshard.quant import KVCacheConfig  # noqa: E402
from kvshard.quant.batch_arena import ArenaLayer, BatchArena  # noqa: E402
from kvshard.service.generation import PREFILL_CHUNK, Decoder, Sampling, decode_batch  # noqa: E402
from kvshard.service.model import ServedModel  # noqa: E402
from kvshard.service.sessions import Limits, Session, resolve_spec  # noqa: E402

CONTEXTS = [100 + (4000 - 100) * i // 7 for i in range(8)]
PARTS = ("graph", "encode", "attention")
DEFAULT_THREADS = os.cpu_count()  # OpenBLAS's own default: a thread per core


class StepClock:
    """Seconds spent in the ArenaLayer calls of the steps timed, by part."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._store, self._attend = ArenaLayer._encode_and_write, ArenaLayer.attend
        clock = self

        def store(layer, slots, keys, values):
            clock._timed("graph", mx.eval, keys, values)
            return clock._timed("encode", clock._store, layer, slots, keys, values)

        def attend(layer, slots, queries, scale):
            clock._timed("graph", mx.eval, queries)
            return clock._timed("attention", clock._attend, layer, slots, queries, scale)

        ArenaLayer._encode_and_write, ArenaLayer.attend = store, attend

    def _timed(self, part, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        self.seconds[part] += time.perf_counter() - started
        return out

    def take(self) -> dict:
        out, self.seconds = self.seconds, dict.fromkeys(PARTS, 0.0)
        return out


def fresh_session(served) -> Session:
    spec = resolve_spec("model", served.shape, KVCacheConfig(method="turboquant_mse", key_bits=4, value_bits=4, seed=42),
                        Limits())
    return Session.new(spec, "default", served)


def prefilled(served, tokens: int, salt: int) -> Decoder:
    high = min(20000, served.vocab_size - 100)  # ids past a small random model's vocabulary crash MLX's gather
    prompt = [(31 * i + 17 * salt) % high + 100 for i in range(tokens)]
    decoder = Decoder(served, fresh_session(served), prompt, Sampling(), {"generated_tokens": 0})
    while decoder.step() is None:
        pass
    return decoder


def timed_step(clock: StepClock, decoders, arena) -> dict:
    clock.take()
    started = time.perf_counter()
    outcomes = decode_batch(decoders, arena)
    total = time.perf_counter() - started
    if not all(isinstance(o, int) for o in outcomes):
        raise RuntimeError(f"a step failed: {outcomes}")
    parts = clock.take()
    parts["rest"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def openblas_threads(n: int) -> None:
    """OpenBLAS's thread count from now on (the library LD_PRELOAD put in this process)."""
    ctypes.CDLL(None).openblas_set_num_threads(n)


def matmuls(served, threads: list[int]) -> dict:
    """Milliseconds (median of 20) of the model's own matmuls alone, at 1 and 8 rows per OpenBLAS thread count: each
    distinct Linear shape of a layer (fp32 weights, as the CPU runs them) and the tied output projection, then
    the whole forward pass of one token per row with no cache (every layer's matmuls plus norms, RoPE, MLP)."""
    layer = served.model.layers[0]
    shapes = {name: module.weight.shape for name, module in (
        ("q_proj", layer.self_attn.q_proj), ("k_proj", layer.self_attn.k_proj), ("gate_proj", layer.mlp.gate_proj),
        ("down_proj", layer.mlp.down_proj))}
    shapes["lm_head"] = served.model.model.embed_tokens.weight.shape

    def median_ms(fn) -> float:
        fn()
        seconds = []
        for _ in range(20):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        return 1e3 * statistics.median(seconds)

    out = {}
    for n in threads:
        openblas_threads(n)
        row = {}
        for rows in (1, 8):
            for name, (n_out, n_in) in shapes.items():
                w, x = mx.random.normal((n_out, n_in)), mx.random.normal((rows, n_in))
                mx.eval(w, x)
                row[f"{name} {n_out}x{n_in}, {rows} rows"] = median_ms(lambda w=w, x=x: mx.eval(x @ w.T))
            tokens = mx.array([[5]] * rows)
            row[f"model forward, no cache, {rows} rows"] = median_ms(lambda t=tokens: mx.eval(served.model(t)))
        out[str(n)] = row
    return out


def timed_chunk(served, salt: int) -> float:
    """Seconds of a fresh session's first prefill chunk (256 tokens of a longer prompt)."""
    prompt = [(29 * i + salt) % 20000 + 100 for i in range(2 * PREFILL_CHUNK)]
    decoder = Decoder(served, fresh_session(served), prompt, Sampling(), {"generated_tokens": 0})
    started = time.perf_counter()
    decoder.step()
    return time.perf_counter() - started


def amid_prompt(served, decoders, prompt_tokens: int) -> dict:
    """Seven decoders decode through the real Scheduler while a fresh session's prompt arrives: each turn's parts
    (the prefill chunk's tokens and seconds, the decode step's seconds), the decoders' worst gap between tokens
    while the prompt is fed, and the same prompt's prefill alone (its seconds per chunk)."""
    import asyncio

    from kvshard.service import scheduler as scheduler_module
    from kvshard.service.worker import SerialExecutor

    prompt = [(37 * i + 11) % 20000 + 100 for i in range(prompt_tokens)]
    started = time.perf_counter()
    alone = Decoder(served, fresh_session(served), list(prompt), Sampling(), {"generated_tokens": 0})
    while alone.step() is None:
        pass
    solo_s = time.perf_counter() - started
    turns, run_turn = [], scheduler_module._run_turn

    def recorded(prefill, chunk, batch, arena):
        outcomes, began, prefill_s, decode_s = run_turn(prefill, chunk, batch, arena)
        turns.append({"at": time.perf_counter(), "chunk": chunk if prefill else 0, "prefill_s": prefill_s,
                      "decode_s": decode_s, "rows": len(batch)})
        return outcomes, began, prefill_s, decode_s

    scheduler_module._run_turn = recorded
    mlx_thread = SerialExecutor("kvshard-mlx")
    scheduler = scheduler_module.Scheduler(mlx_thread, max_batch=8)
    window = {}

    async def decode(decoder, ready):
        scheduler.join(decoder)
        times = []
        while "end" not in window or times[-1] < window["end"] + 2.0:
            await scheduler.step(decoder)
            times.append(time.perf_counter())
            if len(times) == 3:
                ready.release()
        scheduler.leave(decoder)
        await scheduler.release(decoder)
        return times

    async def arrive(ready):
        for _ in range(len(decoders)):
            await ready.acquire()
        newcomer = Decoder(served, fresh_session(served), list(prompt), Sampling(), {"generated_tokens": 0})
        scheduler.join(newcomer)
        window["start"] = time.perf_counter()
        while await scheduler.step(newcomer) is None:
            pass
        window["end"] = time.perf_counter()
        scheduler.leave(newcomer)

    async def run():
        ready = asyncio.Semaphore(0)
        return await asyncio.gather(*(decode(d, ready) for d in decoders), arrive(ready))

    try:
        streams = asyncio.run(run())[:-1]
    finally:
        scheduler_module._run_turn = run_turn
        mlx_thread.shutdown()
    worst = max(b - a for times in streams for a, b in zip(times, times[1:])
                if b > window["start"] and a < window["end"])
    chunks = -(-prompt_tokens // PREFILL_CHUNK)
    inside = [t for t in turns if window["start"] <= t["at"] <= window["end"] + 1.0]
    return {"prompt_tokens": prompt_tokens, "solo_prefill_s": solo_s, "solo_seconds_per_chunk": solo_s / chunks,
            "worst_gap_s": worst, "worst_gap_in_solo_chunks": worst / (solo_s / chunks),
            "turns_while_fed": [{k: v for k, v in t.items() if k != "at"} for t in inside]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="OpenBLAS thread counts to compare")
    parser.add_argument("--max-context", type=int, default=CONTEXTS[-1], help="longest context (a quick check: 1000)")
    parser.add_argument("--amid", action="store_true", help="also: a fresh prompt of --max-context tokens fed "
                        "while seven sessions decode (the scheduler's turns recorded)")
    parser.add_argument("--lock", help="a file to flock while timing (not while prefilling), e.g. /work/wt/timing.lock")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    contexts = [100 + (args.max_context - 100) * i // 7 for i in range(8)]
    served = ServedModel.load("smollm2-135m")
    openblas_threads(1)  # the untimed prefills: faster on the shared cores
    decoders = [prefilled(served, n, i) for i, n in enumerate(contexts)]
    clock, arena = StepClock(), BatchArena()
    runs = {n: {"batched": [], "alone": [[] for _ in decoders], "chunk": []} for n in args.threads}
    with timing_lock(args.lock):
        load = [os.getloadavg()[0]]
        timed_step(clock, decoders, arena)  # warm-up: the arena's buffers sized and filled
        for repeat in range(args.repeats):
            for threads, run in runs.items():
                openblas_threads(threads)
                run["batched"].append(timed_step(clock, decoders, arena))
                for i, decoder in enumerate(decoders):
                    run["alone"][i].append(timed_step(clock, [decoder], arena))
                run["chunk"].append(timed_chunk(served, repeat))
        matmul_ms = matmuls(served, args.threads)
        load.append(os.getloadavg()[0])

    def medians(steps):
        return {k: statistics.median(s[k] for s in steps) for k in steps[0]}

    result = {"device": device_info(), "model": "smollm2-135m (embedded)", "cache": "turboquant_mse, 4-bit keys and values",
              "contexts": contexts, "repeats": args.repeats, "load_average_1min": load, "matmuls_alone_ms": matmul_ms,
              "openblas_threads": {}}
    for threads, run in runs.items():
        alone = [medians(a) for a in run["alone"]]
        row = {"batched_8_rows_s": medians(run["batched"]),
               "alone_s_per_context": dict(zip(map(str, contexts), alone, strict=True)),
               "alone_sum_s": {k: sum(m[k] for m in alone) for k in alone[0]},
               "first_prefill_chunk_s": statistics.median(run["chunk"])}
        row["batched_vs_alone_sum"] = row["batched_8_rows_s"]["total"] / row["alone_sum_s"]["total"]
        result["openblas_threads"][str(threads)] = row
        print(threads, json.dumps({k: row[k] for k in ("batched_8_rows_s", "alone_sum_s", "batched_vs_alone_sum",
                                                       "first_prefill_chunk_s")}), flush=True)
    if args.amid:
        for decoder in decoders:
            arena.release(decoder.session.caches)  # the scheduler's arena takes them
        openblas_threads(DEFAULT_THREADS)  # as the service runs: the scheduler's decode steps take one thread
        with timing_lock(args.lock):
            result["prompt_amid_decoding"] = amid = amid_prompt(served, decoders[:7], args.max_context)
        print(json.dumps(amid, indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_step_cpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
