"""Calibration profiles on the wire: which the shard knows, a session's config from CacheConfig.profile, ProfileInfo,
and the Calibrate RPC's profile mode."""

import dataclasses
import math
import os
import re

from kvshard.quant import KVCacheConfig, list_profiles, load_profile
from kvshard.quant.calibrate.profile import PATH_VARIABLE, PLANNED_TOKENS, RECOMMENDED_BITS, save_profile
from kvshard.wire import kvshard_pb2 as pb

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_BUDGETS = (RECOMMENDED_BITS,)  # a registered profile's measured quality covers its recommended budget
DEFAULT_VALIDATION_TOKENS = 256
MAX_VALIDATION_TOKENS = 2048
MAX_BUDGETS = 8


def profiles_for(fingerprint: str) -> dict:
    """name -> Profile for every profile load_profile finds that was calibrated on this model."""
    found = {}
    for name in list_profiles():
        profile = load_profile(name)
        if profile.model_fingerprint == fingerprint:
            found[name] = profile
    return found


def profile_config(requested: KVCacheConfig, model) -> KVCacheConfig:
    """A model session's config from its requested profile and budget_bits (profile empty: the default): it names
    the profile, its budget and fingerprint (Session.new plans it, sessions.cache_config)."""
    name = requested.profile or model.default_profile
    if not name:
        raise ValueError("cache.profile: this server has no default profile; name one of ServerInfo.profiles")
    profile = model.profiles.get(name)
    if profile is None:
        raise ValueError(f"cache.profile: unknown profile {name!r}; one of {', '.join(sorted(model.profiles)) or 'none'}")
    budget = requested.budget_bits or profile.recommended_bits
    # 0: the profile's default window for the budget (its fp16 window with no budget_bits); any window is counted
    # in the budget, and the stored config names the window planned.
    window = requested.window or profile.default_window(requested.budget_bits or None)
    tokens = requested.planned_tokens or PLANNED_TOKENS
    if tokens <= profile.sink_tokens:
        raise ValueError(f"cache.planned_tokens: must exceed the profile's {profile.sink_tokens} fp16 sinks, got {tokens}")
    try:
        low, high = profile.bits_range(tokens, window=window)
    except ValueError as err:
        raise ValueError(f"cache.window: {err}") from None
    if not (math.isfinite(budget) and low <= budget <= high):
        raise ValueError(f"cache.budget_bits: must be in [{low:.3f}, {high:.3f}] for profile {name!r}, got {budget}")
    planned = profile.config(budget, tokens=tokens, window=window)
    return dataclasses.replace(requested, method=planned.method, sink_tokens=planned.sink_tokens, window=window,
                               profile=name, budget_bits=budget, profile_fingerprint=profile.fingerprint,
                               planned_tokens=planned.planned_tokens)


def profile_info(profile) -> pb.ProfileInfo:
    low, high = profile.bits_range()
    return pb.ProfileInfo(
        name=profile.name,
        fingerprint=profile.fingerprint,
        recommended_bits=profile.recommended_bits,
        min_bits=low,
        max_bits=high,
        planned_tokens=int(profile.meta.get("planned_tokens", 0)),
        measured=[
            pb.ProfileQuality(
                budget_bits=row["budget_bits"],
                effective_bits=row["effective_bits"],
                mean_delta_ppl_pct=row["mean_delta_ppl_pct"],
                worst_delta_ppl_pct=row["worst_delta_ppl_pct"],
                delta_ppl_pct=row["delta_ppl_pct"],
                tokens=row["tokens"],
            )
            for row in profile.meta.get("measured", [])
        ],
    )


def check_calibrate_request(request: pb.CalibrateRequest) -> tuple[str, tuple, int]:
    """(name, budgets, validation tokens) of a profile-mode Calibrate, or ValueError naming the field."""
    if not _NAME.fullmatch(request.profile):
        raise ValueError(f"profile: must be 1-64 characters of [A-Za-z0-9_.-], got {request.profile!r}")
    budgets = tuple(request.profile_budgets) or DEFAULT_BUDGETS
    if len(budgets) > MAX_BUDGETS:
        raise ValueError(f"profile_budgets: at most {MAX_BUDGETS}, got {len(budgets)}")
    for i, b in enumerate(budgets):
        if not (math.isfinite(b) and 0.5 <= b <= 8):
            raise ValueError(f"profile_budgets[{i}]: must be in [0.5, 8] effective bits, got {b}")
    tokens = request.validation_tokens or DEFAULT_VALIDATION_TOKENS
    if not 16 <= tokens <= MAX_VALIDATION_TOKENS:
        raise ValueError(f"validation_tokens: must be in [16, {MAX_VALIDATION_TOKENS}], got {tokens}")
    return request.profile, budgets, tokens


def register(model, folder: str):
    """Register the profile a calibration worker saved in `folder` with the served model; saved under the first
    folder of $KVSHARD_PROFILE_PATH when set, so that it survives a restart."""
    profile = load_profile(folder)
    if profile.model_fingerprint != model.fingerprint:
        raise RuntimeError(f"profile: calibrated on model {profile.model_fingerprint[:16]}…, not the served {model.fingerprint[:16]}…")
    name = profile.name
    folders = [p for p in os.environ.get(PATH_VARIABLE, "").split(os.pathsep) if p]
    if folders:
        save_profile(profile, os.path.join(folders[0], name))
    model.profiles[name] = profile
    return profile
