"""Calibration profiles: what the `klt` recipe measures on one model, kept as one versioned artifact.

A profile holds, per attention layer, the query, key and value second moments (klt.collect_moments) and the key
and value KL sensitivities (ratequant.calibrate_layer_sensitivities). The bit plans are not stored: plan_klt
computes them from those in about a second, so `Profile.config(budget_bits=b)` serves any budget b in the
profile's range, not only the calibrated points. `measured` is the ΔPPL that calibrate_profile measured at its
budgets on validation texts (never the calibration texts).

On disk a profile is a folder: profile.safetensors (the moments, float32) and profile.json (format version,
model fingerprint, texts, sensitivities, budgets, measured quality, library version, the profile's own
fingerprint). `kvshard calibrate --model NAME --out DIR` writes one; `load_profile(NAME or DIR)` reads it.
"""

import datetime
import functools
import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field

import numpy as np

from ..codebooks import CODEBOOK_VERSION
from ..methods.klt import WIDE_BITS

FORMAT_VERSION = 1
SINK_TOKENS = 4
# fp16 recent tokens of the recommended configuration (KVCacheConfig.window; a session may ask for some): none. At
# 3.6 bits on the seven eval texts a 16-token window (0.25 of the bits at 1,024 tokens) read +1.71% mean ΔPPL, none
# +1.31%; in decode mode it bought a fraction of a point on three texts (README, "Quality").
WINDOW_TOKENS = 0
# Per-sequence overheads (the fp16 sinks, window and key mean) are spread over this many tokens when a budget is
# planned: a cache holding at least this many tokens stays within the budget.
PLANNED_TOKENS = 1024
# What a model session gets when it asks for no configuration (issue 10: <= 3.6 bits, <= +1.5% ΔPPL): the most the
# issue allows.
RECOMMENDED_BITS = 3.6
BUDGETS = (2.0, 2.5, 3.5, RECOMMENDED_BITS, 4.5)
# Profile.key_cost_scale of the profiles kvshard calibrate makes: keys' distortion costs 1.4 times what the probes
# say, values' as probed. Measured against 1 on the same code, texts and machine (README, "Quality"), it lowered the
# worst text at every budget.
KEY_COST_SCALE = 1.4
# Keys cost more the more of them a query attends over: a score error lifts every wrong key, and the more keys, the
# more mass they take from the right ones. Re-plans of the shipped SmolLM2 profile with keys at 1.5 times their cost
# did better on the late tokens of 8K windows at 2.5 / 3.5 / 4.5 bits but worse on 1,024-token texts (H200,
# benchmarks/results/long_range_gpu_variants). So a plan for a cache of `tokens` tokens weighs keys
# context_key_scale(tokens) times more: 1 up to PLANNED_TOKENS, then growing as a power of the tokens to
# LONG_CONTEXT_KEY_SCALE at LONG_CONTEXT_TOKENS, and held there (not measured beyond). Measured on SmolLM2 only; every
# profile's plans for long caches weigh keys so.
LONG_CONTEXT_KEY_SCALE, LONG_CONTEXT_TOKENS = 1.5, 8192
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "profiles")
# Folders searched for a profile by name, before the shipped ones: colon-separated, like PATH.
PATH_VARIABLE = "KVSHARD_PROFILE_PATH"
_ARRAYS = ("query", "keys", "values", "key_trace")


def context_key_scale(tokens: int) -> float:
    """What a plan for a cache of `tokens` tokens multiplies the profile's key cost scale by (LONG_CONTEXT_KEY_SCALE)."""
    if tokens <= PLANNED_TOKENS:
        return 1.0
    reach = math.log(min(tokens, LONG_CONTEXT_TOKENS) / PLANNED_TOKENS) / math.log(LONG_CONTEXT_TOKENS / PLANNED_TOKENS)
    return LONG_CONTEXT_KEY_SCALE**reach


