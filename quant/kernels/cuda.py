"""The CUDA kernels (sources in src/*.cu, *.cuh) as `mx.fast.cuda_kernel` objects, and the pieces that let
tests compile them without a GPU (nvcc) or run them on the CPU (tests/cuda_emulator.h).

Kernels (launched from gpu.py): "split" + "combine", the CUDA-core flash-decoding pair; "attend", the split
kernel whose last block per (batch, kv head), found with an atomic ticket, merges all splits, un-rotates and
writes the output; "mma_split" / "mma_attend", the tensor-core kernel (4- or 2-bit codes of one width, head_dim
64 or 128);
"append" / "mma_append", the decode step in one launch: "attend" whose last block also codes the new token
into the cache's code buffers in place and attends it from those codes; "append_ring" / "mma_append_ring",
the same with an fp16 window held as a ring (the oldest token is coded, the new one takes its slot, the ring
is attended exactly); "mma_coded", tensor-core split kernel for codes of any coded layout (klt's plans: mixed
bits, log-scale bytes, keys before RoPE), merged by "combine"; "encode" / "encode_pair", the appends' encode;
"skinny_matmul", a few rows times a weight matrix (linear.py). Codes are read through their strides and each row's
token count from `lengths`: the cache hands over its preallocated buffers, longer than what they hold.
"""

import re
import shutil
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

SRC = Path(__file__).parent / "src"

SPLIT_INPUTS = ["q", "params", "signs", "kcent", "vcent", "kidx", "knorm", "vidx", "vnorm", "lengths"]
SPLIT_OUTPUTS = ["part_o", "part_ml"]
COMBINE_INPUTS = ["q", "params", "signs", "kmean", "part_o", "part_ml"]
COMBINE_OUTPUTS = ["out", "lse"]
ATTEND_INPUTS = SPLIT_INPUTS + ["vsigns", "kmean", "counter"]
ATTEND_OUTPUTS = SPLIT_OUTPUTS + ["out", "lse"]
APPEND_INPUTS = ATTEND_INPUTS + ["xk", "xv", "kbounds", "vbounds"]
RING_INPUTS = APPEND_INPUTS + ["wk", "wv", "ring"]
CODED_INPUTS = ["q", "params", "synth", "kmean", "omega", "kcoord", "kcent", "vcoord", "vcent", "kidx", "knorm", "vidx",
                "vnorm", "lengths"]
CODED_MERGE_INPUTS = ["q", "params", "vsynth_t", "sk", "sv", "wk", "wv", "part_o", "part_ml"]
ENCODE_INPUTS = ["x", "signs", "bounds"]
ENCODE_OUTPUTS = ["idx", "norm"]
ENCODE_PAIR_INPUTS = ["xk", "xv", "ksigns", "vsigns", "kbounds", "vbounds", "kcent", "vcent"]
ENCODE_PAIR_OUTPUTS = ["kidx", "knorm", "vidx", "vnorm"]
MMA_ASM = "mma_asm.cuh"  # the inline-PTX primitives, apart so that the CPU emulator can supply its own


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return (SRC / name).read_text()


