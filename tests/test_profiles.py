"""Calibration profiles (quant/calibrate/profile.py, service/profiles.py): the shipped profile belongs to the
embedded model, configurations fit any budget in range with real bytes held and bounded damage, files refuse
tampering, and the shard serves profiles: the default session, ServerInfo, bad requests, and a session that
refuses to resume under another profile of its name."""

import hashlib
import json
import math
import subprocess
import sys

import grpc
import mlx.core as mx
import pytest

from conftest import ShardProcess
from kvshard.client import NO_RETRY, Client
from kvshard.quant import KVCacheBuilder, KVCacheConfig, Profile, load_profile, save_profile
from kvshard.quant.calibrate.klt import calibration_texts
from kvshard.quant.codebooks import CODEBOOK_VERSION
from kvshard.quant.calibrate.profile import (BUDGETS, KEY_COST_SCALE, LONG_CONTEXT_KEY_SCALE, LONG_CONTEXT_TOKENS,
                                             PATH_VARIABLE, PLANNED_TOKENS, RECOMMENDED_BITS, WINDOW_TOKENS,
                                             context_key_scale, merge_measured, replanned)
from kvshard.quant.calibrate.profile import main as calibrate_main
from kvshard.quant.eval import TEXTS, Float16KVCache, effective_bits, load_text
from kvshard.quant.models import model_fingerprint
from kvshard.service import profiles as profiles_module
from kvshard.wire import kvshard_pb2 as pb
from test_service_raw import grpcurl

NAME = "smollm2-135m"
SINK_TOKENS = 4  # the profile keeps them in fp16: their predictions are not the codes' doing


@pytest.fixture(scope="module")
def profile():
    return load_profile(NAME)


def test_shipped_profile_belongs_to_the_embedded_model(smollm, profile):
    # Fails when the embedded weights (or how they are loaded) change, or when the calibration's texts, budgets or
    # eval texts change without the profile being made again:
    # `kvshard calibrate --model smollm2-135m --out DIR --jobs 2`, then DIR into quant/data/profiles/smollm2-135m.
    model, _ = smollm
    assert profile.model_fingerprint == model_fingerprint(model)
    assert [row["budget_bits"] for row in profile.meta["measured"]] == list(BUDGETS)
    assert [t["sha256"] for t in profile.meta["calibration_texts"]] == [
        hashlib.sha256(t.encode()).hexdigest() for t in calibration_texts()]
    assert profile.window == WINDOW_TOKENS and profile.recommended_bits == RECOMMENDED_BITS <= 3.6
    assert profile.key_cost_scale == KEY_COST_SCALE
    assert profile.codebook_version == CODEBOOK_VERSION  # its measured rows are what today's codebooks do
    # Sphere-law codebooks for every run: the wide codebook, made for Gemma 3's clipped key coordinates, read no better
    # on SmolLM2 (README, "Quality": mean ΔPPL 1.40 -> 1.18% at 3.5 bits, 0.33 -> 0.27% at 4.5, 6.78 -> 6.62% at 2.5).
    assert not profile.wide_codebook and profile.sink_tokens == SINK_TOKENS
    for row in profile.meta["measured"]:
        assert row["effective_bits"] <= row["budget_bits"] and row["tokens"] == PLANNED_TOKENS
        assert set(row["delta_ppl_pct"]) == set(TEXTS)
    rows = {row["budget_bits"]: row for row in profile.meta["measured"]}
    # Issue 10's worst-text targets that the profile meets: <= +1% at 4.5 bits (+0.70% measured; with the wide
    # codebook +0.80%) and <= +2.5% at 3.5 bits (+1.72%; with the wide codebook +2.47%).
    assert rows[4.5]["worst_delta_ppl_pct"] <= 1.0 and rows[3.5]["worst_delta_ppl_pct"] <= 2.5
    recommended = rows[profile.recommended_bits]
    assert recommended["window_tokens"] == WINDOW_TOKENS
    # Issue 10 asks <= +1.5% mean at <= 3.6 bits: +1.31% over the seven eval texts at 3.598 bits, no window (with a
    # 16-token window +1.71%).
    assert recommended["effective_bits"] <= 3.6 and recommended["mean_delta_ppl_pct"] <= 1.5


