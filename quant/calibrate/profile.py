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
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1
SINK_TOKENS = 4
# Per-sequence overheads (the fp16 sinks and key mean) are spread over this many tokens when a budget is planned:
# a cache holding at least this many tokens stays within the budget.
PLANNED_TOKENS = 1024
BUDGETS = (2.0, 2.5, 3.5, 4.5)
# What a model session gets when it asks for no configuration (issue 10: <= 3.6 bits, <= +1.5% ΔPPL).
RECOMMENDED_BITS = 3.5
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "profiles")
# Folders searched for a profile by name, before the shipped ones: colon-separated, like PATH.
PATH_VARIABLE = "KVSHARD_PROFILE_PATH"
_ARRAYS = ("query", "keys", "values", "key_trace")


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

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over what decides the configurations: model fingerprint, sensitivities, moments (as stored)."""
        digest = hashlib.sha256(json.dumps([self.model_fingerprint, self.key_weights, self.value_weights]).encode())
        for layer in self.moments:
            for name in _ARRAYS:
                digest.update(np.ascontiguousarray(layer[name], np.float32).tobytes())
            rope = layer.get("rope")
            digest.update(b"-" if rope is None else np.asarray(rope[0], np.float32).tobytes() + bytes([rope[1]]))
        return digest.hexdigest()

    @property
    def recommended_bits(self) -> float:
        return float(self.meta.get("recommended_bits", RECOMMENDED_BITS))

    def overhead_bits(self, tokens: int = PLANNED_TOKENS) -> float:
        """Effective bits per K/V element that are not codes: each token's scale byte per head and side, and the
        fp16 sinks (keys and values) plus the fp16 key mean, spread over `tokens` tokens."""
        return 8 / self.head_dim + 16 * (2 * SINK_TOKENS + 1) / (2 * tokens)

    def bits_range(self, tokens: int = PLANNED_TOKENS) -> tuple[float, float]:
        """The budgets config() accepts: from one byte of codes per token and side, to 8 bits per coordinate."""
        overhead = self.overhead_bits(tokens)
        return overhead + 8 / self.head_dim, overhead + 8.0

    def config(self, budget_bits: float | None = None, tokens: int = PLANNED_TOKENS):
        """The best `klt` configuration this profile knows within `budget_bits` effective bits per K/V element,
        all overheads counted, for a cache holding at least `tokens` tokens. None: the recommended budget."""
        from ..config import KVCacheConfig
        from .klt import plan_klt

        budget = self.recommended_bits if budget_bits is None else budget_bits
        low, high = self.bits_range(tokens)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ValueError(f"budget_bits must be a number, got {budget!r}")
        if not low <= budget <= high:
            raise ValueError(f"budget_bits must be in [{low:.3f}, {high:.3f}] for profile {self.name!r}, got {budget}")
        # Whole bits in all, rounded down, so that plan_klt's total never passes the budget.
        slots = 2 * len(self.moments) * self.head_dim
        code_bits = math.floor((budget - self.overhead_bits(tokens)) * slots) / slots
        if code_bits not in self._configs:
            self._configs[code_bits] = plan_klt(self.moments, self.key_weights, self.value_weights, code_bits,
                                                decomposed=self._decomposed)
        key_plans, value_plans = self._configs[code_bits]
        return KVCacheConfig(method="klt", sink_tokens=SINK_TOKENS, key_plans=key_plans, value_plans=value_plans,
                             profile=self.name, budget_bits=float(budget), profile_fingerprint=self.fingerprint)

    @functools.cached_property
    def _decomposed(self) -> list:
        from threadpoolctl import threadpool_limits

        from .klt import decompose

        # Hundreds of 64x64 eigendecompositions: BLAS threads only contend on them (measured on the 2-core CI
        # machine under load: 28 s with the default threads, 2.7 s with one).
        with threadpool_limits(1):
            return [decompose(m) for m in self.moments]


def calibrate_profile(model, tokenizer, name: str, texts=None, budgets=BUDGETS, validation=None,
                      validation_tokens: int = 1024, progress: bool = False) -> Profile:
    """Measure a profile on `model`: moments over `texts` (default klt.calibration_texts()), sensitivities on
    ratequant's prompts, then ΔPPL at each budget on the `validation` texts (default: `kvshard eval`'s)."""
    import mlx.core as mx

    from .. import eval as quality
    from ..models import model_fingerprint
    from .klt import calibration_texts, collect_moments
    from .ratequant import calibrate_layer_sensitivities

    texts = calibration_texts() if texts is None else list(texts)
    validation = list(quality.TEXTS) if validation is None else list(validation)
    moments = collect_moments(model, tokenizer, texts, skip_tokens=SINK_TOKENS, progress=progress)
    weights = [calibrate_layer_sensitivities(model, tokenizer, target=t, progress=progress) for t in ("keys", "values")]
    profile = Profile(name, model_fingerprint(model), moments, *weights, meta={
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} on {mx.default_device()}",
        "calibration_texts": [{"chars": len(t), "sha256": hashlib.sha256(t.encode()).hexdigest()} for t in texts],
        "recommended_bits": RECOMMENDED_BITS,
        "planned_tokens": PLANNED_TOKENS,
        "sink_tokens": SINK_TOKENS,
    })
    profile.meta["measured"] = measure_profile(profile, model, tokenizer, budgets, validation, validation_tokens, progress)
    return profile


def measure_profile(profile: Profile, model, tokenizer, budgets, texts, tokens: int = 1024, progress: bool = False) -> list:
    """Per budget: effective bits and ΔPPL % against an fp16 cache on each text (kvshard eval's perplexity)."""
    from tqdm import tqdm

    from .. import eval as quality
    from ..builder import KVCacheBuilder

    configs = [
        quality.EvalConfig(f"{b}", "profile", lambda b=b: KVCacheBuilder.for_model(model, profile.config(b)))
        for b in budgets
    ]
    per_text = {}
    for name in tqdm(texts, desc="measuring", disable=not progress, unit="text"):
        ids = tokenizer.encode(quality.load_text(name), add_special_tokens=False)[:tokens]
        per_text[name] = quality.compare(model, ids, configs)[1:]
    rows = []
    for i, budget in enumerate(budgets):
        deltas = {name: round(rows_[i]["delta_ppl_pct"], 4) for name, rows_ in per_text.items()}
        rows.append({
            "budget_bits": budget,
            "effective_bits": round(max(r[i]["effective_bits"] for r in per_text.values()), 4),
            "delta_ppl_pct": deltas,
            "mean_delta_ppl_pct": round(sum(deltas.values()) / len(deltas), 4),
            "worst_delta_ppl_pct": max(deltas.values()),
            "tokens": tokens,
        })
    return rows


def save_profile(profile: Profile, folder: str) -> str:
    """Write profile.safetensors and profile.json into `folder` (made if missing); returns the folder."""
    import mlx.core as mx

    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for i, layer in enumerate(profile.moments):
        for name in _ARRAYS:
            arrays[f"{i}.{name}"] = mx.array(np.asarray(layer[name], np.float32))
        if layer.get("rope") is not None:
            arrays[f"{i}.rope_frequencies"] = mx.array(np.asarray(layer["rope"][0], np.float32))
    mx.save_safetensors(os.path.join(folder, "profile.safetensors"), arrays)
    document = dict(profile.meta, name=profile.name, model_fingerprint=profile.model_fingerprint,
                    fingerprint=profile.fingerprint, key_weights=profile.key_weights,
                    value_weights=profile.value_weights, format_version=FORMAT_VERSION,
                    rope_traditional=[None if m.get("rope") is None else bool(m["rope"][1]) for m in profile.moments])
    with open(os.path.join(folder, "profile.json"), "w") as f:
        json.dump(document, f, indent=2)
    return folder


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


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvshard")
    except PackageNotFoundError:
        return "unknown"


def main(argv=None) -> int:
    """`kvshard calibrate --model NAME --out DIR`: calibrate, measure and write one profile."""
    import argparse

    parser = argparse.ArgumentParser(prog="kvshard calibrate", description=main.__doc__.split(":")[1].strip())
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, mlx_lm model path or repo id")
    parser.add_argument("--out", required=True, help="folder to write profile.json and profile.safetensors into")
    parser.add_argument("--name", help="profile name (default: the model name)")
    parser.add_argument("--texts", nargs="+", help="calibration text files (default: the licence texts of klt.calibration_texts)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="effective bits to measure ΔPPL at")
    parser.add_argument("--validation", nargs="+", help="texts to measure ΔPPL on (default: kvshard eval's)")
    parser.add_argument("--validation-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.validation_tokens < 2:
        parser.error(f"--validation-tokens must be >= 2, got {args.validation_tokens}")
    texts = None
    if args.texts:
        texts = []
        for path in args.texts:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())

    from ..models import load_model

    model, tokenizer = load_model(args.model)
    profile = calibrate_profile(model, tokenizer, args.name or args.model, texts, tuple(args.budgets),
                                args.validation, args.validation_tokens, progress=True)
    save_profile(profile, args.out)
    for row in profile.meta["measured"]:
        print(f"<= {row['budget_bits']} bits: {row['effective_bits']:.3f} effective, ΔPPL mean "
              f"{row['mean_delta_ppl_pct']:+.2f}% worst {row['worst_delta_ppl_pct']:+.2f}%")
    print(f"profile {profile.name} ({profile.fingerprint[:12]}) -> {args.out}")
    return 0
