"""One cache configuration (quant/config.py): the seed's aliases, errors that name the field, the one dict
serialisation and the one wire conversion (round trips), the field names the wire, the SDK and the caches share,
and sessions stored in the dict shape before this type still resuming on a real shard."""

import dataclasses
import inspect
import json
import sqlite3

import mlx.core as mx
import numpy as np
import pytest

from conftest import ShardProcess
from kvshard.client import Client
from kvshard.client._common import SessionOptions
from kvshard.quant import CompressedKVCache, KVCacheBuilder, KVCacheConfig, load_profile
from kvshard.quant.config import IN_PROCESS_FIELDS, WIRE_FIELDS
from kvshard.service.handlers import cache_config_from_pb, cache_config_to_pb
from kvshard.wire import kvshard_pb2 as pb

PROFILE = "smollm2-135m"
# Every configuration that serialises, one non-default value per plain field somewhere among them.
CONFIGS = [
    KVCacheConfig(),
    KVCacheConfig(method="turboquant_rvq", key_bits=2, value_bits=3, sink_tokens=4, window=16, seed=7),
    KVCacheConfig(method="qjl", key_bits=[3, 4, 5], value_bits=[2, 2, 8], value_method="turboquant_mse", seed=0),
    KVCacheConfig(head_dim=128, center_keys=False, sliding="full", outlier_channels=2, artifact_store="/tmp/artifacts"),
    KVCacheConfig(method="klt", sink_tokens=4, window=8, profile=PROFILE, budget_bits=3.5, profile_fingerprint="ab" * 32,
                  planned_tokens=8192),
]


# ---- the type ------------------------------------------------------------------------------------------------


def test_the_seed_names_are_aliases_of_key_bits_and_value_bits():
    seed = KVCacheConfig(method="turboquant_mse", bit_width_inlier=[4, 3], bit_width_value=2, seed=42)
    assert seed == KVCacheConfig(method="turboquant_mse", key_bits=[4, 3], value_bits=2, seed=42)
    assert (seed.bit_width_inlier, seed.bit_width_value) == ([4, 3], 2)
    seed.bit_width_inlier = 5
    assert seed.key_bits == 5
    assert KVCacheConfig.from_dict({"bit_width_inlier": 3}).key_bits == 3
    with pytest.raises(TypeError, match="key_bits or its seed alias bit_width_inlier"):
        KVCacheConfig(key_bits=3, bit_width_inlier=4)
    with pytest.raises(ValueError, match="bit_width_value: given twice"):
        KVCacheConfig.from_dict({"value_bits": 3, "bit_width_value": 4})
    cache = KVCacheBuilder().with_head_dim(64).with_bit_width(inlier=3, value=2).build()
    assert (cache.key_bits, cache.value_bits) == (3, 2)


