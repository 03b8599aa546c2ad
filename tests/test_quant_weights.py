"""QuantizedLinear / quantize_model: bytes by hand, error against TurboQuant's distortion bounds, the forward
against the dense matmul of what it holds, and encode's memory against the (out, in, 2**bits) temporary."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kvshard.quant import weights
from kvshard.quant.codebooks import sphere_codebook
from kvshard.quant.weights import QuantizedLinear, nearest_index, quantize_model, weight_bytes

# TurboQuant MSE distortion of a unit vector at b = 1..4 bits (DESIGN.md); the least-squares gain only lowers it.
TURBOQUANT_MSE = (0.363, 0.117, 0.0345, 0.0095)


def _linear(n_in, n_out, bias=True, seed=0):
    layer = nn.Linear(n_in, n_out, bias=bias)
    rng = np.random.default_rng(seed)
    layer.weight = mx.array(rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05)
    if bias:
        layer.bias = mx.array(rng.standard_normal(n_out).astype(np.float32))
    return layer


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_nearest_index_counts_boundaries_like_the_codebook(bits):
    codebook = sphere_codebook(64, bits)
    y = mx.concatenate([mx.random.normal((4000,), key=mx.random.key(bits)) * 0.2, codebook.boundaries,
                        codebook.centroids, mx.array([-2.0, 2.0])])
    assert mx.array_equal(nearest_index(codebook, y), codebook.quantize(y))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_features, group_size", [(96, 32), (100, 4)])
def test_rebuilt_weight_is_the_codebook_lookup_of_the_codes(bits, in_features, group_size):
    """The compiled rebuild (word shifts and a select tree, no gather) equals unpacking the codes and looking each
    one up in the codebook, bit for bit: rows whose codes fill whole words (96) and rows that do not (100)."""
    from kvshard.quant.packing import pack, unpack

    rng = np.random.default_rng(bits)
    codes = rng.permutation(np.arange(24 * in_features) % 2**bits).reshape(24, in_features)  # every code appears
    scales = mx.array(rng.uniform(0.5, 2.0, (24, in_features // group_size)).astype(np.float16))
    layer = QuantizedLinear(pack(mx.array(codes), bits), scales, in_features, bits, group_size)
    idx = unpack(layer.codes, bits, in_features)
    assert np.array_equal(np.array(idx), codes)
    groups = sphere_codebook(group_size, bits).lookup(idx).reshape(24, -1, group_size)
    expected = (groups * layer.scales[..., None].astype(mx.float32)).reshape(24, in_features)
    assert mx.array_equal(layer.rotated_weight(), expected)


def test_bytes_by_hand_and_nothing_dense_held():
    layer = QuantizedLinear.from_linear(_linear(128, 96), bits=3, group_size=64)
    codes = 96 * 128 * 3 // 8  # 3-bit codes, packed
    scales = 96 * (128 // 64) * 2  # one fp16 scale per group of 64
    bias = 96 * 4
    assert layer.nbytes == codes + scales + bias
    assert layer.effective_bits == pytest.approx(8 * (codes + scales + bias) / (96 * 128))
    held = dict(tree_flatten(layer.parameters()))
    assert sorted(held) == ["bias", "codes", "scales"]
    assert held["codes"].dtype == mx.uint8 and held["scales"].dtype == mx.float16
    layer(mx.ones((2, 128)))
    assert sorted(dict(tree_flatten(layer.parameters()))) == ["bias", "codes", "scales"]  # no copy after a call


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_error_is_within_turboquant_bounds(bits):
    layer = _linear(512, 256, bias=False, seed=bits)
    quantized = QuantizedLinear.from_linear(layer, bits=bits, group_size=64)
    w, w_hat = layer.weight, quantized.dequantize()
    relative = (((w_hat - w) ** 2).sum() / (w**2).sum()).item()
    assert 4.0**-bits < relative <= TURBOQUANT_MSE[bits - 1]


@pytest.mark.parametrize("group_size", [32, 64, 96])
def test_forward_is_the_matmul_of_the_held_weight(group_size):
    layer = _linear(192, 80)
    quantized = QuantizedLinear.from_linear(layer, bits=4, group_size=group_size)
    x = mx.random.normal((3, 5, 192), key=mx.random.key(1))
    exact = x @ quantized.dequantize().T + layer.bias
    assert mx.allclose(quantized(x), exact, atol=1e-4, rtol=1e-4)
    dense = layer(x)
    assert (((quantized(x) - dense) ** 2).sum() / ((dense - layer.bias) ** 2).sum()).item() < 0.03


def test_encode_memory_is_bounded_by_the_chunk(monkeypatch):
    # 8192 x 2048 weights (64 MiB fp32): the boundary-count temporary at 4 bits alone would be 15 bytes per weight
    # (240 MiB), an argmin over distances 64 bytes (1 GiB).
    monkeypatch.setattr(weights, "ENCODE_CHUNK_WEIGHTS", 1 << 18)
    w = mx.random.normal((8192, 2048), key=mx.random.key(3))
    mx.eval(w)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    codes, scales = weights.encode_rows(w, bits=4, group_size=64)
    mx.eval(codes, scales)
    output = codes.nbytes + scales.nbytes
    assert mx.get_peak_memory() - before < 2 * output + 32 * 2**20


def _tiny_llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
                           rope_theta=10000.0, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_quantize_model_replaces_every_linear_and_counts_its_bytes():
    model = _tiny_llama()
    tokens = mx.array([[1, 5, 9, 33, 70, 2]])
    dense_logits = model(tokens)
    shapes = [m.weight.shape for _, m in model.named_modules() if type(m) is nn.Linear]
    quantize_model(model, bits=4, group_size=64)
    assert not [p for p, m in model.named_modules() if type(m) is nn.Linear]
    assert len([m for _, m in model.named_modules() if isinstance(m, QuantizedLinear)]) == len(shapes) == 14
    assert weight_bytes(model) == sum(o * i // 2 + o * (i // 64) * 2 for o, i in shapes)
    logits = model(tokens)
    error = (((logits - dense_logits) ** 2).sum() / (dense_logits**2).sum()).item()
    assert error < 0.1  # ~0.9% per layer at 4 bits, through 14 random layers


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear.from_linear(_linear(128, 8), bits=0)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedLinear.from_linear(_linear(100, 8), bits=4, group_size=64)
    model = _tiny_llama()
    before = dict(tree_flatten(model.parameters()))
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, bits=4, group_size=96)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)  # left as it was
    with pytest.raises(ValueError, match="features"):
        QuantizedLinear.from_linear(_linear(128, 8), bits=4)(mx.ones((1, 64)))


@pytest.mark.slow
def test_embedded_model_at_4_bits_stays_close_to_dense(smollm):
    from kvshard.quant.eval import Float16KVCache, load_text, perplexity

    model, tokenizer = smollm
    tokens = tokenizer.encode(load_text("persuasion"), add_special_tokens=False)[:256]

    def ppl():
        return perplexity(model, tokens, lambda: [Float16KVCache() for _ in model.layers], 256, 256)["ppl"]

    dense = ppl()
    quantize_model(model, bits=4, group_size=32)
    assert weight_bytes(model) * 8 / sum(m.out_features * m.in_features for _, m in model.named_modules()
                                          if isinstance(m, QuantizedLinear)) == pytest.approx(4.5)
    assert dense < ppl() < 1.5 * dense
