"""RateQuant: exact-average bit allocation, the fitted distortion curve, and measured layer sensitivities."""

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, RotatingKVCache

from kvshard.quant import (
    CompressedKVCache,
    KVCacheBuilder,
    KVCacheConfig,
    allocate_bits_ratequant,
    calibrate_layer_sensitivities,
    fit_distortion_curve,
)
from kvshard.quant.calibrate.ratequant import DEFAULT_PROMPTS, continuous_allocation, measure_distortion


def lognormal_weights(n, seed=0, spread=1.5):
    return np.exp(np.random.default_rng(seed).normal(0, spread, n)).tolist()


def model_distortion(weights, bits, beta):
    return float(sum(w * beta**-b for w, b in zip(weights, bits)))


# ---- allocation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,target,choices",
    [
        (12, 2.5, (1, 2, 3, 4)),
        (7, 3.0, (1, 2, 3, 4)),
        (10, 1.3, (1, 2, 3)),
        (30, 3.25, (2, 3, 4, 5, 6, 7, 8)),
        (5, 4.0, (1, 2, 3, 4)),
        (5, 1.0, (1, 2, 3, 4)),
        (9, 2.0, (1, 4)),  # gapped, but 9 + 3k reaches 18
        (28, 1.5, (1, 2)),
    ],
)
def test_allocation_keeps_the_exact_average(n, target, choices):
    weights = lognormal_weights(n, seed=n)
    bits = allocate_bits_ratequant(weights, target, beta=3.5, bit_choices=choices)
    assert len(bits) == n and all(isinstance(b, int) and b in choices for b in bits)
    assert sum(bits) == math.ceil(target * n - 0.5)  # round(target · n), halves down (97.5 -> 97)


def test_unreachable_total_takes_the_nearest_reachable_one_rounding_down_on_a_tie():
    weights = lognormal_weights(6)
    bits = allocate_bits_ratequant(weights, 2.5, bit_choices=(2, 4, 8))  # 15 is odd; sums of 2, 4, 8 are even
    assert sum(bits) == 14


def test_halves_round_down_so_the_budget_is_never_exceeded_on_a_tie():
    assert sum(allocate_bits_ratequant([1.0, 2.0, 3.0], 1.5)) == 4  # 4.5 -> 4


@pytest.mark.parametrize("target", [1.5, 2.0, 2.75, 3.5])
def test_more_sensitive_layers_never_get_fewer_bits(target):
    weights = lognormal_weights(16, seed=3)
    bits = allocate_bits_ratequant(weights, target)
    order = np.argsort(weights)
    assert all(np.diff(np.array(bits)[order]) >= 0), (weights, bits)
    assert bits[int(np.argmax(weights))] > bits[int(np.argmin(weights))]


@pytest.mark.parametrize("beta", [2.0, 3.5, 5.0])
def test_dense_choices_follow_the_reverse_water_filling_closed_form(beta):
    weights = np.array(lognormal_weights(20, seed=5, spread=1.0))
    target = 8.0
    closed_form = target + np.log(weights / np.exp(np.log(weights).mean())) / np.log(beta)
    assert closed_form.min() > 1 and closed_form.max() < 16  # interior: no clipping
    assert np.allclose(continuous_allocation(weights, target, beta), closed_form)
    bits = np.array(allocate_bits_ratequant(weights, target, beta=beta, bit_choices=range(1, 17)))
    assert bits.sum() == 160
    assert np.all(np.abs(bits - closed_form) < 1), np.c_[bits, closed_form]


