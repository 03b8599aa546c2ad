from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]

class SessionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_KIND_UNSPECIFIED: _ClassVar[SessionKind]
    MODEL: _ClassVar[SessionKind]
    RAW: _ClassVar[SessionKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
SESSION_KIND_UNSPECIFIED: SessionKind
MODEL: SessionKind
RAW: SessionKind
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("method", "key_bits", "value_bits", "sink_tokens", "window", "seed", "profile", "budget_bits", "profile_fingerprint", "planned_tokens")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    KEY_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BITS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    method: str
    key_bits: _containers.RepeatedScalarFieldContainer[int]
    value_bits: _containers.RepeatedScalarFieldContainer[int]
    sink_tokens: int
    window: int
    seed: int
    profile: str
    budget_bits: float
    profile_fingerprint: str
    planned_tokens: int
    def __init__(self, method: _Optional[str] = ..., key_bits: _Optional[_Iterable[int]] = ..., value_bits: _Optional[_Iterable[int]] = ..., sink_tokens: _Optional[int] = ..., window: _Optional[int] = ..., seed: _Optional[int] = ..., profile: _Optional[str] = ..., budget_bits: _Optional[float] = ..., profile_fingerprint: _Optional[str] = ..., planned_tokens: _Optional[int] = ...) -> None: ...

class ProfileQuality(_message.Message):
    __slots__ = ("budget_bits", "effective_bits", "mean_delta_ppl_pct", "worst_delta_ppl_pct", "delta_ppl_pct", "tokens")
    class DeltaPplPctEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BUDGET_BITS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_BITS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DELTA_PPL_PCT_FIELD_NUMBER: _ClassVar[int]
    WORST_DELTA_PPL_PCT_FIELD_NUMBER: _ClassVar[int]
    DELTA_PPL_PCT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    budget_bits: float
    effective_bits: float
    mean_delta_ppl_pct: float
    worst_delta_ppl_pct: float
    delta_ppl_pct: _containers.ScalarMap[str, float]
    tokens: int
    def __init__(self, budget_bits: _Optional[float] = ..., effective_bits: _Optional[float] = ..., mean_delta_ppl_pct: _Optional[float] = ..., worst_delta_ppl_pct: _Optional[float] = ..., delta_ppl_pct: _Optional[_Mapping[str, float]] = ..., tokens: _Optional[int] = ...) -> None: ...

class ProfileInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "recommended_bits", "min_bits", "max_bits", "planned_tokens", "measured")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_BITS_FIELD_NUMBER: _ClassVar[int]
    MIN_BITS_FIELD_NUMBER: _ClassVar[int]
    MAX_BITS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    recommended_bits: float
    min_bits: float
    max_bits: float
    planned_tokens: int
    measured: _containers.RepeatedCompositeFieldContainer[ProfileQuality]
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., recommended_bits: _Optional[float] = ..., min_bits: _Optional[float] = ..., max_bits: _Optional[float] = ..., planned_tokens: _Optional[int] = ..., measured: _Optional[_Iterable[_Union[ProfileQuality, _Mapping]]] = ...) -> None: ...

