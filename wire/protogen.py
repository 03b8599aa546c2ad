"""Generate the Python stubs of proto/kvshard/v1/*.proto into wire/ (-> kvshard.wire).

protoc names imports after the .proto path (`from kvshard.v1 import kvshard_pb2`), but the stubs live in
the package `kvshard.wire`, so the import lines are rewritten. setup.py runs this at build time;
the drift test runs it into a scratch folder and compares with the committed stubs.
Usage: python wire/protogen.py [OUT_DIR]
"""

import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
STUB_DIR = ROOT / "wire"
STUB_PACKAGE = "kvshard.wire"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "kvshard" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path = STUB_DIR) -> list[pathlib.Path]:
    """Write <name>_pb2.py, <name>_pb2.pyi and <name>_pb2_grpc.py for every .proto into out_dir."""
    from grpc_tools import protoc

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{_well_known_protos()}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(args[5:]))
        written = []
        for generated in sorted(pathlib.Path(scratch, "kvshard", "v1").glob("*_pb2*")):
            text = re.sub(r"^from kvshard\.v1 import ", f"from {STUB_PACKAGE} import ", generated.read_text(), flags=re.M)
            target = out_dir / generated.name
            target.write_text(text)
            written.append(target)
    return written


def _well_known_protos() -> str:
    import grpc_tools

    return str(pathlib.Path(grpc_tools.__file__).parent / "_proto")


if __name__ == "__main__":
    for path in generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else STUB_DIR):
        print(path)
