"""Fast attention paths against the portable path and against exact attention on the dequantized K/V.

On this CPU: the CPU fast path (compiled select-tree decode + BLAS) and the fused encode. Everywhere: the
dispatch rules. With nvcc: the CUDA kernels compile for sm_90 without register spills. On a GPU: the fused
kernel against the portable path (the benchmarks record the same check on the lent GPU).
"""

import ctypes
import itertools
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from kvshard.quant import kernels
from kvshard.quant.attention import CodeSegment, ExactSegment, compressed_attention, decode_keys
from kvshard.quant.kernels import cuda, dispatch, gpu, metal
from kvshard.quant.cache import CompressedKVCache
from kvshard.quant.methods import make_method

ON_GPU = kernels.gpu_backend() is not None


def _filled(tokens, n_kv_heads=2, head_dim=64, key_bits=4, value_bits=4, window=0, sinks=0, center=True, seed=0):
    mx.random.seed(seed)
    cache = CompressedKVCache(head_dim=head_dim, n_kv_heads=n_kv_heads, key_bits=key_bits, value_bits=value_bits,
                              window=window, sink_tokens=sinks, center_keys=center)
    # A shared offset makes the key mean matter; a few large keys make the softmax peaky.
    keys = mx.random.normal((1, n_kv_heads, tokens, head_dim)) + 0.7 * mx.random.normal((1, n_kv_heads, 1, head_dim))
    keys = keys * (1 + 3 * (mx.random.uniform(shape=(1, n_kv_heads, tokens, 1)) > 0.98))
    cache.append(keys, mx.random.normal((1, n_kv_heads, tokens, head_dim)))
    return cache


def _attend(cache, queries, backend, mask=None):
    return compressed_attention(queries, cache.segments(), n_kv_heads=cache.n_kv_heads, key_method=cache.key_quantizer,
                                value_method=cache.value_quantizer, scale=cache.head_dim**-0.5, mask=mask,
                                backend=backend)


def _exact(cache, queries, mask=None):
    """Plain softmax attention on the K/V the cache holds, dequantized in fp32 and repeated per query head."""
    keys, values = _exact_kv(cache)
    group = queries.shape[1] // cache.n_kv_heads
    keys, values = mx.repeat(keys, group, axis=1), mx.repeat(values, group, axis=1)
    return mx.fast.scaled_dot_product_attention(queries.astype(mx.float32), keys, values,
                                                scale=cache.head_dim**-0.5, mask=mask)


def _exact_kv(cache):
    """The K/V the cache holds, decoded in fp32 in token order (sinks, codes, window)."""
    keys, values = [], []
    for segment in cache.segments():
        if isinstance(segment, ExactSegment):
            keys.append(segment.keys.astype(mx.float32))
            values.append(segment.values.astype(mx.float32))
        else:
            k = cache.key_quantizer.decode(segment.key_codes)
            keys.append(k if segment.key_mean is None else k + segment.key_mean.astype(mx.float32))
            values.append(cache.value_quantizer.decode(segment.value_codes))
    return mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)


def _max_err(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.mark.parametrize(
    "tokens, key_bits, value_bits, window, sinks, center",
    [
        (100, 4, 4, 0, 0, True),  # shorter than a block: one padded block
        (1024, 4, 4, 0, 0, True),  # exactly one block
        (2500, 4, 4, 0, 0, False),  # two blocks and an overlapping tail, no key mean
        (1500, 4, 4, 32, 4, True),  # fp16 sinks and window beside the codes
        (1100, 2, 4, 0, 0, True),  # mixed bits
        (700, 1, 2, 0, 0, True),
    ],
)
def test_cpu_path_matches_pure_and_exact(tokens, key_bits, value_bits, window, sinks, center):
    cache = _filled(tokens, key_bits=key_bits, value_bits=value_bits, window=window, sinks=sinks, center=center)
    queries = mx.random.normal((1, 8, 1, 64))  # GQA: 4 query heads per kv head
    fast, pure = _attend(cache, queries, "cpu"), _attend(cache, queries, "pure")
    assert fast.shape == queries.shape
    assert _max_err(fast, pure) < 2e-5
    assert _max_err(fast, _exact(cache, queries)) < 1e-4


@pytest.mark.parametrize("window", [0, 24])
def test_cpu_path_causal_prefill_across_blocks(window):
    cache = _filled(1300, window=window)
    queries = mx.random.normal((1, 8, 37, 64))
    fast, pure = _attend(cache, queries, "cpu", mask="causal"), _attend(cache, queries, "pure", mask="causal")
    assert _max_err(fast, pure) < 2e-5
    causal = mx.arange(1300 - 37, 1300)[:, None] >= mx.arange(1300)[None]
    assert _max_err(fast, _exact(cache, queries, mask=causal)) < 1e-4


def test_cpu_path_array_masks():
    cache = _filled(1200)
    queries = mx.random.normal((1, 8, 3, 64))
    allowed = mx.random.uniform(shape=(3, 1200)) > 0.3
    additive = mx.where(allowed, 0.0, -1e9)
    for mask in (allowed, additive):
        assert _max_err(_attend(cache, queries, "cpu", mask), _attend(cache, queries, "pure", mask)) < 2e-5
    # A row with every key masked gives zeros on every path, not NaN.
    blocked = mx.zeros((3, 1200), dtype=mx.bool_)
    out = _attend(cache, queries, "cpu", blocked)
    assert not mx.isnan(out).any().item() and _max_err(out, _attend(cache, queries, "pure", blocked)) == 0


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fused_encode_is_bit_identical(head_dim, bits):
    method = make_method("turboquant_mse", head_dim, bits)
    x = mx.random.normal((1, 2, 300, head_dim)).astype(mx.float16)
    expected, got = method.encode(x), kernels.encode(method, x)
    assert expected.keys() == got.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert mx.array_equal(got[name], expected[name]).item(), name


@pytest.mark.parametrize("mask", [None, "causal", "array"])
def test_prefill_path_matches_pure(mask):
    """The GPU prefill path (decode the layer once, MLX SDPA) computes the same function; it runs anywhere."""
    cache = _filled(300, window=16, sinks=2)
    queries = mx.random.normal((1, 8, 20, 64))
    if mask == "array":
        mask = mx.random.uniform(shape=(20, 300)) > 0.2
    assert _max_err(_attend(cache, queries, "prefill", mask), _attend(cache, queries, "pure", mask)) < 2e-5


def test_dispatch_rules(monkeypatch):
    cache = _filled(1100)
    queries = mx.random.normal((1, 8, 1, 64))

    def choose(c, backend="auto"):
        return dispatch.choose(backend, queries, c.segments(), c.key_quantizer, c.value_quantizer, None)

    if not ON_GPU:
        assert choose(cache) == "cpu"
        assert choose(_filled(200)) == "pure"
        with pytest.raises(ValueError):
            _attend(cache, queries, "cuda")
    other = CompressedKVCache(head_dim=64, n_kv_heads=2, method="polar")
    other.append(mx.random.normal((1, 2, 1100, 64)), mx.random.normal((1, 2, 1100, 64)))
    assert choose(other) == "pure"
    with pytest.raises(ValueError):
        _attend(other, queries, "cpu")
    with pytest.raises(ValueError):
        _attend(cache, queries, "tpu")
    with pytest.raises(ValueError, match="mask"):
        _attend(cache, queries, "auto", mask="sliding")
    monkeypatch.setenv(kernels.ENV_BACKEND, "pure")
    assert kernels.requested_backend(None) == "pure"


def _klt_plan(head_dim, bits, n_kv_heads=1, norm_bits=16):
    import numpy as np

    from kvshard.quant.methods.klt import KLTPlan

    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(head_dim, head_dim)))
    energies = np.sort(np.random.default_rng(1).uniform(0.1, 2.0, head_dim))[::-1]
    return KLTPlan(np.repeat(q[None], n_kv_heads, 0), np.repeat(energies[None], n_kv_heads, 0), bits, norm_bits)


