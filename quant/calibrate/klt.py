"""Calibration for the `klt` method: second moments from a model, and one bit allocation over every layer's
key and value coordinates under an average-bits budget.

The error that matters differs by side. For keys it is the score error q·e: E[(q·e)²] = eᵀΣq e, so keys are
measured in the metric M = Σq^½ (queries grouped under their KV head) and decorrelated there: y = Uᵀ M (k − μ)
with U the eigenvectors of M Σk M. Keys are taken before RoPE where the model's RoPE can be read (quant/rope.py),
and Σq is then of the queries un-rotated to the positions of the keys they read (QueryMomentCache). For values it is the output error, plain ‖e‖²: y = Uᵀ v with U the
eigenvectors of E[v vᵀ] (uncentred: attention needs the mean of the values too).

Allocation is RateQuant's reverse water-filling taken down to coordinates. Layer ℓ's damage per unit of
distortion, c, comes from the measured KL sensitivity w (`calibrate_layer_sensitivities`, plain TurboQuant at
`probe_bits`) divided by the distortion that probe caused, predicted from the same second moments. A
coordinate of energy λ at b bits then costs c · λ · δ(b), with δ the Lloyd-Max distortion of a unit-variance
coordinate; bits go one at a time to the coordinate whose next bit removes the most cost (δ is convex, so
this greedy choice is the exact optimum for a given total), then each slot's codes are rounded up to whole
bytes with its own next-best bits, the total chosen as the largest whose rounded allocation fits the budget.
"""

import heapq
import os

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache
from tqdm import tqdm

from ..builder import install_attention_hook
from ..methods.klt import WIDE_BITS, KLTPlan
from ..rope import rope_frequencies, rotate
from ..sliding import sliding_windows
from .ratequant import _attention_layers

# E[(x − Q(x))²] of the b-bit Lloyd-Max quantizer of a unit-variance Gaussian, b = 0..8.
GAUSSIAN_DISTORTION = (1.0, 0.3634, 0.1175, 0.03454, 0.009497, 0.002499, 0.0006418, 0.0001626, 0.0000409)
LICENCE_DIR = "/usr/share/common-licenses"
LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic")
QUERY_RIDGE = 1e-2  # Σq + ridge · mean eigenvalue: a direction no calibration query used still counts a little
# Key and value moments are shrunk the same way: a direction the calibration text never used may still carry
# energy in other text, and an energy of ~0 would drop it (0 bits) for good.
SHRINKAGE = 1e-2


class QueryMomentCache(KVCache):
    """A plain fp16 cache that also accumulates the second moment of the queries attended with it.

    With `rope` = (ω, traditional), the moment is of queries as a pre-RoPE key sees them. Query q (after RoPE,
    at position p) scores key k (before RoPE, at position s) as q · R_s k = (R_sᵀ q) · k, so the score error
    of a pre-RoPE key error e is (R_sᵀ q) · e: the metric is E[R_sᵀ q qᵀ R_s] over the pairs attention forms.
    Each query is un-rotated to `samples` key positions s drawn uniformly from 0..p (seeded): an unbiased
    estimate of each query's mean over the keys it can see, every query weighing the same, as in Σq. A sliding-window
    layer's query sees only the last `window` positions, so s is drawn from those: from all of 0..p, the moment of
    Gemma 3's sliding layers at 2K calibration tokens was mostly of query-key pairs their attention never forms."""

    def __init__(self, rope=None, samples: int = 4, seed: int = 0, window: int | None = None):
        super().__init__()
        self.query_moment, self.query_count = 0.0, 0
        self.rope, self.samples, self.window = rope, samples, window
        self._rng = np.random.default_rng(seed)

    def attention(self, queries, scale, mask=None):
        B, n_q_heads, L, D = queries.shape
        n_kv_heads = self.keys.shape[1]
        q = queries.astype(mx.float32)
        if self.rope is not None:
            # Tokens become the batch axis so that each gets its own key position: (B·L·samples, Hq, 1, D).
            positions = np.arange(self.offset - L, self.offset)
            seen = positions + 1 if self.window is None else np.minimum(positions + 1, self.window)
            key_positions = (positions + 1 - seen + np.floor(self._rng.random((B, self.samples, L)) * seen)).astype(np.int32)
            q = mx.repeat(q[:, None], self.samples, axis=1).transpose(0, 1, 3, 2, 4).reshape(-1, n_q_heads, 1, D)
            q = rotate(q, mx.array(key_positions.reshape(-1)), *self.rope, inverse=True)
            q = q.reshape(B * self.samples, L, n_q_heads, D).transpose(0, 2, 1, 3)
        q = q.reshape(q.shape[0], n_kv_heads, -1, L, D).transpose(1, 0, 2, 3, 4).reshape(n_kv_heads, -1, D)
        self.query_moment = self.query_moment + q.swapaxes(-1, -2) @ q
        self.query_count += q.shape[1]
        keys, values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