def test_clipped_continuous_allocation_keeps_the_mean():
    weights = [1e-6, 1.0, 1.0, 1e6]
    b = continuous_allocation(weights, 2.5, 3.5, low=1, high=4)
    assert b.mean() == pytest.approx(2.5) and b.min() >= 1 and b.max() <= 4
    assert b[0] == 1 and b[-1] == 4


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_exact_minimiser_of_the_model_distortion(seed):
    """Brute force over every allocation with the same total: nothing beats the returned one."""
    weights = lognormal_weights(6, seed=seed, spread=2.0)
    for target in (1.5, 2.0, 2.5, 3.0, 3.5):
        bits = allocate_bits_ratequant(weights, target, beta=3.5)
        best = min(
            model_distortion(weights, combo, 3.5)
            for combo in itertools.product((1, 2, 3, 4), repeat=6)
            if sum(combo) == sum(bits)
        )
        assert model_distortion(weights, bits, 3.5) == pytest.approx(best, rel=1e-12)


def test_numpy_inputs_are_accepted():
    bits = allocate_bits_ratequant(np.array([1.0, 5.0, 25.0]), np.float32(2.0), beta=np.float64(3.5),
                                   bit_choices=np.arange(1, 5))
    assert bits == [1, 2, 3] and all(type(b) is int for b in bits)


def test_equal_weights_give_a_near_uniform_allocation():
    bits = allocate_bits_ratequant([2.0] * 10, 2.3)
    assert sorted(bits) == [2] * 7 + [3] * 3


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(weights=[]), "weights"),
        (dict(weights=[1.0, 0.0]), "weights"),
        (dict(weights=[1.0, -2.0]), "weights"),
        (dict(weights=[1.0, math.nan]), "weights"),
        (dict(weights=[1.0, math.inf]), "weights"),
        (dict(weights=[[1.0, 2.0]]), "weights"),
        (dict(weights="abc"), "weights"),
        (dict(target_avg_bits=0.5), "target_avg_bits"),
        (dict(target_avg_bits=4.5), "target_avg_bits"),
        (dict(target_avg_bits=math.nan), "target_avg_bits"),
        (dict(target_avg_bits="3"), "target_avg_bits"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-3.0), "beta"),
        (dict(bit_choices=()), "bit_choices"),
        (dict(bit_choices=(0, 1, 2)), "bit_choices"),
        (dict(bit_choices=(1.5, 2)), "bit_choices"),
        (dict(bit_choices=5), "bit_choices"),
    ],
)
def test_bad_arguments_raise_naming_the_field(kwargs, field):
    args = dict(weights=[1.0, 2.0, 3.0], target_avg_bits=2.0, beta=3.5, bit_choices=(1, 2, 3, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        allocate_bits_ratequant(**args)


# ---- distortion curve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 128])
def test_fit_distortion_curve_of_turboquant_mse(d):
    alpha, beta = fit_distortion_curve("turboquant_mse", head_dim=d, samples=4096)
    # Measured β ≈ 3.4 over b = 1..4 (0.363 → 0.0095); it tends to 4 only as b grows.
    assert 3.3 < beta < 3.55
    for b in (1, 2, 3, 4):
        assert alpha * beta**-b == pytest.approx(measure_distortion("turboquant_mse", d, b, 4096), rel=0.15)


def test_fit_distortion_curve_is_measured_per_method():
    _, beta_mse = fit_distortion_curve("turboquant_mse", samples=2048)
    _, beta_rvq = fit_distortion_curve("turboquant_rvq", samples=2048)  # two stages of b bits: β per b ≈ 9
    _, beta_prod = fit_distortion_curve("turboquant_prod", samples=2048)  # bits 2..5 by default
    assert 8.0 < beta_rvq < 11.0
    assert abs(beta_prod - beta_mse) < 0.3  # prod's MSE stage dominates its reconstruction error
    with pytest.raises(ValueError, match="bits"):
        fit_distortion_curve("turboquant_mse", bits=(2, 2))
    with pytest.raises(ValueError, match="bits"):
        fit_distortion_curve("turboquant_prod", bits=(1, 2, 3))


# ---- sensitivities --------------------------------------------------------------------------------------------


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())


@pytest.fixture(scope="module")
def tiny_model():
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        vocab_size=256,
    )
    mx.random.seed(1)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_default_prompts_are_real_sentences():
    assert len(DEFAULT_PROMPTS) >= 3
    assert all(len(p.split()) >= 25 and p[0].isupper() and p.rstrip().endswith(".") for p in DEFAULT_PROMPTS)


