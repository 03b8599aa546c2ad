"""RPC handlers: protobuf in, one session call, protobuf out.

Each handler checks the request's fields (raising ValueError naming the field) before it logs or echoes any
of them, takes the session through the manager (which serializes calls per session), checks the call against
the session and the limits, and only then hands the change and its commit to the manager as one unit. Status
codes are decided in errors.py; the interceptor applies them.
"""

import base64
import binascii
import dataclasses
import shutil
from contextlib import aclosing

from kvshard.quant import METHODS, KVCacheConfig
from kvshard.service import calibration, logs, metrics, profiles
from kvshard.service.auth import current_tenant
from kvshard.service.calibration_worker import CalibrationWorker
from kvshard.service.errors import FailedPrecondition, LimitExceeded
from kvshard.service.generation import GenerateOptions, Sampling, generate
from kvshard.service.scheduler import Scheduler
from kvshard.service.sessions import SessionManager, check_session_id, public_id, resolve_spec
from kvshard.service.store import SessionRecord
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc
from kvshard.wire.tensors import from_numpy, to_numpy

DEFAULT_SEED = 42
DEFAULT_PAGE_SIZE = 50
DEFAULT_MAX_TOKENS = 64  # a Generate without max_tokens (capped by --max-tokens)
PAGE_TOKEN_PREFIX = "p1."
MAX_PAGE_SIZE = 1000
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
_KINDS = {"model": pb.MODEL, "raw": pb.RAW}
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.STOP, "length": pb.LENGTH}


