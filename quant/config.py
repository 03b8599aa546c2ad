"""KVCacheConfig: the one cache configuration, used by the library, the service and (by field name) the client.

Its plain fields (method, key_bits, value_bits, sink_tokens, window, seed, profile, budget_bits,
profile_fingerprint) are the wire's `CacheConfig` fields one to one (WIRE_FIELDS), and the SDK's keyword options
are the same names; the service converts wire <-> config in one place. `to_dict` / `from_dict` are the one
serialisation (the session stores keep it). The rest are in-process only: calibrated arrays (key scales, klt
plans, which a profile name stands for), observers, the artifact folder.

`bit_width_inlier` / `bit_width_value` are the seed's names for key_bits / value_bits, kept as aliases.
"""

import functools
import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace

from .cache import CompressedKVCache
from .methods import METHODS
from .precompute import load_artifact_store
from .sliding import SlidingCompressedKVCache

SLIDING_CHOICES = ("fp16", "compressed", "full")
MAX_BITS = 8  # packing.py's widest code; each method narrows its own range when its cache is built
# The wire's CacheConfig fields, in its order: these travel, and the client's options carry the same names.
WIRE_FIELDS = ("method", "key_bits", "value_bits", "sink_tokens", "window", "seed", "profile", "budget_bits",
               "profile_fingerprint", "planned_tokens")
# Fields that hold arrays or objects: they never serialise (a profile's plans travel as its name and budget).
IN_PROCESS_FIELDS = ("key_scales", "key_plans", "value_plans", "observers")
SEED_ALIASES = {"bit_width_inlier": "key_bits", "bit_width_value": "value_bits"}
_PROFILE_DECIDES = ("method", "key_bits", "value_bits", "sink_tokens", "key_plans", "value_plans", "budget_bits",
                    "profile_fingerprint", "planned_tokens")


