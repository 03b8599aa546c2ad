"""The real-model quality harness on a tiny slice: chunked perplexity, ΔPPL, top-1 agreement, honest bits."""

import json
import os

import pytest

models = pytest.importorskip("kvshard.quant.models")
from kvshard.quant import eval as quality  # noqa: E402

N_TOKENS, CHUNK = 96, 32


@pytest.fixture(scope="module")
def tokens(smollm):
    _, tokenizer = smollm
    return tokenizer.encode(quality.load_text("pride_and_prejudice"))[:N_TOKENS]


@pytest.fixture(scope="module")
def rows(smollm, tokens):
    model, _ = smollm
    repeat = quality.EvalConfig("fp16 repeat", "fp16", quality.baseline_config(model).make_caches)
    configs = [repeat] + quality.mlx_affine_configs(model, bits=(8, 4, 2))
    return {row["label"]: row for row in quality.compare(model, tokens, configs, chunk=CHUNK)}


def test_fp16_against_itself_is_exact(rows):
    for label in ("fp16", "fp16 repeat"):
        assert rows[label]["delta_ppl_pct"] == 0.0
        assert rows[label]["top1_agreement"] == 1.0
        assert rows[label]["effective_bits"] == 16.0


def test_mlx_affine_quality_orders_by_bits(rows):
    eight, four, two = (rows[f"mlx_lm affine {b}-bit g64"] for b in (8, 4, 2))
    assert abs(eight["delta_ppl_pct"]) < 2.0 and eight["top1_agreement"] > 0.95
    assert two["delta_ppl_pct"] > four["delta_ppl_pct"]
    assert two["delta_ppl_pct"] > 10.0
    assert two["top1_agreement"] < eight["top1_agreement"]


def test_effective_bits_count_scales_and_biases(rows):
    # fp16 scale + fp16 bias per group of 64: 32 / 64 extra bits per element.
    assert rows["mlx_lm affine 4-bit g64"]["effective_bits"] == pytest.approx(4.5, abs=0.01)
    assert rows["mlx_lm affine 8-bit g64"]["effective_bits"] == pytest.approx(8.5, abs=0.01)
    assert rows["mlx_lm affine 2-bit g64"]["effective_bits"] == pytest.approx(2.5, abs=0.01)


def test_chunking_does_not_change_fp16_perplexity(smollm, tokens):
    model, _ = smollm
    make = quality.baseline_config(model).make_caches
    chunked = quality.perplexity(model, tokens, make, chunk=CHUNK, context=N_TOKENS)
    whole = quality.perplexity(model, tokens, make, chunk=N_TOKENS, context=N_TOKENS)
    assert chunked["count"] == whole["count"] == N_TOKENS - 1
    assert chunked["ppl"] == pytest.approx(whole["ppl"], rel=1e-3)
    assert chunked["predictions"].shape == (N_TOKENS - 1,)
    assert 1.0 < whole["ppl"] < 100.0


def test_perplexity_rejects_bad_arguments(smollm, tokens):
    model, _ = smollm
    make = quality.baseline_config(model).make_caches
    with pytest.raises(ValueError, match="chunk"):
        quality.perplexity(model, tokens, make, chunk=0)
    with pytest.raises(ValueError, match="tokens"):
        quality.perplexity(model, tokens[:1], make)


def test_our_configs_are_plain_label_family_factory_triples(smollm):
    model, tokenizer = smollm
    configs = quality.our_configs(model, tokenizer)
    for config in configs:
        assert isinstance(config, quality.EvalConfig) and config.label and config.family
        assert callable(config.make_caches)
    assert {c.family for c in configs} >= {"turboquant_mse", "turboquant_prod", "turboquant_rvq", "polar", "qjl"}


def test_tuned_config_spends_the_budget_where_the_weights_say(smollm):
    model, tokenizer = smollm
    layers = len(model.layers)
    calibration = {"keys": [4.0] * layers, "values": [1.0] * layers, "key_scales": None, "beta": 3.4}
    for budget in quality.BUDGETS:
        config = quality.tuned_config(model, tokenizer, budget, calibration)
        keys, values = config.bit_width_inlier, config.bit_width_value
        mean_code_bits = (sum(keys) + sum(values)) / (2 * layers)
        # Code bits plus the fp16 norm (16 bits per 64-element vector) stay inside the budget, and close to it.
        assert budget - 0.4 <= mean_code_bits + 0.25 <= budget - 0.05
        # Keys weigh 4x the values here, so they get log_3.4(4) ≈ 1.1 more bits.
        assert min(keys) >= max(values) + 1


def test_shipped_texts_are_long_enough(smollm):
    _, tokenizer = smollm
    for name in quality.TEXTS:
        assert len(tokenizer.encode(quality.load_text(name))) >= 2048


def test_main_writes_json_and_plot(tmp_path):
    out = tmp_path / "eval"
    args = ["--out", str(out), "--tokens", "48", "--chunk", "16", "--texts", "persuasion"]
    assert quality.main(args + ["--configs", "mlx_lm affine 4-bit g64", "mlx_lm affine 2-bit g64"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in report["mean"]] == ["fp16", "mlx_lm affine 4-bit g64", "mlx_lm affine 2-bit g64"]
    assert set(report["per_text"]) == {"persuasion"} and len(report["model"]["fingerprint"]) == 64
    assert report["machine"]["cpus"] and report["date"]
    assert os.path.getsize(out / "eval.png") > 1000


def test_configs_are_selected_by_label_or_family(smollm):
    model, _ = smollm
    configs = quality.mlx_affine_configs(model)
    assert [c.label for c in quality._select(configs, ["mlx_lm affine 3-bit g64"])] == ["mlx_lm affine 3-bit g64"]
    assert quality._select(configs, ["mlx_lm affine"]) == configs
    with pytest.raises(ValueError, match="configs"):
        quality._select(configs, ["no such config"])


def test_packaged_texts_are_excerpts_of_their_debian_files(tmp_path, monkeypatch):
    source = quality.load_text("python_source")
    assert source.startswith("class HelpFormatter") and source.endswith("\n") and len(source) <= quality.EXCERPT_CHARS
    with open(quality.PACKAGED_TEXTS["python_source"][0], encoding="utf-8") as f:
        assert source in f.read()
    monkeypatch.setitem(quality.PACKAGED_TEXTS, "vim_manual", (str(tmp_path / "gone.txt"), "vim-runtime", None))
    with pytest.raises(ValueError, match="vim-runtime"):
        quality.load_text("vim_manual")


def test_compressed_packaged_texts_are_read_uncompressed():
    import gzip

    faq = quality.load_text("valgrind_faq")
    assert faq.startswith("\n\nValgrind FAQ") and len(faq) <= quality.EXCERPT_CHARS
    with gzip.open(quality.PACKAGED_TEXTS["valgrind_faq"][0], "rt", encoding="utf-8") as f:
        assert faq in f.read()
