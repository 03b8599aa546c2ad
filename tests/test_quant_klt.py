"""KLT transform coding (methods/klt.py, calibrate/klt.py): exact packing, the allocation's optimality, the
transform coding gain on data with a known spectrum, the query metric, and the cache plumbing."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig, make_method
from kvshard.quant.attention import compressed_attention
from kvshard.quant.calibrate.klt import (
    GAUSSIAN_DISTORTION,
    QueryMomentCache,
    _decorrelate,
    allocate_coordinate_bits,
    calibration_texts,
    collect_moments,
    plan_klt,
)
from kvshard.quant.methods.klt import KLT, WIDE_BITS, KLTPlan, rotation_plan
from kvshard.quant.packing import pack_runs, unpack_runs
from kvshard.quant.rope import rope_frequencies, rotate

H, D = 3, 64


def _relative_error(x: mx.array, x_hat: mx.array) -> float:
    return (((x_hat - x) ** 2).sum() / (x**2).sum()).item()


def _spectrum_data(tokens: int, seed: int = 0, decay: float = 10.0):
    """Per head, Gaussian vectors with energies e^(−i/decay) along a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis = np.stack([np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(H)])
    spread = np.exp(-np.arange(D) / decay)
    x = np.einsum("hij,htj->hti", basis, rng.standard_normal((H, tokens, D)) * spread)
    return x, spread**2


def _plan(x: np.ndarray, mean_bits: int, norm_bits: int = 16, rope=(None, False)) -> KLTPlan:
    analysis, energies = _decorrelate(np.einsum("hti,htj->hij", x, x) / x.shape[1], None)
    bits = allocate_coordinate_bits([energies.sum(axis=0)], mean_bits * D)[0]
    return KLTPlan(analysis, energies, tuple(bits), norm_bits, *rope)


