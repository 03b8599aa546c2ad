"""Continuous batching: concurrent Generate streams against one stream alone, side by side in one run.

--mode service (the CPU figures): `kvshard serve` with the embedded SmolLM2-135M in a child process on loopback,
real gRPC. Sessions (turboquant_mse 4/4 bits) hold contexts spread over 100 to 4,000 tokens, as many as the largest
--streams count (8 by default). Each round: every session decodes alone (one stream at a time: the single-stream
figures), then each --streams count of them (contexts spread too) decodes at once; every run starts from the same
session state (the session is trimmed back after it), so each stream's p99 gap batched is divided by the same
stream's p99 gap alone, and its greedy tokens batched are compared with its tokens alone. The shard's
kvshard_scheduler_seconds{part} is read around each run (the scheduler's own time between turns). Then seven
streams decode while a new session's 4,000-token prompt arrives: the decoding streams' worst gap between tokens
while it is fed, against one prefill chunk (the solo prefill's time per chunk) and the whole prefill.

--mode service --model random:llama-3.2-1b --streams 1 8 32: the same over gRPC on a GPU, with the service's
random-weight model of that shape (service/random_model.py; benchmarks/batching_gpu.sh) -> batching_gpu_service.{json,png}.

--mode inprocess (the GPU figures so far): the scheduler runs in this process (service/scheduler.py with real
Sessions and Decoders, as the shard runs them, without gRPC) over a random Llama-3.2-1B-shaped fp16 model; caches filled with random K/V to contexts of 100 to 4,000 tokens;
1, 8 and 32 streams. Also checks one batch-arena step of the sessions against the same step row by row and against
each session's step alone.

    python benchmarks/batching.py [--mode service|inprocess] [--tokens 24] [--rounds 2] [--lock FILE] [--out benchmarks/results]
writes batching_cpu.json + batching_cpu.png (service) or batching_gpu.json (inprocess).

batching_gpu.json ran on the lent H200 as benchmarks/run_gpu.sh describes (MLX-CUDA in two loads; the package
imported through a kvshard/ folder of symlinks to quant, service, wire and client; prometheus_client's wheel carried
along), with: python3 benchmarks/batching.py --mode inprocess --streams 1 8 32 --tokens 32
"""

import argparse
import asyncio
import fcntl
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench import device_info  # noqa: E402 (benchmarks/bench.py, beside this script)

MAX_CONTEXT = 4000  # contexts of 100 ... MAX_CONTEXT tokens, and the long prompt's length (--max-context)
LONG_PROMPT = MAX_CONTEXT


