"""The SDK: arrays on the wire, retries that never apply a call twice, exactly-once generation bookkeeping,
one behaviour behind the blocking and asyncio transports, against real servers."""

import argparse
import asyncio
import inspect
import json
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import version

import grpc
import mlx.core as mx
import numpy as np
import pytest

from conftest import ShardProcess, child_env
from kvshard import client as sdk
from kvshard.client import AsyncClient, Client, RetryPolicy
from kvshard.client._common import GenerateProgress, from_tensor, to_tensor
from kvshard.service.cli import serve_parser
from kvshard.wire import kvshard_pb2 as pb


# Import names of the packages the `server` extra brings (pyproject.toml), and of the redis extra.
SERVER_IMPORTS = {
    "mlx": "mlx", "mlx-lm": "mlx_lm", "structlog": "structlog", "tokenizers": "tokenizers", "tqdm": "tqdm",
    "grpcio-health-checking": "grpc_health", "grpcio-reflection": "grpc_reflection", "prometheus-client": "prometheus_client",
    "threadpoolctl": "threadpoolctl",
}


def without(tmp_path, *modules) -> dict:
    """Environment of a child Python in which importing `modules` fails as if they were not installed."""
    folder = tmp_path / ("without-" + "-".join(modules))
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(modules)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
    """))
    return {"PYTHONPATH": str(folder)}


@pytest.fixture(scope="module")
def shard(module_tmp):
    server = ShardProcess(module_tmp, "--model", "none").start()
    yield server
    server.stop()


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection lost after the server applied the call"


class LoseFirstAnswer:
    """A stub whose first call of `method` reaches the server but whose answer is lost."""

    def __init__(self, stub, method):
        self._stub, self._method, self.lost = stub, method, False

    def __getattr__(self, name):
        real = getattr(self._stub, name)
        if name != self._method:
            return real

        def call(*args, **kwargs):
            answer = real(*args, **kwargs)
            if not self.lost:
                self.lost = True
                raise Unavailable()
            return answer

        return call


@pytest.mark.parametrize("method", ["Append", "Trim"])
def test_a_retry_after_a_lost_answer_is_not_applied_twice(shard, method):
    client = Client(shard.target, retry=RetryPolicy(attempts=3, initial_backoff=0.01))
    cache = client.create_cache(head_dim=8, n_kv_heads=2)
    kv = np.ones((2, 3, 8), np.float32)
    cache.append(kv, kv)
    client.stub = LoseFirstAnswer(client.stub, method)
    if method == "Append":
        cache.append(kv, kv)
        expected = 6
    else:
        assert cache.trim(2) == 2
        expected = 1
    assert client.stub.lost and len(cache) == expected
    assert client.get_session(cache.session_id).offset == expected


def test_a_lost_create_answer_returns_the_created_session(shard):
    client = Client(shard.target, retry=RetryPolicy(attempts=3, initial_backoff=0.01))
    client.stub = LoseFirstAnswer(client.stub, "CreateSession")
    cache = client.create_cache(head_dim=8, n_kv_heads=2)
    assert client.stub.lost and [s.session_id for s in client.list_sessions()].count(cache.session_id) == 1


def test_arrays_keep_their_kind_and_dtype():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    assert np.array_equal(from_tensor(to_tensor(x), x), x)
    half = x.astype(np.float16)
    assert to_tensor(half).dtype == pb.FLOAT16 and np.array_equal(from_tensor(to_tensor(half), half), half)
    as_mx = mx.array(x).astype(mx.bfloat16)
    wire = to_tensor(as_mx)
    assert wire.dtype == pb.BFLOAT16 and len(wire.data) == 2 * 24
    back = from_tensor(wire, as_mx)
    assert back.dtype == mx.bfloat16 and mx.array_equal(back, as_mx).item()
    assert to_tensor(x.astype(np.float64)).dtype == pb.FLOAT32


def message(offset, finish=pb.FINISH_REASON_UNSPECIFIED):
    return pb.GenerateResponse(token_id=offset, offset=offset, finish_reason=finish)


def session_at(offset, start, prompt, generated, finished=False):
    return pb.Session(offset=offset, last_generate=pb.GenerateProgress(start_offset=start, prompt_tokens=prompt, generated_tokens=generated, finished=finished))


def test_generate_progress_resends_when_nothing_was_committed():
    request = pb.GenerateRequest(session_id="s", prompt="hi", max_tokens=8, expected_offset=10)
    progress = GenerateProgress(request)
    assert [progress.accept(message(o)) is not None for o in (13, 14)] == [True, True]
    assert progress.next_request(pb.Session(offset=10)) is request
    assert progress.accept(message(13)) is None and progress.accept(message(14)) is None  # replays dropped
    assert progress.accept(message(15)).offset == 15


def test_generate_progress_resumes_after_a_checkpoint():
    progress = GenerateProgress(pb.GenerateRequest(session_id="s", prompt="hi", max_tokens=8, expected_offset=10))
    for offset in range(13, 19):  # prompt of 2 tokens: tokens at offsets 13..18 delivered (6 of 8)
        progress.accept(message(offset))
    resume = progress.next_request(session_at(16, 10, 2, 4))  # the store kept 4 of them
    assert resume.resume and resume.replay_from == 16 and resume.max_tokens == 4 and resume.expected_offset == 16
    assert [progress.accept(message(o)) is not None for o in (17, 18, 19, 20)] == [False, False, True, True]
    assert progress.finished is False


def test_generate_progress_replays_committed_tokens_never_received():
    progress = GenerateProgress(pb.GenerateRequest(session_id="s", prompt="hi", max_tokens=8, expected_offset=10))
    progress.accept(message(13))
    resume = progress.next_request(session_at(20, 10, 2, 8, finished=True))  # the call ended; 7 answers lost
    assert resume.replay_from == 13 and resume.max_tokens == 0
    for offset in range(14, 21):
        assert progress.accept(message(offset, pb.LENGTH if offset == 20 else 0)) is not None
    assert progress.finished
    with pytest.raises(LookupError):
        progress.next_request(session_at(30, 21, 1, 1))  # someone else moved the session


def test_async_client_mirrors_the_sync_one(shard):
    async def scenario():
        async with AsyncClient(shard.target) as client:
            caches = await client.create_caches(2, head_dim=8, n_kv_heads=2, key_bits=3)
            rng = np.random.default_rng(0)
            k, v = (rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(2))
            await asyncio.gather(caches[0].append(k, v), caches[1].append(v, k))
            out = await caches[1].attend(mx.array(k[:, :1]))
            assert isinstance(out, mx.array) and out.shape == (2, 1, 8)
            assert len(caches[0]) == 5 and await caches[0].trim(2) == 2 and len(caches[0]) == 3
            assert await caches[0].memory_bytes() > 0 and await caches[0].nbytes == await caches[0].memory_bytes()
            session_ids = [s.session_id async for s in client.list_sessions(page_size=1)]
            assert caches[0].session_id in session_ids
            await caches[0].delete()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.get_session(caches[0].session_id)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def kvshard(*args, stdin="", env=None, timeout=120):
    """`kvshard ARGS` as a user runs it: a child process; (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "kvshard.service.cli", *args], input=stdin, capture_output=True, text=True,
                          env={**child_env(), **(env or {})}, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_cli_help_lists_commands_and_version_works():
    code, out, err = kvshard("--help")
    assert code == 0 and all(f"  {name} " in out for name in ("serve", "client", "eval", "bench"))
    code, out, _ = kvshard("--version")
    assert code == 0 and out.strip() == f"kvshard {version('kvshard')}"
    code, _, err = kvshard()
    assert code == 2 and "commands:" in err


