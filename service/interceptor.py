"""The one wrapper around every kvshard RPC: readiness, auth, error -> status mapping, the log line, metrics.

Handlers stay thin: they raise, and this turns the exception into a gRPC status through errors.status_for.
Health and reflection pass through untouched (probes and grpcurl need no token).
"""

import asyncio
import time

import grpc

from kvshard.service import logs, metrics
from kvshard.service.auth import Authenticator, set_current_tenant
from kvshard.service.errors import NotReady, status_for

SERVICE_PREFIX = "/kvshard.v1.KVShard/"


class ShardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, readiness):
        self.auth = auth
        self.readiness = readiness  # callable -> None when ready, else the reason the shard cannot serve

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.removeprefix(SERVICE_PREFIX)
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, metadata, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(method, metadata, handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method, metadata, behavior):
        async def call(request, context):
            rpc = _Rpc(method)
            try:
                self._admit(metadata, rpc)
                return await behavior(request, context)
            except BaseException as error:
                await rpc.fail(error, context)
            finally:
                rpc.finish()

        return call

    def _stream(self, method, metadata, behavior):
        async def call(request, context):
            rpc = _Rpc(method)
            try:
                self._admit(metadata, rpc)
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                await rpc.fail(error, context)
            finally:
                rpc.finish()

        return call

    def _admit(self, metadata, rpc: "_Rpc") -> None:
        reason = self.readiness()
        if reason is not None:
            raise NotReady(reason)
        tenant = self.auth.tenant_for(metadata)
        set_current_tenant(tenant)
        rpc.fields["tenant"] = tenant


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
        await context.abort(self.code, details, trailing_metadata=trailers)

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        method = self.fields.pop("method")
        metrics.RPCS.labels(method, self.code.name).inc()
        metrics.RPC_SECONDS.labels(method).observe(seconds)
        logs.logger().info("rpc", method=method, status=self.code.name, duration_ms=round(1000 * seconds, 2), **self.fields)
