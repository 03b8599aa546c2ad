"""Random-weight models of real shapes, served like any other (`kvshard serve --model random:llama-3.2-1b`).

For measuring the service where no real weights of that shape can be had (the lent GPU machines reach no model hub):
an mlx_lm Llama built from the named shape with seeded random weights (fp16 on a GPU, fp32 on the CPU), so its
fingerprint is its own and the same at every start, and a byte-level tokenizer (the `tokenizers` library: one token
per byte, no merges, a ChatML template) standing in for the real one. Its text is noise; its cost per token is the
real shape's.
"""

import mlx.core as mx
from mlx_lm.models import llama

PREFIX = "random:"
SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    # A few-MB model of the same architecture, for tests.
    "tiny": dict(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, vocab_size=1024, rope_theta=500000.0,
                 tie_word_embeddings=True),
}
SEED = 0
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def load_random(name: str):
    """(model, tokenizer) of `random:<shape>`; the same weights at every call."""
    shape = name[len(PREFIX):]
    if shape not in SHAPES:
        raise ValueError(f"model: no random shape {shape!r}; known: {', '.join(PREFIX + s for s in SHAPES)}")
    mx.random.seed(SEED)
    model = llama.Model(llama.ModelArgs.from_dict(SHAPES[shape]))
    model.set_dtype(mx.float32 if mx.default_device() == mx.cpu else mx.float16)
    mx.eval(model.parameters())
    return model, byte_tokenizer()


def byte_tokenizer():
    """One token per byte (ids 0-255, in byte-level BPE's alphabet), then the three special tokens; ids the model
    samples beyond them decode to nothing."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, IM_START, IM_END)])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    hf.chat_template = CHAT_TEMPLATE
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer, eos_token_ids=[bpe.token_to_id(EOS)])


def _byte_of(char: str) -> int:
    """The byte a character of byte-level BPE's alphabet stands for (GPT-2's printable mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = ord(char)
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]
