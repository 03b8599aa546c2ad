"""What one batched decode step costs by its number of rows, for the service's path and mlx_lm's, in one process.

Issue 16's ratios (aggregate tok/s of N streams over one stream's) are bounded by how a step's time grows with its
rows. Side by side, on the random Llama-3.2-1B-shaped fp16 model (or --model), rows holding contexts spread over
100-4,000 tokens, for each row count:
  - `kvshard arena`: the service's step (generation.decode_batch over the batch arena: turboquant_mse 4/4 Sessions),
    split into the graph's host build and its evaluation (the scheduler's own decode_build / decode_eval metrics);
  - `mlx_lm fp16`: the same model over mlx_lm's BatchKVCache (left-padded fp16), build and evaluation timed alike;
  - `no history`: the model over a one-token fp16 KVCache per row (the weights' matmuls and every launch, almost no
    attention): the floor any cache's step sits on;
  - `mlx_lm fp16 pipelined`: mlx_lm's generate_step loop (step n+1 built and async-evaluated before step n's tokens
    are read): what hiding the build behind the device would give;
  - on CUDA, `kvshard arena, skinny` and `no history, skinny`: the same with the model's projections through
    quant/kernels/linear.py (a gemv over all rows at once) instead of MLX's matmul, which takes cuBLAS from two
    rows on; and `projections`: each of the model's weight shapes alone, MLX's matmul against skinny_matmul
    (median ms of 20 calls evaluated together, and the largest difference of their outputs).
Medians of --steps steps after warm-up; build and evaluation in ms, and rows x one-row step / step (the most a
step could give the N-stream ratio, with no other cost).

    python benchmarks/step_rows.py [--rows 1 8 32] [--steps 40] [--out benchmarks/results]  -> step_rows_<cpu|gpu>.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from batching import filled_session  # noqa: E402 (benchmarks/batching.py, beside this script)
from bench import device_info  # noqa: E402
from decode_speed import fill  # noqa: E402

from kvshard.quant.batch_arena import BatchArena  # noqa: E402
from kvshard.service import metrics  # noqa: E402
from kvshard.service.generation import Decoder, Sampling, decode_batch  # noqa: E402
from kvshard.service.random_model import load_random  # noqa: E402

PARTS = ("build_ms", "eval_ms", "step_ms")


def contexts(rows: int) -> list[int]:
    return [100 + (4000 - 100) * i // max(rows - 1, 1) for i in range(rows)]


def timed(step, steps: int) -> dict:
    """Median ms of a step's (build, evaluation, whole) over `steps` calls after three untimed ones."""
    runs = []
    for i in range(steps + 3):
        started = time.perf_counter()
        out = step()
        built = time.perf_counter()
        mx.eval(out)
        out.tolist()
        if i >= 3:
            runs.append((built - started, time.perf_counter() - built, time.perf_counter() - started))
    return medians(runs)


def medians(runs: list[tuple]) -> dict:
    """PARTS -> median ms, of (build, evaluation, whole) seconds per step."""
    return {name: 1e3 * statistics.median(r[k] for r in runs) for k, name in enumerate(PARTS)}


def with_ratio_bound(rows: dict) -> dict:
    """Each row count's step with rows x the one-row step / its step, where one row was timed."""
    one = rows.get("1", {}).get("step_ms")
    for n, row in rows.items():
        if one:
            row["ratio_bound"] = int(n) * one / row["step_ms"]
    return rows


def kvshard_arena(served, shape: dict, lengths: list[int], steps: int) -> dict:
    decoders = [Decoder(served, filled_session(served, shape, n), [], Sampling(), {"generated_tokens": 0})
                for n in lengths]
    arena = BatchArena()
    parts = ("decode_build", "decode_eval")

    def sums():
        return [metrics.SCHEDULER_SECONDS.labels(p)._sum.get() for p in parts]

    for _ in range(3):
        decode_batch(decoders, arena)
    runs = []
    for _ in range(steps):
        before, started = sums(), time.perf_counter()
        decode_batch(decoders, arena)
        whole = time.perf_counter() - started
        build, evaluation = (a - b for a, b in zip(sums(), before, strict=True))
        runs.append((build, evaluation, whole))
    arena.release_many([d.session.caches for d in decoders])
    return medians(runs)


def fp16_caches(model, shape: dict, lengths: list[int]) -> list:
    longest = max(lengths)
    caches = [BatchKVCache([longest - n for n in lengths]) for _ in range(shape["layers"])]
    for cache in caches:
        fill(cache, shape["n_kv_heads"], shape["head_dim"], longest, batch=len(lengths))
    return caches


