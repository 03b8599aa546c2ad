"""The shard process: a grpc.aio server over one SessionManager, with health, reflection, metrics and a
graceful SIGTERM.

Start-up order: bind the port and answer health NOT_SERVING, load the model on the MLX thread, then SERVING.
Shutdown: health NOT_SERVING, stop taking RPCs, let in-flight ones finish (each commits before it answers),
then close the store.
"""

import asyncio
import signal
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvshard.service import logs, memory
from kvshard.service.auth import Authenticator
from kvshard.service.handlers import KVShardServicer
from kvshard.service.interceptor import ShardInterceptor
from kvshard.service.metrics import observe_caches, serve_metrics
from kvshard.service.scheduler import DEFAULT_MAX_BATCH, Scheduler
from kvshard.service.sessions import Limits, SessionManager
from kvshard.service.store import open_store
from kvshard.service.worker import SerialExecutor
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc

class PortInUse(RuntimeError):
    pass


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVShard"].full_name
NO_MODEL = "none"
TRIM_INTERVAL_S = 1.0  # how often the C heaps' free pages go back to the system (memory.trim)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    store: str = "sqlite:///data/kvshard.sqlite3"
    model: str = "smollm2-135m"  # or "none": raw cache sessions only
    limits: Limits = field(default_factory=Limits)
    auth_tokens: list[str] = field(default_factory=list)  # TOKEN=TENANT
    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    observe_caches: bool = False  # cache observers feeding the metrics (a sync and a decode per encode)
    log_format: str = "json"
    grace_s: float = 30.0
    lease_ttl_s: float = 10.0  # shared stores: how long a session stays leased to this shard after its last use
    max_batch_size: int = DEFAULT_MAX_BATCH  # Generate streams decoded in one forward pass
    batch_order: str = "round-robin"  # which due streams a full batch takes first (service/scheduler.py)


def package_version() -> str:
    try:
        return version("kvshard")
    except PackageNotFoundError:
        return "0+unknown"


class Shard:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.log = logs.logger()
        memory.configure(config.limits.memory_budget_bytes)  # before gRPC starts its threads (their malloc arenas)
        self.auth = Authenticator.from_specs(config.auth_tokens, config.auth_tokens_file)
        self.store = open_store(config.store)
        self.mlx = SerialExecutor("kvshard-mlx")
        self.io = SerialExecutor("kvshard-store")
        self.manager = SessionManager(self.store, self.mlx, self.io, None, config.limits, config.lease_ttl_s)
        self.not_ready = "loading"  # None once serving; the interceptor answers UNAVAILABLE with this reason
        self.health = health.aio.HealthServicer()
        message_limit = config.limits.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[ShardInterceptor(self.auth, lambda: self.not_ready, self.manager.reserve_call)],
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # gRPC sets SO_REUSEPORT by default: a second shard on the port would start and share its traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.scheduler = Scheduler(self.mlx, config.max_batch_size, config.batch_order)
        self.servicer = KVShardServicer(self.manager, package_version(), self.auth.required, self.scheduler)
        pb_grpc.add_KVShardServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self._bind()
        self._stopping = asyncio.Event()

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        if bool(self.config.tls_cert) != bool(self.config.tls_key):
            raise ValueError("tls: give both --tls-cert and --tls-key")
        try:
            if self.config.tls_cert:
                with open(self.config.tls_key, "rb") as key, open(self.config.tls_cert, "rb") as cert:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise PortInUse(f"cannot listen on {address}: the port is in use (another shard?) or the address is not local")
        return port

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def run(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.log.info("listening", host=self.config.host, port=self.port, store=self.store.kind, tls=bool(self.config.tls_cert))
        if self.config.observe_caches:
            observe_caches()
        if self.config.metrics_port:
            serve_metrics(self.config.metrics_port, self.config.host, self.manager, self.scheduler)
        if self.config.model != NO_MODEL:
            # Imported here: a raw-cache shard never needs the model loader (and its transformers import).
            from kvshard.service.model import ServedModel

            self.manager.model = await self.mlx.run(ServedModel.load, self.config.model)
            self.log.info("model loaded", model=self.config.model, fingerprint=self.manager.model.fingerprint)
        await self.mlx.run(memory.warm_up)
        memory.trim()
        self.manager.watch_resident()
        self.not_ready = None
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.log.info("serving", port=self.port)
        background = [asyncio.create_task(self._expire_idle()), asyncio.create_task(self._trim_memory())]
        if self.store.shared:
            background.append(asyncio.create_task(self.manager.renew_leases()))
        await self._stopping.wait()
        for task in background:
            task.cancel()
        await self.stop()

    async def stop(self) -> None:
        self.log.info("draining", grace_s=self.config.grace_s)
        self.not_ready = "draining"
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)
        if self.store.shared:
            await self.manager.release_leases()
        self.servicer.calibrations.stop()
        self.mlx.shutdown()
        self.io.shutdown()
        self.store.close()
        self.log.info("stopped")

    async def _trim_memory(self) -> None:
        while True:
            await asyncio.sleep(TRIM_INTERVAL_S)
            memory.trim()

    async def _expire_idle(self) -> None:
        ttl = self.config.limits.session_ttl_s
        if not ttl:
            return
        while True:
            await asyncio.sleep(min(max(ttl / 4, 1), 60))
            expired = await self.manager.expire_idle()
            if expired:
                self.log.info("sessions expired", count=expired)


async def serve(config: ServeConfig) -> None:
    logs.configure(config.log_format)
    await Shard(config).run()
