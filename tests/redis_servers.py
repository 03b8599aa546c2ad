"""Real redis-server processes for the store and cluster tests: one Redis, or a Redis Cluster of 3 masters
(optionally each with a replica) built with `redis-cli --cluster create`, all on loopback free ports."""

import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import free_port

# fsync every write, as the durability contract asks of a Redis store.
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


def redis_binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    return server, cli


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


class RedisNode:
    def __init__(self, directory, *extra: str):
        server, _ = redis_binaries()
        self.port = _cluster_port() if "--cluster-enabled" in extra else free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), *DURABLE, *extra],
            stdout=subprocess.DEVNULL,
        )
        self._wait()

    def _wait(self) -> None:
        import redis

        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


class RedisCluster:
    """3 masters (slots split evenly by redis-cli), each with `replicas` replicas."""

    def __init__(self, directory, replicas: int = 0):
        _, cli = redis_binaries()
        self.nodes = [
            RedisNode(directory / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000")
            for i in range(3 * (1 + replicas))
        ]
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in self.live()):
                return
            time.sleep(0.2)
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    def live(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def master_of(self, key: str) -> RedisNode:
        """The node that serves the slot of `key` now (after a failover: the promoted replica)."""
        client = self.live()[0].client()
        slot = client.execute_command("CLUSTER", "KEYSLOT", key)
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == master[1])
        raise LookupError(f"no master serves slot {slot}")

    def flush(self) -> None:
        for node in self.live():
            if node.client().execute_command("ROLE")[0] == b"master":
                node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