def _logits(model, tokens, caches):
    return model(tokens[None], cache=caches)[0].astype(mx.float32)


def test_config_between_calibrated_points_holds_its_budget(smollm, profile):
    """2.7 bits is no calibrated point: the plan is computed for it, the bytes really held stay within it (the fp16
    window included: 2.908 bits when the window is not counted), and the next-token distribution stays close to the
    fp16 cache's. Bounds with margin: a profile calibrated on only 3,000 characters measured 0.080 nats and 0.820
    top-1 agreement here."""
    model, tokenizer = smollm
    tokens = mx.array(tokenizer.encode(load_text("persuasion"), add_special_tokens=False)[:PLANNED_TOKENS])
    reference = _logits(model, tokens, [Float16KVCache() for _ in model.layers])
    caches = KVCacheBuilder.for_model(model, profile.config(budget_bits=2.7, window=WINDOW_TOKENS))
    logits = _logits(model, tokens, caches)
    bits = effective_bits(model, caches)
    assert 2.6 < bits <= 2.7
    p = mx.softmax(reference, axis=-1)
    kl = (p * (mx.log(p + 1e-30) - mx.log(mx.softmax(logits, axis=-1) + 1e-30))).sum(axis=-1)
    assert kl[SINK_TOKENS:].mean().item() < 0.15
    agreement = (mx.argmax(logits, axis=-1) == mx.argmax(reference, axis=-1)).astype(mx.float32).mean().item()
    assert agreement > 0.7


def test_more_bits_give_more_coded_bits(profile):
    low, high = profile.config(2.0), profile.config(4.5)
    assert low.method == high.method == "klt"
    total = lambda c: sum(sum(p.coordinate_bits) for p in c.key_plans + c.value_plans)  # noqa: E731
    assert total(low) < total(high)
    assert profile.config().key_plans[0].coordinate_bits == profile.config(profile.recommended_bits).key_plans[0].coordinate_bits


def test_the_window_is_paid_for_from_the_codes(profile):
    """An fp16 window is counted in the budget: the wider the window, the fewer code bits at the same budget; the
    recommended configuration has the profile's window, other budgets none unless asked; a window that leaves no
    coded token in the planned cache is refused, naming the field."""
    total = lambda c: sum(sum(p.coordinate_bits) for p in c.key_plans + c.value_plans)  # noqa: E731
    bits = profile.recommended_bits
    none, some, wide = profile.config(bits, window=0), profile.config(bits, window=16), profile.config(bits, window=128)
    assert (none.window, some.window, wide.window) == (0, 16, 128) and profile.config(3.0).window == 0
    assert profile.config().window == profile.window == WINDOW_TOKENS
    assert total(none) > total(some) > total(wide)
    assert profile.overhead_bits(window=128) - profile.overhead_bits(window=0) > 128 * 15 / PLANNED_TOKENS
    with pytest.raises(ValueError, match="window"):
        profile.config(3.0, window=PLANNED_TOKENS)
    with pytest.raises(ValueError, match="window"):
        profile.config(3.0, window=-1)


def test_key_cost_scale_moves_bits_to_keys_under_a_new_fingerprint(profile, tmp_path):
    """A re-plan with keys costing more gives keys more of the same budget and values less; it is another profile
    (fingerprint, nothing measured), which survives a save and load, and scaling back gives the profile again."""
    scaled = replanned(profile, 2 * profile.key_cost_scale, "test")
    assert scaled.fingerprint != profile.fingerprint and scaled.meta["measured"] == []
    coded = lambda plans: sum(sum(p.coordinate_bits) for p in plans)  # noqa: E731
    base, more = profile.config(3.0), scaled.config(3.0)
    assert coded(more.key_plans) > coded(base.key_plans) and coded(more.value_plans) < coded(base.value_plans)
    assert coded(more.key_plans + more.value_plans) <= coded(base.key_plans + base.value_plans) + 8 * len(base.key_plans)
    again = load_profile(save_profile(scaled, str(tmp_path / "scaled")))
    assert again.key_cost_scale == scaled.key_cost_scale and again.fingerprint == scaled.fingerprint
    assert replanned(scaled, profile.key_cost_scale, "test").fingerprint == profile.fingerprint


