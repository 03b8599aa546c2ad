"""The client's wire-side helpers: channels, arrays <-> wire tensors, request building, retry timing, and the
bookkeeping that makes a retried Generate deliver every token exactly once. _behaviour.py uses them."""

import random
import uuid
from dataclasses import dataclass, field, fields

import grpc
import numpy as np

from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire.status import CURRENT_OFFSET_KEY
from kvshard.wire.tensors import from_numpy, to_numpy

# The server enforces its own message limit; the client should not refuse what the server accepts. gRPC's own
# reconnect backoff (1 s growing to 120 s) would keep a channel idle long after a restarted server is back,
# so it is held to the retry policy's pace.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
_FINISH = {pb.STOP: "stop", pb.LENGTH: "length"}


@dataclass
class RetryPolicy:
    """Retries on UNAVAILABLE, with exponential backoff and jitter. Mutating calls carry expected_offset, so
    a retry of a call that was applied already is recognised instead of applied twice. The default keeps
    trying for 49-61 s (0.1 s doubling to 2 s, 35 attempts): a restart, model load included, takes ~5 s on
    a quiet machine and was measured at ~20 s on a busy 2-core one."""

    attempts: int = 35
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self):
        delay = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_backoff) * random.uniform(0.8, 1.0)
            delay *= self.multiplier


NO_RETRY = RetryPolicy(attempts=1)


def retryable(error: grpc.RpcError, recover=None) -> bool:
    """UNAVAILABLE, or a stream a proxy cut: nginx resets the client's stream (RST_STREAM, which gRPC reports
    as INTERNAL) when the shard behind it dies mid-response. Retries carry expected_offset, so both are safe.
    Calls whose retry recognises an applied first attempt (recover) are retried after DEADLINE_EXCEEDED too:
    the shard leaves a cut call either not applied or applied and committed."""
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    if recover is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    return error.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.debug_error_string() or "")


@dataclass
class GeneratedToken:
    token_id: int
    text: str
    offset: int  # session offset including this token
    committed_offset: int
    finish_reason: str | None = None  # "stop" or "length" on the last token


@dataclass
class CalibrationResult:
    sensitivities: list[float]
    key_bits: list[int]
    average_bits: float
    beta: float
    session: object = None  # RemoteSession when applied


@dataclass
class SessionOptions:
    """CreateSession's cache settings, as keyword arguments. Their names are the wire's CacheConfig fields, which
    are kvshard.quant.KVCacheConfig's (the SDK does not import the library; a test keeps the three in step), less
    profile_fingerprint, which the server sets. None of them set: the server's default (for a model session, its
    recommended calibration profile). profile / budget_bits / planned_tokens pick a profile's configuration instead
    of method and bits."""

    method: str | None = None
    key_bits: int | list[int] | None = None
    value_bits: int | list[int] | None = None
    sink_tokens: int = 0
    window: int = 0
    seed: int | None = None
    profile: str = ""
    budget_bits: float = 0.0
    planned_tokens: int = 0
    labels: dict = field(default_factory=dict)

    def cache_config(self) -> pb.CacheConfig | None:
        if self == SessionOptions(labels=self.labels):
            return None
        config = pb.CacheConfig()
        for option in fields(self):
            value = getattr(self, option.name)
            if option.name == "labels" or value is None:
                continue
            if option.name in ("key_bits", "value_bits"):
                getattr(config, option.name).extend(_as_list(value))
            else:
                setattr(config, option.name, value)
        return config


def _as_list(bits) -> list[int]:
    return [bits] if isinstance(bits, int) else list(bits)


