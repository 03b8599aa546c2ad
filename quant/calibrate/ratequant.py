"""RateQuant: per-layer bit allocation under an average-bits budget.

Model: layer i quantized at b bits adds distortion D_i(b) = w_i · α · β^(−b), where w_i is the layer's
sensitivity and β the quantizer's decay per bit. Minimising Σ D_i with mean bits b̄ is reverse
water-filling: b_i = b̄ + log_β(w_i / geomean(w)). Bits must be integers from the bit widths the method
allows, so the allocation is the exact minimiser of Σ w_i β^(−b_i) over those choices with Σ b_i fixed.

Three pieces: `fit_distortion_curve` measures α, β of a quantizer; `calibrate_layer_sensitivities` measures
w_i on a model (the logit damage of quantizing one layer alone); `allocate_bits_ratequant` turns them into
bits per layer for `KVCacheConfig(key_bits=[...])`.
"""

import math
from numbers import Real

import mlx.core as mx
import numpy as np

DEFAULT_BETA = 3.5
DEFAULT_PROMPTS = (
    "The old lighthouse keeper climbed the spiral stairs every evening, trimmed the wick, and watched the "
    "ships pass the rocky point until the sun came up over the grey water again.",
    "To bake a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let "
    "it rise for an hour in a warm place, then bake it in a hot oven until the crust is brown.",
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
    "members agreed to spend more on the library and less on new office furniture.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. It takes place mostly in the leaves, inside small structures called chloroplasts.",
)
_MODES = ("kl", "key_norm")
_TARGETS = ("keys", "values")
# The side that is not being probed is held at 8-bit TurboQuant-MSE: distortion ~1e-5, i.e. nearly exact.
_NEAR_EXACT = ("turboquant_mse", 8)


# ---- allocation ---------------------------------------------------------------------------------------------


def _check_weights(weights) -> np.ndarray:
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"weights must be a sequence of positive numbers, got {weights!r}") from err
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must all be finite and > 0, got {w.tolist()}")
    return w


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta) or beta <= 1:
        raise ValueError(f"beta must be a finite number > 1, got {beta!r}")
    return float(beta)


def _check_choices(bit_choices) -> list[int]:
    try:
        choices = list(bit_choices)
    except TypeError as err:
        raise ValueError(f"bit_choices must be a sequence of positive integers, got {bit_choices!r}") from err
    if not choices or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in choices):
        raise ValueError(f"bit_choices must be a non-empty sequence of positive integers, got {bit_choices!r}")
    return sorted({int(c) for c in choices})


def _check_target(target, low: int, high: int) -> float:
    if isinstance(target, bool) or not isinstance(target, Real) or not math.isfinite(target):
        raise ValueError(f"target_avg_bits must be a finite number, got {target!r}")
    if not low <= target <= high:
        raise ValueError(f"target_avg_bits must lie in [{low}, {high}] (the range of bit_choices), got {target}")
    return float(target)


def continuous_allocation(weights, target_avg_bits: float, beta: float = DEFAULT_BETA, low=None, high=None):
    """Real-valued bits minimising Σ w_i β^(−b_i) with mean b̄, each clipped to [low, high].

    Without clipping this is the closed form b_i = b̄ + log_β(w_i / geomean(w)); with it, the water level θ
    in b_i = clip(θ + log_β w_i) is found by bisection so that the mean stays b̄.
    """
    w = _check_weights(weights)
    beta = _check_beta(beta)
    log_w = np.log(w) / np.log(beta)
    free = target_avg_bits + log_w - log_w.mean()
    low = -np.inf if low is None else low
    high = np.inf if high is None else high
    if np.all((free >= low) & (free <= high)):
        return free
    lo, hi = low - log_w.max(), high - log_w.min()
    for _ in range(200):
        theta = (lo + hi) / 2
        if np.clip(theta + log_w, low, high).mean() < target_avg_bits:
            lo = theta
        else:
            hi = theta
    return np.clip((lo + hi) / 2 + log_w, low, high)