def mlx_lm_fp16(model, shape: dict, lengths: list[int], steps: int) -> dict:
    caches = fp16_caches(model, shape, lengths)
    tokens = mx.ones((len(lengths), 1), dtype=mx.int32)
    return timed(lambda: mx.argmax(model(tokens, cache=caches)[:, -1, :], axis=-1), steps)


def no_history(model, shape: dict, rows: int, steps: int) -> dict:
    caches = [KVCache() for _ in range(shape["layers"])]
    for cache in caches:
        fill(cache, shape["n_kv_heads"], shape["head_dim"], 1, batch=rows)
    tokens = mx.ones((rows, 1), dtype=mx.int32)

    def step():
        out = mx.argmax(model(tokens, cache=caches)[:, -1, :], axis=-1)
        for cache in caches:
            cache.offset -= 1  # stay at one token of history
        return out

    return timed(step, steps)


def mlx_lm_fp16_pipelined(model, shape: dict, lengths: list[int], steps: int) -> dict:
    caches = fp16_caches(model, shape, lengths)

    def forward(y):
        return mx.argmax(model(y[:, None], cache=caches)[:, -1, :], axis=-1)

    y = forward(mx.ones((len(lengths),), dtype=mx.int32))
    mx.async_eval(y)

    def run(y, n):
        for _ in range(n):
            nxt = forward(y)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        return y

    y = run(y, 3)
    started = time.perf_counter()
    run(y, steps).tolist()
    return {"step_ms": 1e3 * (time.perf_counter() - started) / steps}


def projections(model, rows: list[int]) -> dict:
    from kvshard.quant.kernels.linear import MAX_ROWS, skinny_matmul

    layer = model.model.layers[0]
    weights = {"q_proj": layer.self_attn.q_proj.weight, "k_proj": layer.self_attn.k_proj.weight,
               "gate_proj": layer.mlp.gate_proj.weight, "down_proj": layer.mlp.down_proj.weight,
               "lm_head (tied)": model.model.embed_tokens.weight}
    out = {}
    for name, w in weights.items():
        for n in rows:
            if not 2 <= n <= MAX_ROWS:
                continue
            x = mx.random.normal((n, 1, w.shape[1])).astype(mx.float16)
            mx.eval(x)

            def median_ms(f):
                times = []
                for _ in range(7):
                    started = time.perf_counter()
                    mx.eval([f(x + i) for i in range(20)])
                    times.append((time.perf_counter() - started) / 20)
                return 1e3 * statistics.median(times[2:])

            reference, ours = x @ w.T, skinny_matmul(x, w)
            error = mx.abs(reference.astype(mx.float32) - ours.astype(mx.float32)).max().item()
            out[f"{name} {tuple(w.shape)} rows {n}"] = {"mlx_ms": median_ms(lambda v: v @ w.T),
                                                        "skinny_ms": median_ms(lambda v: skinny_matmul(v, w)),
                                                        "max_abs_diff": error,
                                                        "max_abs_ref": mx.abs(reference).max().item()}
            print(name, n, {k: round(v, 4) for k, v in out[f"{name} {tuple(w.shape)} rows {n}"].items()}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.2-1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model, _ = load_random(args.model)
    from types import SimpleNamespace

    from kvshard.quant import install_attention_hook

    install_attention_hook(model)
    served = SimpleNamespace(model=model, fingerprint="random")
    a = model.args
    shape = dict(layers=a.num_hidden_layers, n_kv_heads=a.num_key_value_heads, head_dim=a.head_dim)
    result = {"device": device_info(), "model": args.model, "steps": args.steps, "series": {}}
    series = {"kvshard arena": lambda n: kvshard_arena(served, shape, contexts(n), args.steps),
              "mlx_lm fp16": lambda n: mlx_lm_fp16(model, shape, contexts(n), args.steps),
              "no history": lambda n: no_history(model, shape, n, args.steps),
              "mlx_lm fp16 pipelined": lambda n: mlx_lm_fp16_pipelined(model, shape, contexts(n), args.steps)}

    def measure(name, run):
        rows = {}
        for n in args.rows:
            rows[str(n)] = run(n)
            mx.clear_cache()
            print(name, n, {k: round(v, 3) for k, v in rows[str(n)].items()}, flush=True)
        result["series"][name] = with_ratio_bound(rows)

    for name, run in series.items():
        measure(name, run)
    if mx.default_device() == mx.gpu:
        from kvshard.quant.kernels import linear

        result["projections"] = projections(model, args.rows)
        linear.install(model)
        linear.warm_up()
        measure("kvshard arena, skinny", series["kvshard arena"])
        measure("no history, skinny", series["no history"])
    out = Path(args.out) / f"step_rows_{'gpu' if mx.default_device() == mx.gpu else 'cpu'}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["series"], indent=1))


if __name__ == "__main__":
    main()