def test_kernels_are_chosen_from_fused_specs(monkeypatch):
    """Kernels see methods only through fused_spec(): TurboQuant-MSE, klt with one bit width and fp16 scales
    (calibrated or not) and query-aware key scales take the TurboQuant kernels; mixed-bit klt and log-scale bytes
    the coded-layout kernel (tensor cores); other methods none. The tensor-core kernel needs sm_80+, 4-bit or 2-bit codes of one width, head_dim 64/128
    and <= 8 rows."""
    from kvshard.quant.methods.klt import KLT
    from kvshard.quant.methods.scaled import ScaledKeys

    pick = dispatch._kernel_for.__wrapped__
    monkeypatch.setattr(dispatch, "_tensor_cores", lambda: True)
    mse4 = make_method("turboquant_mse", 128, 4)
    assert pick("cuda", mse4, mse4, 128, 4) == "mma"  # Llama-3.1-8B decode
    assert pick("cuda", mse4, make_method("turboquant_mse", 128, 2), 128, 4) == "cuda"  # 2-bit values only
    mse2 = make_method("turboquant_mse", 64, 2)
    assert pick("cuda", mse2, mse2, 64, 4) == "mma"  # 2-bit keys and values: the nibble-indexed table
    assert pick("cuda", mse4, mse4, 128, 10) == "cuda"  # more than 8 rows per kv head
    assert pick("metal", mse4, mse4, 128, 4) == "metal"
    klt4 = KLT(64, 4)
    assert pick("cuda", klt4, klt4, 64, 3) == "mma"
    calibrated = KLT(64, 4, plan=_klt_plan(64, (4,) * 64))
    assert pick("cuda", calibrated, klt4, 64, 3) == "mma"
    # Mixed bits and log-scale bytes: the coded-layout kernel, on tensor cores only.
    mixed = KLT(64, 4, plan=_klt_plan(64, (5,) * 32 + (3,) * 32))
    assert pick("cuda", mixed, klt4, 64, 3) == "mma_coded"
    assert pick("cuda", KLT(64, 4, plan=_klt_plan(64, (4,) * 64, norm_bits=8)), klt4, 64, 3) == "mma_coded"
    assert pick("cuda", mixed, klt4, 64, 9) is None  # more than 8 rows per kv head
    assert pick("metal", mixed, klt4, 64, 3) is None
    assert pick("cuda", mixed, make_method("turboquant_mse", 64, 4), 64, 3) is None  # TurboQuant has no coded layout
    scaled = ScaledKeys(make_method("turboquant_mse", 64, 4), mx.ones((3, 64)))
    assert pick("cuda", scaled, make_method("turboquant_mse", 64, 4), 64, 3) == "mma"
    assert pick("cuda", make_method("polar", 64, 4), klt4, 64, 3) is None
    assert pick("cuda", make_method("turboquant_mse", 96, 4), make_method("turboquant_mse", 96, 4), 96, 4) is None
    monkeypatch.setattr(dispatch, "_tensor_cores", lambda: False)
    assert pick("cuda", mse4, mse4, 128, 4) == "cuda"
    assert pick("cuda", mixed, klt4, 64, 3) is None
    assert not gpu.mma_supported(256, 4, 4, 4)
    # A lane packs its codes into one 32-bit word: head_dim 256 at 8 bits (64 bits a lane) is not encoded on the
    # GPU (it gave garbage codes on the H200); at 4 bits it is.
    mse8_256, mse4_256 = make_method("turboquant_mse", 256, 8), make_method("turboquant_mse", 256, 4)
    assert not gpu.encode_supported(mse8_256) and not gpu.append_supported(mse8_256, mse4_256)
    assert gpu.encode_supported(mse4_256) and gpu.encode_supported(make_method("turboquant_mse", 128, 8))


def test_gpu_plan_covers_the_benchmarked_shapes():
    assert gpu.gpu_plan(128, 4, 4, 4) == {"C": 16, "LPT": 8}  # Llama-3.1-8B decode: 32 q / 8 kv heads
    assert gpu.gpu_plan(64, 3, 4, 4) == {"C": 16, "LPT": 4}  # SmolLM2-135M: 9 q / 3 kv heads
    assert gpu.gpu_plan(128, 4, 4, 2) is not None
    assert gpu.gpu_plan(128, 4, 3, 4) is None  # codes that straddle bytes: portable path
    assert gpu.gpu_plan(96, 4, 4, 4) is None  # dense rotation: portable path
    assert gpu.gpu_plan(128, 64, 4, 4) is None  # too many rows per kv head for the registers


def test_metal_sources_take_what_the_launches_pass():
    """The Metal kernels cannot run here (no Apple GPU): unverified beyond this check that each source reads
    every input the launch code hands it."""
    for names, _, body in metal.BODIES.values():
        text = (cuda.SRC / body).read_text()
        for name in names:
            assert name in text, (body, name)