def allocate_bits_ratequant(
    weights, target_avg_bits: float, beta: float = DEFAULT_BETA, bit_choices=(1, 2, 3, 4)
) -> list[int]:
    """Integer bits per layer from `bit_choices`, higher for more sensitive layers, with Σ bits equal to
    round(target_avg_bits · L) (halves round down, so a tie never exceeds the budget).

    It is the exact minimiser of the model distortion Σ w_i β^(−b_i) under that sum: a dynamic program over
    layers and bit totals, so gaps in `bit_choices` (say 2, 4, 8) are handled too. When no combination of
    the choices reaches the total, the nearest reachable total is used (the lower one on a tie).
    """
    w = _check_weights(weights)
    beta = _check_beta(beta)
    choices = _check_choices(bit_choices)
    target = _check_target(target_avg_bits, choices[0], choices[-1])
    n = w.size
    wanted = math.floor(target * n + 0.5 - 1e-9)

    # cost[i, j]: model distortion of layer i at choices[j]; weights rescaled by their geomean for range.
    scaled = w / np.exp(np.log(w).mean())
    cost = scaled[:, None] * beta ** -np.asarray(choices, dtype=np.float64)[None, :]
    offset, span = choices[0] * n, (choices[-1] - choices[0]) * n
    steps = [c - choices[0] for c in choices]
    # best[s]: least distortion of the layers so far whose bits sum to offset + s; pick[i][s]: the choice.
    best = np.full(span + 1, np.inf)
    best[0] = 0.0
    picks = []
    for i in range(n):
        candidates = np.full((len(choices), span + 1), np.inf)
        for j, step in enumerate(steps):
            candidates[j, step:] = best[: span + 1 - step] + cost[i, j]
        pick = np.argmin(candidates, axis=0).astype(np.int32)  # first minimum: the lower choice on a tie
        best = candidates[pick, np.arange(span + 1)]
        picks.append(pick)

    reachable = np.flatnonzero(np.isfinite(best)) + offset
    total = int(reachable[np.argmin(np.abs(reachable - wanted) * 2 + (reachable > wanted))])
    bits = [0] * n
    s = total - offset
    for i in range(n - 1, -1, -1):
        j = int(picks[i][s])
        bits[i] = choices[j]
        s -= steps[j]
    return bits


def allocate_kv_bits_ratequant(
    key_weights, value_weights, target_avg_bits: float, beta: float = DEFAULT_BETA, bit_choices=(1, 2, 3, 4)
) -> tuple[list[int], list[int]]:
    """Key bits and value bits per layer under ONE budget (the mean over all 2·L of them).

    Keys and values are separate groups of the same water-filling: when their sensitivities are measured on
    the same scale (`calibrate_layer_sensitivities` for target="keys" and "values"), the bits go where the
    damage is — on SmolLM2 mostly to keys, which is what plain uniform bits get wrong."""
    keys, values = list(key_weights), list(value_weights)
    if len(keys) != len(values):
        raise ValueError(f"value_weights has {len(values)} entries, key_weights {len(keys)}: one per layer each")
    bits = allocate_bits_ratequant(keys + values, target_avg_bits, beta=beta, bit_choices=bit_choices)
    return bits[: len(keys)], bits[len(keys) :]


# ---- distortion curve ---------------------------------------------------------------------------------------