@dataclass
class KVCacheConfig:
    method: str = "turboquant_mse"
    key_bits: int | list[int] = 4  # one int, or one per attention layer (seed alias: bit_width_inlier)
    value_bits: int | list[int] | None = None  # None = same as the keys (seed alias: bit_width_value)
    sink_tokens: int = 0  # first tokens kept in fp16 (attention sinks)
    window: int = 0  # most recent tokens kept in fp16
    seed: int = 42
    head_dim: int | None = None  # for standalone caches; for_model reads it from the model
    center_keys: bool = True
    value_method: str | None = None  # None = same method as the keys
    key_scales: list | None = None  # per attention layer, a (kv_heads, head_dim) array: calibrate_key_scales
    key_plans: list | None = None  # method "klt": per attention layer, a KLTPlan (calibrate/klt.py: plan_klt)
    value_plans: list | None = None
    # Sliding-window layers (for_model): "fp16" keeps mlx_lm's rotating window in float16, "compressed" codes it
    # like the other layers (SlidingCompressedKVCache), "full" gives them a plain CompressedKVCache of every token
    # under the model's window mask (append-only codes, as the service's store persists them). With "compressed"
    # and "full", per-layer lists count the sliding layers too.
    sliding: str = "fp16"
    observers: list = field(default_factory=list)  # quant/observers.py, shared by every layer's cache
    outlier_channels: int = 0  # turboquant_mse keys: the largest coordinates kept exact (quant/methods/outliers.py)
    artifact_store: str | None = None  # folder from `kvshard precompute`: rotations and codebooks loaded, not computed
    # A configuration made by Profile.config names its profile: to_dict keeps these, resolve_profile() re-plans.
    profile: str = ""
    budget_bits: float = 0.0  # effective bits per K/V element asked of the profile; 0 = its recommended budget
    profile_fingerprint: str = ""
    planned_tokens: int = 0  # the cache length the profile planned for (Profile.config's tokens); 0 = its default

    def __post_init__(self):
        for name in ("method", "value_method"):
            given = getattr(self, name)
            if (given is not None or name == "method") and given not in METHODS:
                raise ValueError(f"{name}: unknown method {given!r}; one of {', '.join(METHODS)}")
        self.key_bits = _check_bits("key_bits", self.key_bits)
        if self.value_bits is not None:
            self.value_bits = _check_bits("value_bits", self.value_bits)
        for name in ("sink_tokens", "window", "seed", "outlier_channels", "planned_tokens"):
            _check_count(name, getattr(self, name))
        if self.head_dim is not None:
            _check_count("head_dim", self.head_dim)
        if self.sliding not in SLIDING_CHOICES:
            raise ValueError(f"sliding: must be one of {SLIDING_CHOICES}, got {self.sliding!r}")
        for name in ("profile", "profile_fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {getattr(self, name)!r}")
        budget = self.budget_bits
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (math.isfinite(budget) and budget >= 0):
            raise ValueError(f"budget_bits: must be a finite number >= 0, got {budget!r}")
        for name in ("key_scales", "key_plans", "value_plans"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name}: must be a list with one entry per attention layer, got {type(getattr(self, name)).__name__}")

    # ---- the seed's names ---------------------------------------------------------------------------------

    @property
    def bit_width_inlier(self):
        return self.key_bits

    @bit_width_inlier.setter
    def bit_width_inlier(self, bits):
        self.key_bits = _check_bits("key_bits", bits)

    @property
    def bit_width_value(self):
        return self.value_bits

    @bit_width_value.setter
    def bit_width_value(self, bits):
        self.value_bits = None if bits is None else _check_bits("value_bits", bits)

    # ---- per layer ------------------------------------------------------------------------------------------

    def bits_for_layer(self, values: bool, layer: int, n_layers: int) -> int:
        name = "value_bits" if values else "key_bits"
        bits = getattr(self, name)
        if values and bits is None:
            return self.bits_for_layer(False, layer, n_layers)
        if isinstance(bits, (list, tuple)):
            if len(bits) != n_layers:
                raise ValueError(f"{name}: has {len(bits)} entries but the model has {n_layers} attention layers")
            return bits[layer]
        return bits

    def make_cache(self, layer: int = 0, n_layers: int = 1, head_dim=None, n_kv_heads=None, max_size=None):
        """A CompressedKVCache for attention layer `layer` of `n_layers`; with max_size, one of a sliding-window
        layer that holds at most that many tokens (its sinks leave the window too). The cache's constructor takes this config's
        field names, per layer (key_scales[layer] as key_scale, ...)."""
        if self.artifact_store is not None:
            load_artifact_store(os.fspath(self.artifact_store))
        sliding = {} if max_size is None else {"max_size": max_size}
        return (SlidingCompressedKVCache if max_size is not None else CompressedKVCache)(
            **sliding,
            head_dim=head_dim if head_dim is not None else self.head_dim,
            n_kv_heads=n_kv_heads,
            method=self.method,
            key_bits=self.bits_for_layer(False, layer, n_layers),
            value_bits=self.bits_for_layer(True, layer, n_layers),
            seed=self.seed,
            sink_tokens=self.sink_tokens,
            window=self.window,
            center_keys=self.center_keys,
            value_method=self.value_method,
            key_scale=None if self.key_scales is None else self.key_scales[layer],
            key_plan=None if self.key_plans is None else self.key_plans[layer],
            value_plan=None if self.value_plans is None else self.value_plans[layer],
            observers=self.observers,
            outlier_channels=self.outlier_channels,
        )

    # ---- profiles -------------------------------------------------------------------------------------------

    def resolve_profile(self, profiles=None) -> "KVCacheConfig":
        """This configuration with its profile's plans and sinks (a config read back by from_dict names its
        profile but holds no arrays). profiles: name -> Profile (the service's registry), else load_profile.
        ValueError when the profile found is not the one this config was made from (profile_fingerprint)."""
        if not self.profile:
            return self
        if profiles is None:
            from .calibrate.profile import load_profile

            found = load_profile(self.profile)
        else:
            found = profiles.get(self.profile)
            if found is None:
                raise ValueError(f"profile: unknown profile {self.profile!r}; one of {', '.join(sorted(profiles)) or 'none'}")
        if self.profile_fingerprint and found.fingerprint != self.profile_fingerprint:
            raise ValueError(
                f"profile_fingerprint: the configuration was made with profile {self.profile!r} "
                f"{self.profile_fingerprint[:16]}…, this one is {found.fingerprint[:16]}…"
            )
        # The profile decides method, bits, sinks and plans, and names the budget it planned and its fingerprint;
        # everything else (window, seed, sliding, observers...) stays this config's. The plans cover the layers
        # that this config's sliding choice codes (a hybrid model's all-layer profile plans them all, or with
        # sliding="fp16" its full-attention layers).
        tokens = {"tokens": self.planned_tokens} if self.planned_tokens else {}
        planned = found.config(self.budget_bits or None, window=self.window, sliding=self.sliding, **tokens)
        return replace(planned, **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PROFILE_DECIDES})

    # ---- the one serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-able form: every field but the in-process ones. Calibrated arrays do not serialise: a config
        from a profile keeps its profile's name and budget instead (resolve_profile plans it again); key scales,
        plans or observers given any other way raise ValueError naming the field."""
        for name in IN_PROCESS_FIELDS:
            if getattr(self, name) and not (self.profile and name in ("key_plans", "value_plans")):
                raise ValueError(f"{name}: arrays and objects do not serialise; save a calibration profile and name it")
        out = {}
        for f in fields(self):
            if f.name in IN_PROCESS_FIELDS:
                continue
            value = getattr(self, f.name)
            if f.name in ("key_bits", "value_bits") and value is not None:
                value = [int(b) for b in value] if isinstance(value, list) else int(value)
            elif f.name == "artifact_store" and value is not None:
                value = os.fspath(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "KVCacheConfig":
        """The config to_dict wrote; also reads the seed's aliases and the service's stored shape before this type
        (method, key_bits and value_bits per layer, sink_tokens, window, seed, and for profile sessions empty
        bit lists with profile, budget_bits and profile_fingerprint). Missing fields take their defaults."""
        known = {f.name for f in fields(cls)} - set(IN_PROCESS_FIELDS)
        given = {}
        for key, value in data.items():
            name = SEED_ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"{key}: not a KVCacheConfig field that serialises")
            if name in given:
                raise ValueError(f"{key}: given twice (as {name} and its seed alias)")
            if name in ("key_bits", "value_bits") and value == []:
                continue  # a profile session's stored bits: the profile decides them
            given[name] = value
        return cls(**given)


def _accept_seed_aliases(init):
    """KVCacheConfig(bit_width_inlier=..., bit_width_value=...) as the seed's README writes it."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for alias, name in SEED_ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"give {name} or its seed alias {alias}, not both")
                kwargs[name] = kwargs.pop(alias)
        init(self, *args, **kwargs)

    return __init__


KVCacheConfig.__init__ = _accept_seed_aliases(KVCacheConfig.__init__)


def _check_bits(name: str, bits):
    """An int, or a non-empty list of ints (tuples and numpy integers accepted), each in [1, MAX_BITS]."""
    listed = isinstance(bits, (list, tuple))
    if listed and not bits:
        raise ValueError(f"{name}: give one value or one per layer, got an empty list")
    for i, b in enumerate(bits if listed else [bits]):
        where = f"{name}[{i}]" if listed else name
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise ValueError(f"{where}: bits must be an integer, got {b!r}")
        if not 1 <= b <= MAX_BITS:
            raise ValueError(f"{where}: {b} bits is out of range [1, {MAX_BITS}]")
    return [int(b) for b in bits] if listed else int(bits)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