# Technical text of four more domains, read from the Debian packages that install it (as the eval's technical
# texts are: other projects' words are not committed): (path, package, where the excerpt starts or None). None of
# them is an eval text (quant/eval.py: TEXTS): the eval's Python, Vim and dpkg texts are other files of the
# same packages, and its novels, C header and FAQ are domains the calibration never sees.
DOMAIN_TEXTS = (
    ("/usr/lib/python3.11/subprocess.py", "libpython3.11-minimal", "class Popen"),
    ("/usr/lib/python3.11/typing.py", "libpython3.11-minimal", "class TypeVar"),
    ("/usr/share/vim/vim90/doc/usr_41.txt", "vim-runtime", None),
    ("/usr/share/doc/dpkg/spec/rootless-builds.txt", "dpkg-dev", None),
    ("/usr/share/doc/git/RelNotes/2.39.0.txt", "git", None),
)
LICENCE_CHUNKS = 3


def calibration_texts(chunks: int = 8, chars: int = 10000) -> list[str]:
    """Real text that is on every Debian system, none of it an eval text: the first `chunks` of
    LICENCE_CHUNKS pieces of the licence texts of /usr/share/common-licenses, then one excerpt of each
    DOMAIN_TEXTS (Python source, a Vim manual chapter, a dpkg spec, git release notes), `chars` characters
    each (about 2000 tokens).

    Licences alone (the first calibration) left the technical texts worst: +2.8% / +3.1% ΔPPL on the Vim
    manual and Python source at 3.5 bits against +1.3% / +0.4% on the novels (README, "Quality").

    Keys after RoPE have statistics that depend on the positions seen: a post-RoPE plan calibrated on 1024
    positions and used over 2048 tokens gave +7.5% ΔPPL at 3.5 bits, one calibrated on 2048 positions +2.9%.
    Pre-RoPE plans (the default) do not depend on position; 2048 positions are kept all the same.

    Second moments need real text: calibrating on SmolLM2-135M's own sampled continuations was measured
    worse (+51% ΔPPL at 2.5 bits instead of +25%)."""
    from ..eval import packaged_excerpt

    if not 1 <= chunks <= LICENCE_CHUNKS + len(DOMAIN_TEXTS):
        raise ValueError(f"chunks must be in 1..{LICENCE_CHUNKS + len(DOMAIN_TEXTS)}, got {chunks}")
    text = "".join(_read(name) for name in LICENCES)
    if len(text) < min(chunks, LICENCE_CHUNKS) * chars:
        raise ValueError(f"chunks: the licence texts in {LICENCE_DIR} hold {len(text) // chars} chunks, asked {chunks}")
    licences = [text[i * chars : (i + 1) * chars] for i in range(LICENCE_CHUNKS)]
    domains = [packaged_excerpt(path, package, start, chars) for path, package, start in DOMAIN_TEXTS[: chunks - LICENCE_CHUNKS]]
    return (licences + domains)[:chunks]