@pytest.mark.parametrize("widths", [(3, 5, 8, 1), (1,), (7, 7, 2), (8, 8), (2, 6, 4, 3, 1)])
def test_pack_runs_round_trips_exactly_into_one_stream(widths):
    rng = np.random.default_rng(sum(widths))
    runs = [(mx.array(rng.integers(0, 1 << b, (2, 3, 5, n)).astype(np.uint8)), b) for n, b in zip((5, 3, 11, 2, 7), widths)]
    packed = pack_runs(runs)
    total_bits = sum(codes.shape[-1] * b for codes, b in runs)
    assert packed.shape == (2, 3, 5, (total_bits + 7) // 8)  # one pad per token, not one per run
    for (codes, _), back in zip(runs, unpack_runs(packed, [(c.shape[-1], b) for c, b in runs])):
        assert mx.array_equal(codes, back)


def test_allocation_is_the_exact_optimum_on_a_small_problem():
    costs = [np.array([9.0, 3.0, 1.0, 0.2]), np.array([4.0, 2.5, 0.5, 0.1])]
    got = allocate_coordinate_bits(costs, 24)
    assert all(sum(b) % 8 == 0 for b in got) and sum(map(sum, got)) <= 24

    def cost(bits):
        return sum(c[i] * GAUSSIAN_DISTORTION[b[i]] for c, b in zip(costs, bits) for i in range(4))

    # Exhaustive: the best cost of each slot at each byte-multiple total, then the best split of 24 bits.
    by_total = {}
    for a in itertools.product(range(9), repeat=4):
        if sum(a) % 8 == 0 and a[0] >= 1:
            for s, c in enumerate(costs):
                key = (s, sum(a))
                value = sum(c[i] * GAUSSIAN_DISTORTION[a[i]] for i in range(4))
                by_total[key] = min(by_total.get(key, np.inf), value)
    best = min(by_total[(0, t)] + by_total[(1, 24 - t)] for t in (8, 16) if (1, 24 - t) in by_total)
    assert cost(got) == pytest.approx(best, rel=1e-12)


def test_allocation_refuses_impossible_totals():
    with pytest.raises(ValueError, match="total_bits"):
        allocate_coordinate_bits([np.ones(4), np.ones(4)], 8)  # two slots need a byte each
    with pytest.raises(ValueError, match="total_bits"):
        allocate_coordinate_bits([np.ones(4)], 33)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uncalibrated_klt_is_at_least_as_good_as_turboquant_mse(bits):
    x = mx.random.normal((1, H, 2048, D), key=mx.random.key(bits))
    klt, mse = make_method("klt", D, bits), make_method("turboquant_mse", D, bits)
    assert klt.bytes_per_token() == mse.bytes_per_token()
    ours, theirs = _relative_error(x, klt.decode(klt.encode(x))), _relative_error(x, mse.decode(mse.encode(x)))
    # The refitted scale can only lower the error; TurboQuant's own bound holds either way.
    assert ours <= theirs * 1.001
    assert ours <= (3**0.5 * np.pi / 2) * 4.0**-bits


def test_strong_coordinates_off_the_calibrated_law_are_not_clipped():
    """A calibrated plan's 8-bit run is mixed only within itself, so a token class far out on one of its coordinates
    stays there (Gemma 3's commas, ~6 spreads out on a top pre-RoPE key coordinate of layer 1). The sphere law's
    8-bit levels stop at ~4.5 standard deviations: such tokens had a relative error of 2.6e-3 on the run here,
    1.2e-4 with the wide codebook, which costs the other tokens 7.3e-5 instead of 5.7e-5."""
    d, strong = 256, 6
    rng = np.random.default_rng(0)
    spread = np.array([8.0] * strong + [1.0] * (d - strong))
    x = rng.standard_normal((4096, d)) * spread
    spiked = rng.random(4096) < 0.03
    x[spiked, 0] = 6 * spread[0] * np.sign(rng.standard_normal(spiked.sum()))
    errors = {}
    for wide_bits in (WIDE_BITS, None):
        plan = KLTPlan(np.eye(d)[None], (spread**2)[None], (8,) * strong + (3,) * (d - strong), wide_bits=wide_bits)
        klt = KLT(d, 3, plan=plan)
        decoded = np.array(klt.decode(klt.encode(mx.array(x[None, None].astype(np.float32)))))[0, 0]
        error = ((decoded - x)[:, :strong] ** 2).sum(axis=1) / (spread[:strong] ** 2).sum()
        errors[wide_bits] = error[spiked].mean(), error[~spiked].mean()
    assert errors[WIDE_BITS][0] < 5e-4 and errors[WIDE_BITS][1] < 1e-4
    # A plan without the wide codebook (a profile's choice: Profile.wide_codebook) clips the spikes and codes the
    # Gaussian tokens better.
    assert errors[None][0] > 4 * errors[WIDE_BITS][0] and errors[None][1] < errors[WIDE_BITS][1]


@pytest.mark.parametrize("mean_bits", [2, 3])
def test_transform_coding_gain_on_a_known_spectrum(mean_bits):
    calibration, energies = _spectrum_data(4096, seed=1)
    plan = _plan(calibration, mean_bits)
    klt = KLT(D, mean_bits, plan=plan)
    mse = make_method("turboquant_mse", D, mean_bits)
    assert klt.bytes_per_token() == mse.bytes_per_token()
    x = mx.array(_spectrum_data(2048, seed=1)[0][None].astype(np.float32))  # same basis, fresh draws
    ours, theirs = _relative_error(x, klt.decode(klt.encode(x))), _relative_error(x, mse.decode(mse.encode(x)))
    # Reverse water-filling's prediction for this spectrum, with the scalar quantizer's real distortions.
    predicted = sum(e * GAUSSIAN_DISTORTION[b] for e, b in zip(energies, plan.coordinate_bits)) / energies.sum()
    assert ours < theirs / 5
    assert ours < 2.0 * predicted


def test_a_rotation_plan_codes_vectors_off_the_calibrated_subspace_as_well_as_typical_ones():
    """Gemma's sliding layers attend many small values lying where calibration saw little energy (its weakest
    directions: no bits in this plan). rotation_plan keeps the plan's bytes per token but spreads its bits evenly
    over a random rotation: such vectors then get TurboQuant's error, as typical ones do; the calibrated plan
    drops most of them. Typical vectors pay for it (the plan's transform coding gain is gone)."""
    calibration, _ = _spectrum_data(4096, seed=2)
    plan = _plan(calibration, 3, norm_bits=8)
    rotated = rotation_plan(plan)
    klt, even = KLT(D, 3, plan=plan), KLT(D, 3, plan=rotated)
    assert even.layout == klt.layout and sum(rotated.coordinate_bits) == sum(plan.coordinate_bits) == 3 * D
    assert set(rotated.coordinate_bits) == {3} and rotation_plan(plan).analysis.tobytes() == rotated.analysis.tobytes()
    typical = mx.array(_spectrum_data(2048, seed=2)[0][None].astype(np.float32))
    # Vectors along each head's 16 weakest calibrated directions, at a tenth of a typical token's norm.
    weak = np.einsum("hij,htj->hti", plan.analysis.transpose(0, 2, 1)[:, :, -16:],
                     np.random.default_rng(3).standard_normal((H, 2048, 16)))
    weak *= 0.1 * np.linalg.norm(calibration, axis=-1).mean() / np.linalg.norm(weak, axis=-1, keepdims=True)
    weak = mx.array(weak[None].astype(np.float32))
    errors = {name: [_relative_error(x, m.decode(m.encode(x))) for x in (typical, weak)]
              for name, m in (("klt", klt), ("rotation", even))}
    assert errors["klt"][1] > 0.9  # dropped: measured 1.00
    bound = GAUSSIAN_DISTORTION[3] * 1.1  # 3 bits a coordinate (measured 0.0315 both), the scale byte on top
    assert errors["rotation"][0] < bound and errors["rotation"][1] < bound
    assert errors["klt"][0] < errors["rotation"][0] / 10  # measured 0.0009


def test_scores_and_values_in_the_coded_domain_equal_the_decoded_ones():
    x, _ = _spectrum_data(512, seed=2)
    klt = KLT(D, 3, plan=_plan(x, 3, norm_bits=8))
    codes = klt.encode(mx.array(x[None].astype(np.float32)))
    q = mx.random.normal((1, H, 4, 2, D), key=mx.random.key(0))  # grouped queries, as attention passes them
    decoded = klt.decode(codes)
    direct = q @ decoded[:, :, None].swapaxes(-1, -2)
    coded = klt.rotate_query(q) @ klt.decode_rotated(codes)[:, :, None].swapaxes(-1, -2)
    assert mx.allclose(coded, direct, atol=1e-3)
    weights = mx.softmax(direct, axis=-1)
    assert mx.allclose(klt.unrotate(weights @ klt.decode_rotated(codes)[:, :, None]), weights @ decoded[:, :, None], atol=1e-4)


def test_key_metric_puts_the_bits_where_the_queries_look():
    """Queries only read the keys' weak half: in the query metric those channels get the bits."""
    rng = np.random.default_rng(3)
    strong = np.where(np.arange(D) < D // 2, 4.0, 0.25)
    keys = rng.standard_normal((H, 4096, D)) * strong
    queries = rng.standard_normal((H, 4096, D)) * strong[::-1]
    moments = {
        "query": np.einsum("hti,htj->hij", queries, queries) / 4096,
        "keys": np.einsum("hti,htj->hij", keys, keys) / 4096,
        "values": np.einsum("hti,htj->hij", keys, keys) / 4096,
    }
    key_plans, _ = plan_klt([moments], [1.0], [1e-9], code_bits=2.0, norm_bits=16)
    weighted = KLT(D, 2, plan=key_plans[0])
    unweighted = KLT(D, 2, plan=_plan(keys, 2))
    k = mx.array(keys[None, :, :512].astype(np.float32))
    q = mx.array(queries[None, :, :64].astype(np.float32))
    exact = q @ k.swapaxes(-1, -2)
    error = lambda m: (((q @ m.decode(m.encode(k)).swapaxes(-1, -2)) - exact) ** 2).mean().item()  # noqa: E731
    assert error(weighted) < 0.5 * error(unweighted)


def _planned_cache(sinks: int = 2) -> CompressedKVCache:
    x, _ = _spectrum_data(256, seed=4)
    return CompressedKVCache(
        head_dim=D, n_kv_heads=H, method="klt", sink_tokens=sinks,
        key_plan=_plan(x, 3, norm_bits=8), value_plan=_plan(x, 2, norm_bits=8),
    )


def test_planned_cache_nbytes_is_a_hand_count_and_state_round_trips(tmp_path):
    cache = _planned_cache()
    x = mx.array(_spectrum_data(100, seed=5)[0][None].astype(np.float32))
    cache.append(x, x * 0.5)
    # Per token and head: 3·64 key bits + 2·64 value bits packed, one byte of log scale each; 2 fp16 sinks;
    # the fp16 key mean. The transforms belong to the model and are not counted.
    coded = 98 * H * (3 * 64 // 8 + 1 + 2 * 64 // 8 + 1)
    assert cache.nbytes == coded + 2 * H * D * 2 * 2 + H * D * 2
    path = str(tmp_path / "klt.safetensors")
    save_prompt_cache(path, [cache])
    restored = load_prompt_cache(path)[0]
    q = mx.random.normal((1, 2 * H, 1, D), key=mx.random.key(1))
    assert mx.array_equal(restored.attention(q, 0.125), cache.attention(q, 0.125))
    more = mx.array(_spectrum_data(7, seed=6)[0][None].astype(np.float32))
    cache.append(more, more)
    restored.append(more, more)
    assert mx.array_equal(restored.dequantized()[0], cache.dequantized()[0])


def test_bad_plans_are_refused_naming_the_field():
    x, _ = _spectrum_data(64, seed=7)
    plan = _plan(x, 2)
    with pytest.raises(ValueError, match="key_plan"):
        CompressedKVCache(head_dim=D, n_kv_heads=H, method="turboquant_mse", key_plan=plan)
    with pytest.raises(ValueError, match="key_plan"):
        CompressedKVCache(head_dim=D, n_kv_heads=H + 1, method="klt", key_plan=plan)
    with pytest.raises(ValueError, match="coordinate_bits"):
        KLTPlan(plan.analysis, plan.energies, (0,) + plan.coordinate_bits[1:])
    with pytest.raises(ValueError, match="coordinate_bits"):
        KLTPlan(plan.analysis, plan.energies, (1, 2) + plan.coordinate_bits[2:])
    with pytest.raises(ValueError, match="norm_bits"):
        KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, 12)
    with pytest.raises(ValueError, match="rope_frequencies"):
        KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, 16, np.ones(D))  # 64 pairs for 64 dims
    with pytest.raises(ValueError, match="rope_frequencies"):
        KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, 16, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="rope_traditional"):
        KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, 16, np.ones(D // 2), "yes")
    for wide_bits in (0, 9, True, 7.0):
        with pytest.raises(ValueError, match="wide_bits"):
            KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, wide_bits=wide_bits)