def stream_stats(starts: float, times: list[float]) -> dict:
    gaps = np.diff([starts, *times])
    return {"tokens": len(times), "seconds": times[-1] - starts, "tok_s": len(times) / (times[-1] - starts),
            "p99_gap_ms": float(np.percentile(gaps[1:] if len(gaps) > 1 else gaps, 99) * 1e3),
            "median_gap_ms": float(np.median(gaps) * 1e3), "gaps_ms": [round(float(g) * 1e3, 1) for g in gaps]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- over gRPC ------------------------------------------------------------------------------------------------


def bench_service(args) -> dict:
    from conftest import ShardProcess, free_port  # the tests' helper: `kvshard serve` as a real process

    from kvshard.client import NO_RETRY, Client

    series = sorted({n for n in args.streams if n > 1})
    contexts = spread(max(series))
    tmp = Path(tempfile.mkdtemp(prefix="kvshard-batching-"))
    metrics_port = free_port()
    shard = ShardProcess(tmp, "--model", args.model, "--metrics-port", str(metrics_port), "--max-prompt-tokens", str(LONG_PROMPT + 100), "--max-tokens", "1024",
                         "--max-session-tokens", "16384", "--checkpoint-tokens", "64", "--memory-budget", args.memory_budget,
                         "--max-batch-size", str(max(series))).start(timeout=300)
    rng = np.random.default_rng(0)
    result = {"device": device_info(), "mode": "service (kvshard serve on loopback, real gRPC)",
              "model": args.model, "cache": "turboquant_mse, 4-bit keys and values", "contexts": contexts,
              "streams": series, "tokens_per_stream": args.tokens, "rounds": args.rounds,
              "p99_gap_ratio": "per stream: the p99 of its gaps between tokens (the first token's wait left out) in a "
                               "batched run over the p99 of its gaps decoding alone, from the same session state "
                               "(the session is trimmed back after each run), same number of tokens",
              "load_average": {}}
    try:
        with Client(shard.target, retry=NO_RETRY, timeout=3600) as client:
            sessions = [client.create_session(key_bits=4, value_bits=4) for _ in contexts]

            def generate(session, max_tokens: int, tokens=None) -> tuple[float, list[float]]:
                start, times = time.perf_counter(), []
                for _ in session.generate(tokens=tokens, resume=tokens is None, max_tokens=max_tokens, ignore_eos=True):
                    times.append(time.perf_counter())
                return start, times

            def decode_and_trim(session) -> tuple[float, list[float], list[int]]:
                """The session's next args.tokens greedy tokens, then the session trimmed back to where it was."""
                start, times, ids = time.perf_counter(), [], []
                for token in session.generate(resume=True, max_tokens=args.tokens, ignore_eos=True):
                    times.append(time.perf_counter())
                    ids.append(token.token_id)
                session.trim(len(ids))
                return start, times, ids

            started = time.perf_counter()
            prompts = [rng.integers(100, _token_high(args.model), n).tolist() for n in contexts]
            together([lambda s=s, p=p: generate(s, 1, p) for s, p in zip(sessions, prompts, strict=True)])
            result["prefill_all_s"] = time.perf_counter() - started
            result["effective_bits"] = _effective_bits(sessions[-1], client.server_info().model_shape)
            with timing_lock(args.lock):
                rounds = _rounds(args, sessions, series, decode_and_trim, result, lambda: scheduler_seconds(metrics_port))
            result["rounds_detail"] = rounds
            result["summary"] = _summary(rounds, contexts, series)
            result["load_average"]["before prefill phase"] = load_average()
            decoding = [sessions[i] for i in subset(len(contexts), min(8, len(contexts)))][:7]
            with timing_lock(args.lock):
                result["prefill_amid_decoding"] = amid = _amid_prefill(client, decoding, rng, generate)
            # The second reading of "one prefill chunk": a stream waits for a chunk and then its own batched step.
            amid["batched_step_s"] = statistics.median(
                b["median_gap_ms"] for r in rounds for b in r["batched"][str(series[0])]) / 1e3
            amid["worst_gap_in_solo_chunk_plus_batched_step"] = amid["worst_gap_s"] / (
                amid["solo_seconds_per_chunk"] + amid["batched_step_s"])
            result["load_average"]["end"] = load_average()
    finally:
        shard.stop()
    return result


def scheduler_seconds(port: int) -> dict:
    """The shard's kvshard_scheduler_seconds by part, as {part: [sum, count]} (its /metrics endpoint), and its MLX
    thread's jobs (kvshard_worker_job_seconds) as {"mlx job <name>": [sum, count]}, their thread CPU time as
    "mlx job cpu <name>" (a job whose CPU time falls short of its seconds waited: the GPU, the GIL, a page fault)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "kvshard_scheduler_seconds":
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out.setdefault(sample.labels["part"], [0.0, 0])[sample.name.endswith("_count")] = sample.value
        if family.name == "kvshard_worker_job_seconds":
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")) and sample.labels["worker"] == "kvshard-mlx":
                    key = f"mlx job {sample.labels['job']}"
                    out.setdefault(key, [0.0, 0])[sample.name.endswith("_count")] = sample.value
        if family.name == "kvshard_worker_job_cpu_seconds":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["worker"] == "kvshard-mlx":
                    out[f"mlx job cpu {sample.labels['job']}"] = [sample.value, out[f"mlx job {sample.labels['job']}"][1]]
    return out


def turn_parts(before: dict, after: dict) -> dict:
    """Mean and total milliseconds of each scheduler part (and MLX thread job) between two scrapes, and how many."""
    parts = {}
    for part, (total, count) in after.items():
        total0, count0 = before.get(part, [0.0, 0])
        if count > count0:
            parts[part] = {"mean_ms": 1e3 * (total - total0) / (count - count0), "count": int(count - count0),
                           "total_ms": 1e3 * (total - total0)}
    return parts


def spread(n: int) -> list[int]:
    """n contexts spread evenly over 100 ... MAX_CONTEXT tokens."""
    return [100 + (MAX_CONTEXT - 100) * i // max(n - 1, 1) for i in range(n)]


def subset(total: int, n: int) -> list[int]:
    """Indices of n of `total` sessions (contexts spread evenly) whose contexts also spread evenly."""
    return [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)]


def together(jobs) -> list:
    """Each job in a thread of its own, all at once; their results in order."""
    out, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            out[i] = job()
        except Exception as error:  # noqa: BLE001 (raised below, in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@contextmanager
def timing_lock(path: str | None):
    """Hold the machine's timing lock (flock) while timing, so that two timings never overlap; the untimed set-up
    (the prefills) runs outside it."""
    if not path:
        yield
        return
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _rounds(args, sessions, series, decode_and_trim, result, scrape) -> list:
    """Each round: every session decodes alone, one after another, then each series' sessions all at once; each
    run starts from the same session state (decode_and_trim), so a batched stream's greedy tokens are comparable
    with its tokens alone."""
    # Warm-up, untimed: a shard's first step of each batch size compiles its kernels and sizes its buffers (on the
    # H200 a cold first solo stream took 2.8 s for its first token, which made the solo rate of round 0 a third of
    # round 1's and the median speedup 4.5x where the warm rounds read 3.0x).
    decode_and_trim(sessions[0])
    for n in series:
        together([lambda s=sessions[i]: decode_and_trim(s) for i in subset(len(sessions), n)])
    rounds = []
    for r in range(args.rounds):
        result["load_average"][f"round {r} start"] = load_average()
        before = scrape()
        solo = [decode_and_trim(s) for s in sessions]
        row = {"solo": [stream_stats(start, times) | {"token_ids": ids} for start, times, ids in solo], "batched": {},
               "aggregate_tok_s": {}, "single_stream_tok_s": {}, "scheduler_parts": {"1": turn_parts(before, scrape())}}
        for n in series:
            chosen = subset(len(sessions), n)
            before = scrape()
            wall_start = time.perf_counter()
            runs = together([lambda s=sessions[i]: decode_and_trim(s) for i in chosen])
            wall = max(t[-1] for _, t, _ in runs) - wall_start
            row["scheduler_parts"][str(n)] = turn_parts(before, scrape())
            row["batched"][str(n)] = [stream_stats(start, times) | {"token_ids": ids, "session": i}
                                      for i, (start, times, ids) in zip(chosen, runs, strict=True)]
            alone = [row["solo"][i] for i in chosen]
            row["single_stream_tok_s"][str(n)] = sum(x["tokens"] for x in alone) / sum(x["seconds"] for x in alone)
            row["aggregate_tok_s"][str(n)] = sum(x["tokens"] for x in row["batched"][str(n)]) / wall
            print(f"round {r}: {n} streams {row['aggregate_tok_s'][str(n)]:.2f} tok/s, the same streams alone "
                  f"{row['single_stream_tok_s'][str(n)]:.2f} tok/s; scheduler {row['scheduler_parts'][str(n)]}", flush=True)
        rounds.append(row)
    return rounds


def _token_high(model: str) -> int:
    """Prompt token ids are drawn below this: 20,000, or a random-weight model's smaller vocabulary."""
    from kvshard.service.random_model import PREFIX, SHAPES, is_random

    return min(20000, SHAPES[model[len(PREFIX):]]["vocab_size"]) if is_random(model) else 20000


def _effective_bits(session, shape) -> float:
    """8 x bytes held / K and V elements (layers x kv heads x head_dim per token, twice)."""
    info = session.refresh()
    return 8 * info.memory_bytes / (2 * info.offset * shape.layers * shape.n_kv_heads * shape.head_dim)


def _summary(rounds: list, contexts: list[int], series: list[int]) -> dict:
    """Per series: the aggregate rate over the same streams' rate alone; each stream's p99 gap ratio (median over
    rounds), the worst and the median stream; greedy tokens batched equal to the same stream's alone."""
    out = {}
    for n in series:
        key = str(n)
        single = statistics.median(r["single_stream_tok_s"][key] for r in rounds)
        aggregate = statistics.median(r["aggregate_tok_s"][key] for r in rounds)
        chosen = [b["session"] for b in rounds[0]["batched"][key]]
        ratios = [statistics.median(r["batched"][key][j]["p99_gap_ms"] / r["solo"][i]["p99_gap_ms"] for r in rounds)
                  for j, i in enumerate(chosen)]
        pairs = [(r["batched"][key][j]["token_ids"], r["solo"][i]["token_ids"]) for r in rounds
                 for j, i in enumerate(chosen)]
        # What bounds it: the same ratio over the gaps between decode steps only, the last gap (which holds the
        # turn's final commit: co-finishing streams' commits queue one after another) left out on both sides.
        steps_only = [statistics.median(_p99(r["batched"][key][j]["gaps_ms"][1:-1]) / _p99(r["solo"][i]["gaps_ms"][1:-1])
                                        for r in rounds) for j, i in enumerate(chosen)]
        out[key] = {"single_stream_tok_s": single, "aggregate_tok_s": aggregate, "speedup": aggregate / single,
                    "p99_gap_ratio_without_final_commit_worst": max(steps_only),
                    "p99_gap_ratio_without_final_commit_median": statistics.median(steps_only),
                    "median_gap_ratio_median": statistics.median(
                        statistics.median(r["batched"][key][j]["median_gap_ms"] / r["solo"][i]["median_gap_ms"] for r in rounds)
                        for j, i in enumerate(chosen)),
                    "p99_gap_ratio_per_stream": dict(zip((str(contexts[i]) for i in chosen), ratios, strict=True)),
                    "p99_gap_ratio_worst": max(ratios), "p99_gap_ratio_median": statistics.median(ratios),
                    "greedy_runs_identical": f"{sum(a == b for a, b in pairs)} of {len(pairs)}",
                    "greedy_tokens_equal": f"{sum(x == y for a, b in pairs for x, y in zip(a, b))} of "
                                           f"{sum(len(a) for a, _ in pairs)}"}
    return out


def _p99(gaps: list[float]) -> float:
    return float(np.percentile(gaps, 99))


def _amid_prefill(client, decoding, rng, generate) -> dict:
    """Seven streams decode; a new session's 4,000-token prompt arrives once each has a few tokens."""
    from kvshard.service.generation import PREFILL_CHUNK

    prompt = rng.integers(100, _token_high(client.server_info().model), LONG_PROMPT).tolist()
    alone = client.create_session(key_bits=4, value_bits=4)
    solo_start, solo_times = generate(alone, 1, prompt)
    solo_prefill_s = solo_times[-1] - solo_start
    chunks = -(-LONG_PROMPT // PREFILL_CHUNK)
    newcomer = client.create_session(key_bits=4, value_bits=4)
    ready = threading.Semaphore(0)  # released by each decoding stream at its third token (it keeps reading)
    window = {}
    streams = []

    def decode(session):
        start, times = time.perf_counter(), []
        for _ in session.generate(resume=True, max_tokens=1000, ignore_eos=True):
            times.append(time.perf_counter())
            if len(times) == 3:
                ready.release()
            if "end" in window and times[-1] > window["end"] + 2.0:
                break
        streams.append(times)
        return start, times

    def arrive():
        for _ in decoding:
            ready.acquire()
        window["start"] = time.perf_counter()
        _, times = generate(newcomer, 1, prompt)
        window["end"] = times[-1]

    together([lambda s=s: decode(s) for s in decoding] + [arrive])
    worst = []
    for times in streams:
        inside = [b - a for a, b in zip(times, times[1:]) if b > window["start"] and a < window["end"]]
        worst.append(max(inside) if inside else 0.0)
    return {"prompt_tokens": LONG_PROMPT, "chunk_tokens": PREFILL_CHUNK, "chunks": chunks,
            "solo_prefill_s": solo_prefill_s, "solo_seconds_per_chunk": solo_prefill_s / chunks,
            "prefill_amid_decoding_s": window["end"] - window["start"],
            "worst_gap_s_per_stream": worst, "worst_gap_s": max(worst),
            "worst_gap_in_solo_chunks": max(worst) / (solo_prefill_s / chunks)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, rounds = result["summary"], result["rounds_detail"]
    first = str(result["streams"][0])  # the per-stream panel shows the smallest batch (8 streams)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = ["one stream"] + [f"{n} streams\n(aggregate)" for n in summary]
    rates = [summary[first]["single_stream_tok_s"]] + [row["aggregate_tok_s"] for row in summary.values()]
    axes[0].bar(names, rates, color=["grey"] + ["tab:blue"] * len(summary))
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("throughput: " + ", ".join(f"{row['speedup']:.2f}x at {n}" for n, row in summary.items()))
    chosen = [b["session"] for b in rounds[0]["batched"][first]]
    x = np.arange(len(chosen))
    solo = [statistics.median(r["solo"][i]["p99_gap_ms"] for r in rounds) for i in chosen]
    batched = [statistics.median(r["batched"][first][j]["p99_gap_ms"] for r in rounds) for j in range(len(chosen))]
    axes[1].bar(x - 0.2, solo, 0.4, label="alone", color="grey")
    axes[1].bar(x + 0.2, batched, 0.4, label=f"{first} streams batched", color="tab:blue")
    axes[1].set_xticks(x, [str(result["contexts"][i]) for i in chosen], rotation=45)
    axes[1].set_xlabel("stream's context (tokens)")
    axes[1].set_ylabel("p99 time between tokens (ms)")
    axes[1].set_title(f"p99 gap batched / alone: worst {summary[first]['p99_gap_ratio_worst']:.2f}x, "
                      f"median {summary[first]['p99_gap_ratio_median']:.2f}x")
    axes[1].legend()
    amid = result["prefill_amid_decoding"]
    axes[2].bar(["worst gap of\n7 decoding streams", "one chunk\n(solo)", "whole prefill\n(solo)"],
                [amid["worst_gap_s"], amid["solo_seconds_per_chunk"], amid["solo_prefill_s"]],
                color=["tab:blue", "grey", "lightgrey"])
    axes[2].set_ylabel("seconds")
    axes[2].set_title(f"a {amid['prompt_tokens']}-token prompt arrives")
    fig.suptitle(f"continuous batching over gRPC, {result['model']}, {result['device'].get('gpu') or result['device'].get('cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- the scheduler in process (GPU) -------------------------------------------------------------------------------


def bench_inprocess(args) -> dict:
    from types import SimpleNamespace

    import mlx.core as mx
    from decode_speed import LLAMA_1B
    from mlx_lm.models import llama

    from kvshard.quant import install_attention_hook
    from kvshard.service import metrics
    from kvshard.service.generation import Decoder, Sampling
    from kvshard.service.scheduler import Scheduler
    from kvshard.service.worker import SerialExecutor

    config = dict(LLAMA_1B, num_hidden_layers=args.layers or LLAMA_1B["num_hidden_layers"])
    mlx_thread = SerialExecutor("kvshard-mlx")

    def build():
        model = llama.Model(llama.ModelArgs(**config))
        model.set_dtype(mx.float16)
        mx.eval(model.parameters())
        install_attention_hook(model)
        return model

    model = asyncio.run(_on(mlx_thread, build))
    served = SimpleNamespace(model=model, fingerprint="random")
    H, D, layers = config["num_key_value_heads"], config["head_dim"], config["num_hidden_layers"]
    shape = dict(layers=layers, n_kv_heads=H, head_dim=D)

    result = {"device": device_info(), "mode": "in process: service/scheduler.py with real Sessions and Decoders, "
              "no gRPC (the service cannot load a random-weight model)", "model": config,
              "cache": "turboquant_mse, 4-bit keys and values", "contexts": "100 to 4000 tokens, spread evenly",
              "tokens_per_stream": args.tokens, "series": {}}
    for n_streams in args.streams:
        contexts = [100 + (4000 - 100) * i // max(n_streams - 1, 1) for i in range(n_streams)]
        sessions = asyncio.run(_on(mlx_thread, lambda c=contexts: [filled_session(served, shape, t) for t in c]))
        if n_streams > 1:
            result.setdefault("arena_check", {})[str(n_streams)] = asyncio.run(
                _on(mlx_thread, lambda s=sessions: _arena_vs_rows(model, s)))
        runs = asyncio.run(_streams(mlx_thread, Scheduler, Decoder, Sampling, served, sessions, args.tokens, n_streams))
        wall = max(t[-1] for _, t in runs) - min(s for s, _ in runs)
        stats = [stream_stats(*run) for run in runs]
        result["series"][str(n_streams)] = {"aggregate_tok_s": sum(s["tokens"] for s in stats) / wall,
                                            "batch_fallbacks_so_far": metrics.BATCH_FALLBACKS._value.get(),
                                            "p99_gap_ms": [s["p99_gap_ms"] for s in stats],
                                            "median_gap_ms": statistics.median(s["median_gap_ms"] for s in stats)}
        print(n_streams, result["series"][str(n_streams)]["aggregate_tok_s"], flush=True)
        (Path(args.out) / "batching_gpu.json").write_text(json.dumps(result, indent=1))  # so far, if cut short
        del sessions
    single = result["series"].get("1", {}).get("aggregate_tok_s")
    if single:
        for row in result["series"].values():
            row["speedup"] = row["aggregate_tok_s"] / single
    mlx_thread.shutdown()
    return result


def filled_session(served, shape: dict, tokens: int):
    """(MLX thread) A service Session (turboquant_mse 4/4 bits) whose caches hold `tokens` random K/V tokens and
    whose conversation has one more, pending: its next step feeds it."""
    from decode_speed import fill

    from kvshard.quant import KVCacheConfig
    from kvshard.service.sessions import Limits, Session, resolve_spec

    spec = resolve_spec("model", shape, KVCacheConfig(method="turboquant_mse", key_bits=4, value_bits=4, seed=42), Limits())
    session = Session.new(spec, "default", served)
    for cache in session.caches:
        fill(cache, shape["n_kv_heads"], shape["head_dim"], tokens)
    session.record.token_ids = [1] * (tokens + 1)
    return session


async def _on(executor, fn):
    return await executor.run(fn)


async def _streams(mlx_thread, Scheduler, Decoder, Sampling, served, sessions, tokens, max_batch):
    scheduler = Scheduler(mlx_thread, max_batch=max(max_batch, 1))

    async def stream(session):
        progress = {"generated_tokens": 0}
        decoder = Decoder(served, session, [], Sampling(), progress)
        scheduler.join(decoder)
        for _ in range(3):  # warm-up steps, not timed
            await scheduler.step(decoder)
        start, times = time.perf_counter(), []
        for _ in range(tokens):
            await scheduler.step(decoder)
            times.append(time.perf_counter())
        scheduler.leave(decoder)
        await scheduler.release(decoder)  # out of the batch arena, as a Generate call's end does
        return start, times

    return await asyncio.gather(*(stream(s) for s in sessions))


def _arena_vs_rows(model, sessions) -> dict:
    """One decode step of copies of the sessions in the batch arena against the same step row by row (the
    per-row batch views) and against each session's step alone (a one-row arena step, as a stream decoding by
    itself takes): the largest logit differences, and each path's step time (a single step, warm)."""
    import copy

    import mlx.core as mx

    from kvshard.quant.batch_arena import BatchArena
    from kvshard.quant.batch_view import batch_views

    tokens = mx.array([[7 + i] for i in range(len(sessions))])

    def step(name, copies):
        if name == "alone":
            rows = []
            for i, caches in enumerate(copies):
                arena = BatchArena()
                rows.append(model(tokens[i : i + 1], cache=arena.views(arena.join([caches])))[:, -1])
            return mx.concatenate(rows, axis=0)
        arena = BatchArena()
        views = arena.views(arena.join(copies)) if name == "arena" else batch_views(copies)
        return model(tokens, cache=views)[:, -1]

    out = {}
    for name in ("rows", "arena", "alone", "rows (timed)", "arena (timed)", "alone (timed)"):  # the first warm up
        copies = [copy.deepcopy(s.caches) for s in sessions]
        mx.eval([c.state for caches in copies for c in caches])
        if name != "rows" and not all(BatchArena().fits(c) for c in copies):
            return {"arena": False}
        started = time.perf_counter()
        logits = step(name.split(" ")[0], copies).astype(mx.float32)
        mx.eval(logits)
        out[name] = (logits, time.perf_counter() - started)
    return {"arena": True, "max_abs_logit_diff": mx.abs(out["arena"][0] - out["rows"][0]).max().item(),
            "max_abs_logit_diff_batched_vs_alone": mx.abs(out["arena"][0] - out["alone"][0]).max().item(),
            "max_abs_logit": mx.abs(out["rows"][0]).max().item(),
            "greedy_equal_batched_vs_alone": f"{sum(mx.argmax(out['arena'][0], -1) == mx.argmax(out['alone'][0], -1)).item()}"
                                             f" of {len(sessions)}",
            "step_s": {k: out[f"{k} (timed)"][1] for k in ("rows", "arena", "alone")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("service", "inprocess"), default="service")
    parser.add_argument("--tokens", type=int, default=24, help="tokens each stream decodes per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[8], help="stream counts decoded together (each "
                        "stream's figures alone are measured too; on a GPU: 1 8 32)")
    parser.add_argument("--layers", type=int, default=0, help="inprocess: fewer layers for a quick check")
    parser.add_argument("--max-context", type=int, default=4000, help="service: longest context (a quick check: 400)")
    parser.add_argument("--model", default="smollm2-135m", help="service: the model the shard serves (on a GPU: "
                        "random:llama-3.2-1b; results then go to batching_gpu_service.json)")
    parser.add_argument("--memory-budget", default="8GiB", help="service: the shard's --memory-budget")
    parser.add_argument("--lock", help="service: a file to flock while timing (not while prefilling), e.g. /work/wt/timing.lock")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    global MAX_CONTEXT, LONG_PROMPT
    MAX_CONTEXT = LONG_PROMPT = args.max_context
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "service":
        result = bench_service(args)
        name = "batching_cpu" if args.model == "smollm2-135m" else "batching_gpu_service"
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        plot(result, out / f"{name}.png")
    else:
        result = bench_inprocess(args)
        (out / "batching_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("summary", result.get("series")), indent=1))


if __name__ == "__main__":
    main()