@dataclass
class Profile:
    name: str
    model_fingerprint: str
    moments: list  # per attention layer: klt.collect_moments' dict
    key_weights: list  # per attention layer: KL sensitivity of its keys
    value_weights: list
    meta: dict = field(default_factory=dict)  # texts, budgets, measured, recommended_bits, library version, created
    _configs: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not self.moments or not len(self.moments) == len(self.key_weights) == len(self.value_weights):
            raise ValueError("moments, key_weights and value_weights must have one entry per attention layer")
        self.key_weights = [float(w) for w in self.key_weights]
        self.value_weights = [float(w) for w in self.value_weights]

    @property
    def head_dim(self) -> int:
        return int(self.moments[0]["query"].shape[-1])

    @property
    def key_cost_scale(self) -> float:
        """What a key's distortion costs the plans over its probed sensitivity, values' being 1 (meta "key_cost_scale";
        profiles without it: 1). The probes (ratequant.calibrate_layer_sensitivities) are 48-token prompts coded with
        plain TurboQuant after RoPE, unlike the klt codes of pre-RoPE keys that the plans are for (README, "Quality")."""
        return float(self.meta.get("key_cost_scale", 1.0))

    @property
    def codebook_version(self) -> int:
        """The codebooks (codebooks.CODEBOOK_VERSION) its measured rows were coded with (profiles without it: 1)."""
        return int(self.meta.get("codebook_version", 1))

    @property
    def wide_codebook(self) -> bool:
        """Whether its plans code runs of klt.WIDE_BITS or more with the wide codebook (meta "wide_codebook";
        profiles without it: they do). Made for Gemma 3's strongest key coordinates, which the sphere law clips; on
        SmolLM2 it cost 16% of a test setting's next-token KL (benchmarks/klt_rope_codebooks.py)."""
        return bool(self.meta.get("wide_codebook", True))

    @property
    def sink_tokens(self) -> int:
        """fp16 attention sinks of its configurations, counted in every budget (meta "sink_tokens")."""
        return int(self.meta.get("sink_tokens", SINK_TOKENS))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over what decides the configurations: model fingerprint, sensitivities (and the key cost scale,
        when not 1; the codebook version, when not 1; the sphere codebooks, when chosen; the sinks, when not
        SINK_TOKENS), moments (as stored)."""
        decides = [self.model_fingerprint, self.key_weights, self.value_weights]
        decides += [self.key_cost_scale] if self.key_cost_scale != 1.0 else []
        decides += [self.codebook_version] if self.codebook_version != 1 else []
        decides += [] if self.wide_codebook else ["sphere codebooks"]
        decides += [] if self.sink_tokens == SINK_TOKENS else [f"{self.sink_tokens} sinks"]
        digest = hashlib.sha256(json.dumps(decides).encode())
        for layer in self.moments:
            for name in _ARRAYS:
                digest.update(np.ascontiguousarray(layer[name], np.float32).tobytes())
            rope = layer.get("rope")
            digest.update(b"-" if rope is None else np.asarray(rope[0], np.float32).tobytes() + bytes([rope[1]]))
        return digest.hexdigest()

    @property
    def sliding_layers(self) -> list:
        """Indices of the sliding-window layers among the profile's layers (a hybrid model's all-layer profile,
        e.g. Gemma 3's); empty when every layer is a full-attention one."""
        return [int(i) for i in self.meta.get("sliding_layers", [])]

    @property
    def sliding_window(self) -> int | None:
        """Tokens a sliding layer attends to (meta "sliding_window"); None: plans count every layer as holding all."""
        window = self.meta.get("sliding_window")
        return None if window is None else int(window)

    def _coded_tokens(self, layers: list, tokens: int, window: int) -> list | None:
        """Per coded layer, the tokens it holds as codes in a cache of `tokens` tokens with a `window`-token fp16
        window, when some layers hold fewer than others (sliding layers in a compressed window, which has dropped
        the fp16 sinks with the rest of what left it); else None."""
        sliding = set(self.sliding_layers)
        if self.sliding_window is None or tokens <= self.sliding_window or not sliding.intersection(layers):
            return None
        coded = [self.sliding_window - window if i in sliding else tokens - self.sink_tokens - window for i in layers]
        if min(coded) < 1:
            raise ValueError(f"window: a {window}-token fp16 window leaves no coded tokens in the {self.sliding_window}-token sliding window")
        return coded

    def _priced_code_bits(self, budget: float, tokens: int, window: int, layers: list, coded: list) -> float:
        """Code bits per coded K/V element, averaged over the elements held, that keep a hybrid model's caches within
        `budget` effective bits against its fp16 cache (quant/sliding.py: effective_bits_vs_fp16): the fp16 sinks
        (global layers), window and key mean, and each coded token's scale byte per side, come first."""
        d, sliding = self.head_dim, set(self.sliding_layers)
        held = [self.sliding_window if i in sliding else tokens for i in layers]
        fp16 = [h - c for h, c in zip(held, coded)]  # sinks and window tokens, keys and values in fp16
        overhead = sum(2 * d * 16 * f + 16 * d + 16 * c for f, c in zip(fp16, coded))
        slots = 2 * d * sum(coded)
        code_bits = (budget * 2 * d * sum(held) - overhead) / slots
        return max(math.floor(code_bits * slots) / slots, 8 / d)

    def _coded_layers(self, sliding: str) -> list:
        """The profile's layers that a cache of this `sliding` choice codes (KVCacheConfig.sliding): all of them,
        or with sliding="fp16" only the full-attention ones (the sliding layers keep fp16 windows)."""
        if sliding not in ("fp16", "compressed", "full"):
            raise ValueError(f"sliding: must be one of ('fp16', 'compressed', 'full'), got {sliding!r}")
        skip = set(self.sliding_layers) if sliding == "fp16" else set()
        return [i for i in range(len(self.moments)) if i not in skip]

    @property
    def recommended_bits(self) -> float:
        return float(self.meta.get("recommended_bits", RECOMMENDED_BITS))

    @property
    def window(self) -> int:
        """fp16 recent tokens of the recommended configuration (profiles made before windows were counted: 0)."""
        return int(self.meta.get("window_tokens", 0))

    def default_window(self, budget_bits: float | None) -> int:
        """The window config() gives a budget when none is asked: the profile's at the recommended budget, else 0."""
        return self.window if budget_bits is None or budget_bits == self.recommended_bits else 0

    def _window(self, window: int | None) -> int:
        window = 0 if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        return window

    def _coded_share(self, tokens: int, window: int) -> float:
        """The share of a cache's `tokens` tokens that are held as codes (not fp16 sinks or window)."""
        if tokens <= self.sink_tokens + window:
            raise ValueError(f"tokens must exceed the {self.sink_tokens} sinks and the {window}-token window, got {tokens}")
        return (tokens - self.sink_tokens - window) / tokens

    def overhead_bits(self, tokens: int = PLANNED_TOKENS, window: int | None = None) -> float:
        """Effective bits per K/V element that are not codes, in a cache of `tokens` tokens: the fp16 sinks and
        fp16 window (keys and values) plus the fp16 key mean, and each coded token's scale byte per head and
        side. A budget b leaves (b − overhead) / coded share code bits per coordinate of a coded token."""
        window = self._window(window)
        return (16 * (self.sink_tokens + window) + 8) / tokens + self._coded_share(tokens, window) * 8 / self.head_dim

    def bits_range(self, tokens: int = PLANNED_TOKENS, window: int | None = None) -> tuple[float, float]:
        """The budgets config() accepts: from one byte of codes per token and side, to 8 bits per coordinate."""
        overhead, share = self.overhead_bits(tokens, window), self._coded_share(tokens, self._window(window))
        return overhead + share * 8 / self.head_dim, overhead + share * 8.0

    def config(self, budget_bits: float | None = None, tokens: int = PLANNED_TOKENS, window: int | None = None,
               sliding: str | None = None, sliding_values: str = "rotation"):
        """The best `klt` configuration this profile knows within `budget_bits` effective bits per K/V element,
        all overheads counted (sinks, the fp16 window of `window` tokens, key mean and scales), for a cache holding
        at least `tokens` tokens, its keys weighed context_key_scale(tokens) times more (the plans of the default
        PLANNED_TOKENS are those of every earlier release). None: the recommended budget; window None:
        default_window(budget_bits).
        sliding (KVCacheConfig.sliding; a profile with sliding layers only): "compressed" (its default) or "full"
        plan every layer; "fp16" plans the full-attention layers alone within the budget and leaves the sliding
        layers' fp16 windows outside it. With "compressed" and a known `sliding_window` shorter than `tokens`, the
        budget is of the elements the model's fp16 cache holds (a sliding layer: its window) and a sliding layer's
        bits cost what it holds: at 1,024 tokens half a global layer's (README, "A second model").
        sliding_values: how the coded sliding layers code values, at the bits their plans give them: "rotation"
        (methods/klt.py: rotation_plan; the default) or "klt" (the calibrated transform, as before 2026-12-04:
        it loses what those layers attend once the window has dropped <bos>)."""
        from ..config import KVCacheConfig
        from ..methods.klt import rotation_plan
        from .klt import plan_klt

        if sliding_values not in ("rotation", "klt"):
            raise ValueError(f"sliding_values: must be 'rotation' or 'klt', got {sliding_values!r}")
        budget = self.recommended_bits if budget_bits is None else budget_bits
        window = self._window(self.default_window(budget_bits) if window is None else window)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ValueError(f"budget_bits must be a number, got {budget!r}")
        low, high = self.bits_range(tokens, window)
        if not low <= budget <= high:
            raise ValueError(f"budget_bits must be in [{low:.3f}, {high:.3f}] for profile {self.name!r} with a "
                             f"{window}-token window, got {budget}")
        # Whole bits in all, rounded down, so that plan_klt's total never passes the budget.
        if sliding is None:
            sliding = "compressed" if self.sliding_layers else "fp16"
        layers = self._coded_layers(sliding)
        coded = self._coded_tokens(layers, tokens, window) if sliding == "compressed" else None
        if coded is None:
            slots = 2 * len(layers) * self.head_dim
            code_bits = (budget - self.overhead_bits(tokens, window)) / self._coded_share(tokens, window)
            code_bits = max(math.floor(code_bits * slots) / slots, 8 / self.head_dim)
        else:
            code_bits = self._priced_code_bits(budget, tokens, window, layers, coded)
        key_scale = self.key_cost_scale * context_key_scale(tokens)
        key = (code_bits, len(layers), None if coded is None else tuple(coded), key_scale)
        if key not in self._configs:
            pick = lambda items: [items[i] for i in layers]  # noqa: E731
            key_costs = [w * key_scale for w in self.key_weights]
            self._configs[key] = plan_klt(
                pick(self.moments), pick(key_costs), pick(self.value_weights), code_bits,
                decomposed=pick(self._decomposed), wide_bits=WIDE_BITS if self.wide_codebook else None,
                coded_tokens=coded)
        if sliding_values == "rotation" and sliding != "fp16" and self.sliding_layers:
            if (key, "rotation") not in self._configs:  # made once: caches and batch arenas compare plans by identity
                slide, (keys, values) = set(self.sliding_layers), self._configs[key]
                self._configs[key, "rotation"] = keys, [rotation_plan(p) if i in slide else p
                                                        for i, p in zip(layers, values, strict=True)]
            key = key, "rotation"
        key_plans, value_plans = self._configs[key]
        return KVCacheConfig(method="klt", sink_tokens=self.sink_tokens, window=window, key_plans=key_plans,
                             value_plans=value_plans, sliding=sliding, profile=self.name, budget_bits=float(budget),
                             profile_fingerprint=self.fingerprint, planned_tokens=0 if tokens == PLANNED_TOKENS else tokens)

    @functools.cached_property
    def _decomposed(self) -> list:
        from threadpoolctl import threadpool_limits

        from .klt import decompose

        # Hundreds of 64x64 eigendecompositions: BLAS threads only contend on them (measured on the 2-core CI
        # machine under load: 28 s with the default threads, 2.7 s with one).
        with threadpool_limits(1):
            return [decompose(m) for m in self.moments]