@pytest.mark.parametrize("fields, named", [
    (dict(method="turboquant"), "method"),
    (dict(value_method="zip"), "value_method"),
    (dict(key_bits=9), "key_bits"),
    (dict(key_bits=[4, 0]), r"key_bits\[1\]"),
    (dict(key_bits=[]), "key_bits"),
    (dict(key_bits=2.5), "key_bits"),
    (dict(value_bits=True), "value_bits"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(window=1.5), "window"),
    (dict(seed=-3), "seed"),
    (dict(head_dim=0.5), "head_dim"),
    (dict(sliding="rotating"), "sliding"),
    (dict(outlier_channels=-1), "outlier_channels"),
    (dict(budget_bits=float("inf")), "budget_bits"),
    (dict(profile=3), "profile"),
    (dict(key_plans="plan"), "key_plans"),
])
def test_every_bad_field_is_named_at_construction(fields, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        KVCacheConfig(**fields)


def test_per_layer_counts_are_checked_where_the_layers_are_known():
    with pytest.raises(ValueError, match="^key_bits: has 2 entries but the model has 3"):
        KVCacheConfig(key_bits=[4, 4]).make_cache(layer=0, n_layers=3)


# ---- the one serialisation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_dict_round_trip_through_json(config):
    stored = json.loads(json.dumps(config.to_dict()))
    assert KVCacheConfig.from_dict(stored) == config
    assert set(stored) == {f.name for f in dataclasses.fields(KVCacheConfig)} - set(IN_PROCESS_FIELDS)


def test_arrays_do_not_serialise_and_unknown_keys_are_named():
    scales = KVCacheConfig(key_scales=[mx.ones((3, 64))])
    with pytest.raises(ValueError, match="^key_scales: "):
        scales.to_dict()
    with pytest.raises(ValueError, match="^bits: not a KVCacheConfig field"):
        KVCacheConfig.from_dict({"bits": 4})


def test_a_profile_config_serialises_as_its_name_and_plans_again_the_same():
    profile = load_profile(PROFILE)
    config = profile.config(budget_bits=3.0)
    assert (config.profile, config.budget_bits, config.profile_fingerprint) == (PROFILE, 3.0, profile.fingerprint)
    back = KVCacheConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back.key_plans is None
    planned = back.resolve_profile({PROFILE: profile})
    assert [p.coordinate_bits for p in planned.key_plans] == [p.coordinate_bits for p in config.key_plans]
    assert [p.coordinate_bits for p in planned.value_plans] == [p.coordinate_bits for p in config.value_plans]
    assert (planned.method, planned.sink_tokens) == (config.method, config.sink_tokens)
    with pytest.raises(ValueError, match="^profile_fingerprint: "):
        dataclasses.replace(back, profile_fingerprint="0" * 64).resolve_profile({PROFILE: profile})
    with pytest.raises(ValueError, match="^profile: unknown profile"):
        back.resolve_profile({})


# ---- the one wire conversion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.profile], ids=range(len(CONFIGS) - 1))
def test_wire_round_trip_keeps_every_wire_field(config):
    """Bits travel as lists (one value: every layer), value bits unset mean the keys'."""
    wire = cache_config_to_pb(config)
    back = cache_config_from_pb(pb.CacheConfig.FromString(wire.SerializeToString()))
    as_list = lambda bits: bits if isinstance(bits, list) or bits is None else [bits]  # noqa: E731
    expected = dataclasses.replace(config, key_bits=as_list(config.key_bits), value_bits=as_list(config.value_bits))
    assert {f: getattr(back, f) for f in WIRE_FIELDS} == {f: getattr(expected, f) for f in WIRE_FIELDS}


def test_a_profile_session_shows_every_wire_field_but_bits_and_requests_name_the_field():
    wire = cache_config_to_pb(CONFIGS[-1])
    assert {f.name for f, _ in wire.ListFields()} == set(WIRE_FIELDS) - {"key_bits", "value_bits"}
    request = pb.CacheConfig(profile=PROFILE, budget_bits=3.5, window=8)
    assert cache_config_from_pb(request) == KVCacheConfig(profile=PROFILE, budget_bits=3.5, window=8)
    for bad, named in [
        (pb.CacheConfig(key_bits=[4, 9]), r"cache\.key_bits\[1\]: 9 bits"),
        (pb.CacheConfig(method="zip"), "cache.method: unknown method"),
        (pb.CacheConfig(profile=PROFILE, key_bits=[4]), "cache.key_bits: must be unset"),
        (pb.CacheConfig(profile_fingerprint="ab"), "cache.profile_fingerprint: set by the server"),
        (pb.CacheConfig(budget_bits=float("nan")), "cache.budget_bits: "),
    ]:
        with pytest.raises(ValueError, match=f"^{named}"):
            cache_config_from_pb(bad)


def test_the_wire_the_sdk_and_the_type_name_the_same_fields():
    """The SDK cannot import kvshard.quant (it installs without MLX): its options are CacheConfig's field names,
    which are KVCacheConfig's plain fields. Adding a field to one and not the others fails here."""
    assert tuple(pb.CacheConfig.DESCRIPTOR.fields_by_name) == WIRE_FIELDS
    assert set(WIRE_FIELDS) <= {f.name for f in dataclasses.fields(KVCacheConfig)}
    options = {f.name for f in dataclasses.fields(SessionOptions)}
    assert options == set(WIRE_FIELDS) - {"profile_fingerprint"} | {"labels"}  # the server sets the fingerprint
    every = SessionOptions(method="qjl", key_bits=[3, 4], value_bits=2, sink_tokens=1, window=2, seed=0,
                           profile="p", budget_bits=3.0, planned_tokens=2048).cache_config()
    assert {f.name for f, _ in every.ListFields()} == set(WIRE_FIELDS) - {"profile_fingerprint"}


def test_caches_take_the_config_field_names_and_their_state_meta_keeps_them():
    config = KVCacheConfig(method="turboquant_mse", key_bits=3, value_bits=2, sink_tokens=1, window=2, seed=5,
                           center_keys=False, value_method="turboquant_mse", outlier_channels=1, head_dim=64)
    per_layer = ("method", "key_bits", "value_bits", "sink_tokens", "window", "seed", "center_keys", "value_method",
                 "outlier_channels", "head_dim")
    assert set(per_layer) <= set(inspect.signature(CompressedKVCache).parameters)
    cache = config.make_cache(0, 1, n_kv_heads=2)
    cache.append(mx.ones((2, 12, 64)), mx.ones((2, 12, 64)))
    meta = json.loads(cache.state["meta"])
    assert {name: meta[name] for name in per_layer} == {name: getattr(config, name) for name in per_layer}


# ---- sessions stored before this type ----------------------------------------------------------------------------

# What the service stored as a session's config before KVCacheConfig.to_dict (service/sessions.py resolve_spec and
# service/profiles.py profile_config wrote these dicts).
OLD_RAW = {"method": "turboquant_rvq", "key_bits": [2, 3], "value_bits": [4, 4], "sink_tokens": 1, "window": 4, "seed": 9}
OLD_PROFILE = {"method": "klt", "key_bits": [], "value_bits": [], "sink_tokens": 4, "window": 0, "seed": 42,
               "profile": PROFILE, "budget_bits": 3.5, "profile_fingerprint": "cd" * 32}


def test_an_old_profile_session_record_reads_back_as_it_was_shown():
    config = KVCacheConfig.from_dict(OLD_PROFILE)
    assert (config.profile, config.budget_bits, config.profile_fingerprint) == (PROFILE, 3.5, "cd" * 32)
    assert cache_config_to_pb(config) == pb.CacheConfig(method="klt", sink_tokens=4, seed=42, profile=PROFILE,
                                                        budget_bits=3.5, profile_fingerprint="cd" * 32)


def _set_stored_config(path, session_id: str, config: dict) -> None:
    with sqlite3.connect(path) as db:
        (text,) = db.execute("SELECT record FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        record = json.loads(text)
        record["config"] = config
        db.execute("UPDATE sessions SET record = ? WHERE session_id = ?", (json.dumps(record, sort_keys=True), session_id))


def test_a_session_stored_in_the_old_dict_shape_resumes(tmp_path):
    """A raw session's record is rewritten to the dict shape the old code stored, the shard restarted: GetSession
    shows the same configuration, attention over the restored codes is bit for bit what it was, and it grows on."""
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((2, 40, 64)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((4, 3, 64)).astype(np.float32)
    server = ShardProcess(tmp_path, "--model", "none").start()
    try:
        with Client(server.target) as client:
            caches = client.create_caches(2, head_dim=64, n_kv_heads=2, session_id="old-shape", method="turboquant_rvq",
                                          key_bits=[2, 3], value_bits=4, sink_tokens=1, window=4, seed=9)
            for cache in caches:
                cache.append(k, v)
            before = [cache.attend(q) for cache in caches]
            shown = client.get_session("old-shape").cache
        assert server.stop() == 0, server.log()
        assert cache_config_from_pb(shown) == KVCacheConfig.from_dict(OLD_RAW)
        _set_stored_config(tmp_path / "kvshard.sqlite3", "old-shape", OLD_RAW)
        server.start()
        with Client(server.target) as client:
            assert client.get_session("old-shape").cache == shown
            for layer, cache in enumerate(client.session("old-shape")):
                assert np.array_equal(cache.attend(q), before[layer])
                cache.append(k[:, :5], v[:, :5])
                assert len(cache) == 45
    finally:
        server.stop()


@pytest.mark.slow  # two model shard starts and three short turns: ~90 s on the loaded 2-core machine
def test_a_profile_session_stored_in_the_old_dict_shape_resumes_and_continues_as_if_uninterrupted(tmp_path):
    """Two default-profile sessions take the same turn; one goes on, the other's record is rewritten to the dict
    shape the old code stored (empty bit lists, the profile fields) and the shard restarted: it shows the same
    configuration and its greedy continuation is the uninterrupted one's (same codes, same arithmetic)."""
    server = ShardProcess(tmp_path, "--max-tokens", "4").start()
    try:
        with Client(server.target) as client:
            resumed, uninterrupted = client.create_session("old-profile"), client.create_session("reference")
            for session in (resumed, uninterrupted):
                list(session.generate("Once upon a time", max_tokens=2, ignore_eos=True))
            expected = [t.token_id for t in uninterrupted.generate(" there", max_tokens=3, ignore_eos=True)]
            shown = client.get_session("old-profile").cache
        assert server.stop() == 0, server.log()
        old = dict(OLD_PROFILE, budget_bits=shown.budget_bits, profile_fingerprint=shown.profile_fingerprint)
        _set_stored_config(tmp_path / "kvshard.sqlite3", "old-profile", old)
        server.start()
        with Client(server.target) as client:
            assert client.get_session("old-profile").cache == shown
            continued = client.session("old-profile").generate(" there", max_tokens=3, ignore_eos=True)
            assert [t.token_id for t in continued] == expected
    finally:
        server.stop()