def test_a_plan_without_the_wide_codebook_restores_as_such(tmp_path):
    """The codebook choice travels in the cache's state: a restored cache decodes its 7- and 8-bit runs with the
    codebooks they were coded with (with the wide codebook instead, the restored keys differ)."""
    x, _ = _spectrum_data(256, seed=4)
    plan = _plan(x, 6)
    assert max(plan.coordinate_bits) >= WIDE_BITS
    sphere = KLTPlan(plan.analysis, plan.energies, plan.coordinate_bits, wide_bits=None)
    cache = CompressedKVCache(head_dim=D, n_kv_heads=H, method="klt", sink_tokens=2, key_plan=sphere, value_plan=sphere)
    tokens = mx.array(_spectrum_data(40, seed=5)[0][None].astype(np.float32))
    cache.append(tokens, tokens)
    path = str(tmp_path / "sphere.safetensors")
    save_prompt_cache(path, [cache])
    restored = load_prompt_cache(path)[0]
    assert restored.key_plan.wide_bits is None and restored.value_plan.wide_bits is None
    assert mx.array_equal(restored.dequantized()[0], cache.dequantized()[0])


def test_planned_cache_rejects_bad_input_and_keeps_its_state():
    cache = _planned_cache()
    x = mx.array(_spectrum_data(20, seed=8)[0][None].astype(np.float32))
    cache.append(x, x)
    before = [np.array(a) for a in cache._arrays()]
    bad = mx.array(np.full((1, H, 2, D), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="keys"):
        cache.append(bad, x[:, :, :2])
    assert all(np.array_equal(a, np.array(b), equal_nan=True) for a, b in zip(before, cache._arrays()))


def test_real_model_klt_beats_turboquant_at_fewer_bytes(smollm):
    """On SmolLM2 itself, calibrated as `kvshard eval` does it (licence texts for the moments, the KL probes
    for the layer weights) and scored on other text: next-token KL to the fp16 cache, 4 fp16 sinks each.
    Pre-RoPE plans must also beat post-RoPE ones at equal bytes."""
    from mlx_lm.models.cache import make_prompt_cache

    from kvshard.quant import calibrate_layer_sensitivities
    from kvshard.quant.eval import held_bytes

    model, tokenizer = smollm
    moments = collect_moments(model, tokenizer, calibration_texts(2))
    keys = calibrate_layer_sensitivities(model, tokenizer, target="keys", progress=False)
    values = calibrate_layer_sensitivities(model, tokenizer, target="values", progress=False)
    key_plans, value_plans = plan_klt(moments, keys, values, code_bits=2.875)
    text = "To bake a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten minutes, " * 8
    tokens = mx.array(tokenizer.encode(text)[:192])[None]
    reference = mx.softmax(model(tokens, cache=make_prompt_cache(model)).astype(mx.float32), axis=-1)[:, 64:]

    def damage(config):
        caches = KVCacheBuilder.for_model(model, config)
        model(tokens[:, :64], cache=caches)  # the prefix goes to codes, the rest is scored against them
        log_probs = mx.log(mx.softmax(model(tokens[:, 64:], cache=caches).astype(mx.float32), axis=-1) + 1e-12)
        kl = (reference * (mx.log(reference + 1e-12) - log_probs)).sum(-1).mean().item()
        return kl, sum(held_bytes(c) for c in caches)

    klt_kl, klt_bytes = damage(KVCacheConfig(method="klt", key_plans=key_plans, value_plans=value_plans, sink_tokens=4))
    mse_kl, mse_bytes = damage(KVCacheConfig(method="turboquant_mse", bit_width_inlier=3, sink_tokens=4))
    assert klt_bytes < mse_bytes
    assert klt_kl < mse_kl
    # Keys coded before RoPE beat the same recipe on keys after RoPE. The margin is small: 0.0338 against 0.0360 with
    # converged sphere-law codebooks, 0.0393 against 0.0484 with the wide >= 7-bit runs of codebook version 2
    # (benchmarks/results/klt_rope_codebooks_cpu.json). The 0.8 factor this test once asked came from the unconverged
    # 5-8-bit codebooks of version 1, which hurt the post-RoPE plans more (0.0497; pre-RoPE 0.0401).
    post_moments = collect_moments(model, tokenizer, calibration_texts(2), pre_rope=False)
    assert all(m["rope"] is None for m in post_moments) and all(m["rope"] is not None for m in moments)
    post_keys, post_values = plan_klt(post_moments, keys, values, code_bits=2.875)
    post_kl, post_bytes = damage(KVCacheConfig(method="klt", key_plans=post_keys, value_plans=post_values, sink_tokens=4))
    assert post_bytes == klt_bytes
    assert klt_kl < post_kl


# ---- keys before RoPE (quant/rope.py) -----------------------------------------------------------------------


@pytest.mark.parametrize("traditional", [True, False])
def test_rope_is_read_off_the_module_and_undone_exactly(traditional):
    import mlx.nn as nn

    rope = nn.RoPE(D, traditional=traditional, base=10000.0)
    omega, layout = rope_frequencies(rope, D)
    assert layout is traditional
    np.testing.assert_allclose(omega, 10000.0 ** (-np.arange(D // 2) * 2 / D), rtol=1e-6)
    x = mx.random.normal((1, H, 40, D), key=mx.random.key(2))
    assert mx.allclose(rotate(x, 9, omega, layout), rope(x, offset=9), atol=1e-4)
    assert mx.allclose(rotate(rotate(x, 9, omega, layout), 9, omega, layout, inverse=True), x, atol=1e-5)
    partial = nn.RoPE(D // 2, traditional=traditional, base=500.0)  # rotates only the first half of the dims
    omega, layout = rope_frequencies(partial, D)
    assert omega.shape == (D // 4,) and mx.allclose(rotate(x, 3, omega, layout), partial(x, offset=3), atol=1e-4)


def test_a_rope_that_is_not_a_plain_rotation_is_not_read():
    import mlx.nn as nn

    class ScaledRoPE(nn.RoPE):  # YaRN-style: rotation times a magnitude, which un-rotating would not undo
        def __call__(self, x, offset=0):
            return 1.2 * super().__call__(x, offset)

    assert rope_frequencies(ScaledRoPE(D, traditional=True), D) is None
    assert rope_frequencies(object(), D) is None


def _pre_rope_keys(tokens: int, seed: int, rank: int = 8):
    """Keys that are low-rank (plus a little noise and a mean) before RoPE, as real keys are, and the RoPE."""
    import mlx.nn as nn

    rng = np.random.default_rng(seed)
    basis = np.stack([np.linalg.qr(rng.standard_normal((D, D)))[0][:, :rank] for _ in range(H)])
    pre = np.einsum("hir,htr->hti", basis, rng.standard_normal((H, tokens, rank)) * 3.0)
    pre = pre + 0.05 * rng.standard_normal(pre.shape) + rng.standard_normal((H, 1, D))
    rope = nn.RoPE(D, traditional=False, base=10000.0)
    return pre, rope


def test_a_pre_rope_plan_codes_low_rank_keys_far_better_than_a_post_rope_plan():
    """After RoPE the same rank-8 keys fill every dimension; before it they need 8 coordinates."""
    pre, rope = _pre_rope_keys(512, seed=11)
    post = np.array(rope(mx.array(pre[None].astype(np.float32)), offset=0))[0]
    centred = lambda x: x - x.mean(axis=1, keepdims=True)  # noqa: E731 (the cache codes k − μ)
    keys = mx.array(post[None].astype(np.float32))
    errors = {}
    for name, key_plan in (("post", _plan(centred(post), 2)), ("pre", _plan(centred(pre), 2, rope=rope_frequencies(rope, D)))):
        cache = CompressedKVCache(head_dim=D, n_kv_heads=H, method="klt", key_bits=2, value_bits=2, key_plan=key_plan)
        cache.append(keys, keys)
        errors[name] = _relative_error(keys, cache.dequantized()[0].astype(mx.float32))
    assert errors["pre"] < 0.2 * errors["post"], errors


def test_a_pre_rope_cache_attends_what_it_decodes_and_restores(tmp_path):
    pre, rope = _pre_rope_keys(96, seed=12)
    omega, traditional = rope_frequencies(rope, D)
    centred = pre - pre.mean(axis=1, keepdims=True)
    analysis, energies = _decorrelate(np.einsum("hti,htj->hij", centred, centred) / pre.shape[1], None)
    key_plan = KLTPlan(analysis, energies, (4,) * 16 + (2,) * 16 + (0,) * 32, 8, omega, traditional)
    cache = CompressedKVCache(head_dim=D, n_kv_heads=H, method="klt", sink_tokens=3, key_plan=key_plan)
    keys = rope(mx.array(pre[None].astype(np.float32)), offset=0)
    values = mx.random.normal(keys.shape, key=mx.random.key(3))
    cache.update_and_fetch(keys[:, :, :50], values[:, :, :50])
    fetched_keys, fetched_values = cache.update_and_fetch(keys[:, :, 50:90], values[:, :, 50:90])
    assert _relative_error(keys[:, :, :90], fetched_keys.astype(mx.float32)) < 0.05
    q = mx.random.normal((1, 2 * H, 1, D), key=mx.random.key(4))
    exact = mx.fast.scaled_dot_product_attention(q, fetched_keys.astype(mx.float32), fetched_values.astype(mx.float32), scale=0.125)
    assert mx.allclose(cache.attention(q, 0.125), exact, atol=1e-3)
    # Several queries under a causal mask, on the portable path and on the decode-then-SDPA (prefill) path.
    queries = mx.random.normal((1, 2 * H, 6, D), key=mx.random.key(6))
    exact = mx.fast.scaled_dot_product_attention(
        queries, fetched_keys.astype(mx.float32), fetched_values.astype(mx.float32), scale=0.125, mask="causal")
    for backend in ("pure", "prefill"):
        got = compressed_attention(queries, cache.segments(), n_kv_heads=H, key_method=cache.key_quantizer,
                                   value_method=cache.value_quantizer, scale=0.125, mask="causal", backend=backend)
        assert mx.allclose(got, exact, atol=1e-3), backend
    # The native CPU kernel reads keys coded before RoPE too (quant/kernels/cpu.py); the GPU kernels refuse them.
    got = compressed_attention(queries, cache.segments(), n_kv_heads=H, key_method=cache.key_quantizer,
                               value_method=cache.value_quantizer, scale=0.125, mask="causal", backend="cpu")
    assert mx.allclose(got, exact, atol=1e-3)
    path = str(tmp_path / "pre_rope.safetensors")
    save_prompt_cache(path, [cache])
    restored = load_prompt_cache(path)[0]
    assert mx.array_equal(restored.attention(q, 0.125), cache.attention(q, 0.125))
    # Positions carry on across a trim and a restore: what is appended next is un-rotated where it belongs.
    for c in (cache, restored):
        c.trim(10)
        c.update_and_fetch(keys[:, :, 80:96], values[:, :, 80:96])
    assert mx.array_equal(restored.dequantized()[0], cache.dequantized()[0])
    assert _relative_error(keys, cache.dequantized()[0].astype(mx.float32)) < 0.05


def test_query_moment_under_rope_averages_over_the_key_positions_a_query_sees():
    import mlx.nn as nn

    rope = nn.RoPE(D, traditional=True, base=100.0)
    omega, traditional = rope_frequencies(rope, D)
    L, heads = 12, 2
    queries = rope(mx.random.normal((1, heads, L, D), key=mx.random.key(5)) + 1.0, offset=0)
    cache = QueryMomentCache((omega, traditional), samples=3000)
    cache.update_and_fetch(mx.zeros((1, 1, L, D)), mx.zeros((1, 1, L, D)))
    cache.attention(queries, 0.125)
    # Exact: per query at position p, the mean over key positions s = 0..p of (R_sᵀ q)(R_sᵀ q)ᵀ.
    exact = np.zeros((D, D))
    for p in range(L):
        seen = rotate(mx.repeat(queries[:, :, p : p + 1], p + 1, axis=0), mx.arange(p + 1), omega, traditional, inverse=True)
        seen = np.array(seen, np.float64).reshape(-1, D)
        exact += seen.T @ seen / (p + 1) / (L * heads)
    estimate = np.array(cache.query_moment[0], np.float64) / cache.query_count
    assert np.linalg.norm(estimate - exact) < 0.05 * np.linalg.norm(exact)
    plain = np.array(queries[0].reshape(-1, D), np.float64)
    assert np.linalg.norm(plain.T @ plain / (L * heads) - exact) > 0.2 * np.linalg.norm(exact)  # it does differ


def test_query_moment_of_a_sliding_layer_averages_over_its_window_only():
    """A sliding-window query at position p sees keys p − window + 1..p: its moment is the mean over those, not over
    0..p (Gemma 3's sliding layers see 512 of up to 2,048 calibration positions)."""
    import mlx.nn as nn

    rope = nn.RoPE(D, traditional=False, base=100.0)
    omega, traditional = rope_frequencies(rope, D)
    L, heads, window = 16, 2, 4
    queries = rope(mx.random.normal((1, heads, L, D), key=mx.random.key(6)) + 1.0, offset=0)
    cache = QueryMomentCache((omega, traditional), samples=3000, window=window)
    cache.update_and_fetch(mx.zeros((1, 1, L, D)), mx.zeros((1, 1, L, D)))
    cache.attention(queries, 0.125)
    exact = np.zeros((D, D))
    for p in range(L):
        positions = mx.arange(max(0, p - window + 1), p + 1)
        seen = rotate(mx.repeat(queries[:, :, p : p + 1], positions.size, axis=0), positions, omega, traditional, inverse=True)
        seen = np.array(seen, np.float64).reshape(-1, D)
        exact += seen.T @ seen / positions.size / (L * heads)
    estimate = np.array(cache.query_moment[0], np.float64) / cache.query_count
    assert np.linalg.norm(estimate - exact) < 0.05 * np.linalg.norm(exact)