def calibrate_profile(model, tokenizer, name: str, texts=None, budgets=BUDGETS, validation=None,
                      validation_tokens: int = 1024, progress: bool = False, on_measured=None, jobs: int = 1,
                      model_name: str | None = None, keys_after_rope: bool = False,
                      key_cost_scale: float = KEY_COST_SCALE, wide_codebook: bool = True,
                      sink_tokens: int = SINK_TOKENS, window: int = WINDOW_TOKENS) -> Profile:
    """Measure a profile on `model`: moments over `texts` (default klt.calibration_texts()), sensitivities on
    ratequant's prompts, then ΔPPL at each budget on the `validation` texts (default: `kvshard eval`'s).
    keys_after_rope: key moments (and so the plans) of keys as the model caches them, after RoPE, instead of before
    (the default, better at every budget measured; README, "Quality") — the CPU kernel scores such keys 2–2.5×
    faster and the GPU kernels have a fast path only for them.
    on_measured(profile), when given, is called before the first validation text and after each, with
    meta["measured"] holding the texts measured so far (kvshard calibrate saves the profile each time).
    jobs > 1: each text's moments and each side's sensitivities are measured in one of `jobs` processes that load
    `model_name` (load_model), with the same result as one process.
    wide_codebook, sink_tokens, window: the profile's Profile.wide_codebook, sink_tokens and window."""
    import mlx.core as mx

    from .. import eval as quality
    from ..models import model_fingerprint
    from .klt import calibration_texts, collect_moments
    from .ratequant import calibrate_layer_sensitivities

    texts = calibration_texts() if texts is None else list(texts)
    validation = list(quality.TEXTS) if validation is None else list(validation)
    if jobs > 1:
        if model_name is None:
            raise ValueError("model_name: jobs > 1 loads the model by name in each process")
        tasks = [("moments", (text, not keys_after_rope)) for text in texts]
        tasks += [("sensitivities", "keys"), ("sensitivities", "values")]
        results = _in_processes(model_name, tasks, jobs, progress)
        moments = collect_moments(model, tokenizer, texts, pre_rope=not keys_after_rope, text_sums=results[: len(texts)])
        weights = results[len(texts) :]
    else:
        moments = collect_moments(model, tokenizer, texts, skip_tokens=SINK_TOKENS, pre_rope=not keys_after_rope,
                                  progress=progress)
        weights = [calibrate_layer_sensitivities(model, tokenizer, target=t, progress=progress) for t in ("keys", "values")]
    profile = Profile(name, model_fingerprint(model), moments, *weights, meta={
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} on {mx.default_device()}",
        "calibration_texts": [{"chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()} for t in texts],
        "recommended_bits": RECOMMENDED_BITS,
        "planned_tokens": PLANNED_TOKENS,
        "sink_tokens": sink_tokens,
        "window_tokens": window,
        "codebook_version": CODEBOOK_VERSION,
        **({"key_cost_scale": key_cost_scale} if key_cost_scale != 1.0 else {}),
        **({} if wide_codebook else {"wide_codebook": False}),
    })

    def measured(rows):
        profile.meta["measured"] = rows
        if on_measured is not None:
            on_measured(profile)

    measured([])
    profile.meta["measured"] = measure_profile(profile, model, tokenizer, budgets, validation, validation_tokens,
                                               progress, on_text=measured)
    return profile


_WORKER = {}


def _load_worker(model_name: str) -> None:
    from ..models import load_model

    _WORKER["model"] = load_model(model_name)


def _calibration_task(task: tuple):
    from .klt import text_moment_sums
    from .ratequant import calibrate_layer_sensitivities

    model, tokenizer = _WORKER["model"]
    kind, argument = task
    if kind == "moments":
        text, pre_rope = argument
        return text_moment_sums(model, tokenizer, text, skip_tokens=SINK_TOKENS, pre_rope=pre_rope)
    return calibrate_layer_sensitivities(model, tokenizer, target=argument, progress=False)


def _in_processes(model_name: str, tasks: list, jobs: int, progress: bool) -> list:
    """_calibration_task of every task, in order, run by `jobs` spawned processes that each load the model once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # MLX state does not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_load_worker, initargs=(model_name,)) as pool:
        return list(tqdm(pool.map(_calibration_task, tasks), total=len(tasks), desc=f"calibrating ({jobs} processes)",
                         disable=not progress, unit="task"))


def measure_profile(profile: Profile, model, tokenizer, budgets, texts, tokens: int = 1024, progress: bool = False,
                    on_text=None) -> list:
    """Per budget (with its default window): effective bits and ΔPPL % against an fp16 cache on each text (kvshard
    eval's perplexity).
    on_text(rows), when given, gets the rows of the texts measured so far after each text."""
    from tqdm import tqdm

    from .. import eval as quality
    from ..builder import KVCacheBuilder

    windows = [profile.default_window(b) for b in budgets]
    configs = [
        quality.EvalConfig(f"{b}", "profile", lambda b=b: KVCacheBuilder.for_model(model, profile.config(b)))
        for b in budgets
    ]
    per_text = {}
    for name in tqdm(texts, desc="measuring", disable=not progress, unit="text"):
        ids = tokenizer.encode(quality.load_text(name), add_special_tokens=False)[:tokens]
        per_text[name] = quality.compare(model, ids, configs)[1:]
        if on_text is not None:
            on_text(_rows(budgets, windows, per_text, tokens))
    return _rows(budgets, windows, per_text, tokens)


def merge_measured(rows: list, other: list) -> list:
    """Rows of two measurements of one profile at the same budgets and tokens, texts of `rows` first; a text
    measured in both keeps `rows`' figures."""
    if not other:
        return rows
    if not rows:
        return other
    if [(r["budget_bits"], r["tokens"]) for r in rows] != [(r["budget_bits"], r["tokens"]) for r in other]:
        raise ValueError("measured: the two measurements differ in budgets or tokens")
    merged = []
    for row, more in zip(rows, other):
        deltas = {**more["delta_ppl_pct"], **row["delta_ppl_pct"]}
        merged.append(dict(row, delta_ppl_pct=deltas, effective_bits=max(row["effective_bits"], more["effective_bits"]),
                           mean_delta_ppl_pct=round(sum(deltas.values()) / len(deltas), 4),
                           worst_delta_ppl_pct=max(deltas.values())))
    return merged


def _rows(budgets, windows, per_text: dict, tokens: int) -> list:
    rows = []
    for i, (budget, window) in enumerate(zip(budgets, windows)):
        deltas = {name: round(rows_[i]["delta_ppl_pct"], 4) for name, rows_ in per_text.items()}
        rows.append({
            "budget_bits": budget,
            "effective_bits": round(max(r[i]["effective_bits"] for r in per_text.values()), 4),
            "delta_ppl_pct": deltas,
            "mean_delta_ppl_pct": round(sum(deltas.values()) / len(deltas), 4),
            "worst_delta_ppl_pct": max(deltas.values()),
            "tokens": tokens,
            "window_tokens": window,
        })
    return rows


def save_profile(profile: Profile, folder: str, dtype=np.float32) -> str:
    """Write profile.safetensors and profile.json into `folder` (made if missing); returns the folder.
    dtype np.float16 halves the file; the moments must then hold float16 values already (the fingerprint is
    of the values stored)."""
    import mlx.core as mx

    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for i, layer in enumerate(profile.moments):
        for name in _ARRAYS:
            arrays[f"{i}.{name}"] = mx.array(np.asarray(layer[name], np.float32).astype(dtype))
        if layer.get("rope") is not None:
            arrays[f"{i}.rope_frequencies"] = mx.array(np.asarray(layer["rope"][0], np.float32))
    # Each file is written beside and renamed into place: a reader never sees half a profile file.
    mx.save_safetensors(os.path.join(folder, "profile.tmp.safetensors"), arrays)
    os.replace(os.path.join(folder, "profile.tmp.safetensors"), os.path.join(folder, "profile.safetensors"))
    _save_document(profile, folder)
    return folder


def _save_document(profile: Profile, folder: str) -> None:
    document = dict(profile.meta, name=profile.name, model_fingerprint=profile.model_fingerprint,
                    fingerprint=profile.fingerprint, key_weights=profile.key_weights,
                    value_weights=profile.value_weights, format_version=FORMAT_VERSION,
                    rope_traditional=[None if m.get("rope") is None else bool(m["rope"][1]) for m in profile.moments])
    with open(os.path.join(folder, "profile.json.tmp"), "w") as f:
        json.dump(document, f, indent=2)
    os.replace(os.path.join(folder, "profile.json.tmp"), os.path.join(folder, "profile.json"))


def profile_path(name_or_path: str) -> str:
    """The folder of a profile: a path to one, or a name looked up in $KVSHARD_PROFILE_PATH, then the shipped ones."""
    if os.path.isfile(os.path.join(name_or_path, "profile.json")):
        return name_or_path
    folders = [p for p in os.environ.get(PATH_VARIABLE, "").split(os.pathsep) if p] + [SHIPPED_DIR]
    for folder in folders:
        candidate = os.path.join(folder, name_or_path)
        if os.sep not in name_or_path and os.path.isfile(os.path.join(candidate, "profile.json")):
            return candidate
    known = sorted({n for f in folders if os.path.isdir(f) for n in os.listdir(f)})
    raise ValueError(f"profile: no profile {name_or_path!r} (a folder with profile.json, or one of {known})")


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (see profile_path) or folder; refuses a file whose fingerprint does not match its data."""
    import mlx.core as mx

    folder = profile_path(name_or_path)
    with open(os.path.join(folder, "profile.json")) as f:
        document = json.load(f)
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"profile: {folder} has format_version {document.get('format_version')}, this library reads {FORMAT_VERSION}")
    arrays = mx.load(os.path.join(folder, "profile.safetensors"))
    moments = []
    for i, traditional in enumerate(document["rope_traditional"]):
        layer = {name: np.array(arrays[f"{i}.{name}"], np.float64) for name in _ARRAYS}
        layer["rope"] = None if traditional is None else (np.array(arrays[f"{i}.rope_frequencies"], np.float64), traditional)
        moments.append(layer)
    reserved = ("name", "model_fingerprint", "fingerprint", "key_weights", "value_weights", "rope_traditional")
    meta = {k: v for k, v in document.items() if k not in reserved}
    profile = Profile(document["name"], document["model_fingerprint"], moments, document["key_weights"],
                      document["value_weights"], meta)
    if profile.fingerprint != document["fingerprint"]:
        raise ValueError(f"profile: {folder}'s data does not match the fingerprint its profile.json records")
    return profile


def list_profiles() -> list[str]:
    """Names of the profiles load_profile finds by name."""
    folders = [p for p in os.environ.get(PATH_VARIABLE, "").split(os.pathsep) if p] + [SHIPPED_DIR]
    names = {n for f in folders if os.path.isdir(f) for n in os.listdir(f) if os.path.isfile(os.path.join(f, n, "profile.json"))}
    return sorted(names)


def replanned(profile: Profile, key_cost_scale: float, command: str, wide_codebook: bool | None = None,
              sink_tokens: int | None = None) -> Profile:
    """`profile` with another key cost scale (wide codebook choice, sinks: None keeps the profile's), for this
    library's codebooks: the same moments and sensitivities, other plans or codes, so a new fingerprint and nothing
    measured yet; `command` joins the commands that made it."""
    wide_codebook = profile.wide_codebook if wide_codebook is None else wide_codebook
    sink_tokens = profile.sink_tokens if sink_tokens is None else sink_tokens
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 1:
        raise ValueError(f"sink_tokens must be an integer >= 1, got {sink_tokens!r}")
    meta = {k: v for k, v in profile.meta.items() if k not in ("key_cost_scale", "wide_codebook")}
    meta.update(measured=[], commands=profile.meta.get("commands", []) + [command], codebook_version=CODEBOOK_VERSION,
                sink_tokens=sink_tokens, **({"key_cost_scale": key_cost_scale} if key_cost_scale != 1.0 else {}),
                **({} if wide_codebook else {"wide_codebook": False}))
    return Profile(profile.name, profile.model_fingerprint, profile.moments, profile.key_weights, profile.value_weights,
                   meta)


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvshard")
    except PackageNotFoundError:
        return "unknown"


def main(argv=None) -> int:
    """`kvshard calibrate --model NAME --out DIR`: calibrate, measure and write one profile. With --measure, measure
    the profile already in DIR on the --validation texts and add them to its measured rows: several such runs may
    share the texts of one calibration between processes."""
    import argparse

    parser = argparse.ArgumentParser(prog="kvshard calibrate", description=main.__doc__.split(":")[1].strip())
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, mlx_lm model path or repo id")
    parser.add_argument("--out", required=True, help="folder to write profile.json and profile.safetensors into")
    parser.add_argument("--name", help="profile name (default: the model name)")
    parser.add_argument("--texts", nargs="+", help="calibration text files (default: klt.calibration_texts, licences and four technical domains)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="effective bits to measure ΔPPL at")
    parser.add_argument("--validation", nargs="+", help="texts to measure ΔPPL on (default: kvshard eval's)")
    parser.add_argument("--validation-tokens", type=int, default=1024)
    parser.add_argument("--measure", action="store_true",
                        help="only measure the profile in --out on --validation, at --budgets (its other rows kept)")
    parser.add_argument("--jobs", type=int, default=1, help="processes that measure moments and sensitivities (each loads the model)")
    parser.add_argument("--key-cost-scale", type=float,
                        help=f"Profile.key_cost_scale (default {KEY_COST_SCALE}); with --measure, re-plans the profile in --out "
                             "with it (a new fingerprint, its measured rows dropped) before measuring, as --measure does "
                             "for a profile measured with older codebooks")
    parser.add_argument("--wide-codebook", choices=("on", "off"),
                        help="code klt runs of 7 bits or more with the wide codebook (default: on; Profile.wide_codebook); "
                             "with --measure, re-plans the profile in --out with it, as --key-cost-scale does")
    parser.add_argument("--sinks", type=int,
                        help=f"fp16 sink tokens of its configurations (default {SINK_TOKENS}); with --measure, re-plans "
                             "the profile in --out with them, as --key-cost-scale does")
    parser.add_argument("--window", type=int,
                        help=f"fp16 recent tokens of the recommended configuration (Profile.window; default {WINDOW_TOKENS}); "
                             "with --measure, sets the profile's and drops its measured rows")
    parser.add_argument("--keys-after-rope", action="store_true",
                        help="plan keys as cached, after RoPE (faster kernels, lower quality; default: before RoPE)")
    args = parser.parse_args(argv)
    if args.validation_tokens < 2:
        parser.error(f"--validation-tokens must be >= 2, got {args.validation_tokens}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.key_cost_scale is not None and not (math.isfinite(args.key_cost_scale) and args.key_cost_scale > 0):
        parser.error(f"--key-cost-scale must be a positive number, got {args.key_cost_scale}")
    if args.sinks is not None and args.sinks < 1:
        parser.error(f"--sinks must be >= 1, got {args.sinks}")
    if args.window is not None and args.window < 0:
        parser.error(f"--window must be >= 0, got {args.window}")
    wide = None if args.wide_codebook is None else args.wide_codebook == "on"
    texts = None
    if args.texts:
        texts = []
        for path in args.texts:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())

    from ..models import load_model

    model, tokenizer = load_model(args.model)
    command = " ".join(["kvshard calibrate", *(sys.argv[1:] if argv is None else argv)])

    def save(profile):
        # Saved once the moments are known and after every validation text, with what other runs on the same
        # profile measured meanwhile (they take turns on a lock of the folder): a run cut short leaves a profile that
        # loads, with the texts it measured. A --measure run rewrites only profile.json.
        import fcntl

        os.makedirs(args.out, exist_ok=True)
        folder = os.open(args.out, os.O_RDONLY)  # the folder itself is the lock: nothing is left behind in it
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            path = os.path.join(args.out, "profile.json")
            on_disk = {}
            if os.path.isfile(path):
                with open(path) as f:
                    on_disk = json.load(f)
            if on_disk.get("fingerprint") == profile.fingerprint and on_disk.get("window_tokens", 0) == profile.window:
                profile.meta["measured"] = merge_measured(profile.meta["measured"], on_disk.get("measured", []))
                commands = on_disk.get("commands", [])
                profile.meta["commands"] = commands + [command] * (command not in commands)
            profile.meta.setdefault("commands", [command])
            if args.measure:
                _save_document(profile, args.out)
            else:
                save_profile(profile, args.out)
        finally:
            os.close(folder)

    if args.measure:
        profile = load_profile(args.out)
        if not args.validation:
            parser.error("--measure needs --validation")
        scale = profile.key_cost_scale if args.key_cost_scale is None else args.key_cost_scale
        changes = (scale != profile.key_cost_scale, profile.codebook_version != CODEBOOK_VERSION,
                   wide not in (None, profile.wide_codebook), args.sinks not in (None, profile.sink_tokens))
        if any(changes):
            profile = replanned(profile, scale, command, wide, args.sinks)
        if args.window not in (None, profile.window):
            # Its plans stay; the recommended budget's configuration changes, so its rows go.
            commands = profile.meta.get("commands", [])
            profile.meta.update(window_tokens=args.window, commands=commands + [command] * (command not in commands))
            profile.meta["measured"] = [r for r in profile.meta.get("measured", [])
                                        if r["window_tokens"] == profile.default_window(r["budget_bits"])]
        # Rows of budgets not measured now are kept as they are.
        kept = [r for r in profile.meta.get("measured", []) if r["budget_bits"] not in args.budgets]
        with_kept = lambda rows: sorted(kept + rows, key=lambda r: r["budget_bits"])  # noqa: E731
        profile.meta["measured"] = with_kept(measure_profile(
            profile, model, tokenizer, tuple(args.budgets), args.validation, args.validation_tokens, True,
            on_text=lambda rows: (profile.meta.update(measured=with_kept(rows)), save(profile))))
    else:
        profile = calibrate_profile(model, tokenizer, args.name or args.model, texts, tuple(args.budgets),
                                    args.validation, args.validation_tokens, progress=True, on_measured=save,
                                    jobs=args.jobs, model_name=args.model, keys_after_rope=args.keys_after_rope,
                                    key_cost_scale=KEY_COST_SCALE if args.key_cost_scale is None else args.key_cost_scale,
                                    wide_codebook=wide is not False, sink_tokens=args.sinks or SINK_TOKENS,
                                    window=WINDOW_TOKENS if args.window is None else args.window)
    for row in profile.meta["measured"]:
        print(f"<= {row['budget_bits']} bits: {row['effective_bits']:.3f} effective, ΔPPL mean "
              f"{row['mean_delta_ppl_pct']:+.2f}% worst {row['worst_delta_ppl_pct']:+.2f}%")
    print(f"profile {profile.name} ({profile.fingerprint[:12]}) -> {args.out}")
    return 0
