"""The one wrapper around every kvshard RPC: readiness, auth, error -> status mapping, the log line, metrics.

Handlers stay thin: they raise, and this turns the exception into a gRPC status through errors.status_for.
Request bodies arrive as bytes and are parsed here, after readiness and auth, so an undecodable body is an
INVALID_ARGUMENT that is logged and counted like any other call (gRPC's own parser would answer UNKNOWN
before any of this ran), and a call's working memory is reserved against the memory budget from the body's
size before it is parsed and held until the RPC is done, its answer sent (SessionManager.reserve_call). Health
and reflection pass through untouched (probes and grpcurl need no token).
"""

import asyncio
import time

import grpc
from google.protobuf.message import DecodeError

from kvshard.service import logs, metrics
from kvshard.service.auth import Authenticator, set_current_tenant
from kvshard.service.errors import NotReady, status_for

SERVICE_PREFIX = "/kvshard.v1.KVShard/"


class ShardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, readiness, reserve_call):
        self.auth = auth
        self.readiness = readiness  # callable -> None when ready, else the reason the shard cannot serve
        self.reserve_call = reserve_call  # async (method, request bytes) -> the function that releases the reservation

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.removeprefix(SERVICE_PREFIX)
        metadata = details.invocation_metadata
        parse = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, metadata, parse, handler.unary_unary), response_serializer=handler.response_serializer
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(method, metadata, parse, handler.unary_stream), response_serializer=handler.response_serializer
        )

    def _unary(self, method, metadata, parse, behavior):
        async def call(body, context):
            rpc = _Rpc(method)
            try:
                self._admit(metadata, rpc)
                await self._reserve(method, body)
                return await behavior(_parsed(method, parse, body), context)
            except BaseException as error:
                del body  # an aborted call's traceback outlives it (see _Rpc.fail): not with the request's bytes
                await rpc.fail(error, context)
            finally:
                rpc.finish()

        return call

    def _stream(self, method, metadata, parse, behavior):
        async def call(body, context):
            rpc = _Rpc(method)
            try:
                self._admit(metadata, rpc)
                await self._reserve(method, body)
                async for response in behavior(_parsed(method, parse, body), context):
                    yield response
            except BaseException as error:
                del body  # an aborted call's traceback outlives it (see _Rpc.fail): not with the request's bytes
                await rpc.fail(error, context)
            finally:
                rpc.finish()

        return call

    async def _reserve(self, method: str, body: bytes) -> None:
        """The call's working memory, held until gRPC has sent its answer (or the call ended otherwise): until the
        task serving the RPC is done. (Not context.add_done_callback: that ties the context and gRPC's call
        state in a reference cycle, and an aborted call's traceback, with its request and arrays, would then
        stay alive until the garbage collector's next full pass.)"""
        release = await self.reserve_call(method, len(body))
        asyncio.current_task().add_done_callback(lambda _: release())

    def _admit(self, metadata, rpc: "_Rpc") -> None:
        reason = self.readiness()
        if reason is not None:
            raise NotReady(reason)
        tenant = self.auth.tenant_for(metadata)
        set_current_tenant(tenant)
        rpc.fields["tenant"] = tenant


def _parsed(method: str, parse, body: bytes):
    try:
        return parse(body)
    except (DecodeError, RecursionError) as error:
        metrics.MALFORMED.labels(method).inc()
        raise ValueError(f"request: not a valid {method} request body ({len(body)} bytes): {error}") from None


def _drop_tracebacks(error: BaseException | None) -> None:
    """gRPC keeps an aborted call's AbortError in a reference cycle with the call's state, and that error's
    context is the handler's error: with their tracebacks gone, the handler's frames (the request's arrays, a
    session dropped meanwhile) are freed when the call ends, not at the garbage collector's next full pass."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


class _Rpc:
    """Timing, status and log fields of one call."""

    def __init__(self, method: str):
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.fields = {"method": method}
        logs.start_rpc(self.fields)

    async def fail(self, error: BaseException, context) -> None:
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
            raise error
        if isinstance(error, grpc.aio.AbortError):
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise error
        self.code, details, trailers = status_for(error)
        self.fields["error"] = details
        if self.code == grpc.StatusCode.INTERNAL:
            logs.logger().error("internal error", method=self.fields["method"], exc_info=error)
        _drop_tracebacks(error)
        await context.abort(self.code, details, trailing_metadata=trailers)

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        method = self.fields.pop("method")
        metrics.RPCS.labels(method, self.code.name).inc()
        metrics.RPC_SECONDS.labels(method).observe(seconds)
        logs.logger().info("rpc", method=method, status=self.code.name, duration_ms=round(1000 * seconds, 2), **self.fields)