class RawShape(_message.Message):
    __slots__ = ("layers", "n_kv_heads", "head_dim")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    layers: int
    n_kv_heads: int
    head_dim: int
    def __init__(self, layers: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("kind", "raw", "cache", "session_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    kind: SessionKind
    raw: RawShape
    cache: CacheConfig
    session_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[_Union[SessionKind, str]] = ..., raw: _Optional[_Union[RawShape, _Mapping]] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., session_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("start_offset", "prompt_tokens", "generated_tokens", "max_tokens", "finished", "finish_reason")
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    start_offset: int
    prompt_tokens: int
    generated_tokens: int
    max_tokens: int
    finished: bool
    finish_reason: FinishReason
    def __init__(self, start_offset: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "kind", "cache", "shape", "offset", "layer_offsets", "committed_offset", "memory_bytes", "stored_bytes", "model_fingerprint", "last_generate", "token_ids", "hot", "version", "created_at_ms", "updated_at_ms", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: SessionKind
    cache: CacheConfig
    shape: RawShape
    offset: int
    layer_offsets: _containers.RepeatedScalarFieldContainer[int]
    committed_offset: int
    memory_bytes: int
    stored_bytes: int
    model_fingerprint: str
    last_generate: GenerateProgress
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hot: bool
    version: int
    created_at_ms: int
    updated_at_ms: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[_Union[SessionKind, str]] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., shape: _Optional[_Union[RawShape, _Mapping]] = ..., offset: _Optional[int] = ..., layer_offsets: _Optional[_Iterable[int]] = ..., committed_offset: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., last_generate: _Optional[_Union[GenerateProgress, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., hot: _Optional[bool] = ..., version: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_token_ids: bool
    def __init__(self, session_id: _Optional[str] = ..., include_token_ids: _Optional[bool] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "layer", "keys", "values", "expected_offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer: int
    keys: Tensor
    values: Tensor
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., layer: _Optional[int] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("offset", "memory_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    memory_bytes: int
    def __init__(self, offset: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class AttendRequest(_message.Message):
    __slots__ = ("session_id", "layer", "queries")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer: int
    queries: Tensor
    def __init__(self, session_id: _Optional[str] = ..., layer: _Optional[int] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttendResponse(_message.Message):
    __slots__ = ("output", "offset")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    offset: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class TrimRequest(_message.Message):
    __slots__ = ("session_id", "n", "layer", "expected_offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    n: int
    layer: int
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., n: _Optional[int] = ..., layer: _Optional[int] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class TrimResponse(_message.Message):
    __slots__ = ("trimmed", "offset")
    TRIMMED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    trimmed: int
    offset: int
    def __init__(self, trimmed: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatTurn(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "prompt_tokens", "chat", "resume", "max_tokens", "sampling", "stop", "stop_token_ids", "ignore_eos", "expected_offset", "replay_from")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FROM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    prompt_tokens: TokenIds
    chat: ChatTurn
    resume: bool
    max_tokens: int
    sampling: SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    expected_offset: int
    replay_from: int
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatTurn, _Mapping]] = ..., resume: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., expected_offset: _Optional[int] = ..., replay_from: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_id", "text", "offset", "committed_offset", "finish_reason", "usage")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    offset: int
    committed_offset: int
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., offset: _Optional[int] = ..., committed_offset: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CalibrateRequest(_message.Message):
    __slots__ = ("prompts", "method", "target_avg_bits", "bit_choices", "beta", "apply", "cache", "mode", "profile", "profile_budgets", "validation_tokens")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_AVG_BITS_FIELD_NUMBER: _ClassVar[int]
    BIT_CHOICES_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    method: str
    target_avg_bits: float
    bit_choices: _containers.RepeatedScalarFieldContainer[int]
    beta: float
    apply: bool
    cache: CacheConfig
    mode: str
    profile: str
    profile_budgets: _containers.RepeatedScalarFieldContainer[float]
    validation_tokens: int
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., target_avg_bits: _Optional[float] = ..., bit_choices: _Optional[_Iterable[int]] = ..., beta: _Optional[float] = ..., apply: _Optional[bool] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., mode: _Optional[str] = ..., profile: _Optional[str] = ..., profile_budgets: _Optional[_Iterable[float]] = ..., validation_tokens: _Optional[int] = ...) -> None: ...

class CalibrateResponse(_message.Message):
    __slots__ = ("sensitivities", "key_bits", "average_bits", "beta", "session", "profile")
    SENSITIVITIES_FIELD_NUMBER: _ClassVar[int]
    KEY_BITS_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_BITS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    sensitivities: _containers.RepeatedScalarFieldContainer[float]
    key_bits: _containers.RepeatedScalarFieldContainer[int]
    average_bits: float
    beta: float
    session: Session
    profile: ProfileInfo
    def __init__(self, sensitivities: _Optional[_Iterable[float]] = ..., key_bits: _Optional[_Iterable[int]] = ..., average_bits: _Optional[float] = ..., beta: _Optional[float] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., profile: _Optional[_Union[ProfileInfo, _Mapping]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_tokens", "max_prompt_tokens", "max_session_tokens", "max_append_tokens", "max_message_bytes", "max_sessions", "memory_budget_bytes", "min_bits", "max_bits", "session_ttl_s", "max_tenant_sessions", "max_tenant_bytes", "max_attend_cost", "attend_slice_cost", "append_slice_cost", "checkpoint_tokens")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_BITS_FIELD_NUMBER: _ClassVar[int]
    MAX_BITS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TENANT_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEND_COST_FIELD_NUMBER: _ClassVar[int]
    ATTEND_SLICE_COST_FIELD_NUMBER: _ClassVar[int]
    APPEND_SLICE_COST_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    max_prompt_tokens: int
    max_session_tokens: int
    max_append_tokens: int
    max_message_bytes: int
    max_sessions: int
    memory_budget_bytes: int
    min_bits: int
    max_bits: int
    session_ttl_s: int
    max_tenant_sessions: int
    max_tenant_bytes: int
    max_attend_cost: int
    attend_slice_cost: int
    append_slice_cost: int
    checkpoint_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_session_tokens: _Optional[int] = ..., max_append_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., min_bits: _Optional[int] = ..., max_bits: _Optional[int] = ..., session_ttl_s: _Optional[int] = ..., max_tenant_sessions: _Optional[int] = ..., max_tenant_bytes: _Optional[int] = ..., max_attend_cost: _Optional[int] = ..., attend_slice_cost: _Optional[int] = ..., append_slice_cost: _Optional[int] = ..., checkpoint_tokens: _Optional[int] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("model", "model_fingerprint", "model_shape", "methods", "limits", "version", "store", "auth_required", "tenant", "profiles", "default_profile")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROFILE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_fingerprint: str
    model_shape: RawShape
    methods: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    version: str
    store: str
    auth_required: bool
    tenant: str
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileInfo]
    default_profile: str
    def __init__(self, model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., model_shape: _Optional[_Union[RawShape, _Mapping]] = ..., methods: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., version: _Optional[str] = ..., store: _Optional[str] = ..., auth_required: _Optional[bool] = ..., tenant: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[ProfileInfo, _Mapping]]] = ..., default_profile: _Optional[str] = ...) -> None: ...
