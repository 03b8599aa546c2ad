"""Bit plans of a hybrid model priced by what each layer holds: at 1,024 tokens a sliding layer of Gemma 3 holds its
512-token window, so its bits cost half a global layer's, and the budget is of the elements the fp16 cache holds."""

import os

import mlx.core as mx
import numpy as np
import pytest

from kvshard.quant import KVCacheBuilder
from kvshard.quant.calibrate.klt import allocate_coordinate_bits

STORED_PROFILE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "gemma3-270m", "gemma3-270m-all-layers")


def costs(seed=0, slots=4, d=16):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.exponential(size=d))[::-1] * rng.uniform(0.5, 2) for _ in range(slots)]


def test_unit_prices_allocate_as_no_prices():
    c = costs()
    assert allocate_coordinate_bits(c, 200) == allocate_coordinate_bits(c, 200, prices=[1] * 4)


def test_priced_bits_fit_the_weighted_total_and_go_where_they_are_cheap():
    c = [costs(1, 1, d=32)[0]] * 2  # two equal slots; the second holds half the tokens
    bits = allocate_coordinate_bits(c, 3 * 160, prices=[2, 1])
    totals = [sum(b) for b in bits]
    assert 2 * totals[0] + totals[1] <= 3 * 160
    assert all(t % 8 == 0 for t in totals)
    assert totals[1] > totals[0]  # the cheaper slot buys more bits for the same cost
    with pytest.raises(ValueError, match="prices"):
        allocate_coordinate_bits(c, 480, prices=[2])


@pytest.fixture(scope="module")
def gemma():
    from kvshard.quant.models import load_model

    try:
        return load_model("gemma3-270m")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def filled_bits(model, config, tokens=1023):
    """Effective bits vs the fp16 cache of the caches for_model builds, filled with `tokens` random K/V in chunks of
    256 (the bytes held do not depend on the values)."""
    from kvshard.quant.sliding import effective_bits_vs_fp16

    caches = KVCacheBuilder.for_model(model, config)
    mx.random.seed(0)
    for start in range(0, tokens, 256):
        n = min(256, tokens - start)
        for cache in caches:
            keys, values = mx.random.normal((2, 1, 1, n, 256))
            cache.update_and_fetch(keys, values)
    mx.eval([c.state for c in caches])
    return effective_bits_vs_fp16(model, caches, tokens)


def test_gemma_plans_stay_within_the_budget_of_what_the_fp16_cache_holds(gemma):
    """Planned as if every layer held all 1,024 tokens, the stored profile's caches held 3.52 bits for a 3.5-bit
    budget (eval_cpu.json); priced by what each layer holds they stay within it, and spend it."""
    from kvshard.quant import load_profile
    from kvshard.quant.calibrate.profile import Profile

    model, _ = gemma
    profile = load_profile(STORED_PROFILE)
    assert profile.sliding_window == 512
    assert 3.49 <= filled_bits(model, profile.config(3.5)) <= 3.5
    meta = {k: v for k, v in profile.meta.items() if k != "sliding_window"}
    unpriced = Profile(profile.name, profile.model_fingerprint, profile.moments, profile.key_weights,
                       profile.value_weights, meta)
    assert filled_bits(model, unpriced.config(3.5)) > 3.51
    # Bits cost less on sliding layers, so the same budget buys more bits per coordinate.
    priced_keys = np.mean([np.mean(p.coordinate_bits) for p in profile.config(3.5).key_plans])
    assert priced_keys > np.mean([np.mean(p.coordinate_bits) for p in unpriced.config(3.5).key_plans])
