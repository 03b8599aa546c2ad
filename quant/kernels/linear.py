"""A batched decode step's projections on CUDA: a few rows times each fp16 weight matrix, the weights read once.

MLX's CUDA matmul keeps its gemv for one row and hands two rows or more to cuBLAS, whose kernels for a few rows
cost about twice the gemv: on the H200 the random Llama-3.2-1B forward pass with no history evaluates in 2.2 ms
at one row and 4.0 ms at eight (benchmarks/results/step_rows_gpu.json), which alone bounds eight streams' step
at 5.4x one stream's. `skinny_matmul` (src/skinny_matmul.cu) is a gemv over 2..MAX_ROWS rows at once.
`install(model)` makes a model's fp16 `nn.Linear` layers take it for 2..MAX_ROWS rows on CUDA; every other call
(one row, a prefill chunk, the CPU, quantized or float32 weights) is MLX's matmul.

Not installed by the service: it has not paid end to end. Measured on the H200 (benchmarks/step_rows.py,
batching_gpu_service_ab.json): alone, each projection at 8 rows takes 0.74-0.93x cuBLAS's time, but at 32 rows up to
1.7x and the tied 128K-row lm_head at 8 rows 1.25x (so more rows and embeddings keep MLX's matmul); in the
shard's 8-row step a first version (compiled per exact row count) cut the evaluation from 4.7-5.4 to 3.3-3.4 ms,
the bucketed one here did not (5.2 against 4.1-5.1 ms), and each launch adds host time to the step's build.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import cuda
from .dispatch import gpu_backend

BUCKETS = (4, 8, 16)  # the kernel is compiled for at most this many rows, once each: any batch size reuses one
MAX_ROWS = BUCKETS[-1]
COLS = 4  # weight rows a warp reads at once, sharing each read of x
WARPS = 4  # warps a block


def covers(rows: int, weight: mx.array, dtype) -> bool:
    """Whether skinny_matmul takes `rows` rows of `dtype` times this weight here."""
    return (2 <= rows <= MAX_ROWS and dtype == mx.float16 and weight.dtype == mx.float16 and weight.ndim == 2
            and weight.shape[1] % 8 == 0 and gpu_backend() == "cuda")


@lru_cache(maxsize=None)
def _kernel():
    names, outputs, _, body = cuda.parts("skinny_matmul")
    return mx.fast.cuda_kernel(name="kvshard_skinny_matmul", input_names=names, output_names=outputs, source=body,
                               ensure_row_contiguous=True)


def bucket(rows: int) -> int:
    """The compiled row count that takes `rows` rows."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x: skinny_matmul takes 1 to {MAX_ROWS} rows, got {rows}")
    return next(b for b in BUCKETS if rows <= b)


def skinny_matmul(x: mx.array, weight: mx.array) -> mx.array:
    """x (..., K) · weightᵀ for weight (N, K), with the rows of x (all but its last axis) at most MAX_ROWS."""
    N, K = weight.shape
    rows = x.size // K
    warps = -(-N // COLS)
    (y,) = _kernel()(inputs=[x.reshape(rows, K), weight], template=[("M", bucket(rows)), ("COLS", COLS)],
                     grid=(-(-warps // WARPS) * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1),
                     output_shapes=[(rows, N)], output_dtypes=[mx.float16])
    return y.reshape(*x.shape[:-1], N)


class SkinnyLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"]
        if not covers(x.size // x.shape[-1], weight, x.dtype):
            return super().__call__(x)
        y = skinny_matmul(x, weight)
        return y + self["bias"] if "bias" in self else y


def install(model: nn.Module) -> int:
    """Make the model's plain Linear layers skinny ones (in place; their weights stay the same arrays); returns
    how many changed. Quantized layers keep their own class."""
    changed = 0
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            changed += 1
    return changed


def warm_up() -> None:
    """Compile every bucket's kernel now (NVRTC: about a second each), not in the first step of that size."""
    weight = mx.zeros((8, 64), dtype=mx.float16)
    mx.eval([skinny_matmul(mx.zeros((b, 64), dtype=mx.float16), weight) for b in BUCKETS])
