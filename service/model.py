"""The one model a shard serves: weights, tokenizer, fingerprint, and turning requests into token ids."""

from dataclasses import dataclass
from typing import Any

from kvshard.quant import install_attention_hook, load_model
from kvshard.quant.models import model_fingerprint
from kvshard.service.profiles import profiles_for
from kvshard.service.random_model import is_random, load_random

CHAT_ROLES = ("system", "user", "assistant")
# Stands in for an earlier assistant reply so that the chat template renders a continuation (see render_chat).
_SENTINEL = "KVSHARD-EARLIER-REPLY-SENTINEL"


@dataclass
class ServedModel:
    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    shape: dict  # layers, n_kv_heads, head_dim
    vocab_size: int
    eos_token_ids: frozenset[int]
    profiles: dict  # name -> calibration Profile of this model (service/profiles.py)
    default_profile: str  # what a model session with no cache config uses; "" if none

    @classmethod
    def load(cls, name: str) -> "ServedModel":
        """Load on the MLX thread: the weights belong to it from then on."""
        model, tokenizer = load_random(name) if is_random(name) else load_model(name)
        # Sessions restored from the store never pass through KVCacheBuilder.for_model, which installs the
        # hook that makes attention read the codes; without it they would attend over dequantized fp16 K/V
        # and drift from sessions that were never restored.
        install_attention_hook(model)
        attention = model.layers[0].self_attn
        fingerprint = model_fingerprint(model)
        profiles = profiles_for(fingerprint)
        if name in profiles:
            profiles[name].config()  # plan the default now (seconds), not in the first CreateSession's deadline
        return cls(
            name=name,
            model=model,
            tokenizer=tokenizer,
            fingerprint=fingerprint,
            shape=dict(layers=len(model.layers), n_kv_heads=attention.n_kv_heads, head_dim=attention.head_dim),
            vocab_size=model.args.vocab_size,
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            profiles=profiles,
            # The profile named after the model is the one shipped for it (quant/data/profiles/).
            default_profile=name if name in profiles else "",
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check_token_ids(self, token_ids: list[int], field: str) -> list[int]:
        for i, token in enumerate(token_ids):
            if token >= self.vocab_size:
                raise ValueError(f"{field}[{i}]: token {token} is not below the vocabulary size {self.vocab_size}")
        return list(token_ids)

    def render_chat(self, messages: list[dict], history: list[int]) -> list[int]:
        """Token ids of the next chat turn(s), ending with the assistant's generation prompt.

        The first turn is the template applied to `messages`. A later turn must add only what the template
        would put after the conversation so far: render it after a sentinel assistant reply and keep what
        follows the sentinel. That suffix starts by closing the reply (end-of-turn token); when the model
        already generated that token, it is not added twice.
        """
        for i, message in enumerate(messages):
            if message["role"] not in CHAT_ROLES:
                raise ValueError(f"chat.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {message['role']!r}")
        if not any(m["content"] for m in messages):
            raise ValueError("chat.messages: every message is empty")
        template = self.tokenizer.apply_chat_template
        if not history:
            return self.encode(template(messages, tokenize=False, add_generation_prompt=True))
        earlier = [{"role": "user", "content": "-"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = template(earlier + messages, tokenize=False, add_generation_prompt=True)
        suffix = self.encode(rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :])
        if suffix and suffix[0] == history[-1] and suffix[0] in self.eos_token_ids:
            suffix = suffix[1:]
        return suffix