def test_serve_help_shows_every_flag_with_help_and_default():
    parser = serve_parser(argparse.ArgumentParser())
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags and [a.dest for a in flags if not a.help] == []
    code, out, _ = kvshard("serve", "--help", env={"COLUMNS": "250"})
    assert code == 0 and "(default: sqlite:///data/kvshard.sqlite3)" in out and "(default: 1GiB)" in out
    assert parser.parse_args([]).memory_budget == 1024**3  # the human default parses back to bytes


CLI_ERRORS = [
    ("unknown eval config", ["eval", "--out", "/tmp/kvshard-unused", "--configs", "fp16", "--tokens", "16"], "configs: unknown ['fp16']"),
    ("redis store without the extra", ["serve", "--model", "none", "--port", "0", "--store", "redis://127.0.0.1:6379/0"], "'redis' extra"),
    ("no server there", ["client", "--target", "127.0.0.1:9", "info"], "UNAVAILABLE"),
    ("bad byte size", ["serve", "--memory-budget", "lots"], "not a byte size"),
]


@pytest.mark.parametrize("name, args, says", CLI_ERRORS, ids=[case[0] for case in CLI_ERRORS])
def test_cli_errors_are_one_line_and_a_nonzero_exit(tmp_path, name, args, says):
    code, _, err = kvshard(*args, env=without(tmp_path, "redis") if "redis" in name else None)
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and says in lines[-1], err
    assert len(lines) == 1, err


