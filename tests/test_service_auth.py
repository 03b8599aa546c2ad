"""Bearer-token auth with tenants, over TLS: no token, a wrong token and another tenant's sessions."""

import shutil
import subprocess

import grpc
import numpy as np
import pytest

from conftest import ShardProcess
from kvshard.client import NO_RETRY, Client
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc
from kvshard.wire.tensors import from_numpy


@pytest.fixture(scope="module")
def certificate(module_tmp):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = module_tmp / "key.pem", module_tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def shard(module_tmp, certificate):
    key, cert = certificate
    tokens = module_tmp / "tokens.txt"
    tokens.write_text("# token=tenant\nbob-token=bob\n")
    server = ShardProcess(
        module_tmp, "--model", "none", "--auth-token", "alice-token=alice", "--auth-tokens-file", str(tokens),
        "--tls-cert", str(cert), "--tls-key", str(key),
    ).start(wait=False)
    server.wait_serving(credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    yield server
    server.stop()


def connect(shard, certificate, token):
    return Client(shard.target, token=token, tls=str(certificate[1]), retry=NO_RETRY)


def test_tenants_never_see_each_others_sessions(shard, certificate):
    alice, bob = connect(shard, certificate, "alice-token"), connect(shard, certificate, "bob-token")
    cache = alice.create_cache(head_dim=8, n_kv_heads=1, session_id="alice-notes")
    cache.append(np.ones((1, 2, 8), np.float32), np.ones((1, 2, 8), np.float32))
    assert alice.server_info().tenant == "alice" and bob.server_info().tenant == "bob"
    assert [s.session_id for s in alice.list_sessions()] == ["alice-notes"]
    assert list(bob.list_sessions()) == []
    ones = from_numpy(np.ones((1, 1, 8), np.float32), pb.FLOAT32)
    for attempt in (
        lambda: bob.get_session("alice-notes"),
        lambda: bob.delete_session("alice-notes"),
        lambda: bob.stub.Append(pb.AppendRequest(session_id="alice-notes", keys=ones, values=ones), metadata=bob.metadata),
        lambda: bob.stub.Attend(pb.AttendRequest(session_id="alice-notes", queries=ones), metadata=bob.metadata),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            attempt()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Ids are per tenant: bob's "alice-notes" is his own session, as if alice's did not exist.
    bobs = bob.create_cache(head_dim=8, n_kv_heads=1, session_id="alice-notes")
    assert len(bobs) == 0 and [s.session_id for s in bob.list_sessions()] == ["alice-notes"]
    assert alice.get_session("alice-notes").offset == 2


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_calls_without_a_valid_token_are_unauthenticated(shard, certificate, token):
    client = connect(shard, certificate, token)
    with pytest.raises(grpc.RpcError) as caught:
        client.server_info()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in caught.value.details()


def test_health_needs_no_token_and_plaintext_is_refused(shard, certificate):
    channel = grpc.secure_channel(shard.target, grpc.ssl_channel_credentials(certificate[1].read_bytes()))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    plaintext = grpc.insecure_channel(shard.target)
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.KVShardStub(plaintext).ServerInfo(pb.ServerInfoRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
