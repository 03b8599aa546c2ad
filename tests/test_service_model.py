"""The shard serving the embedded SmolLM2-135M over real sockets: multi-turn chat, grpcurl Generate with a
JSON body, bad generation inputs, seeded sampling, Calibrate, and a graceful SIGTERM mid-stream."""

import json
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ShardProcess
from kvshard.wire import kvshard_pb2 as pb
from kvshard.wire import kvshard_pb2_grpc as pb_grpc
from test_service_raw import grpcurl

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def shard(module_tmp):
    server = ShardProcess(module_tmp, "--max-tokens", str(MAX_TOKENS), "--max-prompt-tokens", "200", "--checkpoint-tokens", "4").start()
    yield server
    server.stop()


def test_multi_turn_chat_continues_one_session(client):
    # An fp16 window wider than the whole conversation: this checks that turns share one session (the second
    # answer needs the first turn's context), not quantization quality. Compressed 4-6 bit K/V flip this
    # 135M model's first token between "Paris" and "L'Étoile" with package versions (issue 10).
    session = client.create_session(key_bits=8, value_bits=8, window=512)
    chat = session.chat()
    first = chat.send("What is the capital of France?", max_tokens=10)
    assert "Paris" in first
    after_first = session.offset
    second = chat.send("And of Germany?", max_tokens=10)
    assert "Berlin" in second
    info = session.refresh()
    assert info.offset == session.offset > after_first and info.committed_offset == info.offset
    assert info.last_generate.start_offset == after_first and info.last_generate.finished
    assert info.model_fingerprint == client.server_info().model_fingerprint and len(info.model_fingerprint) == 64
    assert len(chat.history) == 4 and chat.history[3]["content"] == second


def test_grpcurl_generate_with_a_json_body(shard):
    created = json.loads(grpcurl("-plaintext", "-d", '{"cache": {"key_bits": [4]}}', shard.target, "kvshard.v1.KVShard/CreateSession"))
    body = json.dumps({"session_id": created["session_id"], "prompt": "Once upon a time", "max_tokens": 4})
    out = grpcurl("-plaintext", "-d", body, shard.target, "kvshard.v1.KVShard/Generate")
    messages = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert len(messages) == 4 and all("token_id" in m and "text" in m for m in messages)
    assert messages[-1]["finish_reason"] == "LENGTH" and messages[-1]["usage"]["generated_tokens"] == 4
    assert messages[-1]["committed_offset"] == messages[-1]["offset"]


BAD_GENERATE = [
    ("empty prompt", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty"),
    ("no input", dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt: empty"),
    ("empty chat", dict(chat=pb.ChatTurn()), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages: empty"),
    ("bad role", dict(chat=pb.ChatTurn(messages=[pb.ChatMessage(role="robot", content="hi")])), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages[0].role"),
    ("absurd max_tokens", dict(prompt="hi", max_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be in [1, 64]"),
    ("prompt too long", dict(prompt="word " * 300), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_prompt_tokens 200"),
    ("token out of vocab", dict(prompt_tokens=pb.TokenIds(ids=[1, 10**7])), grpc.StatusCode.INVALID_ARGUMENT, "prompt_tokens.ids[1]"),
    ("stop token out of vocab", dict(prompt="hi", stop_token_ids=[10**7]), grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids[0]"),
    ("temperature", dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("top_p", dict(prompt="hi", sampling=pb.SamplingParams(top_p=2)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ("resume an empty session", dict(resume=True), grpc.StatusCode.INVALID_ARGUMENT, "resume"),
    ("replay without resume", dict(prompt="hi", replay_from=0), grpc.StatusCode.INVALID_ARGUMENT, "replay_from"),
    ("stale offset", dict(prompt="hi", expected_offset=7), grpc.StatusCode.ABORTED, "expected_offset: expected 7, the session is at offset 0"),
    ("unknown session", dict(session_id="nobody", prompt="hi"), grpc.StatusCode.NOT_FOUND, "session_id"),
]


@pytest.mark.parametrize("name, fields, code, field", BAD_GENERATE, ids=[case[0] for case in BAD_GENERATE])
def test_bad_generate_inputs_name_the_field(client, name, fields, code, field):
    session = client.create_session()
    request = pb.GenerateRequest(**{"session_id": session.session_id, "max_tokens": 4, **fields})
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.Generate(request))
    assert caught.value.code() == code and field in caught.value.details(), caught.value.details()
    info = client.get_session(session.session_id)
    assert info.offset == 0 and info.version == 1


def test_seeded_sampling_is_reproducible(client):
    draws = []
    for _ in range(2):
        session = client.create_session()
        draws.append([t.token_id for t in session.generate("The weather today is", max_tokens=4, temperature=0.9, top_k=50, seed=7)])
    assert draws[0] == draws[1]


def test_calibrate_allocates_bits_and_applies_them(client):
    prompts = ["The cat sat on the warm mat.", "Rivers flow down to the sea."]  # short: one cheap forward pass
    result = client.calibrate(target_avg_bits=3, bit_choices=(2, 3, 4), mode="key_norm", prompts=prompts, apply=True, window=2, timeout=120)
    assert len(result.sensitivities) == len(result.key_bits) == 30
    assert set(result.key_bits) <= {2, 3, 4} and result.average_bits == 3.0 and result.beta > 1
    info = result.session.refresh()
    assert list(info.cache.key_bits) == result.key_bits and info.cache.window == 2
    with pytest.raises(grpc.RpcError) as caught:
        client.calibrate(target_avg_bits=9, bit_choices=(2, 3))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_avg_bits" in caught.value.details()


def test_sigterm_finishes_the_stream_in_flight(shard, client):
    """Last in this module: the server drains (health NOT_SERVING), the stream completes, the exit is clean."""
    session = client.create_session()
    channel = grpc.insecure_channel(shard.target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="kvshard.v1.KVShard"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stream = pb_grpc.KVShardStub(channel).Generate(pb.GenerateRequest(session_id=session.session_id, prompt="Count: one, two,", max_tokens=12, ignore_eos=True))
    tokens = [next(stream), next(stream)]
    statuses = []

    def follow_health():
        try:
            statuses.extend(m.status for m in watch)
        except grpc.RpcError:
            pass  # the watch ends when the server goes

    watcher = threading.Thread(target=follow_health, daemon=True)
    watcher.start()
    shard.proc.send_signal(signal.SIGTERM)
    tokens += list(stream)
    assert len(tokens) == 12 and tokens[-1].finish_reason == pb.LENGTH and tokens[-1].committed_offset == tokens[-1].offset
    assert shard.proc.wait(60) == 0
    watcher.join(10)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    log = shard.log()
    assert '"event": "draining"' in log and '"event": "stopped"' in log
    channel.close()