def test_cli_client_lists_describes_and_deletes(shard):
    with Client(shard.target) as client:
        cache = client.create_cache(head_dim=8, n_kv_heads=2, session_id="cli-listed", labels={"team": "docs"})
        cache.append(np.ones((2, 3, 8), np.float32), np.ones((2, 3, 8), np.float32))
    code, out, _ = kvshard("client", "--target", shard.target, "info")
    assert code == 0 and json.loads(out)["limits"]["max_tokens"] > 0
    code, out, _ = kvshard("client", "--target", shard.target, "list")
    row = next(line.split() for line in out.splitlines() if line.startswith("cli-listed "))
    assert code == 0 and row[1:3] == ["raw", "3"] and row[-1] == "team=docs"
    code, out, _ = kvshard("client", "--target", shard.target, "describe", "cli-listed")
    assert code == 0 and json.loads(out)["layer_offsets"] == ["3"]  # uint64 is a JSON string, as grpcurl prints it
    code, out, _ = kvshard("client", "--target", shard.target, "delete", "cli-listed")
    assert code == 0 and out.strip() == "deleted cli-listed"
    code, _, err = kvshard("client", "--target", shard.target, "describe", "cli-listed")
    assert code == 1 and err.strip() == "kvshard client: error: NOT_FOUND: session_id: no session 'cli-listed'"


TRANSPORT_TWINS = [
    (sdk.Client, sdk.AsyncClient),
    (sdk.RemoteKVCache, sdk.AsyncRemoteKVCache),
    (sdk.RemoteSession, sdk.AsyncRemoteSession),
    (sdk.Chat, sdk.AsyncChat),
]


@pytest.mark.parametrize("blocking, asynchronous", TRANSPORT_TWINS, ids=[pair[0].__name__ for pair in TRANSPORT_TWINS])
def test_both_transports_offer_the_same_methods_and_signatures(blocking, asynchronous):
    def api(cls):
        members = {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}
        return {name: str(inspect.signature(m)) if callable(m) else type(m).__name__ for name, m in members.items()}

    transport_only = {"close"}  # blocking close() vs awaited close(): the same name, different kinds
    assert api(blocking).keys() == api(asynchronous).keys()
    assert {k: v for k, v in api(blocking).items() if k not in transport_only} == {k: v for k, v in api(asynchronous).items() if k not in transport_only}
    assert sdk.RemoteKVCache.nbytes.__doc__ and sdk.AsyncRemoteKVCache.nbytes.__doc__


def test_a_session_object_is_true_even_when_empty(shard):
    with Client(shard.target) as client:
        cache = client.create_cache(head_dim=8, n_kv_heads=2)
        assert len(cache) == 0 and cache
        session = sdk.RemoteSession(client, pb.Session(session_id="fresh"))
        assert len(session) == 0 and session


