"""`kvshard` command line. Each command owns its argument parser and gets the rest of the command line:
`serve` runs a shard, `client` talks to one, `eval`, `bench`, `calibrate` and `precompute` belong to kvshard.quant.

Every failure ends as one line on stderr and a non-zero exit; KVSHARD_DEBUG=1 shows the traceback.
"""

import argparse
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
# A missing import, the extra that brings it: the SDK-only install lacks the server's, `redis://` the redis client.
_EXTRAS = {"redis": "redis", "matplotlib": "plot"}
# MLX's Linux CPU wheel links the reference BLAS: its matmuls run ~60x slower than with Debian's OpenBLAS preloaded.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
# OpenBLAS 0.3.21 picks its AVX-512 (SkylakeX) kernels on CPUs that have AVX-512, and their sgemm sums a row
# differently when it is one of several (576 x 576 products of 1 and of 5 rows differ by 3e-5): a batched decode
# step then codes some K/V coordinate of a session differently from the same step alone, and its logits move by
# ~0.03. Haswell's AVX2 kernels give each row the same bits whatever the batch, at the same step time here.
OPENBLAS_CORETYPE = "Haswell"
_MLX_COMMANDS = ("serve", "eval", "bench", "calibrate", "precompute")
_SERVER_MODULES = ("mlx", "mlx_lm", "structlog", "tokenizers", "grpc_health", "grpc_reflection", "prometheus_client", "tqdm", "threadpoolctl")


def byte_size(text: str) -> int:
    """'1048576', '512MiB', '2GB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1048576, 512MiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_bytes(n: int) -> str:
    """1073741824 -> '1GiB': byte defaults read as people write them (byte_size parses them back)."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def package_version() -> str:
    try:
        return version("kvshard")
    except PackageNotFoundError:
        return "0+unknown"


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from kvshard.service.scheduler import DEFAULT_MAX_BATCH, ORDERS
    from kvshard.service.sessions import Limits

    d = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (logged)")
    parser.add_argument("--store", default="sqlite:///data/kvshard.sqlite3",
                        help="session store: sqlite:///relative/path, sqlite:////absolute/path or redis://host:port/db")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the embedded model, any mlx_lm model path or repo id, random:llama-3.2-1b (random weights "
                        "of that shape, a byte-level tokenizer: for measuring), or 'none' for raw cache sessions only")
    parser.add_argument("--memory-budget", type=byte_size, default=human_bytes(d.memory_budget_bytes),
                        help="bytes for hot sessions, calls in flight, session loads and MLX's buffer cache (service/README: what the budget covers); idle sessions are dropped first (they are stored)")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions, help="sessions the store may hold (0: no limit)")
    parser.add_argument("--max-tenant-sessions", type=int, default=d.max_tenant_sessions, help="sessions one tenant may hold (0: only --max-sessions)")
    parser.add_argument("--max-tenant-bytes", type=byte_size, default=d.max_tenant_bytes,
                        help="bytes one tenant's sessions may store, e.g. 256MiB; a write that would pass it is refused whole (0: no quota)")
    parser.add_argument("--max-attend-cost", type=int, default=d.max_attend_cost, help="query heads x query tokens x layer tokens one Attend may cost")
    parser.add_argument("--attend-slice-cost", type=int, default=d.attend_slice_cost, help="an Attend takes turns on the compute thread in slices of this cost")
    parser.add_argument("--append-slice-cost", type=int, default=d.append_slice_cost,
                        help="an Append encodes on the compute thread in turns of at most this many key elements (heads x tokens x head_dim)")
    parser.add_argument("--session-ttl", type=int, default=d.session_ttl_s, help="seconds idle before a session is deleted (0: never)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens one Generate call may produce")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="most tokens one Generate input may add")
    parser.add_argument("--max-session-tokens", type=int, default=d.max_session_tokens, help="most tokens a session may hold")
    parser.add_argument("--max-append-tokens", type=int, default=d.max_append_tokens, help="most tokens one Append may add")
    parser.add_argument("--max-message-bytes", type=byte_size, default=human_bytes(d.max_message_bytes), help="largest gRPC message")
    parser.add_argument("--checkpoint-tokens", type=int, default=d.checkpoint_tokens, help="a streaming Generate commits every N tokens")
    parser.add_argument("--auth-token", action="append", default=[], metavar="TOKEN=TENANT", help="accept this bearer token (repeat); enables auth")
    parser.add_argument("--auth-tokens-file", help="file of TOKEN=TENANT lines; enables auth")
    parser.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--observe-caches", action="store_true", help="time, distortion and key-norm metrics of every cache (costs a sync and a decode per encode)")
    parser.add_argument("--log-format", choices=("json", "console"), default="json", help="one JSON line per RPC, or readable lines")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight RPCs get on SIGTERM")
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="shared (Redis) stores: seconds a session stays leased to this shard after its last use; another shard takes over a dead shard's sessions after at most this long")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH, help="most Generate streams decoded together in one forward pass")
    parser.add_argument("--batch-order", choices=ORDERS, default=ORDERS[0], help="which due streams a full batch serves first: the least recently served, or the oldest calls")
    return parser