def test_calibration_gives_one_positive_weight_per_attention_layer_deterministically(tiny_model):
    first = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), progress=False)
    second = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), progress=False)
    assert len(first) == 3
    assert all(math.isfinite(w) and w > 0 for w in first)
    assert first == second
    values = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), target="values", progress=False)
    assert len(values) == 3 and all(math.isfinite(w) and w > 0 for w in values)
    assert values != first


def test_calibration_shows_a_progress_bar(tiny_model, capsys):
    calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), prompts=["Short prompt one.", "And another."])
    assert "3/3" in capsys.readouterr().err


def test_calibration_measures_damage_not_key_norms(tiny_model):
    """Silence layer 1's attention output: quantizing its cache then cannot change the logits, so its measured
    sensitivity collapses, while the seed's key-norm proxy does not notice."""
    attention = tiny_model.layers[1].self_attn
    saved = attention.o_proj.weight
    try:
        attention.o_proj.weight = mx.zeros_like(saved)
        kl = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), progress=False)
        norms = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), mode="key_norm", progress=False)
    finally:
        attention.o_proj.weight = saved
    assert kl[1] < 1e-6 * min(kl[0], kl[2])
    assert all(n > 0 for n in norms) and norms[1] > 0.1 * max(norms)


def test_calibration_sensitivity_grows_as_probe_bits_fall(tiny_model):
    coarse = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), probe_bits=1, progress=False)
    fine = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), probe_bits=4, progress=False)
    assert all(c > 3 * f for c, f in zip(coarse, fine))


def test_calibration_counts_only_plain_kv_cache_layers(tiny_model, monkeypatch):
    monkeypatch.setattr(
        tiny_model, "make_cache", lambda: [KVCache(), RotatingKVCache(max_size=256), KVCache()], raising=False
    )
    assert len(calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), progress=False)) == 2
    assert len(calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), mode="key_norm", progress=False)) == 2


def test_calibration_rejects_bad_arguments(tiny_model):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="mode"):
        calibrate_layer_sensitivities(tiny_model, tok, mode="gradient", progress=False)
    with pytest.raises(ValueError, match="target"):
        calibrate_layer_sensitivities(tiny_model, tok, target="queries", progress=False)
    with pytest.raises(ValueError, match="bits"):
        calibrate_layer_sensitivities(tiny_model, tok, method="turboquant_rvq", probe_bits=6, progress=False)
    with pytest.raises(ValueError, match="method"):
        calibrate_layer_sensitivities(tiny_model, tok, method="kivi", progress=False)
    with pytest.raises(ValueError, match="prompts"):
        calibrate_layer_sensitivities(tiny_model, tok, prompts="one string", progress=False)
    with pytest.raises(ValueError, match="prompts"):
        calibrate_layer_sensitivities(tiny_model, tok, prompts=["x"], progress=False)


def test_calibrate_allocate_build_generate(tiny_model):
    """The README's RateQuant flow, end to end."""
    weights = calibrate_layer_sensitivities(tiny_model, ByteTokenizer(), method="turboquant_rvq", progress=False)
    _, beta = fit_distortion_curve("turboquant_rvq", samples=1024)
    alloc = allocate_bits_ratequant(weights, target_avg_bits=2.0, beta=beta, bit_choices=(1, 2, 3))
    assert sum(alloc) == 6
    caches = KVCacheBuilder.for_model(tiny_model, KVCacheConfig(method="turboquant_rvq", bit_width_inlier=alloc))
    assert [c.key_bits for c in caches] == alloc and all(isinstance(c, CompressedKVCache) for c in caches)
    tokens = [t for t, _ in generate_step(mx.array(ByteTokenizer().encode("Hello there")), tiny_model,
                                          max_tokens=5, prompt_cache=caches)]
    assert len(tokens) == 5