@pytest.mark.parametrize("token", ["nonsense", "p1.", "p1.!!!", "p1.bm9ib2R5==x"])
def test_a_page_token_the_server_never_wrote_is_invalid_argument(shard, token):
    with Client(shard.target) as client:
        client.create_cache(head_dim=8, n_kv_heads=2)
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ListSessions(pb.ListSessionsRequest(page_size=1, page_token=token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in caught.value.details()
        listed = [s.session_id for s in client.list_sessions(page_size=1)]  # the tokens it writes still page
        assert len(listed) == len(set(listed)) >= 2


@pytest.fixture(scope="module")
def model_shard(module_tmp):
    server = ShardProcess(module_tmp, "--max-tokens", "8", "--checkpoint-tokens", "4", store=f"sqlite:///{module_tmp}/model.sqlite3").start()
    yield server
    server.stop()


def test_generate_without_max_tokens_then_replay_from_an_offset(model_shard):
    with Client(model_shard.target) as client:
        session = client.create_session()
        tokens = list(session.generate("Once upon a time", ignore_eos=True))
        progress = client.get_session(session.session_id).last_generate
        assert len(tokens) == progress.max_tokens == 8  # the default, 64, capped by --max-tokens 8
        start = tokens[2].offset - 1
        replayed = list(session.generate(resume=True, replay_from=start, max_tokens=0))
        assert [(t.offset, t.token_id) for t in replayed] == [(t.offset, t.token_id) for t in tokens[2:]]
        assert replayed[-1].finish_reason == "length" and len(session) == tokens[-1].offset


def test_the_default_retry_policy_rides_out_a_restart(model_shard):
    with Client(model_shard.target) as client:
        session = client.create_session(window=4)
        received = []
        for token in session.generate("The history of the printing press", max_tokens=8, ignore_eos=True):
            received.append(token)
            if len(received) == 3:
                model_shard.kill9()
                model_shard.start(wait=False)  # the model loads again: UNAVAILABLE for several seconds
        offsets = [t.offset for t in received]
        assert offsets == list(range(offsets[0], offsets[0] + 8))  # every token once, none lost
        assert client.get_session(session.session_id).offset == offsets[-1]


SDK_ONLY = """
import sys
import numpy as np
from kvshard.client import Client

with Client(sys.argv[1]) as client:
    cache = client.create_cache(head_dim=8, n_kv_heads=2, key_bits=3)
    cache.append(np.ones((2, 4, 8), np.float32), np.ones((2, 4, 8), np.float32))
    out = cache.attend(np.ones((4, 1, 8), np.float32))
    print(len(cache), out.shape, cache.nbytes > 0)
    cache.delete()
print(sorted({m.split(".")[1] for m in sys.modules if m.startswith("kvshard.")}))
"""


def test_the_sdk_stands_alone_on_grpcio_protobuf_numpy(shard, tmp_path):
    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert {re.split(r"[<>=\[; ]", d)[0] for d in project["dependencies"]} == {"grpcio", "protobuf", "numpy"}
    assert {re.split(r"[<>=\[; ]", d)[0] for d in project["optional-dependencies"]["server"]} == set(SERVER_IMPORTS)
    sdk_only = {**child_env(), **without(tmp_path, *SERVER_IMPORTS.values(), "redis")}
    done = subprocess.run([sys.executable, "-c", SDK_ONLY, shard.target], capture_output=True, text=True, env=sdk_only, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["4 (4, 1, 8) True", "['client', 'wire']"]
    code, out, _ = kvshard("client", "--target", shard.target, "info", env=sdk_only)
    assert code == 0 and "limits" in json.loads(out)
    code, _, err = kvshard("serve", "--model", "none", env=sdk_only)
    assert code == 1 and "'server' extra" in err and len(err.strip().splitlines()) == 1, err