def test_generation_uses_fast_path_and_matches_pure(monkeypatch):
    """Greedy tokens of a tiny random llama with compressed caches: identical on the fast and portable paths,
    with a prompt long enough (> CPU_MIN_TOKENS) that the CPU fast path is taken."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama

    from kvshard.quant import KVCacheBuilder, KVCacheConfig

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        vocab_size=256, rope_theta=10000.0))
    prompt = mx.random.randint(0, 256, (kernels.CPU_MIN_TOKENS + 50,))

    def tokens(backend):
        monkeypatch.setenv(kernels.ENV_BACKEND, backend)
        caches = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4))
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=6, prompt_cache=caches)]

    assert tokens("auto") == tokens("pure")


def _nvcc_compile(kind, template, tmp_path):
    dtypes = {"q": "__half", "kidx": "uint8_t", "vidx": "uint8_t", "knorm": "__half", "vnorm": "__half",
              "kmean": "__half", "x": "__half", "idx": "uint8_t", "norm": "__half", "counter": "int32_t",
              "xk": "__half", "xv": "__half", "kidx_out": "uint8_t", "vnorm_out": "__half", "lengths": "int32_t",
              "wk": "__half", "wv": "__half", "ring": "int32_t", "sk": "__half", "sv": "__half"}
    source = tmp_path / f"{kind}.cu"
    source.write_text(cuda.translation_unit(kind, dtypes, template))
    result = subprocess.run(
        [cuda.nvcc_path(), "-std=c++17", "-arch=sm_90", "-c", "-o", str(tmp_path / f"{kind}.o"),
         "-Xptxas", "-v", str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.mark.skipif(cuda.nvcc_path() is None, reason="nvcc not installed")
def test_cuda_kernels_compile_without_spills(tmp_path):
    log = _nvcc_compile("split", dict(D=128, R=4, KB=4, VB=4, LPT=8, WARPS=4, U=gpu.GPU_UNROLL, TPS=256, ROUNDS=3),
                        tmp_path)
    assert " 0 bytes spill stores" in log, log
    _nvcc_compile("combine", dict(D=64, R=3, HAS_MEAN=True, NT=128, ROUNDS=3, OutT="__half"), tmp_path)
    _nvcc_compile("encode", dict(D=128, BITS=4, ROUNDS=3), tmp_path)
    log = _nvcc_compile("coded_merge", dict(D=64, R=4, MPV=64, MV=64, NT=128, HAS_SINKS=True, HAS_WINDOW=True,
                                            OutT="__half"), tmp_path)
    assert " 0 bytes spill stores" in log, log
    _nvcc_compile("encode_pair", dict(D=64, KBITS=4, VBITS=2, KROUNDS=3, VROUNDS=0, KREFIT=False, VREFIT=True), tmp_path)
    log = _nvcc_compile("attend", dict(D=128, R=4, KB=4, VB=4, LPT=8, WARPS=4, U=gpu.GPU_UNROLL, TPS=256, ROUNDS=3,
                                       HAS_MEAN=True, VROUNDS=3, OutT="__half"), tmp_path)
    assert " 0 bytes spill stores" in log, log
    mma = dict(D=128, R=4, WARPS=gpu.GPU_MMA_WARPS, U=gpu.GPU_MMA_UNROLL, NB=gpu.GPU_MMA_BUFFERS[128], ROUNDS=3,
               KB=4, VB=4)
    log = _nvcc_compile("mma_attend", dict(mma, HAS_MEAN=True, VROUNDS=3, OutT="__half"), tmp_path)
    assert " 0 bytes spill stores" in log, log
    log = _nvcc_compile("mma_split", dict(mma, D=64, R=3, NB=gpu.GPU_MMA_BUFFERS[64]), tmp_path)
    assert " 0 bytes spill stores" in log, log
    for D, bits in itertools.product((64, 128), (4, 2)):  # the decode step's single launch, appending in place
        log = _nvcc_compile("mma_append", dict(mma, D=D, NB=gpu.GPU_MMA_BUFFERS[D], HAS_MEAN=True, VROUNDS=3,
                                               OutT="__half", KB=bits, VB=bits), tmp_path)
        assert " 0 bytes spill stores" in log, log
    log = _nvcc_compile("append", dict(D=64, R=4, KB=2, VB=2, LPT=4, WARPS=4, U=gpu.GPU_UNROLL, TPS=256, ROUNDS=3,
                                       HAS_MEAN=True, VROUNDS=3, OutT="__half"), tmp_path)
    assert " 0 bytes spill stores" in log, log
    log = _nvcc_compile("mma_append_ring", dict(mma, D=64, NB=gpu.GPU_MMA_BUFFERS[64], HAS_MEAN=True, VROUNDS=3,
                                                OutT="__half", KB=4, VB=4, W=128), tmp_path)
    assert " 0 bytes spill stores" in log, log
    log = _nvcc_compile("append_ring", dict(D=128, R=4, KB=4, VB=4, LPT=8, WARPS=4, U=gpu.GPU_UNROLL, TPS=256,
                                            ROUNDS=3, HAS_MEAN=True, VROUNDS=3, OutT="__half", W=64), tmp_path)
    assert " 0 bytes spill stores" in log, log


def _emulated(kind, dtypes, template, tmp_path):
    """The CUDA kernel's own source compiled by g++ against tests/cuda_emulator.h: a callable
    (pointers, shapes, strides, grid, threads)."""
    headers, function = cuda.kernel_function(kind, dtypes, template)
    headers = [cuda.source(h) for h in headers if h != cuda.MMA_ASM]  # the emulator supplies these primitives
    # Dynamic shared memory (the tensor-core kernel's) comes from the emulator.
    declaration = "extern __shared__ __align__(16) unsigned char kvs_smem[];"
    assert declaration in function or not kind.startswith("mma")
    function = function.replace(declaration, "unsigned char* kvs_smem = emu::shared_memory;")
    names, outputs = cuda.parts(kind)[:2]
    args = []
    for i, name in enumerate(names):
        args.append(f"(const {dtypes.get(name, 'float')}*)p[{i}]")
        args += [f"emu_array<mlx::core::cu::{kind_}>({arr} + 8 * {i})"
                 for suffix, kind_, arr in (("_shape", "Shape", "shp"), ("_strides", "Strides", "str"))
                 if name + suffix in function]
    args += [f"({dtypes.get(name, 'float')}*)p[{len(names) + j}]" for j, name in enumerate(outputs)]
    source = tmp_path / f"{kind}_emulated.cpp"
    source.write_text(
        '#include "cuda_emulator.h"\nnamespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 8>;\n'
        "using Strides = cuda::std::array<int64_t, 8>;\n}\nusing std::min;\n"
        "template <class A, class T> A emu_array(const T* p) { A a; for (int i = 0; i < 8; ++i) a.v[i] = p[i]; return a; }\n"
        + "".join(headers) + function
        + 'extern "C" void launch(void** p, const int32_t* shp, const int64_t* str, int gx, int gy, int gz, int nt) {\n'
        "  emu::launch({unsigned(gx), unsigned(gy), unsigned(gz)}, nt, [&] { mlx::core::cu::kvshard_check("
        + ", ".join(args) + "); });\n}\n")
    library = tmp_path / f"{kind}_emulated.so"
    result = subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas",
                             f"-I{Path(__file__).parent}", "-o", str(library), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(library)).launch, names, outputs


def _dense(a, dtype, batch):
    """An input for an emulated launch: (array, shape, strides), 4-D arrays repeated to `batch` rows."""
    import numpy as np

    a = np.array(a).astype(dtype)
    a = np.ascontiguousarray(np.repeat(a, batch, 0) if a.ndim == 4 and a.shape[0] != batch else a)
    return a, a.shape, [s // a.itemsize for s in a.strides]


def _roomy(codes, batch, room=40):
    """Codes repeated to `batch` rows in a buffer `room` tokens longer than they are, as the cache preallocates."""
    import numpy as np

    codes = np.repeat(np.array(codes), batch, 0)
    B, H, T, W = codes.shape
    buffer = np.zeros((B, H, T + room, W), codes.dtype)
    buffer[:, :, :T] = codes
    return buffer, codes.shape, [H * (T + room) * W, (T + room) * W, W, 1]


def _emulated_attend(kind, dtypes, template, inputs, q_shape, grid, rows, warps, tmp_path) -> list:
    """One launch of a single-launch attention kernel under the emulator: inputs are name -> (array, shape,
    strides); returns the outputs (split partials, out, lse); the inputs' arrays are what the kernel left."""
    import numpy as np

    launch, names, _ = _emulated(kind, dtypes, template, tmp_path)
    shapes, strides, arrays = np.zeros((len(names), 8), np.int32), np.zeros((len(names), 8), np.int64), []
    for i, name in enumerate(names):
        array, shape, stride = inputs[name]
        arrays.append(array)
        shapes[i, : len(shape)], strides[i, : len(stride)] = shape, stride
    splits, n_kv, batch = grid
    results = [np.full((batch, n_kv, splits, rows, q_shape[-1]), np.nan, np.float32),
               np.full((batch, n_kv, splits, rows, 2), np.nan, np.float32),
               np.full(q_shape, np.nan, np.float16), np.full((batch, n_kv, rows), np.nan, np.float32)]
    pointers = (ctypes.c_void_p * (len(arrays) + 4))(*[a.ctypes.data for a in arrays + results])
    launch(pointers, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p), splits, n_kv,
           batch, warps * 32)
    return results


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize(
    "tokens, head_dim, queries_per_kv, length, warps, unroll, splits, center, second_row, bits",
    [
        (300, 128, 4, 1, 4, 1, 3, True, None, 4),  # Llama decode shape, partial last step, a split with no tokens
        (1000, 64, 3, 1, 8, 1, 5, False, None, 4),  # SmolLM shape, no key mean, 8 warps
        (150, 128, 4, 2, 4, 2, 2, True, None, 4),  # two query tokens per head (8 rows), two 16-token steps a warp step
        (700, 64, 3, 1, 4, 1, 4, True, 77, 4),  # batch 2, rows of 700 and 77 tokens in one launch
        (300, 128, 4, 1, 4, 1, 3, True, None, 2),  # 2-bit codes: nibble-indexed pair table
        (700, 64, 3, 1, 4, 1, 4, True, 77, 2),  # 2 bits at head_dim 64: a lane's values are half a word
    ],
)
def test_tensor_core_kernel_on_cpu_emulator(tokens, head_dim, queries_per_kv, length, warps, unroll, splits, center,
                                            second_row, bits, tmp_path):
    """The tensor-core kernel's CUDA source (fragment layouts, centroid-pair table look-ups at 4 and 2 bits,
    online softmax, split merge, tickets, per-row lengths) run under g++ with warp operations emulated, against
    the portable path. Codes
    are read from buffers longer than the held tokens, as the cache hands them over; with a second row, that
    row holds fewer tokens than its buffer has codes, as a batch of sequences of different lengths does."""
    import numpy as np

    cache = _filled(tokens, head_dim=head_dim, center=center, key_bits=bits, value_bits=bits)
    batch = 1 if second_row is None else 2
    queries = mx.random.normal((batch, 2 * queries_per_kv, length, head_dim)).astype(mx.float16)
    (segment,) = cache.segments()
    km, vm = cache.key_quantizer, cache.value_quantizer
    rows, n_kv = queries_per_kv * length, cache.n_kv_heads

    dense = lambda a, dtype: _dense(a, dtype, batch)  # noqa: E731
    roomy = lambda codes: _roomy(codes, batch)  # noqa: E731

    lengths = np.array([tokens] if second_row is None else [tokens, second_row], np.int32)
    tickets = np.zeros(batch * n_kv, np.int32)
    inputs = {"q": dense(queries, np.float16), "params": dense(mx.array([head_dim**-0.5]), np.float32),
              "signs": dense(km.rotation.signs, np.float32), "kcent": dense(km.codebook.centroids, np.float32),
              "vcent": dense(vm.codebook.centroids, np.float32), "kidx": roomy(segment.key_codes["idx"]),
              "knorm": dense(segment.key_codes["norm"], np.float16), "vidx": roomy(segment.value_codes["idx"]),
              "vnorm": dense(segment.value_codes["norm"], np.float16), "lengths": (lengths, lengths.shape, [1]),
              "vsigns": dense(vm.rotation.signs, np.float32),
              "kmean": dense(segment.key_mean if center else mx.zeros((1, 1, 1, 1)), np.float16),
              "counter": (tickets, tickets.shape, [1])}
    dtypes = {"q": "__half", "kidx": "uint8_t", "vidx": "uint8_t", "knorm": "__half", "vnorm": "__half",
              "kmean": "__half", "counter": "int32_t", "out": "__half", "lengths": "int32_t"}
    template = dict(D=head_dim, R=rows, WARPS=warps, U=unroll, NB=gpu.GPU_MMA_BUFFERS[head_dim], KB=bits, VB=bits,
                    ROUNDS=km.rotation.signs.shape[0], HAS_MEAN=center, VROUNDS=vm.rotation.signs.shape[0],
                    OutT="__half")
    results = _emulated_attend("mma_attend", dtypes, template, inputs, queries.shape, (splits, n_kv, batch), rows,
                               warps, tmp_path)
    pure = [np.array(_attend(cache, queries[:1].astype(mx.float32), "pure"))]
    if second_row is not None:
        cache.trim(tokens - second_row)
        pure.append(np.array(_attend(cache, queries[1:].astype(mx.float32), "pure")))
    pure = np.concatenate(pure)
    # fp16 products on tensor cores (query, centroids, probabilities·norms rounded to fp16, as in fp16 SDPA):
    # within a few fp16 ulps of the largest output.
    assert np.abs(results[2].astype(np.float32) - pure).max() < 2e-3 * max(1.0, np.abs(pure).max())
    assert (tickets == 0).all()  # the last block of each kv head cleaned its ticket for the next launch


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize(
    "kind, tokens, head_dim, queries_per_kv, bits, splits, batch, window, slot",
    [
        ("mma_append", 300, 64, 4, 4, 3, 1, 0, 0),  # Llama-3.2-1B decode shape (the e2e benchmark's)
        ("mma_append", 150, 128, 4, 4, 2, 2, 0, 0),  # Llama-3.1-8B shape, batch 2 (rows of 150 and 61 tokens)
        ("mma_append", 300, 64, 4, 2, 3, 1, 0, 0),  # tensor cores at 2 bits: codes under a byte a lane
        ("append", 200, 64, 3, 2, 0, 1, 0, 0),  # CUDA-core kernel, 2 bits: a lane's codes are under a byte
        ("append", 130, 128, 4, 4, 0, 1, 0, 0),
        ("mma_append_ring", 300, 64, 4, 4, 3, 1, 24, 5),  # an fp16 window of 24 as a ring, oldest in slot 5
        ("append_ring", 200, 64, 3, 2, 0, 1, 16, 0),
    ],
)
def test_append_kernel_on_cpu_emulator(kind, tokens, head_dim, queries_per_kv, bits, splits, batch, window, slot,
                                       tmp_path):
    """The decode step in one launch, run under g++: the last block codes a token into row `length` of the
    code buffers (in place: they are inputs) and attends it beside the held codes: the new token, or with an
    fp16 window held as a ring, the window's oldest, whose slot the new token takes (the ring attended
    exactly). Against the cache that appended the token the ordinary way: the codes written (up to float
    rounding at a boundary), the window, and the portable path's output over all tokens."""
    import numpy as np

    from kvshard.quant.packing import unpack

    cache = _filled(tokens, head_dim=head_dim, key_bits=bits, value_bits=bits, window=window)
    held = tokens - window
    lengths = [held] if batch == 1 else [held, held // 2 - 14]
    new_k = (mx.random.normal((batch, 2, 1, head_dim)) + 0.5).astype(mx.float16)
    new_v = mx.random.normal((batch, 2, 1, head_dim)).astype(mx.float16)
    # Queries aimed at the new key: it takes a share of each row's weight (2-70% here), so a wrong score or value
    # of it shows.
    queries = (0.5 * mx.repeat(new_k, queries_per_kv, axis=1)).astype(mx.float16)
    segment = next(s for s in cache.segments() if s.is_codes)
    km, vm = cache.key_quantizer, cache.value_quantizer
    rows, n_kv, room = queries_per_kv, 2, 40

    def dense(a, dtype):
        a = np.ascontiguousarray(np.array(a).astype(dtype))
        return a, a.shape, [s // a.itemsize for s in a.strides]

    def roomy(codes):
        codes = np.repeat(np.array(codes), batch, 0)
        B, H, T, W = codes.shape
        buffer = np.zeros((B, H, T + room, W), codes.dtype)
        buffer[:, :, :T] = codes
        return buffer, buffer.shape, [H * (T + room) * W, (T + room) * W, W, 1]

    def ring(x):  # the window's token i in slot (i + slot) % window
        return dense(np.roll(np.array(x.astype(mx.float16)), slot, axis=2), np.float16)

    mean = np.repeat(np.array(segment.key_mean.astype(mx.float16)), batch, 0)
    row_lengths = np.array(lengths, np.int32)
    tickets = np.zeros(batch * n_kv, np.int32)
    inputs = {"q": dense(queries, np.float16), "params": dense(mx.array([head_dim**-0.5]), np.float32),
              "signs": dense(km.rotation.signs, np.float32), "kcent": dense(km.codebook.centroids, np.float32),
              "vcent": dense(vm.codebook.centroids, np.float32), "kidx": roomy(segment.key_codes["idx"]),
              "knorm": roomy(segment.key_codes["norm"]), "vidx": roomy(segment.value_codes["idx"]),
              "vnorm": roomy(segment.value_codes["norm"]), "lengths": (row_lengths, row_lengths.shape, [1]),
              "vsigns": dense(vm.rotation.signs, np.float32), "kmean": dense(mean, np.float16),
              "counter": (tickets, tickets.shape, [1]), "xk": dense(new_k, np.float16), "xv": dense(new_v, np.float16),
              "kbounds": dense(km.codebook.boundaries, np.float32), "vbounds": dense(vm.codebook.boundaries, np.float32)}
    if window:
        inputs.update(wk=ring(cache.window_keys), wv=ring(cache.window_values),
                      ring=(np.array([slot], np.int32), (1,), [1]))
    dtypes = {"q": "__half", "kidx": "uint8_t", "vidx": "uint8_t", "knorm": "__half", "vnorm": "__half",
              "kmean": "__half", "counter": "int32_t", "out": "__half", "lengths": "int32_t", "xk": "__half",
              "xv": "__half", "wk": "__half", "wv": "__half", "ring": "int32_t"}
    template = dict(D=head_dim, R=rows, ROUNDS=km.rotation.signs.shape[0], HAS_MEAN=True,
                    VROUNDS=vm.rotation.signs.shape[0], OutT="__half", KB=bits, VB=bits, W=window)
    if kind.startswith("mma"):
        template.update(WARPS=4, U=1, NB=gpu.GPU_MMA_BUFFERS[head_dim])
    else:
        plan = gpu.gpu_plan(head_dim, rows, bits, bits)
        template.update(LPT=plan["LPT"], WARPS=4, U=gpu.GPU_UNROLL, TPS=64)
        splits = -(-held // 64)
    results = _emulated_attend(kind, dtypes, template, inputs, queries.shape, (splits, n_kv, batch), rows, 4,
                               tmp_path)
    assert (tickets == 0).all()
    for b, n in enumerate(lengths):
        reference = _filled(tokens, head_dim=head_dim, key_bits=bits, value_bits=bits, window=window)
        reference.trim(held - n)
        reference.append(new_k[b:b + 1], new_v[b:b + 1])
        ref_segment = next(s for s in reference.segments() if s.is_codes)
        for side, ref_codes in (("k", ref_segment.key_codes), ("v", ref_segment.value_codes)):
            got = mx.array(inputs[f"{side}idx"][0][b:b + 1, :, n : n + 1])
            differ = unpack(got, bits, head_dim) != unpack(ref_codes["idx"][:, :, n : n + 1], bits, head_dim)
            assert differ.mean().item() < 0.02  # a coordinate within float rounding of a boundary may flip
            got_norm = inputs[f"{side}norm"][0][b:b + 1, :, n : n + 1].astype(np.float32)
            assert np.allclose(got_norm, np.array(ref_codes["norm"][:, :, n : n + 1].astype(mx.float32)), rtol=2e-3)
        # The rows past the coded token are untouched (no block writes anywhere else).
        assert not inputs["kidx"][0][b, :, n + 1 :].any() or b > 0
        if window:  # the ring holds the reference's window, its newest token in the oldest's slot
            for side, held_window in (("wk", reference.window_keys), ("wv", reference.window_values)):
                ordered = np.roll(inputs[side][0], -slot - 1, axis=2)
                assert np.array_equal(ordered, np.array(held_window.astype(mx.float16)))
        pure = np.array(_attend(reference, queries[b:b + 1].astype(mx.float32), "pure"))
        assert np.abs(results[2][b:b + 1].astype(np.float32) - pure).max() < 2e-3 * max(1.0, np.abs(pure).max())


# Coordinate bits of the recommended configuration's shape at head_dim 64 (benchmarks/decode_speed.py): keys with
# most bits in a few coordinates and 8 dropped, values at 6-4 bits.
RECOMMENDED_KEY_BITS = (7, 6, 6, 5, 5, 5, 4, 4) + (4,) * 4 + (3,) * 16 + (2,) * 14 + (1,) * 14 + (0,) * 8
RECOMMENDED_VALUE_BITS = (6, 6, 6) + (5,) * 13 + (4,) * 48


def _coded_cache(head_dim, key_bits, value_bits, rope, tokens, sinks=4, norm_bits=8, center=True, window=0):
    """A klt cache of calibrated plans' shape (per-head transforms, mixed bits), keys coded before RoPE when rope
    is "half" or "traditional", filled with keys of a shared offset and a few large ones."""
    import numpy as np

    from kvshard.quant.methods.klt import KLTPlan

    key, value = _klt_plan(head_dim, key_bits, 2, norm_bits), _klt_plan(head_dim, value_bits, 2, norm_bits)
    if rope:
        key = KLTPlan(key.analysis, key.energies, key.coordinate_bits, norm_bits,
                      10000.0 ** (-np.arange(0, head_dim, 2) / head_dim), rope == "traditional")
    cache = CompressedKVCache(head_dim=head_dim, n_kv_heads=2, method="klt", key_plan=key, value_plan=value,
                              sink_tokens=sinks, center_keys=center, window=window)
    mx.random.seed(3)
    keys = mx.random.normal((1, 2, tokens, head_dim)) + 0.7 * mx.random.normal((1, 2, 1, head_dim))
    keys = keys * (1 + 3 * (mx.random.uniform(shape=(1, 2, tokens, 1)) > 0.98))
    cache.append(keys, mx.random.normal((1, 2, tokens, head_dim)))
    return cache


@pytest.mark.parametrize("window", [16, 0])
def test_cuda_caches_of_klt_layouts_code_window_tokens_in_blocks(window, monkeypatch):
    """On CUDA, tokens of a method no encode kernel covers (klt's calibrated layouts) leave the fp16 window for the
    codes WINDOW_BLOCK at a time: the window holds window..window + 15 tokens, the codes are the ones a cache coding
    token by token holds, nbytes counts the waiting tokens, and attention over the segments is the portable path's.
    (The device check is patched: what is checked is the cache's bookkeeping, which the same on any device.)"""
    from kvshard.quant.cache import WINDOW_BLOCK

    def decode(on_cuda):
        monkeypatch.setattr(kernels, "gpu_backend", (lambda: "cuda") if on_cuda else dispatch.gpu_backend)
        cache = _coded_cache(64, RECOMMENDED_KEY_BITS, RECOMMENDED_VALUE_BITS, "half", 100, window=window)
        mx.random.seed(5)
        held = []
        for _ in range(2 * WINDOW_BLOCK + 8):
            cache.update_and_fetch(mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64)))
            held.append(0 if cache.window_keys is None else cache.window_keys.shape[2])
        return cache, held

    plain, plain_held = decode(False)
    blocked, held = decode(True)
    assert set(plain_held) == {window}
    assert held == [window + 1 + i % WINDOW_BLOCK if i % WINDOW_BLOCK < WINDOW_BLOCK - 1 else window
                    for i in range(len(held))]
    n = blocked.n_encoded
    assert n == plain.n_encoded - held[-1] + window and blocked.offset == plain.offset
    for side in ("key_codes", "value_codes"):
        for field in ("idx", "norm"):
            assert mx.array_equal(getattr(plain, side)[field][:, :, :n], getattr(blocked, side)[field][:, :, :n])
    waiting = held[-1] - window
    coded_token = sum(a[:, :, :1].nbytes for codes in (plain.key_codes, plain.value_codes) for a in codes.values())
    fp16_token = 2 * 2 * 64 * 2  # keys and values, 2 kv heads, head_dim 64, fp16
    assert waiting > 0 and blocked.nbytes - plain.nbytes == waiting * (fp16_token - coded_token)
    queries = mx.random.normal((1, 8, 1, 64))
    assert _max_err(_attend(blocked, queries, None), _attend(blocked, queries, "pure")) < 2e-4


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize(
    "head_dim, queries_per_kv, key_bits, value_bits, rope, norm_bits, center, splits, second_row",
    [
        (64, 4, RECOMMENDED_KEY_BITS, RECOMMENDED_VALUE_BITS, "half", 8, True, 3, 77),  # the recommended config
        (64, 3, RECOMMENDED_KEY_BITS, (4,) * 64, "traditional", 16, True, 2, None),  # SmolLM2's RoPE layout
        # head_dim 128, 8 rows per kv head, 8-bit codes at odd bit offsets, no RoPE, no key mean
        (128, 8, (8,) * 3 + (6,) * 13 + (4,) * 48 + (2,) * 40 + (0,) * 24, (8,) * 5 + (3,) * 95 + (0,) * 28, None, 8,
         False, 3, None),
        (64, 2, (4,) * 64, (2,) * 64, "half", 16, True, 1, None),  # uniform klt before RoPE, one split
    ],
)
def test_coded_kernel_on_cpu_emulator(head_dim, queries_per_kv, key_bits, value_bits, rope, norm_bits, center, splits,
                                      second_row, tmp_path):
    """The coded-layout tensor-core kernel's CUDA source (per-coordinate bit widths and codebooks, 8-bit log or fp16
    scales, keys decoded through the synthesis on tensor cores, RoPE at the tokens' positions after the fp16
    sinks, value sums in the coded domain) run under g++ against the portable path over the code segment, with
    the splits merged and un-rotated as gpu.coded_attention does. Codes are read from buffers longer than the
    held tokens; with a second row, that row holds fewer tokens than its buffer has codes."""
    import numpy as np

    tokens = 300
    cache = _coded_cache(head_dim, key_bits, value_bits, rope, tokens + 4, norm_bits=norm_bits, center=center)
    batch = 1 if second_row is None else 2
    segment = next(s for s in cache.segments() if s.is_codes)
    km, vm = cache.key_quantizer, cache.value_quantizer
    queries = mx.random.normal((batch, 2 * queries_per_kv, 1, head_dim)).astype(mx.float16)
    template, synth, kcoord, kcent, vcoord, vcent, mv, constants = gpu._coded_layout(km, vm, head_dim)
    rows, n_kv = queries_per_kv, 2

    dense = lambda a, dtype: _dense(a, dtype, batch)  # noqa: E731
    roomy = lambda codes: _roomy(codes, batch)  # noqa: E731

    frequencies = np.zeros(1) if rope is None else segment.key_rope[0]
    lengths = np.array([tokens] if second_row is None else [tokens, second_row], np.int32)
    params = np.array(gpu._coded_params(head_dim**-0.5, 0 if rope is None else segment.key_rope[2], *constants))
    norm_type = "uint8_t" if norm_bits == 8 else "__half"
    norm_dtype = np.uint8 if norm_bits == 8 else np.float16
    inputs = {"q": dense(queries, np.float16), "params": dense(mx.array(params), np.float32),
              "synth": dense(synth, np.uint32), "kmean": dense(segment.key_mean if center else mx.zeros((1, 1, 1, 1)),
                                                               np.float16),
              "omega": dense(mx.array(frequencies.astype(np.float32)), np.float32), "kcoord": dense(kcoord, np.int32),
              "kcent": dense(kcent, np.float32), "vcoord": dense(vcoord, np.int32), "vcent": dense(vcent, np.float32),
              "kidx": roomy(segment.key_codes["idx"]), "knorm": dense(segment.key_codes["norm"], norm_dtype),
              "vidx": roomy(segment.value_codes["idx"]), "vnorm": dense(segment.value_codes["norm"], norm_dtype),
              "lengths": (lengths, lengths.shape, [1])}
    dtypes = {"q": "__half", "synth": "uint32_t", "kmean": "__half", "kcoord": "int32_t", "vcoord": "int32_t",
              "kidx": "uint8_t", "vidx": "uint8_t", "knorm": norm_type, "vnorm": norm_type, "lengths": "int32_t"}
    full = dict(D=head_dim, R=rows, WARPS=4, ROPE={None: 0, "half": 1, "traditional": 2}[rope], HAS_MEAN=center,
                **dict(template))
    launch, names, _ = _emulated("mma_coded", dtypes, full, tmp_path)
    shapes, strides, arrays = np.zeros((len(names), 8), np.int32), np.zeros((len(names), 8), np.int64), []
    for i, name in enumerate(names):
        array, shape, stride = inputs[name]
        arrays.append(array)
        shapes[i, : len(shape)], strides[i, : len(stride)] = shape, stride
    MPV = dict(template)["MPV"]
    part_o = np.full((batch, n_kv, splits, rows, MPV), np.nan, np.float32)
    part_ml = np.full((batch, n_kv, splits, rows, 2), np.nan, np.float32)
    pointers = (ctypes.c_void_p * (len(arrays) + 2))(*[a.ctypes.data for a in arrays + [part_o, part_ml]])
    launch(pointers, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p), splits, n_kv,
           batch, 4 * 32)
    # The splits merged (combine.cu's arithmetic), the padding coordinates dropped, un-rotated by the method.
    m, l = part_ml[..., 0], part_ml[..., 1]
    top = np.max(np.where(np.isfinite(m), m, -np.inf), axis=2, keepdims=True)
    w = np.where(np.isfinite(m), np.exp(m - top), 0.0) * l
    coded = (np.exp(np.where(np.isfinite(m), m - top, -np.inf))[..., None] * part_o).sum(2) / w.sum(2)[..., None]
    out = np.array(vm.unrotate(mx.array(coded[..., :mv]).reshape(batch, n_kv, queries_per_kv, 1, mv)))
    out = out.reshape(batch, n_kv * queries_per_kv, 1, head_dim)
    lse = (top[:, :, 0] + np.log(w.sum(2)))

    def portable(q, seg):
        return np.array(compressed_attention(q.astype(mx.float32), [seg], n_kv_heads=2, key_method=km,
                                             value_method=vm, scale=head_dim**-0.5, backend="pure"))

    pure = [portable(queries[:1], segment)]
    if second_row is not None:
        pure.append(portable(queries[1:], segment.block(0, second_row)))
    pure = np.concatenate(pure)
    assert np.abs(out - pure).max() < 2e-3 * max(1.0, np.abs(pure).max())
    # The log-sum-exp of the scores, key mean and RoPE included: what merges with the fp16 sinks and window.
    keys = np.array(decode_keys(segment, km))[:, :, :tokens]
    q = np.array(queries[:1].astype(mx.float32)).reshape(1, n_kv, queries_per_kv, head_dim)
    scores = np.einsum("bhgd,bhtd->bhgt", q, keys[:1]) * head_dim**-0.5
    top_s = scores.max(-1)
    expected = top_s + np.log(np.exp(scores - top_s[..., None]).sum(-1))
    assert np.abs(lse[:1] - expected.reshape(1, n_kv, queries_per_kv)).max() < 2e-2


