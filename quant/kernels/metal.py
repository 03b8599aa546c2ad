"""The Metal kernels (sources in src/*.metal) as `mx.fast.metal_kernel` objects: the CUDA-core split, combine
and encode kernels line for line (inputs as in cuda.py). They have never run on Apple hardware here; the
tests only check that their sources are present and name every input the launches pass."""

from functools import lru_cache

import mlx.core as mx

from .cuda import COMBINE_INPUTS, COMBINE_OUTPUTS, ENCODE_INPUTS, ENCODE_OUTPUTS, SPLIT_INPUTS, SPLIT_OUTPUTS, SRC

BODIES = {
    "split": (SPLIT_INPUTS, SPLIT_OUTPUTS, "split.metal"),
    "combine": (COMBINE_INPUTS, COMBINE_OUTPUTS, "combine.metal"),
    "encode": (ENCODE_INPUTS, ENCODE_OUTPUTS, "encode.metal"),
}


@lru_cache(maxsize=None)
def kernel(kind: str):
    names, outputs, body = BODIES[kind]
    return mx.fast.metal_kernel(name=f"kvshard_tq_{kind}", input_names=names, output_names=outputs,
                                source=(SRC / body).read_text(), header=(SRC / "common.metal").read_text(),
                                ensure_row_contiguous=False)