class KVShardServicer(pb_grpc.KVShardServicer):
    def __init__(self, manager: SessionManager, version: str, auth_required: bool, scheduler: Scheduler | None = None):
        self.manager = manager
        self.scheduler = scheduler or Scheduler(manager.mlx)  # batches the Generate streams' steps
        self.calibrations = CalibrationWorker()  # Calibrate runs there, off the MLX thread
        self.limits = manager.limits
        self.version = version
        self.auth_required = auth_required

    @property
    def model(self):
        # Loaded after the server starts (health says NOT_SERVING until then).
        return self.manager.model

    # ---- sessions -----------------------------------------------------------------------------------------

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        spec = self._session_spec(request, request.cache)
        if spec.session_id:
            logs.note(session=spec.session_id)
        session = await self.manager.create(current_tenant(), spec)
        logs.note(session=session.public_id)
        return session_message(session.record, session)

    def _session_spec(self, request, cache: pb.CacheConfig, key_bits=None):
        kind = "raw" if request.kind == pb.RAW else "model"
        if request.kind not in (pb.SESSION_KIND_UNSPECIFIED, pb.MODEL, pb.RAW):
            raise ValueError(f"kind: unknown session kind {request.kind}")
        if kind == "raw":
            if not request.HasField("raw"):
                raise ValueError("raw: required for a RAW session (layers, n_kv_heads, head_dim)")
            shape = dict(layers=request.raw.layers, n_kv_heads=request.raw.n_kv_heads, head_dim=request.raw.head_dim)
        else:
            if request.HasField("raw"):
                raise ValueError("raw: must be unset for a MODEL session; the model fixes the shape")
            if self.model is None:
                raise FailedPrecondition("kind: this server serves no model; create a RAW session")
            shape = self.model.shape
        if len(request.labels) > MAX_LABELS:
            raise ValueError(f"labels: at most {MAX_LABELS}, got {len(request.labels)}")
        for key, value in request.labels.items():
            if not 1 <= len(key) <= MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
                raise ValueError(f"labels: keys of 1-{MAX_LABEL_KEY} and values of at most {MAX_LABEL_VALUE} characters")
        requested = cache_config_from_pb(cache)
        if key_bits is not None:
            requested = dataclasses.replace(requested, key_bits=list(key_bits))
        if asks_for_profile(requested) or (kind == "model" and not request.HasField("cache") and self.model.default_profile):
            if kind == "raw":
                raise ValueError("cache.profile: profiles configure MODEL sessions; a RAW session takes method and bits")
            requested = profiles.profile_config(requested, self.model)
        return resolve_spec(kind, shape, requested, self.limits, request.session_id, dict(request.labels))

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        session_id = _session_id(request)
        record, session = await self.manager.describe(current_tenant(), session_id)
        return session_message(record, session, include_token_ids=request.include_token_ids)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size: at most {MAX_PAGE_SIZE}, got {page_size}")
        after = decode_page_token(request.page_token)
        if after:
            check_session_id(after, "page_token")
        records, last = await self.manager.list(current_tenant(), page_size, after)
        sessions = [session_message(r, self.manager.hot.get(r.session_id)) for r in records]
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=encode_page_token(last))

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        await self.manager.delete(current_tenant(), _session_id(request))
        return pb.DeleteSessionResponse()

    # ---- raw caches ---------------------------------------------------------------------------------------

    async def Append(self, request: pb.AppendRequest, context) -> pb.AppendResponse:
        session_id = _session_id(request)
        logs.note(layer=request.layer)
        keys = to_numpy(request.keys, "keys")
        values = to_numpy(request.values, "values")
        expected = request.expected_offset if request.HasField("expected_offset") else None
        async with self.manager.open(current_tenant(), session_id) as session:
            session.check_append(request.layer, keys, values, self.limits, expected)
            offset = await self.manager.append(session, request.layer, keys, values)
        logs.note(tokens=keys.shape[-2])
        metrics.TOKENS_APPENDED.inc(keys.shape[-2])
        return pb.AppendResponse(offset=offset, memory_bytes=session.memory_bytes)

    async def Attend(self, request: pb.AttendRequest, context) -> pb.AttendResponse:
        session_id = _session_id(request)
        logs.note(layer=request.layer)
        queries = to_numpy(request.queries, "queries")
        async with self.manager.open(current_tenant(), session_id) as session:
            session.check_attend(request.layer, queries, self.limits)
            output = await self.manager.attend(session, request.layer, queries)
        return pb.AttendResponse(output=from_numpy(output, request.queries.dtype), offset=session.offset_of(request.layer))

    async def Trim(self, request: pb.TrimRequest, context) -> pb.TrimResponse:
        session_id = _session_id(request)
        layer = request.layer if request.HasField("layer") else None
        expected = request.expected_offset if request.HasField("expected_offset") else None
        async with self.manager.open(current_tenant(), session_id) as session:
            session.check_trim(request.n, layer, expected)
            trimmed = await self.manager.mutate(session, session.trim, request.n, layer)
        return pb.TrimResponse(trimmed=trimmed, offset=session.offset_of(layer))

    # ---- the model ----------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context):
        session_id = _session_id(request)
        model = self._served_model("Generate")
        options = self._generate_options(request)
        source = request.WhichOneof("input")
        prompt = self._prompt_tokens(request, source)
        async with self.manager.open(current_tenant(), session_id) as session:
            if session.record.kind != "model":
                raise FailedPrecondition("session_id: Generate needs a model session; this is a raw cache session")
            session.check_offset(request.expected_offset if request.HasField("expected_offset") else None)
            session.check_memory(self.limits)
            if source == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                prompt = model.render_chat(messages, session.record.token_ids)
            elif source == "resume" and not session.record.token_ids:
                raise ValueError("resume: the session is empty; there is nothing to continue")
            generated = 0
            async with aclosing(generate(self.manager, self.scheduler, model, session, prompt, options)) as stream:
                async for token in stream:
                    generated += 1
                    metrics.TOKENS_GENERATED.inc()
                    logs.note(tokens=generated, prompt_tokens=len(prompt))
                    yield token_message(token)

    def _served_model(self, rpc: str):
        if self.model is None:
            raise FailedPrecondition(f"{rpc}: this server serves no model (started with --model none)")
        return self.model

    def _generate_options(self, request: pb.GenerateRequest) -> GenerateOptions:
        replay = request.HasField("replay_from")
        if replay and request.WhichOneof("input") != "resume":
            raise ValueError("replay_from: only with resume")
        max_tokens = request.max_tokens or (0 if replay else min(DEFAULT_MAX_TOKENS, self.limits.max_tokens))
        if max_tokens > self.limits.max_tokens:
            raise ValueError(f"max_tokens: must be in [1, {self.limits.max_tokens}], got {max_tokens}")
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in request.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
        stop_ids = self.model.check_token_ids(list(request.stop_token_ids), "stop_token_ids")
        if not request.ignore_eos:
            stop_ids += self.model.eos_token_ids
        s = request.sampling
        sampling = Sampling(s.temperature, s.top_p, s.top_k, s.min_p, s.seed if s.HasField("seed") else DEFAULT_SEED)
        return GenerateOptions(
            max_tokens=max_tokens,
            sampling=sampling.check(self.model.vocab_size),
            stop=list(request.stop),
            stop_token_ids=frozenset(stop_ids),
            replay_from=request.replay_from if replay else None,
        )

    def _prompt_tokens(self, request: pb.GenerateRequest, source: str | None) -> list[int]:
        """Token ids of a text or token input; chat turns are rendered later, against the session's history."""
        prompt = self._given_prompt(request, source)
        if len(prompt) > self.limits.max_prompt_tokens:
            raise LimitExceeded(f"prompt: {len(prompt)} tokens exceed max_prompt_tokens {self.limits.max_prompt_tokens}")
        return prompt

    def _given_prompt(self, request: pb.GenerateRequest, source: str | None) -> list[int]:
        if source is None:
            raise ValueError("prompt: empty; set one of prompt, prompt_tokens, chat or resume")
        if source == "prompt":
            if not request.prompt:
                raise ValueError("prompt: empty")
            return self.model.encode(request.prompt)
        if source == "prompt_tokens":
            if not request.prompt_tokens.ids:
                raise ValueError("prompt_tokens.ids: empty")
            return self.model.check_token_ids(list(request.prompt_tokens.ids), "prompt_tokens.ids")
        if source == "chat" and not request.chat.messages:
            raise ValueError("chat.messages: empty")
        if source == "resume" and not request.resume:
            raise ValueError("resume: set it to true, or give a prompt")
        return []

    async def Calibrate(self, request: pb.CalibrateRequest, context) -> pb.CalibrateResponse:
        model = self._served_model("Calibrate")
        if request.profile:
            return await self._calibrate_profile(model, request)
        plan = calibration.check_request(request, self.limits, METHODS)
        result = await self.calibrations.run(model.name, "ratequant", plan)
        response = pb.CalibrateResponse(
            sensitivities=result.sensitivities, key_bits=result.key_bits, average_bits=result.average_bits, beta=result.beta
        )
        if request.apply:
            cache = pb.CacheConfig()
            cache.CopyFrom(request.cache)
            cache.method = plan.method
            spec = self._session_spec(pb.CreateSessionRequest(kind=pb.MODEL, cache=cache), cache, key_bits=result.key_bits)
            session = await self.manager.create(current_tenant(), spec)
            logs.note(session=session.public_id)
            response.session.CopyFrom(session_message(session.record, session))
        return response

    async def _calibrate_profile(self, model, request: pb.CalibrateRequest) -> pb.CalibrateResponse:
        calibration.check_prompts(request)
        name, budgets, tokens = profiles.check_calibrate_request(request)
        folder = await self.calibrations.run(model.name, "profile", name, list(request.prompts), budgets, tokens)
        try:
            profile = await self.manager.mlx.run(profiles.register, model, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        response = pb.CalibrateResponse(profile=profiles.profile_info(profile))
        if request.apply:
            cache = pb.CacheConfig()
            cache.CopyFrom(request.cache)
            cache.profile, cache.budget_bits = name, budgets[0]
            session = await self.manager.create(current_tenant(), self._session_spec(pb.CreateSessionRequest(kind=pb.MODEL), cache))
            logs.note(session=session.session_id)
            response.session.CopyFrom(session_message(session.record, session))
        return response

    async def ServerInfo(self, request: pb.ServerInfoRequest, context) -> pb.ServerInfoResponse:
        limits = self.limits
        info = pb.ServerInfoResponse(
            methods=list(METHODS),
            limits=pb.Limits(
                max_tokens=limits.max_tokens,
                max_prompt_tokens=limits.max_prompt_tokens,
                max_session_tokens=limits.max_session_tokens,
                max_append_tokens=limits.max_append_tokens,
                max_message_bytes=limits.max_message_bytes,
                max_sessions=limits.max_sessions,
                memory_budget_bytes=limits.memory_budget_bytes,
                min_bits=limits.min_bits,
                max_bits=limits.max_bits,
                session_ttl_s=limits.session_ttl_s,
                max_tenant_sessions=limits.max_tenant_sessions,
                max_tenant_bytes=limits.max_tenant_bytes,
                max_attend_cost=limits.max_attend_cost,
                attend_slice_cost=limits.attend_slice_cost,
                append_slice_cost=limits.append_slice_cost,
                checkpoint_tokens=limits.checkpoint_tokens,
            ),
            version=self.version,
            store=self.manager.store.kind,
            auth_required=self.auth_required,
            tenant=current_tenant(),
        )
        if self.model is not None:
            info.model = self.model.name
            info.model_fingerprint = self.model.fingerprint
            info.model_shape.CopyFrom(pb.RawShape(**self.model.shape))
            info.profiles.extend(profiles.profile_info(p) for _, p in sorted(self.model.profiles.items()))
            info.default_profile = self.model.default_profile
        return info


def _session_id(request) -> str:
    """The request's session id, checked before it is logged or echoed (an unchecked one may be megabytes)."""
    session_id = check_session_id(request.session_id)
    logs.note(session=session_id)
    return session_id


def session_message(record: SessionRecord, session=None, include_token_ids: bool = False) -> pb.Session:
    message = pb.Session(
        session_id=public_id(record),
        kind=_KINDS[record.kind],
        cache=cache_config_to_pb(KVCacheConfig.from_dict(record.config)),
        shape=pb.RawShape(**record.shape),
        offset=record.offset,
        layer_offsets=record.layer_offsets,
        committed_offset=session.committed_offset if session is not None else record.offset,
        memory_bytes=session.memory_bytes if session is not None else record.memory_bytes,
        stored_bytes=record.stored_bytes,
        model_fingerprint=record.model_fingerprint,
        hot=session is not None,
        version=record.version,
        created_at_ms=record.created_at_ms,
        updated_at_ms=record.updated_at_ms,
        labels=record.labels,
    )
    if record.last_generate:
        progress = dict(record.last_generate)
        progress["finish_reason"] = _FINISH[progress.get("finish_reason")]
        message.last_generate.CopyFrom(pb.GenerateProgress(**progress))
    if include_token_ids:
        message.token_ids.extend(record.token_ids)
    return message


def asks_for_profile(cache) -> bool:
    """Whether a request's cache settings (its CacheConfig, or the KVCacheConfig made of it: the same field names)
    pick a profile's configuration rather than method and bits."""
    return bool(cache.profile or cache.budget_bits or cache.planned_tokens)


def cache_config_from_pb(cache: pb.CacheConfig) -> KVCacheConfig:
    """The one wire -> config conversion (a request's CacheConfig): the same field names; unset fields take
    KVCacheConfig's defaults (method turboquant_mse, 4 key bits, value bits as the keys, seed 42); bits stay lists
    (one value: every layer, which resolve_spec expands). The wire's own rules come first: a profile excludes method, bits and sinks, and
    profile_fingerprint is the server's to set. Errors name the field as `cache.<field>`."""
    if cache.profile_fingerprint:
        raise ValueError("cache.profile_fingerprint: set by the server, not by requests")
    if asks_for_profile(cache):
        # Name what picked the profile: a request that set only budget_bits or planned_tokens never said "profile".
        chosen = next(f"cache.{name}" for name in ("profile", "budget_bits", "planned_tokens") if getattr(cache, name))
        for field in ("method", "key_bits", "value_bits", "sink_tokens"):
            if getattr(cache, field):
                raise ValueError(f"cache.{field}: must be unset with {chosen} (a profile's configuration decides it)")
    given = dict(sink_tokens=cache.sink_tokens, window=cache.window, profile=cache.profile, budget_bits=cache.budget_bits,
                 planned_tokens=cache.planned_tokens)
    if cache.method:
        given["method"] = cache.method
    for field in ("key_bits", "value_bits"):
        if getattr(cache, field):
            given[field] = list(getattr(cache, field))
    if cache.HasField("seed"):
        given["seed"] = cache.seed
    try:
        return KVCacheConfig(**given)
    except ValueError as error:
        raise ValueError(f"cache.{error}") from None


def cache_config_to_pb(config: KVCacheConfig) -> pb.CacheConfig:
    """The one config -> wire conversion (Session.cache): bits as lists (value bits unset: as the keys); a
    profile's session shows its profile, budget and fingerprint, and no bits (the profile planned them)."""

    def bits(given) -> list[int]:
        return [] if given is None or config.profile else given if isinstance(given, list) else [given]

    return pb.CacheConfig(
        method=config.method, key_bits=bits(config.key_bits), value_bits=bits(config.value_bits),
        sink_tokens=config.sink_tokens, window=config.window, seed=config.seed, profile=config.profile,
        budget_bits=config.budget_bits, profile_fingerprint=config.profile_fingerprint, planned_tokens=config.planned_tokens,
    )


def token_message(token) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        token_id=token.token_id,
        text=token.text,
        offset=token.offset,
        committed_offset=token.committed_offset,
        finish_reason=_FINISH[token.finish_reason],
    )
    if token.finish_reason is not None:
        message.usage.CopyFrom(pb.Usage(prompt_tokens=token.prompt_tokens, generated_tokens=token.generated_tokens))
    return message


def encode_page_token(session_id: str) -> str:
    """The opaque cursor a page ends with: the last session id listed ("" on the last page)."""
    return PAGE_TOKEN_PREFIX + base64.urlsafe_b64encode(session_id.encode()).decode() if session_id else ""


def decode_page_token(token: str) -> str:
    """The session id a page token continues after; ValueError for a token no server wrote."""
    if not token:
        return ""
    session_id = ""
    if token.startswith(PAGE_TOKEN_PREFIX):
        try:
            session_id = base64.urlsafe_b64decode(token[len(PAGE_TOKEN_PREFIX):].encode("ascii")).decode()
        except (binascii.Error, UnicodeError):
            pass
    if not session_id or encode_page_token(session_id) != token:
        raise ValueError(f"page_token: not a token from ListSessions.next_page_token: {token[:64]!r}")
    return session_id
