"""The committed stubs are exactly what the build generates from proto/, and the wire contract has every RPC."""

import pathlib
import tomllib

from kvshard.wire import protogen
from kvshard.wire import kvshard_pb2 as pb


def test_committed_stubs_match_the_proto(tmp_path):
    generated = protogen.generate(tmp_path)
    assert generated, "no stubs generated"
    for path in generated:
        committed = protogen.STUB_DIR / path.name
        assert committed.exists(), f"{path.name} is generated but not committed; run python wire/protogen.py"
        assert committed.read_text() == path.read_text(), f"{path.name} drifted from the .proto; run python wire/protogen.py"
    stale = {p.name for p in protogen.STUB_DIR.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a .proto: {stale}"


def test_the_build_generates_the_stubs_with_the_pinned_grpcio_tools():
    """setup.py regenerates the stubs in pip's build environment, which ignores constraints.txt: unpinned there,
    a newer grpcio-tools wrote stubs that refused to import under the pinned grpcio (2026-12-06)."""
    root = protogen.ROOT
    build = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = dict(line.split("==") for line in (root / "constraints.txt").read_text().splitlines() if "==" in line)
    assert f"grpcio-tools=={pins['grpcio-tools']}" in build, (build, pins["grpcio-tools"])


def test_the_service_has_the_contracted_rpcs():
    service = pb.DESCRIPTOR.services_by_name["KVShard"]
    rpcs = {m.name: m for m in service.methods}
    assert set(rpcs) == {"CreateSession", "GetSession", "ListSessions", "DeleteSession", "Append", "Attend", "Generate", "Calibrate", "Trim", "ServerInfo"}
    assert rpcs["Generate"].server_streaming and not any(m.server_streaming for n, m in rpcs.items() if n != "Generate")
    for message in ("AppendRequest", "GenerateRequest", "TrimRequest"):
        assert "expected_offset" in pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert pb.DESCRIPTOR.name == "kvshard/v1/kvshard.proto" and pathlib.Path(protogen.PROTO_ROOT, pb.DESCRIPTOR.name).exists()