def test_plans_for_longer_caches_weigh_keys_more_and_read_back_alike(profile):
    """A plan for a cache of more tokens gives keys more of the codes (context_key_scale: 1.5 times their cost at
    8K, held beyond), within the same budget; the default length plans as before; the length travels with the
    config, so a config read back re-plans the same codes."""
    coded = lambda plans: sum(sum(p.coordinate_bits) for p in plans)  # noqa: E731
    assert context_key_scale(PLANNED_TOKENS) == context_key_scale(1) == 1.0
    assert context_key_scale(LONG_CONTEXT_TOKENS) == pytest.approx(LONG_CONTEXT_KEY_SCALE)
    assert context_key_scale(4 * LONG_CONTEXT_TOKENS) == context_key_scale(LONG_CONTEXT_TOKENS)
    assert 1.0 < context_key_scale(2048) < context_key_scale(4096) < LONG_CONTEXT_KEY_SCALE
    short, long = profile.config(3.5), profile.config(3.5, tokens=8192)
    assert short.planned_tokens == 0 and long.planned_tokens == 8192
    assert coded(long.key_plans) > coded(short.key_plans) and coded(long.value_plans) < coded(short.value_plans)
    back = KVCacheConfig.from_dict(long.to_dict()).resolve_profile({profile.name: profile})
    assert back.planned_tokens == 8192
    assert [p.coordinate_bits for p in back.key_plans + back.value_plans] == \
        [p.coordinate_bits for p in long.key_plans + long.value_plans]
    default = KVCacheConfig.from_dict(short.to_dict()).resolve_profile({profile.name: profile})
    assert [p.coordinate_bits for p in default.key_plans] == [p.coordinate_bits for p in short.key_plans]
    with pytest.raises(ValueError, match="planned_tokens"):
        KVCacheConfig(planned_tokens=-1)


def test_codebook_choice_and_sinks_are_re_plans_under_new_fingerprints(profile, tmp_path):
    """Without the wide codebook the plans code every run with the sphere law (KLTPlan.wide_bits None); more fp16
    sinks are paid for from the codes. Each is another profile that survives a save and load; going back to the
    profile's own choices gives the profile again."""
    other = replanned(profile, profile.key_cost_scale, "test", wide_codebook=not profile.wide_codebook)
    more_sinks = replanned(profile, profile.key_cost_scale, "test", sink_tokens=16)
    assert len({profile.fingerprint, other.fingerprint, more_sinks.fingerprint}) == 3
    wide, sphere = (profile, other) if profile.wide_codebook else (other, profile)
    assert wide.wide_codebook and not sphere.wide_codebook and more_sinks.sink_tokens == 16
    config = sphere.config(4.5)
    assert {p.wide_bits for p in config.key_plans + config.value_plans} == {None}
    assert {p.wide_bits for p in wide.config(4.5).key_plans} == {7}
    assert more_sinks.config(3.0).sink_tokens == 16
    coded = lambda plans: sum(sum(p.coordinate_bits) for p in plans)  # noqa: E731
    assert coded(more_sinks.config(3.0).key_plans) + coded(more_sinks.config(3.0).value_plans) < coded(
        profile.config(3.0).key_plans) + coded(profile.config(3.0).value_plans)
    for made in (other, more_sinks):
        again = load_profile(save_profile(made, str(tmp_path / made.fingerprint[:8])))
        assert again.fingerprint == made.fingerprint
        assert (again.wide_codebook, again.sink_tokens) == (made.wide_codebook, made.sink_tokens)
        back = replanned(made, profile.key_cost_scale, "test", wide_codebook=profile.wide_codebook,
                         sink_tokens=profile.sink_tokens)
        assert back.fingerprint == profile.fingerprint
    with pytest.raises(ValueError, match="sink_tokens"):
        replanned(profile, profile.key_cost_scale, "test", sink_tokens=0)