def serve_main(argv: list[str]) -> None:
    import asyncio

    from kvshard.service.server import PortInUse, ServeConfig, serve
    from kvshard.service.sessions import Limits

    parser = argparse.ArgumentParser(prog="kvshard serve", description="Run a kvshard model shard.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = serve_parser(parser).parse_args(argv)
    for flag, value in (("--checkpoint-tokens", args.checkpoint_tokens), ("--attend-slice-cost", args.attend_slice_cost),
                        ("--append-slice-cost", args.append_slice_cost)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if args.lease_ttl < 0.1:
        parser.error("--lease-ttl must be at least 0.1 seconds")
    limits = Limits(
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_session_tokens=args.max_session_tokens,
        max_append_tokens=args.max_append_tokens,
        max_message_bytes=args.max_message_bytes,
        max_sessions=args.max_sessions,
        max_tenant_sessions=args.max_tenant_sessions,
        max_tenant_bytes=args.max_tenant_bytes,
        max_attend_cost=args.max_attend_cost,
        attend_slice_cost=args.attend_slice_cost,
        append_slice_cost=args.append_slice_cost,
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
        observe_caches=args.observe_caches,
        log_format=args.log_format,
        grace_s=args.grace,
        lease_ttl_s=args.lease_ttl,
        max_batch_size=args.max_batch_size,
        batch_order=args.batch_order,
    )
    try:
        asyncio.run(serve(config))
    except PortInUse as error:
        raise SystemExit(f"kvshard serve: {error}") from None


def client_main(argv: list[str]) -> None:
    from kvshard.client.cli import main

    main(argv)


def eval_main(argv: list[str]) -> None:
    from kvshard.quant.eval import main

    main(argv)


def bench_main(argv: list[str]) -> None:
    # The benchmark code lives beside its results in the repository's benchmarks/, not in the package.
    import importlib.util

    single = argv[:1] == ["--single"]  # the seed's one-configuration benchmark
    script = Path(__file__).resolve().parents[1] / "benchmarks" / ("single.py" if single else "bench.py")
    if not script.exists():
        raise SystemExit(f"kvshard bench runs from a source checkout: {script} not found")
    spec = importlib.util.spec_from_file_location("kvshard_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(argv[1:] if single else argv)


def precompute_main(argv: list[str]) -> None:
    from kvshard.quant.precompute import main

    main(argv)


def calibrate_main(argv: list[str]) -> None:
    from kvshard.quant.calibrate.profile import main

    main(argv)


# name: (one line for `kvshard --help`, the function that gets the rest of the command line)
COMMANDS = {
    "serve": ("run a model shard: gRPC sessions with compressed, durable KV caches", serve_main),
    "client": ("talk to a running shard: server info, list / describe / delete sessions, chat", client_main),
    "eval": ("real-model quality (perplexity) of every cache method, with effective bits", eval_main),
    "bench": ("speed of attention, decode and the service, side by side (--single: one configuration)", bench_main),
    "precompute": ("write rotations, codebooks and QJL sketches to a folder for with_artifact_store", precompute_main),
    "calibrate": ("measure a calibration profile of a model (kvshard calibrate --model NAME --out DIR)", calibrate_main),
}


def top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {about}" for name, (about, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="kvshard",
        usage="kvshard [--version] COMMAND [options]",
        description="kvshard: a gRPC shard for long-lived LLM sessions whose KV cache is stored compressed.",
        epilog=f"commands:\n{listing}\n\n`kvshard COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvshard {package_version()}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def error_line(error: BaseException) -> str:
    """One line that says what went wrong and, where a package is missing, what to install."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        root = error.name.split(".")[0]
        extra = _EXTRAS.get(root) or ("server" if root in _SERVER_MODULES else None)
        if extra:
            return f"needs the Python package {root!r} of the {extra!r} extra: pip install -e '.[{extra}]' in a checkout, 'kvshard[{extra}]' otherwise"
    import grpc

    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(error).__name__}: {message}" if not message or isinstance(error, (OSError, RuntimeError, KeyError)) else message


def one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's error, as one line: its usage block, often longer than the screen, hides the message."""
    parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")


def has_avx2() -> bool:
    """Whether this CPU runs OpenBLAS's Haswell kernels (Linux's /proc/cpuinfo; False where it cannot tell)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " avx2" in line for line in info)
    except OSError:
        return False


def openblas_env(env: dict) -> dict:
    """env with Debian's OpenBLAS preloaded (MLX's CPU wheel links the reference BLAS: ~60x slower matmuls) and
    its kernels pinned to row-invariant ones (OPENBLAS_CORETYPE above); env's own choices are kept."""
    env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    if sys.platform == "linux" and os.path.exists(OPENBLAS) and "libblas" not in preload:
        env["LD_PRELOAD"] = f"{OPENBLAS}:{preload}" if preload else OPENBLAS
    if "libblas" in env.get("LD_PRELOAD", "") and "OPENBLAS_CORETYPE" not in env and has_avx2():
        env["OPENBLAS_CORETYPE"] = OPENBLAS_CORETYPE
    return env


def preload_openblas(argv: list[str]) -> None:
    """`make serve` preloads OpenBLAS; a bare `.venv/bin/kvshard serve` re-executes itself with it, so MLX's
    commands are never silently 60x slower (nor batched steps unlike unbatched ones)."""
    if argv[0] in _MLX_COMMANDS:
        env = openblas_env(os.environ)
        if env != dict(os.environ):
            os.execve(sys.executable, [sys.executable, "-m", "kvshard.service.cli", *argv], env)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Every command's parser (eval's and bench's live in kvshard.quant) reports bad options in one line.
    argparse.ArgumentParser.error = one_line_error
    if not argv or argv[0] not in COMMANDS:
        parser = top_parser()
        if not argv:
            parser.print_help(sys.stderr)
            raise SystemExit(2)
        parser.parse_args(argv[:1])  # --help, --version, or an unknown command: argparse answers and exits
    preload_openblas(argv)
    command, rest = argv[0], argv[1:]
    try:
        COMMANDS[command][1](rest)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - the one place every failure becomes one line
        if os.environ.get("KVSHARD_DEBUG"):
            raise
        print(f"kvshard {command}: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