def channel_credentials(tls) -> grpc.ChannelCredentials | None:
    """tls: None/False (plaintext), True (system roots), a PEM path or bytes (custom root), or credentials."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    with open(tls, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def auth_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---- arrays ---------------------------------------------------------------------------------------------------


def _is_mlx(x) -> bool:
    return type(x).__module__.startswith("mlx")


def to_tensor(x) -> pb.Tensor:
    """MLX or numpy (or anything numpy takes) -> wire tensor; float16/bfloat16 stay as they are, the rest
    travels as float32."""
    if _is_mlx(x):
        import mlx.core as mx

        dtype = {mx.float16: pb.FLOAT16, mx.bfloat16: pb.BFLOAT16}.get(x.dtype, pb.FLOAT32)
        return from_numpy(np.array(x.astype(mx.float16 if dtype == pb.FLOAT16 else mx.float32)), dtype)
    array = np.asarray(x)
    return from_numpy(array, pb.FLOAT16 if array.dtype == np.float16 else pb.FLOAT32)


def from_tensor(tensor: pb.Tensor, like):
    """Wire tensor -> the array type (and dtype) of `like`."""
    array = to_numpy(tensor, "output")
    if _is_mlx(like):
        import mlx.core as mx

        return mx.array(array).astype(like.dtype)
    return array


# ---- offsets ---------------------------------------------------------------------------------------------------


def current_offset(error: grpc.RpcError) -> int | None:
    """The session offset an ABORTED (offset mismatch) answer carries."""
    for key, value in error.trailing_metadata() or ():
        if key == CURRENT_OFFSET_KEY:
            return int(value)
    return None


def applied_already(error: grpc.RpcError, offset_if_applied: int) -> bool:
    """After a retry: does this ABORTED mean our earlier attempt went through?"""
    return error.code() == grpc.StatusCode.ABORTED and current_offset(error) == offset_if_applied


def append_call(session_id: str, layer: int, keys, values, offset: int):
    """(request, recover): recover(error) answers for a retry whose earlier attempt was applied."""
    k, v = to_tensor(keys), to_tensor(values)
    request = pb.AppendRequest(session_id=session_id, layer=layer, keys=k, values=v, expected_offset=offset)
    after = offset + (k.shape[-2] if len(k.shape) >= 2 else 1)

    def recover(error):
        return pb.AppendResponse(offset=after) if applied_already(error, after) else None

    return request, recover


def trim_call(session_id: str, n: int, offset: int, layer: int | None = None):
    """(request, recover) for trimming n tokens off a session (or one layer of it) at `offset`."""
    request = pb.TrimRequest(session_id=session_id, n=n, layer=layer, expected_offset=offset)
    after = offset - min(n, offset)

    def recover(error):
        return pb.TrimResponse(trimmed=offset - after, offset=after) if applied_already(error, after) else None

    return request, recover


def delete_recover(error):
    """A retried delete that finds the session gone had deleted it the first time."""
    return pb.DeleteSessionResponse() if error.code() == grpc.StatusCode.NOT_FOUND else None


def create_request(kind, shape, session_id, options: SessionOptions) -> pb.CreateSessionRequest:
    # A client-chosen id makes the create retry-safe: a retry that finds it taken fetches it instead.
    return pb.CreateSessionRequest(
        kind=kind, raw=shape, cache=options.cache_config(), session_id=session_id or uuid.uuid4().hex, labels=options.labels
    )


def generate_request(
    session_id: str, *, prompt=None, tokens=None, messages=None, resume=False, replay_from=None, max_tokens=None,
    temperature=0.0, top_p=0.0, top_k=0, min_p=0.0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False,
) -> pb.GenerateRequest:
    """max_tokens None: the server's default (64, or its --max-tokens if lower)."""
    given = [name for name, value in (("prompt", prompt), ("tokens", tokens), ("messages", messages)) if value is not None]
    if len(given) + bool(resume) != 1:
        raise ValueError("give exactly one of prompt, tokens, messages or resume=True")
    if replay_from is not None and not resume:
        raise ValueError("replay_from: only with resume=True")
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(
        session_id=session_id,
        max_tokens=max_tokens or 0,
        sampling=sampling,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if prompt is not None:
        request.prompt = prompt
    elif tokens is not None:
        request.prompt_tokens.ids.extend(tokens)
    elif messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.resume = True
        if replay_from is not None:
            request.replay_from = replay_from
    return request


class GenerateProgress:
    """Exactly-once delivery of one Generate call across broken streams.

    Tokens are told apart by their session offset, so a message the caller has seen is dropped when a retry
    produces it again. After a break, `next_request` looks at the session: if nothing of the call was
    committed, the same request is sent again (greedy and seeded sampling redraw the same tokens); otherwise
    the call resumes, replaying committed tokens the caller has not seen and generating the rest.
    """

    def __init__(self, request: pb.GenerateRequest):
        self.original = request
        self.request = request
        self.call_start = request.expected_offset  # offset before the call last sent
        self.base = None  # offset before the first generated token
        self.last_offset = None  # offset of the last token delivered
        self.max_tokens = request.max_tokens  # 0: the server's default, learned from the session after a break
        self.finished = False

    def accept(self, message: pb.GenerateResponse) -> GeneratedToken | None:
        if self.last_offset is not None and message.offset <= self.last_offset:
            return None
        if self.base is None:
            self.base = message.offset - 1
        self.last_offset = message.offset
        finish = _FINISH.get(message.finish_reason)
        self.finished = finish is not None
        return GeneratedToken(message.token_id, message.text, message.offset, message.committed_offset, finish)

    def next_request(self, session: pb.Session) -> pb.GenerateRequest | None:
        """The request that continues the call, None when nothing is left, or LookupError when the session
        moved in a way this call cannot account for (another writer)."""
        if session.offset == self.call_start:
            return self.request
        progress = session.last_generate
        if progress.start_offset != self.call_start:
            raise LookupError(f"session moved from offset {self.call_start} to {session.offset} by another call")
        if self.base is None:
            self.base = progress.start_offset + progress.prompt_tokens
        self.max_tokens = self.max_tokens or progress.max_tokens
        remaining = 0 if progress.finished else self.max_tokens - (session.offset - self.base)
        # Tokens delivered past the last checkpoint were lost with the server: they are generated again
        # (the same draws) and dropped as duplicates.
        replay_from = min(self.base if self.last_offset is None else self.last_offset, session.offset)
        if replay_from >= session.offset and remaining <= 0:
            return None
        request = pb.GenerateRequest()
        request.CopyFrom(self.original)
        request.resume = True
        request.replay_from = replay_from
        request.max_tokens = max(remaining, 0)
        request.expected_offset = session.offset
        self.request, self.call_start = request, session.offset
        return request


def calibrate_request(
    target_avg_bits=4.0, method="turboquant_mse", bit_choices=(), beta=0.0, prompts=(), apply=False, mode="kl", options=None
) -> pb.CalibrateRequest:
    request = pb.CalibrateRequest(
        prompts=list(prompts), method=method, target_avg_bits=target_avg_bits, bit_choices=list(bit_choices), beta=beta,
        apply=apply, mode=mode,
    )
    if options is not None:
        if options.cache_config() is not None:
            request.cache.CopyFrom(options.cache_config())
    return request