def _read(name: str) -> str:
    try:
        with open(os.path.join(LICENCE_DIR, name), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def model_rope(model, layer: int):
    """(ω, traditional) of a layer's RoPE (quant/rope.py), or None if it has none kvshard can undo."""
    block = model.layers[layer]
    attention = getattr(block, "self_attn", None) or getattr(block, "attention", None)
    rope, head_dim = getattr(attention, "rope", None), getattr(attention, "head_dim", None)
    if rope is None or not isinstance(head_dim, int):
        return None
    return rope_frequencies(rope, head_dim)


def collect_moments(model, tokenizer, texts, max_tokens: int = 2048, skip_tokens: int = 4, pre_rope: bool = True,
                    progress: bool = False, text_sums: list | None = None) -> list[dict]:
    """Per attention layer: query second moment grouped by KV head, centred key covariance and uncentred value
    second moment, each (H, d, d) float64, averaged over the texts' tokens; "rope", the layer's RoPE when the
    key moments are of keys before RoPE (`pre_rope` and a RoPE that quant/rope.py can read), else None; and
    "key_trace" (H,), the trace of the centred key covariance after RoPE, which plain methods code.
    text_sums: text_moment_sums of each text, when already computed (in other processes): the same result.

    The first `skip_tokens` keys and values of each text are left out: caches keep them as fp16 attention
    sinks, and they are outliers that would pull the transform towards themselves (+17.1% ΔPPL at 2.5 bits
    with them, +16.0% without)."""
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings")
    layers = _attention_layers(model)
    ropes = [model_rope(model, i) if pre_rope else None for i in layers]
    if text_sums is None:
        text_sums = (text_moment_sums(model, tokenizer, text, max_tokens, skip_tokens, pre_rope)
                     for text in tqdm(texts, desc="collecting moments", disable=not progress, unit="text"))
    sums = [{"query": 0.0, "keys": 0.0, "values": 0.0, "key_trace": 0.0, "nq": 0, "nk": 0} for _ in layers]
    for layer_sums in text_sums:
        for acc, add in zip(sums, layer_sums):
            for name in acc:
                acc[name] = acc[name] + add[name]
    return [
        {"query": a["query"] / a["nq"], "keys": a["keys"] / a["nk"], "values": a["values"] / a["nk"],
         "key_trace": a["key_trace"] / a["nk"], "rope": rope}
        for a, rope in zip(sums, ropes)
    ]


def text_moment_sums(model, tokenizer, text: str, max_tokens: int = 2048, skip_tokens: int = 4,
                     pre_rope: bool = True) -> list[dict]:
    """One text's share of collect_moments: per attention layer, the sums of its moments and their counts."""
    layers = _attention_layers(model)
    ropes = [model_rope(model, i) if pre_rope else None for i in layers]
    windows = sliding_windows(model)
    install_attention_hook(model)
    caches = make_prompt_cache(model)
    for i, rope in zip(layers, ropes):
        caches[i] = QueryMomentCache(rope, window=windows[i])
    model(mx.array(tokenizer.encode(text)[:max_tokens])[None], cache=caches)
    sums = []
    for i, rope in zip(layers, ropes):
        cache = caches[i]
        keys = cache.keys[:, :, : cache.offset].astype(mx.float32)
        k = keys[0, :, skip_tokens:]
        v = cache.values[0, :, skip_tokens : cache.offset].astype(mx.float32)
        k = k - k.mean(axis=1, keepdims=True)  # the cache codes k − μ, μ the mean of its tokens after the sinks
        key_trace = np.array((k * k).sum(axis=(1, 2)), np.float64)
        if rope is not None:
            k = rotate(keys, 0, *rope, inverse=True)[0, :, skip_tokens:]
            k = k - k.mean(axis=1, keepdims=True)
        sums.append({"query": np.array(cache.query_moment, np.float64), "nq": cache.query_count,
                     "keys": np.array(k.swapaxes(-1, -2) @ k, np.float64),
                     "values": np.array(v.swapaxes(-1, -2) @ v, np.float64), "key_trace": key_trace, "nk": k.shape[1]})
    return sums


def _sqrtm(a: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(a)
    return (u * np.sqrt(np.maximum(w, 0))) @ u.T


def _decorrelate(moment: np.ndarray, metric: np.ndarray | None):
    """(analysis, energies) per head: y = analysis @ x has uncorrelated coordinates of descending energy."""
    analysis, energies = [], []
    for h in range(moment.shape[0]):
        m = np.eye(moment.shape[1]) if metric is None else metric[h]
        w, u = np.linalg.eigh(m @ moment[h] @ m)
        order = np.argsort(w)[::-1]
        analysis.append(u[:, order].T @ m)
        energies.append(np.maximum(w[order], 0.0))
    return np.stack(analysis), np.stack(energies)


def _shrink(moment: np.ndarray, amount: float) -> np.ndarray:
    """moment + amount · (mean eigenvalue) · I, per head."""
    d = moment.shape[-1]
    return moment + amount * np.trace(moment, axis1=1, axis2=2)[:, None, None] / d * np.eye(d)


def decompose(moments: dict, shrinkage: float = SHRINKAGE):
    """Analysis matrices and energies of one layer's keys and values."""
    metric = np.stack([_sqrtm(q) for q in _shrink(moments["query"], QUERY_RIDGE)])
    keys, values = _shrink(moments["keys"], shrinkage), _shrink(moments["values"], shrinkage)
    return _decorrelate(keys, metric), _decorrelate(values, None)


def _greedy(costs: list[np.ndarray], bits: list[list[int]], budgets: list[int | None], left: int, max_bits: int,
            prices: list[int] | None = None) -> None:
    """Hand out `left` bits, each to the coordinate whose next bit removes the most cost per unit of its slot's
    price (prices[s], default 1: what one bit of slot s takes from `left`); budgets[s], when set, caps slot s's
    total."""
    delta = GAUSSIAN_DISTORTION
    prices = [1] * len(costs) if prices is None else prices
    heap = [(-c[i] * (delta[bits[s][i]] - delta[bits[s][i] + 1]) / prices[s], s, i)
            for s, c in enumerate(costs) for i in range(len(c)) if bits[s][i] < max_bits]
    heapq.heapify(heap)
    totals = [sum(b) for b in bits]
    while left > 0 and heap:
        _, s, i = heapq.heappop(heap)
        if budgets[s] is not None and totals[s] >= budgets[s] or prices[s] > left:
            continue
        bits[s][i] += 1
        totals[s] += 1
        left -= prices[s]
        b = bits[s][i]
        if b < max_bits:
            heapq.heappush(heap, (-costs[s][i] * (delta[b] - delta[b + 1]) / prices[s], s, i))


def allocate_coordinate_bits(costs: list[np.ndarray], total_bits: int, max_bits: int = 8,
                             prices: list[int] | None = None) -> list[list[int]]:
    """Integer bits for every coordinate of every slot minimising Σ cost·δ(b) with at most total_bits in all,
    each slot a whole number of bytes (a token's codes are padded to a byte, so the padding might as well
    carry the slot's next most useful bits), and every slot's first coordinate coded. costs: one (d,) array
    of c · λ per slot, descending. prices: per slot, what one of its bits counts in total_bits (default 1 each):
    the tokens a slot's layer holds, when layers hold different numbers of tokens (sliding windows)."""
    prices = [1] * len(costs) if prices is None else [int(p) for p in prices]
    if len(prices) != len(costs) or min(prices) < 1:
        raise ValueError(f"prices must be {len(costs)} integers >= 1, got {prices}")
    floor, capacity = 8 * sum(prices), max_bits * sum(p * len(c) for p, c in zip(prices, costs))
    if not floor <= total_bits <= capacity:
        raise ValueError(f"total_bits must be in {floor}..{capacity}, got {total_bits}")
    def fill(target: int) -> tuple[list[list[int]], int]:
        bits = [[1] + [0] * (len(c) - 1) for c in costs]
        _greedy(costs, bits, [None] * len(costs), target - sum(prices), max_bits, prices)
        # Round every slot up to whole bytes with its own next-best bits.
        padded = [min(-(-sum(b) // 8) * 8, max_bits * len(b)) for b in bits]
        for s in range(len(costs)):
            _greedy([costs[s]], [bits[s]], [padded[s]], padded[s] - sum(bits[s]), max_bits)
        return bits, sum(p * n for p, n in zip(prices, padded))

    # The largest target whose byte-rounded allocation still fits total_bits (rounding adds < 8 per slot).
    low, high = max(sum(prices), total_bits - floor), total_bits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fill(middle)[1] <= total_bits else (low, middle - 1)
    bits, _ = fill(low)
    # Equal costs can leave a later coordinate one bit above an earlier one; sorting keeps runs contiguous and
    # changes nothing else (costs are descending).
    return [sorted(b, reverse=True) for b in bits]


def energy_costs(moments: dict, key_weight: float, value_weight: float, probe_bits: int = 2) -> tuple[float, float]:
    """What one unit of a layer's decorrelated key and value energy costs in plan_klt's allocation: the layer's
    sensitivity (calibrate_layer_sensitivities, probed at probe_bits) over the distortion its probe caused."""
    probe = GAUSSIAN_DISTORTION[probe_bits]
    d = moments["query"].shape[-1]
    # The probe spread its error evenly over the coordinates of keys after RoPE (whatever plan is made):
    # E[(q·e)²] = tr Σq · tr Σk / d · δ per head. RoPE keeps tr Σq.
    key_trace = moments.get("key_trace", np.trace(moments["keys"], axis1=1, axis2=2))
    key_probe = probe * np.sum(np.trace(moments["query"], axis1=1, axis2=2) * key_trace) / d
    value_probe = probe * np.sum(np.trace(moments["values"], axis1=1, axis2=2))
    return key_weight / max(key_probe, 1e-30), value_weight / max(value_probe, 1e-30)


def plan_klt(moments: list[dict], key_weights, value_weights, code_bits: float, probe_bits: int = 2, norm_bits: int = 8,
             decomposed: list | None = None, wide_bits: int | None = WIDE_BITS, coded_tokens: list[int] | None = None):
    """(key_plans, value_plans), one KLTPlan per attention layer, with `code_bits` average code bits per K/V
    element (each token's norm, `norm_bits` per head, comes on top). key_weights / value_weights:
    `calibrate_layer_sensitivities`. decomposed: `decompose` of each layer's moments, when already computed
    (a profile plans many budgets from one decomposition). wide_bits: KLTPlan.wide_bits of every plan.
    coded_tokens: per layer, the coded tokens it holds, when they differ (a sliding-window layer holds its
    window): the average is then over the elements held, and a bit of a layer that holds fewer tokens costs
    that much less."""
    if not len(moments) == len(key_weights) == len(value_weights):
        raise ValueError("moments, key_weights and value_weights must have one entry per attention layer")
    decomposed = [decompose(m) for m in moments] if decomposed is None else decomposed
    costs = []
    for m, ((_, key_energy), (_, value_energy)), wk, wv in zip(moments, decomposed, key_weights, value_weights):
        key_cost, value_cost = energy_costs(m, wk, wv, probe_bits)
        costs.append(key_cost * key_energy.sum(axis=0))
        costs.append(value_cost * value_energy.sum(axis=0))
    d = len(costs[0])
    prices = [1] * len(costs) if coded_tokens is None else [int(n) for n in coded_tokens for _ in ("keys", "values")]
    bits = allocate_coordinate_bits(costs, int(round(code_bits * d * sum(prices))), prices=prices)
    key_plans, value_plans = [], []
    for layer, ((ka, ke), (va, ve)) in enumerate(decomposed):
        rope = moments[layer].get("rope") or (None, False)
        key_plans.append(KLTPlan(ka, ke, tuple(bits[2 * layer]), norm_bits, *rope, wide_bits))
        value_plans.append(KLTPlan(va, ve, tuple(bits[2 * layer + 1]), norm_bits, wide_bits=wide_bits))
    return key_plans, value_plans