def test_kvshard_calibrate_measure_re_plans_the_codebook_choice_and_window(profile, tmp_path):
    """`kvshard calibrate --measure --window 4`, then `--wide-codebook` the other way, turn a profile folder into its
    re-plan (the fingerprint replanned() gives) with another recommended window, measured on the texts and budgets
    asked."""
    folder = save_profile(profile, str(tmp_path / "profile"))
    for bad in (["--sinks", "0"], ["--window", "-1"]):
        with pytest.raises(SystemExit):
            calibrate_main(["--measure", "--out", folder, *bad, "--validation", "persuasion"])
    # Another window: the recommended budget's rows are measured again, the others kept.
    calibrate_main(["--measure", "--out", folder, "--window", "4", "--budgets", str(profile.recommended_bits),
                    "--validation", "persuasion", "--validation-tokens", "48"])
    windowed = load_profile(folder)
    assert windowed.fingerprint == profile.fingerprint and windowed.window == 4
    assert [r for r in windowed.meta["measured"] if r["budget_bits"] != profile.recommended_bits] == [
        r for r in profile.meta["measured"] if r["budget_bits"] != profile.recommended_bits]
    assert [(r["budget_bits"], list(r["delta_ppl_pct"]), r["window_tokens"]) for r in windowed.meta["measured"]
            if r["budget_bits"] == profile.recommended_bits] == [(profile.recommended_bits, ["persuasion"], 4)]
    flip = "off" if profile.wide_codebook else "on"
    calibrate_main(["--measure", "--out", folder, "--wide-codebook", flip, "--budgets",
                    str(profile.recommended_bits), "--validation", "persuasion", "--validation-tokens", "48"])
    made = load_profile(folder)
    assert made.wide_codebook != profile.wide_codebook and made.fingerprint == replanned(
        profile, profile.key_cost_scale, "", wide_codebook=not profile.wide_codebook).fingerprint
    assert made.window == 4 and made.config().window == 4
    rows = [(r["budget_bits"], list(r["delta_ppl_pct"]), r["window_tokens"]) for r in made.meta["measured"]]
    assert rows == [(profile.recommended_bits, ["persuasion"], 4)]
    assert f"--wide-codebook {flip}" in made.meta["commands"][-1]


def test_calibration_texts_are_of_several_domains_and_none_is_an_eval_text():
    texts = calibration_texts()
    assert len(texts) == 8 and calibration_texts(2) == texts[:2]
    assert sum("def " in t for t in texts) >= 2 and any("*usr_41.txt*" in t for t in texts)
    for name in TEXTS:
        evaluated = load_text(name)
        # No 300-character passage of an eval text is in the calibration: what the profile measured is held out.
        assert not any(evaluated[i : i + 300] in t for t in texts for i in range(0, len(evaluated) - 300, 1000))


def test_measurements_of_one_profile_merge():
    def rows(deltas, bits):
        return [{"budget_bits": 3.0, "tokens": 1024, "effective_bits": bits, "delta_ppl_pct": deltas,
                 "mean_delta_ppl_pct": sum(deltas.values()) / len(deltas), "worst_delta_ppl_pct": max(deltas.values())}]

    merged = merge_measured(rows({"a": 1.0, "b": 3.0}, 2.99), rows({"c": 5.0, "a": 9.0}, 2.995))
    assert merged[0]["delta_ppl_pct"] == {"a": 1.0, "b": 3.0, "c": 5.0}
    assert merged[0]["mean_delta_ppl_pct"] == 3.0 and merged[0]["worst_delta_ppl_pct"] == 5.0
    assert merged[0]["effective_bits"] == 2.995 and merge_measured([], merged) == merged
    with pytest.raises(ValueError, match="budgets or tokens"):
        merge_measured(merged, [dict(merged[0], budget_bits=2.0)])


@pytest.mark.parametrize("budget", [0.1, 9.0, math.nan, "3.5", True])
def test_bad_budgets_name_the_field(profile, budget):
    with pytest.raises(ValueError, match="budget_bits"):
        profile.config(budget)


