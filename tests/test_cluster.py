"""Past one machine: nginx in front of shards on a shared Redis (or Redis Cluster) store, started by
deploy/local-cluster.sh, with real processes on loopback: a shard killed mid-Generate, a paused owner fenced."""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def render_nginx(run_dir: Path, listen: str, servers: list[str]) -> str:
    lines = "".join(f"        server {s} max_fails=1 fail_timeout=5s;\n" for s in servers)
    return subprocess.run([DEPLOY / "render-nginx.sh", str(run_dir), listen, lines], check=True, capture_output=True, text=True).stdout


def nginx_test(config: str, run_dir: Path) -> subprocess.CompletedProcess:
    path = run_dir / "nginx.conf"
    path.write_text(config)
    return subprocess.run([NGINX, "-t", "-c", str(path), "-p", str(run_dir)], capture_output=True, text=True)


@needs_nginx
def test_the_nginx_config_is_valid_and_hashes_the_client_session_header(tmp_path):
    from kvshard.client import Client
    from kvshard.wire import kvshard_pb2 as pb

    config = render_nginx(tmp_path / "run", "127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"])
    checked = nginx_test(config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    (header,) = [name for name, _ in Client("127.0.0.1:1").call_metadata(pb.GenerateRequest(session_id="s"))]
    assert f"hash $http_{header.replace('-', '_')} consistent;" in config and "grpc_pass grpc://kvshard;" in config
    broken = nginx_test(config.replace("grpc_pass grpc://kvshard;", "grpc_pass grpc://nowhere;"), tmp_path)
    assert broken.returncode != 0 and "no live upstreams" not in broken.stderr  # nginx -t really reads it


def upstream_lines_of(config: str) -> list[str]:
    return [line.split()[1] for line in config.splitlines() if line.strip().startswith("server ") and ":" in line]


def test_compose_and_kubernetes_carry_the_rendered_nginx_config(tmp_path):
    import yaml

    compose_conf = (DEPLOY / "nginx" / "compose.conf").read_text()
    assert compose_conf == render_nginx(Path("/tmp"), "8080", upstream_lines_of(compose_conf))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {f"shard-{i}:50051" for i in range(3)} == set(upstream_lines_of(compose_conf)) and {f"shard-{i}" for i in range(3)} <= set(compose["services"])
    assert compose["services"]["nginx"]["volumes"] == ["./nginx/compose.conf:/etc/kvshard/nginx.conf:ro"]
    assert (DEPLOY / compose["services"]["shard-0"]["build"]["dockerfile"].removeprefix("deploy/")).exists()
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "kvshard.yaml").read_text()))
    k8s_conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["nginx.conf"]
    shards = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "kvshard")
    names = [f"kvshard-{i}.{shards['spec']['serviceName']}:50051" for i in range(shards["spec"]["replicas"])]
    assert upstream_lines_of(k8s_conf) == names and k8s_conf == render_nginx(Path("/tmp"), "8080", names)


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    import yaml

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "kvshard.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "ConfigMap", "Deployment"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)  # raises ValidationError naming the field
    broken = dict(docs[0], spec=dict(docs[0]["spec"], replicas="three"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)
    probes = next(d for d in docs if d["metadata"]["name"] == "kvshard")["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["grpc"]["service"] == "kvshard.v1.KVShard"


@pytest.mark.slow
def test_the_images_install_script_installs_a_working_shard(tmp_path):
    """deploy/install-image.sh is every RUN of both Dockerfiles that installs kvshard: run it in a fresh venv."""
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        assert "RUN deploy/install-image.sh /src " in (DEPLOY / dockerfile).read_text()
    venv = tmp_path / "venv"
    subprocess.run([os.sys.executable, "-m", "venv", str(venv)], check=True)
    env = child_env() | {"PATH": f"{venv}/bin:{os.environ['PATH']}"}
    done = subprocess.run([DEPLOY / "install-image.sh", str(ROOT), "cpu"], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "embedded model:" in done.stdout
    served = subprocess.run([venv / "bin" / "kvshard", "serve", "--help"], env=env, capture_output=True, text=True)
    assert "--lease-ttl" in served.stdout


class LocalCluster:
    """deploy/local-cluster.sh N as a child process; its cluster.env says what runs where."""

    def __init__(self, run_dir: Path, shards: int, *args: str, redis_cluster: bool = False, lease_ttl: float = 2):
        self.run_dir = run_dir
        env = child_env() | {"KVSHARD_RUN_DIR": str(run_dir), "KVSHARD_PYTHON": os.sys.executable, "LEASE_TTL": str(lease_ttl)}
        command = [str(DEPLOY / "local-cluster.sh"), str(shards), *(["--redis-cluster"] if redis_cluster else []), "--", *args]
        self.log = open(run_dir.parent / f"{run_dir.name}.out", "wb")
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not (run_dir / "cluster.env").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"local-cluster.sh did not come up:\n{Path(self.log.name).read_text()}")
            time.sleep(0.5)
        self.env = dict(line.split("=", 1) for line in (run_dir / "cluster.env").read_text().split())
        self.front = self.env["FRONT"]
        self.shard_ports = [int(p) for p in self.env["SHARD_PORTS"].split(",")]
        self.shard_pids = [int(p) for p in self.env["SHARD_PIDS"].split(",")]

    def shard_log(self, i: int) -> str:
        return (self.run_dir / f"shard-{i}.log").read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class CountingRetry:
    """The client's retry policy, counting the retries it grants."""

    def __init__(self):
        from kvshard.client import RetryPolicy

        self.policy = RetryPolicy(attempts=8)
        self.used = 0

    def delays(self):
        for delay in self.policy.delays():
            self.used += 1
            yield delay


PROMPTS = [f"Write one sentence about the number {i}." for i in range(20)]
TOKENS = 10


def drive_sessions(front: str, prefix: str, on_token=None) -> tuple[dict, dict]:
    """20 sessions through the front, one thread each: {i: token ids}, {i: retries used}."""
    from kvshard.client import Client

    outputs, retries, errors = {}, {}, []

    def one(i):
        retry = CountingRetry()
        try:
            with Client(front, retry=retry, timeout=120) as client:
                session = client.create_session(session_id=f"{prefix}{i}", key_bits=4, value_bits=3)
                outputs[i] = []
                for token in session.generate(PROMPTS[i], max_tokens=TOKENS, ignore_eos=True):
                    outputs[i].append(token.token_id)
                    if on_token:
                        on_token()
        except Exception as error:  # reported below, with the session
            errors.append((i, error))
        retries[i] = retry.used

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    assert not errors, errors
    return outputs, retries


def kill_one_shard_mid_generate(cluster: LocalCluster, victim: int = 0) -> None:
    reference, _ = drive_sessions(cluster.front, "ref-")
    streamed = [0]
    lock = threading.Lock()
    killed = threading.Event()

    def on_token():
        with lock:
            streamed[0] += 1
            if streamed[0] == 2 * len(PROMPTS) and not killed.is_set():
                os.kill(cluster.shard_pids[victim], signal.SIGKILL)
                killed.set()

    outputs, retries = drive_sessions(cluster.front, "cut-", on_token)
    assert killed.is_set()
    assert outputs == reference  # every session, greedy, identical to the uninterrupted run
    cut = [i for i, used in retries.items() if used]
    served_by_victim = [i for i in range(len(PROMPTS)) if f'"cut-{i}"' in cluster.shard_log(victim)]
    assert served_by_victim and set(cut) <= set(served_by_victim), (cut, served_by_victim)
    assert max(retries.values()) <= 1, retries  # one retried UNAVAILABLE per cut stream, nothing else


@pytest.fixture(scope="module")
def cluster(module_tmp):
    if not os.path.exists(NGINX) or shutil.which("redis-server") is None:
        pytest.skip("needs nginx and redis-server")
    running = LocalCluster(module_tmp / "single", 3, "--checkpoint-tokens", "2")
    yield running
    running.stop()


@pytest.mark.slow
def test_a_paused_owner_is_fenced_and_the_session_continues_elsewhere(cluster, smollm):
    from kvshard.client import NO_RETRY, Client

    owner, other = (f"127.0.0.1:{p}" for p in cluster.shard_ports[1:3])
    owner_pid = cluster.shard_pids[1]
    session = Client(owner, retry=NO_RETRY).create_session(session_id="fence-me", key_bits=4)
    seen, failure = [], []

    def generate_on_owner():
        try:
            for token in session.generate("Tell me a long story about a dragon.", max_tokens=40, ignore_eos=True):
                seen.append(token)
                if len(seen) == 3:
                    os.kill(owner_pid, signal.SIGSTOP)  # mid-Generate, after a checkpoint (every 2 tokens)
        except grpc.RpcError as error:
            failure.append(error)

    stream = threading.Thread(target=generate_on_owner)
    stream.start()
    try:
        while len(seen) < 3 and stream.is_alive():
            time.sleep(0.05)
        time.sleep(0.2)
        taker = Client(other)
        moved = taker.session("fence-me")  # the owner is stopped; its lease runs out (2 s) and `other` takes over
        taken = [t.token_id for t in moved.generate(" The end.", max_tokens=3, ignore_eos=True)]
        after_takeover = taker.get_session("fence-me", include_token_ids=True)
    finally:
        os.kill(owner_pid, signal.SIGCONT)
    stream.join(120)
    assert failure, "the old owner's Generate went on writing after it lost its lease"
    assert failure[0].code() == grpc.StatusCode.UNAVAILABLE and "no longer owns" in failure[0].details()
    final = taker.get_session("fence-me", include_token_ids=True)
    assert list(final.token_ids) == list(after_takeover.token_ids) and final.offset == after_takeover.offset
    assert list(final.token_ids)[-3:] == taken
    # The old owner serves the session again once it takes the lease: from what the store holds.
    back = Client(owner).session("fence-me")
    assert back.refresh().offset == final.offset


@pytest.mark.slow
def test_twenty_sessions_through_nginx_survive_a_shard_killed_mid_generate(cluster, smollm):
    kill_one_shard_mid_generate(cluster, victim=0)


@pytest.mark.slow
def test_on_a_redis_cluster_a_killed_shard_and_a_killed_master_lose_nothing(tmp_path, smollm):
    if not os.path.exists(NGINX) or shutil.which("redis-server") is None:
        pytest.skip("needs nginx and redis-server")
    running = LocalCluster(tmp_path / "rc", 3, "--checkpoint-tokens", "2", redis_cluster=True)
    try:
        kill_one_shard_mid_generate(running, victim=0)
        # Now a master: every acknowledged commit was WAITed onto its replica, which Redis promotes.
        from kvshard.client import Client
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode("127.0.0.1", int(p.rsplit(":", 1)[1])) for p in running.env["REDIS_PORTS"].split(",")]
        store = RedisCluster(startup_nodes=nodes)
        key = "kvshard:{cut-3}:session"
        master = store.get_node_from_key(key)
        before = Client(running.front).get_session("cut-3", include_token_ids=True)
        pids = dict(zip((n.port for n in nodes), (int(p) for p in running.env["REDIS_PIDS"].split(","))))
        os.kill(pids[master.port], signal.SIGKILL)
        session = Client(running.front, retry=CountingRetry()).session("cut-3")
        more = [t.token_id for t in session.generate(" Then", max_tokens=3, ignore_eos=True)]
        after = Client(running.front).get_session("cut-3", include_token_ids=True)
        assert list(after.token_ids)[: len(before.token_ids)] == list(before.token_ids) and list(after.token_ids)[-3:] == more
        assert RedisCluster(startup_nodes=[n for n in nodes if n.port != master.port]).get_node_from_key(key).port != master.port
    finally:
        running.stop()
