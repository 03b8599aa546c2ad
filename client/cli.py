"""`kvshard client`: the common operator tasks against a running shard, without composing JSON for grpcurl.

    kvshard client info                   the server: version, model, limits
    kvshard client list                   sessions, one line each
    kvshard client describe SESSION_ID    one session as JSON (what GetSession answers)
    kvshard client delete SESSION_ID ...
    kvshard client chat [SESSION_ID]      a chat on the terminal; each line you type is one turn (the session
                                          is continued, or created under that id)

Only the SDK is needed (grpcio, protobuf, numpy).
"""

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from kvshard.client._common import RetryPolicy
from kvshard.client.sync import Client
from kvshard.wire import kvshard_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kvshard client", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    top.add_argument("--target", default=os.environ.get("KVSHARD_TARGET", DEFAULT_TARGET), help="host:port of the shard ($KVSHARD_TARGET)")
    top.add_argument("--token", default=os.environ.get("KVSHARD_TOKEN"), help="bearer token, when the shard has auth on ($KVSHARD_TOKEN)")
    top.add_argument("--tls", metavar="CA_PEM", help="use TLS, trusting this root certificate ('system': the system roots)")
    top.add_argument("--timeout", type=float, default=30.0, help="seconds each call may take")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="the server: version, model, limits, auth")
    listing = commands.add_parser("list", help="sessions, one line each")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of columns")
    describe = commands.add_parser("describe", help="one session as JSON")
    describe.add_argument("session_id")
    describe.add_argument("--token-ids", action="store_true", help="include the session's token ids")
    delete = commands.add_parser("delete", help="delete sessions")
    delete.add_argument("session_ids", nargs="+", metavar="SESSION_ID")
    chat = commands.add_parser("chat", help="chat on the terminal; one line is one turn (Ctrl-D ends)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chat.add_argument("session_id", nargs="?", help="continue this model session, or create it under this id (default: a new id)")
    chat.add_argument("--system", help="system prompt of a new conversation")
    chat.add_argument("--max-tokens", type=int, default=128, help="most tokens of one reply")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--key-bits", type=int, default=4, help="key bits of a new session")
    chat.add_argument("--value-bits", type=int, help="value bits of a new session (default: the key bits)")
    chat.add_argument("--window", type=int, default=16, help="recent tokens a new session keeps in fp16")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tls = None if args.tls is None else True if args.tls == "system" else args.tls
    # A one-off command should say "unavailable" within a second; a chat rides out a restart like the SDK.
    retry = RetryPolicy() if args.command == "chat" else RetryPolicy(attempts=4)
    with Client(args.target, token=args.token, tls=tls, timeout=args.timeout, retry=retry) as client:
        COMMANDS[args.command](client, args)


def _json(message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2)


def info(client: Client, args) -> None:
    print(_json(client.server_info()))


def list_sessions(client: Client, args) -> None:
    if not args.json:
        print(f"{'SESSION_ID':<34} {'KIND':<5} {'TOKENS':>7} {'MEMORY_BYTES':>13} {'STORED_BYTES':>13}  LABELS")
    for session in client.list_sessions():
        if args.json:
            print(json.dumps(MessageToDict(session, preserving_proto_field_name=True)))
            continue
        kind = "raw" if session.kind == pb.RAW else "model"
        labels = ",".join(f"{k}={v}" for k, v in sorted(session.labels.items()))
        print(f"{session.session_id:<34} {kind:<5} {session.offset:>7} {session.memory_bytes:>13} {session.stored_bytes:>13}  {labels}")


def describe(client: Client, args) -> None:
    print(_json(client.get_session(args.session_id, include_token_ids=args.token_ids)))


def delete(client: Client, args) -> None:
    for session_id in args.session_ids:
        client.delete_session(session_id)
        print(f"deleted {session_id}")


def chat(client: Client, args) -> None:
    session = _existing_session(client, args.session_id) if args.session_id else None
    if isinstance(session, list):
        raise ValueError(f"session_id: {args.session_id!r} is a raw cache session; chat needs a model session")
    fresh = session is None
    if fresh:
        options = dict(key_bits=args.key_bits, value_bits=args.value_bits, window=args.window)
        session = client.create_session(session_id=args.session_id, **options)
    print(f"session {session.session_id} (continue it later: kvshard client chat {session.session_id})", file=sys.stderr)
    conversation = session.chat(system=args.system if fresh else None)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        for text in conversation.stream(line.strip(), max_tokens=args.max_tokens, temperature=args.temperature):
            print(text, end="", flush=True)
        print()


def _existing_session(client: Client, session_id: str):
    try:
        return client.session(session_id)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


COMMANDS = {"info": info, "list": list_sessions, "describe": describe, "delete": delete, "chat": chat}