def _random_unit_vectors(samples: int, head_dim: int, seed: int) -> mx.array:
    x = np.random.default_rng(seed).standard_normal((samples, head_dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return mx.array(x.astype(np.float32))


def measure_distortion(method: str, head_dim: int, bits: int, samples: int = 4096, seed: int = 0) -> float:
    """E‖x − decode(encode(x))‖² over random unit vectors x: the quantizer's MSE distortion at `bits`."""
    from ..methods import make_method

    x = _random_unit_vectors(samples, head_dim, seed)
    quantizer = make_method(method, head_dim, bits, seed=seed)
    error = quantizer.decode(quantizer.encode(x)) - x
    return float((error * error).sum(axis=-1).mean().item())


def _default_bits(method: str) -> tuple[int, ...]:
    # turboquant_prod spends one bit on its QJL stage, so its range starts at 2.
    return (2, 3, 4, 5) if method == "turboquant_prod" else (1, 2, 3, 4)


def fit_distortion_curve(method: str, head_dim: int = 64, bits=None, samples: int = 4096, seed: int = 0):
    """(α, β) of D(b) = α · β^(−b), fitted by least squares on log D over measured distortions at `bits`
    (default 1..4; 2..5 for turboquant_prod). β is what `allocate_bits_ratequant` needs."""
    bits = _default_bits(method) if bits is None else tuple(bits)
    if len(set(bits)) < 2:
        raise ValueError(f"bits must hold at least two distinct bit widths, got {bits!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    distortions = [measure_distortion(method, head_dim, b, samples, seed) for b in bits]
    if min(distortions) <= 0:
        raise ValueError(f"{method} reconstructs exactly at some of bits={bits}: no curve to fit")
    slope, intercept = np.polyfit(np.asarray(bits, dtype=np.float64), np.log(distortions), 1)
    return float(math.exp(intercept)), float(math.exp(-slope))


# ---- sensitivities ------------------------------------------------------------------------------------------


def _attention_layers(model) -> list[int]:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return [i for i, c in enumerate(make_prompt_cache(model)) if type(c) is KVCache]


def _token_batch(tokenizer, prompts, max_tokens: int) -> mx.array:
    """All prompts as one (B, T) batch, each cut to the shortest prompt's length (at most max_tokens), so
    that they run in one forward pass with no padding to distort the key statistics."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    rows = [list(tokenizer.encode(p)) for p in prompts]
    length = min(min(len(r) for r in rows), max_tokens)
    if length < 2:
        raise ValueError(f"prompts must each encode to at least 2 tokens, shortest has {length}")
    return mx.array([r[:length] for r in rows])


def _log_probs(model, tokens: mx.array, caches) -> mx.array:
    logits = model(tokens, cache=caches).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _probe_config(method: str, probe_bits: int, target: str, seed: int):
    from ..config import KVCacheConfig

    exact_method, exact_bits = _NEAR_EXACT
    if target == "keys":
        return KVCacheConfig(method=method, key_bits=probe_bits, value_method=exact_method, value_bits=exact_bits, seed=seed)
    return KVCacheConfig(method=exact_method, key_bits=exact_bits, value_method=method, value_bits=probe_bits, seed=seed)


def calibrate_layer_sensitivities(model, tokenizer, prompts=None, **options) -> list[float]:
    """One sensitivity w_i per attention layer (the layers whose mlx_lm cache is a plain KVCache), in order.
    Options (method, probe_bits, target, mode, progress, seed, max_tokens) as `sensitivity_steps`.

    mode="kl" (default) measures it: for each attention layer alone, its keys (target="keys") or values
    (target="values") are stored as `method` codes at `probe_bits` — every other layer keeps mlx_lm's fp16
    KVCache and the other side of the probed layer is held at 8 bits — and w_i is the mean KL divergence
    from the fp16 model's next-token distribution to the probed one, over every position of the prompts.
    Only ratios between the w_i matter to the allocation. mode="key_norm" is the seed's cheap proxy, the
    mean squared key norm of each layer in one fp16 pass.
    """
    steps = sensitivity_steps(model, tokenizer, prompts, **options)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def sensitivity_steps(
    model,
    tokenizer,
    prompts=None,
    method: str = "turboquant_mse",
    probe_bits: int = 2,
    target: str = "keys",
    mode: str = "kl",
    progress: bool = True,
    seed: int = 42,
    max_tokens: int = 48,
):
    """calibrate_layer_sensitivities as a generator that yields after each forward pass (the fp16 reference,
    then one per probed layer) and returns the sensitivities: a server runs each step as its own turn."""
    from mlx_lm.models.cache import make_prompt_cache

    from ..builder import install_attention_hook
    from ..progress import progress as report

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    config = _probe_config(method, probe_bits, target, seed)
    config.make_cache()  # a bad method or probe_bits fails here, before any forward pass
    tokens = _token_batch(tokenizer, DEFAULT_PROMPTS if prompts is None else list(prompts), max_tokens)
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("model has no attention layer with a plain KVCache to calibrate")

    reference_caches = make_prompt_cache(model)
    reference = _log_probs(model, tokens, reference_caches)
    mx.eval(reference)
    yield
    if mode == "key_norm":
        norms = []
        for i in layers:
            keys = reference_caches[i].state[0].astype(mx.float32)
            norms.append((keys * keys).sum(axis=-1).mean())
        return [float(n.item()) for n in norms]

    install_attention_hook(model)
    reference_probs = mx.exp(reference)
    mx.eval(reference, reference_probs)
    sensitivities = []
    for i in report(layers, f"calibrating {target}", "layer") if progress else layers:
        caches = make_prompt_cache(model)
        caches[i] = config.make_cache()
        probed = _log_probs(model, tokens, caches)
        kl = (reference_probs * (reference - probed)).sum(axis=-1).mean()
        # KL ≥ 0; the floor keeps a layer that quantization leaves untouched a valid (positive) weight.
        sensitivities.append(max(float(kl.item()), 1e-12))
        yield
    return sensitivities
