"""`kvshard` command line: `serve` runs a shard; `eval` and `bench` belong to kvshard.quant."""

import argparse
import asyncio
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def byte_size(text: str) -> int:
    """'1048576', '512MiB', '2GB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1048576, 512MiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from kvshard.service.sessions import Limits

    d = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (logged)")
    parser.add_argument("--store", default="sqlite:///data/kvshard.sqlite3", help="sqlite:///path or redis://host:port/db")
    parser.add_argument("--model", default="smollm2-135m", help="model to serve, or 'none' for raw cache sessions only")
    parser.add_argument("--memory-budget", type=byte_size, default=d.memory_budget_bytes, help="bytes of hot sessions kept in memory (e.g. 1GiB)")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions, help="sessions the store may hold (0: no limit)")
    parser.add_argument("--session-ttl", type=int, default=d.session_ttl_s, help="seconds idle before a session is deleted (0: never)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens one Generate call may produce")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-session-tokens", type=int, default=d.max_session_tokens)
    parser.add_argument("--max-append-tokens", type=int, default=d.max_append_tokens)
    parser.add_argument("--max-message-bytes", type=byte_size, default=d.max_message_bytes, help="largest gRPC message")
    parser.add_argument("--checkpoint-tokens", type=int, default=d.checkpoint_tokens, help="a streaming Generate commits every N tokens")
    parser.add_argument("--auth-token", action="append", default=[], metavar="TOKEN=TENANT", help="accept this bearer token (repeat); enables auth")
    parser.add_argument("--auth-tokens-file", help="file of TOKEN=TENANT lines; enables auth")
    parser.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight RPCs get on SIGTERM")
    return parser


def serve_main(argv: list[str]) -> None:
    from kvshard.service.server import ServeConfig, serve
    from kvshard.service.sessions import Limits

    args = serve_parser(argparse.ArgumentParser(prog="kvshard serve", description="Run a kvshard model shard.")).parse_args(argv)
    if args.checkpoint_tokens < 1:
        raise SystemExit("kvshard serve: --checkpoint-tokens must be at least 1")
    limits = Limits(
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_session_tokens=args.max_session_tokens,
        max_append_tokens=args.max_append_tokens,
        max_message_bytes=args.max_message_bytes,
        max_sessions=args.max_sessions,
        memory_budget_bytes=args.memory_budget,
        session_ttl_s=args.session_ttl,
        checkpoint_tokens=args.checkpoint_tokens,
    )
    config = ServeConfig(
        host=args.host,
        port=args.port,
        store=args.store,
        model=args.model,
        limits=limits,
        auth_tokens=args.auth_token,
        auth_tokens_file=args.auth_tokens_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        log_format=args.log_format,
        grace_s=args.grace,
    )
    asyncio.run(serve(config))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("serve", "eval", "bench")
    if not argv or argv[0] not in commands:
        print("usage: kvshard {serve,eval,bench} [options]   (kvshard COMMAND --help for options)", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve_main(rest)
    elif command == "eval":
        from kvshard.quant.eval import main as eval_main

        eval_main(rest)
    else:
        from kvshard.quant.bench import main as bench_main

        bench_main(rest)


if __name__ == "__main__":
    main()