def test_save_load_round_trip_and_tampering(profile, tmp_path):
    folder = save_profile(profile, str(tmp_path / "copy"))
    again = load_profile(folder)
    assert again.fingerprint == profile.fingerprint and again.meta["measured"] == profile.meta["measured"]
    assert again.config(3.0).key_plans[5].coordinate_bits == profile.config(3.0).key_plans[5].coordinate_bits
    document = json.loads((tmp_path / "copy" / "profile.json").read_text())
    document["key_weights"][0] *= 2
    (tmp_path / "copy" / "profile.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="fingerprint"):
        load_profile(folder)
    with pytest.raises(ValueError, match="profile: no profile 'nothing-here'"):
        load_profile("nothing-here")


def _altered_copy(profile, folder):
    """The shipped profile, recalibrated in spirit: same model and name, other sensitivities, other fingerprint."""
    altered = Profile(NAME, profile.model_fingerprint, profile.moments, [w * 1.5 for w in profile.key_weights],
                      profile.value_weights, profile.meta)
    save_profile(altered, str(folder / NAME))
    return load_profile(str(folder / NAME))


@pytest.fixture(scope="module")
def shard(module_tmp):
    server = ShardProcess(module_tmp, "--max-tokens", "8").start()
    yield server
    server.stop()


def test_a_session_with_no_cache_config_uses_the_recommended_profile(client, shard, profile):
    info = client.server_info()
    assert info.default_profile == NAME
    served = {p.name: p for p in info.profiles}[NAME]
    assert served.fingerprint == profile.fingerprint and served.recommended_bits == profile.recommended_bits
    assert [round(m.budget_bits, 3) for m in served.measured] == [r["budget_bits"] for r in profile.meta["measured"]]
    texts = len(profile.meta["measured"][0]["delta_ppl_pct"])
    assert all(m.effective_bits <= m.budget_bits and len(m.delta_ppl_pct) == texts >= 2 for m in served.measured)
    session = client.create_session()
    made = session.refresh()
    assert made.cache.profile == NAME and made.cache.method == "klt"
    assert made.cache.budget_bits == profile.recommended_bits and made.cache.profile_fingerprint == profile.fingerprint
    assert made.cache.window == profile.window  # the recommended configuration's window, counted in its budget
    assert len(list(session.generate("The capital of France is", max_tokens=4))) == 4
    shown = json.loads(grpcurl("-plaintext", "-d", "{}", shard.target, "kvshard.v1.KVShard/ServerInfo"))
    assert shown["default_profile"] == NAME and shown["profiles"][0]["measured"][0]["delta_ppl_pct"]
    created = json.loads(grpcurl("-plaintext", "-d", '{"cache": {"budget_bits": 2.5}}', shard.target, "kvshard.v1.KVShard/CreateSession"))
    assert created["cache"]["profile"] == NAME and created["cache"]["budget_bits"] == 2.5
    # planned_tokens alone: the default profile, planned for that length.
    long = client.create_session(planned_tokens=8192)
    shown = long.refresh().cache
    assert (shown.profile, shown.budget_bits, shown.planned_tokens) == (NAME, profile.recommended_bits, 8192)
    assert len(list(long.generate("The capital of France is", max_tokens=2))) == 2


def test_a_session_planned_for_more_tokens_gets_the_profile_plans_for_them(profile):
    """The service's config for planned_tokens re-plans (as a resumed session does) to the profile's own plans for
    that length, which differ from the default length's."""

    class Served:
        default_profile, profiles = NAME, {NAME: profile}

    config = profiles_module.profile_config(KVCacheConfig(planned_tokens=8192), Served())
    resolved = KVCacheConfig.from_dict(config.to_dict()).resolve_profile(Served.profiles)
    bits = lambda c: [p.coordinate_bits for p in c.key_plans + c.value_plans]  # noqa: E731
    assert bits(resolved) == bits(profile.config(profile.recommended_bits, tokens=8192)) != bits(profile.config())


BAD = [
    ("unknown profile", pb.CacheConfig(profile="nope"), "cache.profile: unknown profile 'nope'"),
    ("budget out of range", pb.CacheConfig(profile=NAME, budget_bits=40), "cache.budget_bits"),
    ("profile with bits", pb.CacheConfig(profile=NAME, key_bits=[4]), "cache.key_bits: must be unset with cache.profile"),
    ("profile with method", pb.CacheConfig(profile=NAME, method="qjl"), "cache.method: must be unset"),
    ("fingerprint from a client", pb.CacheConfig(profile=NAME, profile_fingerprint="ab"), "cache.profile_fingerprint"),
    ("window past the planned tokens", pb.CacheConfig(profile=NAME, window=PLANNED_TOKENS), "cache.window"),
    ("planned tokens with bits", pb.CacheConfig(planned_tokens=8192, key_bits=[4]),
     "cache.key_bits: must be unset with cache.planned_tokens"),
    ("budget with sinks", pb.CacheConfig(budget_bits=3.5, sink_tokens=8),
     "cache.sink_tokens: must be unset with cache.budget_bits"),
    ("planned tokens within the sinks", pb.CacheConfig(planned_tokens=3), "cache.planned_tokens"),
]


@pytest.mark.parametrize("name, cache, message", BAD, ids=[case[0] for case in BAD])
def test_bad_profile_requests_name_the_field_and_change_nothing(client, name, cache, message):
    before = len(client.stub.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions)
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.CreateSession(pb.CreateSessionRequest(cache=cache))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details(), caught.value.details()
    assert len(client.stub.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions) == before


def test_raw_sessions_take_no_profile(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.CreateSession(pb.CreateSessionRequest(kind=pb.RAW, raw=pb.RawShape(layers=1, n_kv_heads=1, head_dim=64),
                                                          cache=pb.CacheConfig(profile=NAME)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache.profile" in caught.value.details()


def test_a_session_refuses_to_resume_under_another_profile(tmp_path, monkeypatch, profile):
    store = f"sqlite:///{tmp_path}/kvshard.sqlite3"
    first = ShardProcess(tmp_path, "--max-tokens", "4", store=store).start()
    try:
        with Client(first.target, retry=NO_RETRY) as c:
            session = c.create_session()
            list(session.generate("Once upon a time", max_tokens=2))
            session_id = session.session_id
    finally:
        first.stop()
    altered = _altered_copy(profile, tmp_path / "profiles")
    monkeypatch.setenv(PATH_VARIABLE, str(tmp_path / "profiles"))
    second = ShardProcess(tmp_path, "--max-tokens", "4", store=store).start()
    try:
        with Client(second.target, retry=NO_RETRY) as c:
            assert {p.name: p.fingerprint for p in c.server_info().profiles}[NAME] == altered.fingerprint
            with pytest.raises(grpc.RpcError) as caught:
                list(c.stub.Generate(pb.GenerateRequest(session_id=session_id, prompt=" there", max_tokens=2)))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "profile" in caught.value.details()
            # A new session takes the profile the server has now.
            assert c.create_session().refresh().cache.profile_fingerprint == altered.fingerprint
    finally:
        second.stop()


@pytest.mark.slow
def test_kvshard_calibrate_writes_a_profile_that_loads(tmp_path, smollm):
    text = tmp_path / "calibration.txt"
    text.write_text(open("/usr/share/common-licenses/GPL-3").read()[:4000])
    out = tmp_path / "profile"
    subprocess.run([sys.executable, "-m", "kvshard.service.cli", "calibrate", "--out", str(out), "--texts", str(text),
                    "--budgets", "3.0", "--validation", "persuasion", "--validation-tokens", "64"], check=True, timeout=1800)
    made = load_profile(str(out))
    assert made.model_fingerprint == model_fingerprint(smollm[0])
    assert [r["budget_bits"] for r in made.meta["measured"]] == [3.0]
    # Another process adds texts to the same profile's measurement.
    subprocess.run([sys.executable, "-m", "kvshard.service.cli", "calibrate", "--out", str(out), "--measure", "--budgets",
                    "3.0", "--validation", "pride_and_prejudice", "--validation-tokens", "64"], check=True, timeout=1800)
    again = load_profile(str(out))
    assert again.fingerprint == made.fingerprint and set(again.meta["measured"][0]["delta_ppl_pct"]) == {"persuasion", "pride_and_prejudice"}
    assert [c.split()[2] for c in again.meta["commands"]] == ["--out", "--out"] and "--measure" in again.meta["commands"][1]


@pytest.mark.slow
def test_calibrate_rpc_registers_a_profile(client):
    request = pb.CalibrateRequest(profile="mine", prompts=["The cat sat on the warm mat. " * 20], profile_budgets=[3.0],
                                  validation_tokens=32, apply=True)
    response = client.stub.Calibrate(request, timeout=1800)
    assert response.profile.name == "mine" and response.profile.measured[0].budget_bits == 3.0
    assert response.session.cache.profile == "mine"
    assert "mine" in {p.name for p in client.server_info().profiles}
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Calibrate(pb.CalibrateRequest(profile="bad name!"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "profile:" in caught.value.details()