@pytest.mark.parametrize("head_dim, tokens", [(64, 16), (128, 3)])
def test_compiled_klt_encode_is_the_methods_bit_for_bit(head_dim, tokens):
    """A decode block's klt encode on a GPU runs under mx.compile (gpu.compiled_encode): the same codes and scale
    bytes as the method's own encode, for the recommended layout's keys and values."""
    bits = RECOMMENDED_KEY_BITS if head_dim == 64 else (6,) * 16 + (4,) * 48 + (2,) * 40 + (0,) * 24
    cache = _coded_cache(head_dim, bits, (4,) * head_dim, "half", 100)
    for method in (cache.key_quantizer, cache.value_quantizer):
        assert gpu.has_layout(method)
        x = 2 * mx.random.normal((1, 2, tokens, head_dim))
        want, got = method.encode(x), gpu.compiled_encode(method)(x)
        assert all(mx.array_equal(want[k], got[k]).item() for k in want)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize(
    "head_dim, queries_per_kv, coded_width, splits, sinks, window, empty_split, shared_synthesis",
    [
        (64, 4, 64, 5, 4, 16, True, False),  # the recommended config: 4 sinks, 16-token window
        (64, 3, 61, 3, 0, 9, False, False),  # no sinks, a part-filled block waiting in fp16, padded coded width
        (128, 8, 104, 4, 4, 0, False, True),  # head_dim 128, 8 rows, sinks only, one synthesis for all heads
        (64, 2, 64, 2, 0, 0, False, False),  # codes only
        (128, 4, 128, 3, 2, 200, False, False),  # a window longer than one chunk of weights
    ],
)
def test_coded_merge_on_cpu_emulator(head_dim, queries_per_kv, coded_width, splits, sinks, window, empty_split,
                                     shared_synthesis, tmp_path):
    """coded_merge.cu (mma_coded's splits merged, values mapped back through the synthesis, fp16 sinks and window
    attended exactly and merged) under g++ against the same arithmetic in numpy; the window is a strided view of a
    longer buffer, as the cache's is after a block leaves it; a split with no tokens (-inf) must weigh nothing."""
    import numpy as np

    rng = np.random.default_rng(head_dim + window)
    batch, n_kv, D, R, mv = 2, 2, head_dim, queries_per_kv, coded_width
    MPV = -(-mv // 16) * 16
    scale = D**-0.5
    q = rng.standard_normal((batch, n_kv * R, 1, D)).astype(np.float16)
    synth = rng.standard_normal((1 if shared_synthesis else n_kv, D, mv)).astype(np.float32) / np.sqrt(mv)
    part_o = rng.standard_normal((batch, n_kv, splits, R, MPV)).astype(np.float32)
    part_ml = np.stack([rng.uniform(-2, 6, (batch, n_kv, splits, R)), rng.uniform(1, 40, (batch, n_kv, splits, R))],
                       -1).astype(np.float32)
    if empty_split:
        part_ml[:, :, -1, :, 0], part_ml[:, :, -1, :, 1] = -np.inf, 0.0
        part_o[:, :, -1] = 0.0
    sk = 3 * rng.standard_normal((batch, n_kv, max(sinks, 1), D)).astype(np.float16)
    sv = rng.standard_normal(sk.shape).astype(np.float16)
    buffer_k = 3 * rng.standard_normal((batch, n_kv, window + 7, D)).astype(np.float16)
    buffer_v = rng.standard_normal(buffer_k.shape).astype(np.float16)

    def view(a, start, n):  # tokens [start, start + n) of a contiguous buffer, through its strides
        T = a.shape[2]
        return a[:, :, start:], (a.shape[0], a.shape[1], n, D), [n_kv * T * D, T * D, D, 1]

    dense = lambda a, dtype: _dense(a, dtype, batch)  # noqa: E731
    inputs = {"q": dense(q, np.float16), "params": dense(np.array([scale], np.float32), np.float32),
              "vsynth_t": dense(np.ascontiguousarray(synth.transpose(0, 2, 1)), np.float32), "sk": dense(sk, np.float16), "sv": dense(sv, np.float16),
              "wk": view(buffer_k, 7, window) if window else dense(np.zeros((1, 1, 1, 1)), np.float16),
              "wv": view(buffer_v, 7, window) if window else dense(np.zeros((1, 1, 1, 1)), np.float16),
              "part_o": dense(part_o, np.float32), "part_ml": dense(part_ml, np.float32)}
    fp16 = [name for name, on in (("sinks", sinks), ("window", window)) if on]
    template = dict(D=D, R=R, MPV=MPV, MV=mv, NT=gpu.GPU_COMBINE_THREADS, HAS_SINKS=bool(fp16),
                    HAS_WINDOW=len(fp16) > 1, OutT="float")
    if fp16 == ["window"]:  # the kernel's first fp16 slot takes whichever segment comes first
        inputs["sk"], inputs["sv"], inputs["wk"], inputs["wv"] = inputs["wk"], inputs["wv"], inputs["sk"], inputs["sv"]
    dtypes = {"q": "__half", "sk": "__half", "sv": "__half", "wk": "__half", "wv": "__half"}
    launch, names, _ = _emulated("coded_merge", dtypes, template, tmp_path)
    shapes, strides, arrays = np.zeros((len(names), 8), np.int32), np.zeros((len(names), 8), np.int64), []
    for i, name in enumerate(names):
        array, shape, stride = inputs[name]
        arrays.append(np.ascontiguousarray(array) if name not in ("wk", "wv", "sk", "sv") else array)
        shapes[i, : len(shape)], strides[i, : len(stride)] = shape, stride
    out = np.full((batch, n_kv * R, 1, D), np.nan, np.float32)
    pointers = (ctypes.c_void_p * (len(arrays) + 1))(*[a.ctypes.data for a in arrays + [out]])
    launch(pointers, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p), R, n_kv, batch,
           gpu.GPU_COMBINE_THREADS)

    m, l = part_ml[..., 0].astype(np.float64), part_ml[..., 1].astype(np.float64)
    top = m.max(2, keepdims=True)
    w = np.where(np.isfinite(m), np.exp(m - top), 0.0)
    coded = (w[..., None] * part_o).sum(2)[..., :mv] / (w * l).sum(2)[..., None]  # (B, H, R, mv)
    coded_lse = top[:, :, 0] + np.log((w * l).sum(2))
    model = np.einsum("bhrm,hdm->bhrd", coded, np.broadcast_to(synth, (n_kv, D, mv)))
    keys = [sk[:, :, :sinks]] + [buffer_k[:, :, 7:7 + window]]
    values = [sv[:, :, :sinks]] + [buffer_v[:, :, 7:7 + window]]
    k, v = np.concatenate(keys, 2).astype(np.float64), np.concatenate(values, 2).astype(np.float64)
    qq = q.astype(np.float64).reshape(batch, n_kv, R, D) * scale
    scores = np.concatenate([coded_lse[..., None], np.einsum("bhrd,bhtd->bhrt", qq, k)], -1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p[..., :1] * model + np.einsum("bhrt,bhtd->bhrd", p[..., 1:], v)
    got = out.reshape(batch, n_kv, R, D)
    assert np.isfinite(got).all() and np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize("single_launch", [True, False])
@pytest.mark.parametrize("tokens", [1, 100, 4096, 70000])
@pytest.mark.parametrize("queries_per_kv, length", [(4, 1), (3, 1), (2, 5)])
def test_gpu_kernel_matches_pure(tokens, queries_per_kv, length, single_launch, monkeypatch):
    monkeypatch.setattr(gpu, "GPU_SINGLE_LAUNCH", single_launch)
    cache = _filled(tokens + 8, head_dim=128 if queries_per_kv == 4 else 64)
    queries = mx.random.normal((1, 2 * queries_per_kv, length, cache.head_dim)).astype(mx.float16)
    fast = _attend(cache, queries, kernels.gpu_backend())
    with mx.stream(mx.cpu):  # the reference in fp32 on the CPU: GPU matmuls may round through TF32
        pure = _attend(cache, queries, "pure")
    assert _max_err(fast, pure) < 2e-3  # fp16 output


def _gpu_vs_pure(cache, queries, exact=False):
    (segment,) = [s for s in cache.segments(exact=exact) if s.is_codes]
    assert dispatch.gpu_kernel(queries, segment, cache.key_quantizer, cache.value_quantizer) is not None
    fast = cache.attention(queries, cache.head_dim**-0.5)
    with mx.stream(mx.cpu):
        pure = compressed_attention(queries, cache.segments(), n_kv_heads=cache.n_kv_heads,
                                    key_method=cache.key_quantizer, value_method=cache.value_quantizer,
                                    scale=cache.head_dim**-0.5, backend="pure")
    return _max_err(fast, pure)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize("head_dim, queries_per_kv", [(64, 3), (128, 4)])
@pytest.mark.parametrize("plan", [None, "uniform"])
@pytest.mark.parametrize("window", [0, 16])
def test_gpu_kernel_klt(head_dim, queries_per_kv, plan, window):
    """klt (one bit width, fp16 scale) on the fused kernel: its transform applied to the query and the output
    outside the kernel; with an fp16 window the kernel's log-sum-exp (key mean added outside) merges."""
    plan = None if plan is None else _klt_plan(head_dim, (4,) * head_dim, n_kv_heads=2)
    cache = CompressedKVCache(head_dim=head_dim, n_kv_heads=2, method="klt", key_bits=4, value_bits=4,
                              key_plan=plan, value_plan=plan, window=window)
    cache.append(mx.random.normal((1, 2, 3000, head_dim)) + 0.5, mx.random.normal((1, 2, 3000, head_dim)))
    queries = mx.random.normal((1, 2 * queries_per_kv, 1, head_dim)).astype(mx.float16)
    assert _gpu_vs_pure(cache, queries) < 2e-3


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize(
    "head_dim, queries_per_kv, key_bits, value_bits, rope, norm_bits, tokens, window",
    [
        (64, 4, RECOMMENDED_KEY_BITS, RECOMMENDED_VALUE_BITS, "half", 8, 5000, 16),  # the recommended config's shape
        (64, 3, RECOMMENDED_KEY_BITS, RECOMMENDED_VALUE_BITS, "traditional", 8, 20000, 0),  # SmolLM2's RoPE layout
        (128, 4, (6,) * 16 + (4,) * 48 + (2,) * 40 + (0,) * 24, (3,) * 128, "half", 16, 3000, 16),
        (64, 2, (5,) * 32 + (3,) * 32, (4,) * 64, None, 8, 3000, 0),  # mixed bits, keys after RoPE
    ],
)
def test_gpu_coded_kernel_matches_pure(head_dim, queries_per_kv, key_bits, value_bits, rope, norm_bits, tokens, window):
    """klt's calibrated layouts on the coded-layout tensor-core kernel (mixed bits, log-scale bytes, keys coded
    before RoPE, decoded at their positions after the fp16 sinks), merged with the sinks and window, against the
    portable path on the CPU."""
    cache = _coded_cache(head_dim, key_bits, value_bits, rope, tokens, norm_bits=norm_bits, window=window)
    queries = mx.random.normal((1, 2 * queries_per_kv, 1, head_dim)).astype(mx.float16)
    (segment,) = [s for s in cache.segments(exact=False) if s.is_codes]
    assert dispatch.gpu_kernel(queries, segment, cache.key_quantizer, cache.value_quantizer) == "mma_coded"
    assert _gpu_vs_pure(cache, queries) < 3e-3


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
def test_gpu_kernel_scaled_keys():
    """Query-aware key scales: the scaled query rotated outside the kernel, the codes scored inside."""
    scale = 0.5 + mx.random.uniform(shape=(2, 128))
    cache = CompressedKVCache(head_dim=128, n_kv_heads=2, key_bits=4, value_bits=4, key_scale=scale, sink_tokens=4)
    cache.append(mx.random.normal((1, 2, 2000, 128)), mx.random.normal((1, 2, 2000, 128)))
    assert _gpu_vs_pure(cache, mx.random.normal((1, 8, 1, 128)).astype(mx.float16)) < 2e-3


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize("key_bits, value_bits", [(4, 4), (2, 2)])
def test_gpu_kernel_per_row_lengths(key_bits, value_bits):
    """Batch 8, rows of different lengths in one launch (codes past a row's length are garbage to it)."""
    lengths = [1, 100, 700, 1500, 2048, 3000, 4000, 5000]
    cache = _filled(5000, key_bits=key_bits, value_bits=value_bits)
    B = len(lengths)
    (seg,) = cache.segments(exact=False)
    batched = CodeSegment({n: mx.repeat(a, B, 0) for n, a in seg.key_codes.items()},
                          {n: mx.repeat(a, B, 0) for n, a in seg.value_codes.items()},
                          mx.repeat(seg.key_mean, B, 0), seg.length)
    queries = mx.random.normal((B, 8, 1, 64)).astype(mx.float16)
    km, vm = cache.key_quantizer, cache.value_quantizer
    kernel = dispatch.gpu_kernel(queries, batched, km, vm)
    out = gpu.attention(queries, batched, km, vm, 0.125, kernel, mx.array(lengths, dtype=mx.int32))[0]
    for b, n in enumerate(lengths):
        row = CodeSegment({k: a[:1, :, :n] for k, a in seg.key_codes.items()},
                          {k: a[:1, :, :n] for k, a in seg.value_codes.items()}, seg.key_mean, n)
        with mx.stream(mx.cpu):
            ref = compressed_attention(queries[b:b + 1], [row], n_kv_heads=2, key_method=km, value_method=vm,
                                       scale=0.125, backend="pure")
        assert _max_err(out[b:b + 1], ref) < 2e-3, (b, n)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize("head_dim, bits", [(128, 4), (64, 4), (128, 2), (64, 8)])
def test_gpu_encode_matches_method(head_dim, bits):
    method = make_method("turboquant_mse", head_dim, bits)
    x = mx.random.normal((2, 3, 257, head_dim)).astype(mx.float16)
    fast = gpu.encode(method, x, kernels.gpu_backend())
    with mx.stream(mx.cpu):
        ref = method.encode(x)
    assert _max_err(fast["norm"], ref["norm"]) <= 1e-3 * _max_err(ref["norm"], 0 * ref["norm"])
    # Codes agree except where a coordinate sits within float rounding of a boundary.
    from kvshard.quant.packing import unpack

    a, b = unpack(fast["idx"], bits, head_dim), unpack(ref["idx"], bits, head_dim)
    assert (a != b).mean().item() < 1e-3 and (mx.abs(a.astype(mx.int32) - b.astype(mx.int32)) <= 1).all().item()
    value_method = make_method("turboquant_mse", head_dim, 2)
    if kernels.gpu_backend() == "cuda" and gpu.encode_supported(value_method):
        pair_k, pair_v = kernels.encode_pair(method, x, value_method, x * 0.5)
        single_v = gpu.encode(value_method, x * 0.5, "cuda")
        assert mx.array_equal(pair_k["idx"], fast["idx"]).item() and mx.array_equal(pair_v["idx"], single_v["idx"]).item()
        assert mx.array_equal(pair_v["norm"], single_v["norm"]).item()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("key_bits, value_bits", [(4, 2), (2, 1)])  # 2 and 1 bits at head_dim 64: under a byte a lane
def test_pair_encode_on_cpu_emulator(key_bits, value_bits, tmp_path):
    """The append's encode kernel, run under g++: TurboQuant-MSE keys (rotation in the kernel) beside klt values
    (coded domain from to_coded, least-squares scale refitted in the kernel), against the methods' own encode."""
    import numpy as np

    from kvshard.quant.methods.klt import KLT
    from kvshard.quant.packing import unpack

    km = make_method("turboquant_mse", 64, key_bits)
    vm = KLT(64, value_bits, plan=_klt_plan(64, (value_bits,) * 64, n_kv_heads=2))
    keys = mx.random.normal((1, 2, 50, 64)).astype(mx.float16)
    values = mx.random.normal((1, 2, 50, 64)) * mx.random.uniform(0.5, 2.0, (1, 2, 50, 1))
    ks, vs = km.fused_spec(), vm.fused_spec()
    dense = lambda a: np.ascontiguousarray(np.array(a.astype(mx.float32)))  # noqa: E731
    arrays = [dense(keys), dense(vs.to_coded(values)), dense(ks.signs), np.zeros((1, 64), np.float32),
              dense(ks.boundaries), dense(vs.boundaries), dense(ks.centroids), dense(vs.centroids)]
    dtypes = {"kidx": "uint8_t", "vidx": "uint8_t", "knorm": "__half", "vnorm": "__half"}
    template = dict(D=64, KBITS=key_bits, VBITS=value_bits, KROUNDS=ks.signs.shape[0], VROUNDS=0, KREFIT=False,
                    VREFIT=True)
    launch, names, _ = _emulated("encode_pair", dtypes, template, tmp_path)
    shapes, strides = np.zeros((len(names), 8), np.int32), np.zeros((len(names), 8), np.int64)
    for i, a in enumerate(arrays):
        shapes[i, : a.ndim], strides[i, : a.ndim] = a.shape, [s // a.itemsize for s in a.strides]
    results = [np.zeros((1, 2, 50, 8 * key_bits), np.uint8), np.zeros((1, 2, 50, 1), np.float16),
               np.zeros((1, 2, 50, 8 * value_bits), np.uint8), np.zeros((1, 2, 50, 1), np.float16)]
    pointers = (ctypes.c_void_p * 12)(*[a.ctypes.data for a in arrays + results])
    rows, warps = 100, 4
    launch(pointers, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p),
           -(-2 * rows // warps), 1, 1, warps * 32)
    for method, idx, norm, x, bits in ((km, results[0], results[1], keys, key_bits),
                                       (vm, results[2], results[3], values, value_bits)):
        ref = method.encode(x)
        got, want = unpack(mx.array(idx), bits, 64), unpack(ref["idx"], bits, 64)
        # Codes agree except where a coordinate sits within float rounding of a boundary.
        assert (got != want).mean().item() < 2e-3
        assert np.allclose(norm.astype(np.float32), np.array(ref["norm"].astype(mx.float32)), rtol=2e-3)


@pytest.mark.skipif(kernels.gpu_backend() != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim, bits", [(64, 4), (128, 4), (64, 2)])
def test_gpu_pair_encode_klt(head_dim, bits):
    """klt keys and values encoded by the pair kernel (scale refitted in the kernel) against KLT.encode."""
    from kvshard.quant.methods.klt import KLT
    from kvshard.quant.packing import unpack

    method = KLT(head_dim, bits, plan=_klt_plan(head_dim, (bits,) * head_dim, n_kv_heads=2))
    x = mx.random.normal((1, 2, 300, head_dim)).astype(mx.float16)
    got_k, got_v = kernels.encode_pair(method, x, method, x * 0.5)
    with mx.stream(mx.cpu):
        ref_k, ref_v = method.encode(x), method.encode(x * 0.5)
    for got, ref in ((got_k, ref_k), (got_v, ref_v)):
        differ = unpack(got["idx"], bits, head_dim) != unpack(ref["idx"], bits, head_dim)
        assert differ.mean().item() < 2e-3
        # A code flipped at a boundary moves that token's least-squares scale by up to ~1%; every other token's
        # scale agrees to fp16 rounding.
        same = ~differ.any(axis=-1, keepdims=True)
        assert same.mean().item() > 0.7  # at head_dim 128 about one token in ten has a flipped code
        rel = mx.abs(got["norm"].astype(mx.float32) - ref["norm"].astype(mx.float32)) / ref["norm"].astype(mx.float32)
        assert mx.where(same, rel, 0).max().item() < 2e-3 and rel.max().item() < 0.05


@pytest.mark.skipif(kernels.gpu_backend() != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim, queries_per_kv, bits, window",
                         [(64, 4, 4, 0), (128, 4, 4, 0), (64, 3, 2, 0), (64, 4, 4, 32), (128, 4, 4, 128)])
def test_gpu_decode_step_appends_in_the_attention_launch(head_dim, queries_per_kv, bits, window):
    """A hooked cache's decode step on CUDA is one launch: update_and_fetch leaves the token to `attention`,
    whose kernel codes it into the buffers in place and attends it. Over 300 steps (buffer growths among them,
    done the ordinary way), with queries aimed at the new key so that a token missed or mis-coded shows:
    every output matches the portable path over the codes the cache then holds, and those codes are what the
    ordinary appends code (up to a coordinate at float rounding from a boundary). With an fp16 window the
    launch also keeps the window as a ring: the same tokens as the ordinary appends' window."""
    from kvshard.quant.packing import unpack

    fused = _filled(1000 + window, head_dim=head_dim, key_bits=bits, value_bits=bits, window=window)
    plain = _filled(1000 + window, head_dim=head_dim, key_bits=bits, value_bits=bits, window=window)
    fused.read_by_hook = True  # as the attention hook marks it
    in_kernel = 0
    for _ in range(300):
        k = (mx.random.normal((1, 2, 1, head_dim)) + 0.5).astype(mx.float16)
        v = mx.random.normal((1, 2, 1, head_dim)).astype(mx.float16)
        q = (0.5 * mx.repeat(k, queries_per_kv, axis=1)).astype(mx.float16)  # 2-70% of the weight on the new key
        fused.update_and_fetch(k, v)
        in_kernel += fused._pending is not None
        out = fused.attention(q, head_dim**-0.5)
        plain.append(k, v)
        with mx.stream(mx.cpu):
            ref = _attend(fused, q.astype(mx.float32), "pure")  # segments(): the in-place codes, evaluated
        assert _max_err(out, ref) < 2e-3 * max(1.0, mx.abs(ref).max().item())
    assert in_kernel >= 290 and fused.offset - window == fused.n_encoded == plain.n_encoded == 1300
    assert fused.nbytes == plain.nbytes
    got, want = fused.state, plain.state
    if window:
        assert mx.array_equal(got["window_keys"], want["window_keys"]).item()
        assert mx.array_equal(got["window_values"], want["window_values"]).item()
    for side in ("key_codes", "value_codes"):
        new = slice(1000, 1300)
        differ = unpack(got[side]["idx"][:, :, new], bits, head_dim) != unpack(want[side]["idx"][:, :, new], bits,
                                                                                head_dim)
        assert differ.mean().item() < 5e-3
        norms = got[side]["norm"][:, :, new].astype(mx.float32), want[side]["norm"][:, :, new].astype(mx.float32)
        assert mx.allclose(*norms, rtol=2e-3).item()


@pytest.mark.skipif(kernels.gpu_backend() != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [16, 0])
def test_gpu_coded_decode_steps_reuse_their_plan_and_match_pure(window):
    """A hooked cache of the recommended configuration's shape (klt, keys before RoPE, mixed bits, 4 sinks, maybe a
    16-token window) decoding 40 steps on CUDA: each step runs the plan the cache made for its codes (remade when a
    block of window tokens is coded, every WINDOW_BLOCK steps, and when the buffers grow), and every output matches
    the portable path over what the cache then holds, with queries aimed at the newest key so that a stale plan
    (old codes, length or window) shows."""
    from kvshard.quant.cache import WINDOW_BLOCK

    cache = _coded_cache(64, RECOMMENDED_KEY_BITS, RECOMMENDED_VALUE_BITS, "half", 250, window=window)
    cache.read_by_hook = True
    plans = set()
    for _ in range(40):
        k = (mx.random.normal((1, 2, 1, 64)) + 0.5).astype(mx.float16)
        cache.update_and_fetch(k, mx.random.normal((1, 2, 1, 64)).astype(mx.float16))
        q = (0.5 * mx.repeat(k, 4, axis=1)).astype(mx.float16)
        out = cache.attention(q, 64**-0.5)
        assert cache._plan is not None and cache._plan[1] is not None
        plans.add(id(cache._plan[1]))
        with mx.stream(mx.cpu):
            ref = _attend(cache, q.astype(mx.float32), "pure")
        assert _max_err(out, ref) < 3e-3 * max(1.0, mx.abs(ref).max().item())
    assert 40 // WINDOW_BLOCK <= len(plans) <= 2 * (40 // WINDOW_BLOCK + 2)  # reused between blocks, not every step


def test_hooked_cache_stops_returning_the_decoded_history():
    """Once the attention hook has read a cache, update_and_fetch returns only the new tokens instead of a lazy
    graph of the whole decoded history that nobody evaluates; a cache no hook reads returns the full K/V."""
    from mlx_lm.models import llama

    from kvshard.quant import KVCacheBuilder, KVCacheConfig

    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        vocab_size=64, rope_theta=10000.0))
    (cache,) = KVCacheBuilder.for_model(model, KVCacheConfig(bit_width_inlier=4))
    model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=[cache])
    assert cache.read_by_hook
    k, v = cache.update_and_fetch(mx.ones((1, 2, 1, 16)), mx.ones((1, 2, 1, 16)))
    assert k.shape[2] == v.shape[2] == 1 and cache.offset == 11
    plain = CompressedKVCache(head_dim=16, n_kv_heads=2)
    k, v = plain.update_and_fetch(mx.ones((1, 2, 12, 16)), mx.ones((1, 2, 12, 16)))
    k, v = plain.update_and_fetch(mx.ones((1, 2, 1, 16)), mx.ones((1, 2, 1, 16)))
    assert k.shape[2] == v.shape[2] == 13


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA or Metal GPU")
@pytest.mark.parametrize("key_bits, value_bits", [(8, 8), (8, 4), (4, 8), (4, 4), (2, 2)])
def test_gpu_gemma_shape_round_trip_and_attention(key_bits, value_bits):
    """Gemma 3 270M's shape (one KV head, head_dim 256, 4 query heads), filled through update_and_fetch on the GPU
    as a model fills it: the codes decode back to the K/V within the method's distortion (so a bad GPU encode
    cannot hide behind a reference that reads the same codes), and attention equals the portable path on the CPU."""
    mx.random.seed(3)
    cache = CompressedKVCache(head_dim=256, n_kv_heads=1, key_bits=key_bits, value_bits=value_bits, sink_tokens=1)
    keys = (mx.random.normal((1, 1, 600, 256)) + 0.5).astype(mx.float16)
    values = mx.random.normal((1, 1, 600, 256)).astype(mx.float16)
    cache.update_and_fetch(keys[:, :, :590], values[:, :, :590])
    for t in range(590, 600):
        cache.update_and_fetch(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    queries = mx.random.normal((1, 4, 1, 256)).astype(mx.float16)
    fast = cache.attention(queries, 256**-0.5)
    with mx.stream(mx.cpu):
        pure = _attend(cache, queries, "pure")
        decoded_k, decoded_v = _exact_kv(cache)
    bound = {8: 1e-3, 4: 0.03, 2: 0.15}
    for got, want, bits in ((decoded_k, keys, key_bits), (decoded_v, values, value_bits)):
        want = want.astype(mx.float32)
        relative = (mx.sum((got - want) ** 2) / mx.sum(want**2)).item()
        assert relative < bound[bits], (bits, relative)
    assert _max_err(fast, pure) < 2e-3



@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("rows, bucket, n, k", [(2, 4, 37, 264), (8, 8, 64, 512), (11, 16, 10, 24), (16, 16, 9, 256)])
def test_skinny_matmul_on_cpu_emulator(rows, bucket, n, k, tmp_path):
    """skinny_matmul's CUDA source under g++ against x·wᵀ in float64: fewer rows than the compiled bucket, output
    columns that do not fill the last warp, K not a multiple of a warp's 256-element step."""
    import numpy as np

    from kvshard.quant.kernels.linear import COLS, WARPS

    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, k)).astype(np.float16)
    w = rng.normal(size=(n, k)).astype(np.float16)
    launch, names, _ = _emulated("skinny_matmul", {"x": "__half", "w": "__half", "y": "__half"},
                                 dict(M=bucket, COLS=COLS), tmp_path)
    shapes, strides = np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int64)
    for i, a in enumerate((x, w)):
        shapes[i, :2], strides[i, :2] = a.shape, [s // a.itemsize for s in a.strides]
    y = np.full((rows, n), np.nan, np.float16)
    pointers = (ctypes.c_void_p * 3)(*[a.ctypes.data for a in (x, w, y)])
    warps = -(-n // COLS)
    launch(pointers, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p),
           -(-warps // WARPS), 1, 1, WARPS * 32)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert not np.isnan(y).any()
    # fp32 sums of k products, rounded once to fp16 (relative 2^-11 of the result, plus the sum's own rounding).
    assert np.abs(y - want).max() <= 2e-3 * np.abs(want).max() + 1e-3


def test_skinny_matmul_refuses_more_rows_than_its_buckets():
    from kvshard.quant.kernels import linear

    assert [linear.bucket(n) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    with pytest.raises(ValueError, match="x: skinny_matmul takes 1 to 16 rows, got 17"):
        linear.bucket(17)


@pytest.mark.skipif(kernels.gpu_backend() != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16, 17])
def test_gpu_skinny_linear_equals_mlx_matmul(rows):
    """A model's Linear layers after linear.install: the same outputs as MLX's matmul, at row counts the kernel
    takes (2..16) and ones it leaves to MLX (1, 17), with and without bias."""
    import mlx.nn as nn

    from kvshard.quant.kernels import linear

    plain, biased = nn.Linear(2048, 520, bias=False), nn.Linear(256, 72)
    for module in (plain, biased):
        module.set_dtype(mx.float16)
    x, small = (mx.random.normal((rows, 1, d)).astype(mx.float16) for d in (2048, 256))
    want = [plain(x), biased(small)]
    for module in (plain, biased):
        assert linear.install(module) == 1
    got = [plain(x), biased(small)]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() <= 2e-3 * mx.abs(b).max().item() + 1e-3
