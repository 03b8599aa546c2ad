"""The embedded real model: GGUF weights mapped onto mlx_lm's llama, tokenizer and chat template from the
GGUF metadata, and a fingerprint that names the weights."""

import os
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

models = pytest.importorskip("kvshard.quant.models")

PASSAGE_FILE = os.path.join(os.path.dirname(models.__file__), "data", "pride_and_prejudice.txt")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_config_read_from_gguf_metadata(smollm):
    model, _ = smollm
    args = model.args
    assert (args.num_hidden_layers, args.hidden_size, args.intermediate_size) == (30, 576, 1536)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (9, 3, 64)
    assert args.rope_theta == 1e5 and args.rope_traditional and args.tie_word_embeddings
    assert args.rms_norm_eps == pytest.approx(1e-5) and args.vocab_size == 49152
    assert len(model.layers) == 30 and not hasattr(model, "lm_head")


def test_gguf_weights_load_quantized_and_dequantize_to_the_same_model(smollm):
    dense, tokenizer = smollm
    quantized, _ = models.load_model("smollm2-135m", dequantize=False)
    q_proj, down_proj = quantized.layers[0].self_attn.q_proj, quantized.layers[0].mlp.down_proj
    embed = quantized.model.embed_tokens
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    assert isinstance(down_proj, nn.QuantizedLinear) and (down_proj.bits, down_proj.group_size) == (4, 32)
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (8, 32)
    tokens = mx.array([tokenizer.encode("The river ran quietly past the old mill")])
    a, b = dense(tokens)[0], quantized(tokens)[0]
    assert mx.array_equal(a.argmax(-1), b.argmax(-1))
    assert mx.abs(a - b).max().item() < 0.1 < mx.abs(a).max().item()


def test_greedy_chat_reply_is_deterministic_english(smollm):
    from mlx_lm import generate

    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    first = generate(model, tokenizer, prompt, max_tokens=12)
    second = generate(model, tokenizer, prompt, max_tokens=12)
    assert first == second
    assert first.isascii() and re.search(r"[A-Za-z]{3}", first)
    assert "Paris" in first


def test_perplexity_of_english_prose_is_sane(smollm):
    model, tokenizer = smollm
    with open(PASSAGE_FILE, encoding="utf-8") as f:
        tokens = mx.array(tokenizer.encode(f.read())[:129])
    logits = model(tokens[None, :-1])[0].astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, tokens[1:], reduction="mean").item()
    ppl = float(mx.exp(mx.array(nll)).item())
    # Measured 19.1 for these 128 predictions (CPU, float32); with the wrong rope order the model scores
    # in the hundreds.
    assert 10 < ppl < 30


def test_digits_tokenize_individually_and_text_round_trips(smollm):
    _, tokenizer = smollm
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == list("12345")
    text = "In 1818, Sir Walter's café bill came to £3 — naïvely."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(" the")) == 1


def test_chat_template_renders_role_markers(smollm):
    _, tokenizer = smollm
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert im_end in tokenizer.eos_token_ids


def test_fingerprint_is_stable_across_processes_and_follows_the_weights(smollm):
    model, _ = smollm
    fingerprint = models.model_fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kvshard.quant.models import load_model, model_fingerprint; "
            "print(model_fingerprint(load_model('smollm2-135m')[0]))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert other.stdout.strip() == fingerprint

    layer = model.layers[0].mlp.up_proj
    original = layer.weight
    try:
        layer.weight = original.at[0, 0].add(1e-3)
        assert models.model_fingerprint(model) != fingerprint
    finally:
        layer.weight = original
    assert models.model_fingerprint(model) == fingerprint