def _compact(text: str) -> str:
    """CUDA source without comments and indentation: MLX copies the whole text into every launch's
    primitive, so a shorter text is host time saved at each decode step."""
    lines = (re.sub(r"\s*//.*$", "", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"


@lru_cache(maxsize=None)
def parts(kind: str) -> tuple:
    """(input names, output names, header file names, body) of one kernel."""
    common = ("common.cuh",)
    mma = ("common.cuh", MMA_ASM, "mma_common.cuh")
    names, outputs, headers, body = {
        "split": (SPLIT_INPUTS, SPLIT_OUTPUTS, common, ("split.cu",)),
        "attend": (ATTEND_INPUTS, ATTEND_OUTPUTS, common, ("split.cu", "attend_merge.cu", "attend_out.cu")),
        "append": (APPEND_INPUTS, ATTEND_OUTPUTS, common, ("split.cu", "attend_merge.cu", "append_token.cu",
                                                           "attend_out.cu")),
        "combine": (COMBINE_INPUTS, COMBINE_OUTPUTS, common, ("combine.cu",)),
        "encode": (ENCODE_INPUTS, ENCODE_OUTPUTS, common, ("encode.cu",)),
        "encode_pair": (ENCODE_PAIR_INPUTS, ENCODE_PAIR_OUTPUTS, common, ("encode_pair.cu",)),
        "mma_split": (SPLIT_INPUTS, SPLIT_OUTPUTS, mma, ("mma_split.cu",)),
        "mma_attend": (ATTEND_INPUTS, ATTEND_OUTPUTS, mma, ("mma_split.cu", "attend_merge.cu", "attend_out.cu")),
        "mma_append": (APPEND_INPUTS, ATTEND_OUTPUTS, mma, ("mma_split.cu", "attend_merge.cu", "append_token.cu",
                                                            "attend_out.cu")),
        "mma_coded": (CODED_INPUTS, SPLIT_OUTPUTS, mma, ("mma_coded.cu",)),
        "coded_merge": (CODED_MERGE_INPUTS, ["out"], common, ("coded_merge.cu",)),
        "skinny_matmul": (["x", "w"], ["y"], (), ("skinny_matmul.cu",)),
        "append_ring": (RING_INPUTS, ATTEND_OUTPUTS, common, ("split.cu", "attend_merge.cu", "append_ring.cu",
                                                              "attend_out.cu")),
        "mma_append_ring": (RING_INPUTS, ATTEND_OUTPUTS, mma, ("mma_split.cu", "attend_merge.cu", "append_ring.cu",
                                                               "attend_out.cu")),
    }[kind]
    return names, outputs, headers, _compact("".join(source(b) for b in body))


@lru_cache(maxsize=None)
def kernel(kind: str, shared_memory: int = 0):
    names, outputs, headers, body = parts(kind)
    return mx.fast.cuda_kernel(name=f"kvshard_tq_{kind}", input_names=names, output_names=outputs, source=body,
                               header="".join(_compact(source(h)) for h in headers), ensure_row_contiguous=False,
                               shared_memory=shared_memory)


def kernel_function(kind: str, dtypes: dict, template: dict, name: str = "kvshard_check") -> tuple:
    """(header file names, the `__global__` function) as MLX generates them for one instantiation: parameters
    (pointers, then shapes and strides the body uses), template constants, body."""
    names, outputs, headers, body = parts(kind)
    params = []
    for input_name in names:
        params.append(f"    const {dtypes.get(input_name, 'float')}* {input_name}")
        for suffix, kind_ in (("_shape", "Shape"), ("_strides", "Strides")):
            if input_name + suffix in body:
                params.append(f"    const __grid_constant__ {kind_} {input_name}{suffix}")
    for output_name in outputs:
        params.append(f"    {dtypes.get(output_name, 'float')}* {output_name}")
    consts = []
    for key, value in template.items():
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {key} = {value};")
        else:
            consts.append(f"  using {key} = {value};")
    function = (
        f"namespace mlx::core::cu {{\n__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + body + "\n}\n}\n"
    )
    return headers, function


def translation_unit(kind: str, dtypes: dict, template: dict) -> str:
    """The CUDA source MLX would hand NVRTC for one instantiation, with a stand-in for MLX's device header,
    so `nvcc` can compile-check the kernels on a machine without a GPU (tests/test_kernels.py does)."""
    stand_in = (
        "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
        "#include <cuda/std/array>\n#include <cuda/std/limits>\n"
        "namespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 8>;\n"
        "using Strides = cuda::std::array<int64_t, 8>;\n}\n"
    )
    headers, function = kernel_function(kind, dtypes, template)
    return stand_in + "".join(source(h) for h in headers) + function


def nvcc_path() -> str | None:
    return shutil.which("nvcc")
