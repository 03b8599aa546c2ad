"""Precomputed artifacts: the rotations, codebooks and QJL sketches that caches build from (head_dim, bits, seed),
written once to a folder (`kvshard precompute`) and loaded instead of computed (`with_artifact_store(folder)`).

The functions that build them (quant/codebooks.py, quant/rotation.py) are `precomputable`: an lru_cache that
first looks among the loaded artifacts. `precompute` records what those functions return while it constructs every
method for the given head dims, bits and seeds, so the folder holds exactly what a cache would compute, bit for bit
(float32 centroids and boundaries as computed, not re-derived). The Lloyd-Max iterations are what it saves.

Folder layout: one `<function>-<arg>-<arg>….npz` per artifact and `manifest.json` (format, entries).
"""

import argparse
import functools
import json
import os

import numpy as np

FORMAT = 1
_STORED: dict = {}  # (function name, *args) -> file, registered by ArtifactStore.load
_LOADED: dict = {}  # (function name, *args) -> value, read from its file on first use
_RECORDING: list = []  # dicts that precompute fills with (function name, *args) -> value


def precomputable(maxsize=None):
    """lru_cache(maxsize) that returns a loaded artifact where there is one, and reports values to precompute."""

    def decorate(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def lookup(*args):
            key = (fn.__name__, *args)
            value = _LOADED.get(key)
            if value is None and key in _STORED:
                value = _LOADED[key] = _read(key, _STORED[key])
            if value is None:
                value = cached(*args)
            for recording in _RECORDING:
                recording[key] = value
            return value

        lookup.cache_clear = cached.cache_clear
        return lookup

    return decorate


def _arrays(value) -> dict:
    """The arrays an artifact is made of (a Codebook, a Rotation or a plain array), as numpy, exactly."""
    import mlx.core as mx

    if isinstance(value, mx.array):
        return {"array": np.array(value)}
    return {name: np.array(a) if isinstance(a, mx.array) else np.array(a)
            for name, a in vars(value).items() if a is not None}


def _read(key: tuple, path: str):
    with np.load(path) as arrays:
        return _artifact(key[0], dict(arrays))


def _artifact(name: str, arrays: dict):
    import mlx.core as mx

    from .codebooks import Codebook
    from .rotation import Rotation

    if "array" in arrays:
        return mx.array(arrays["array"])
    if name.endswith("codebook"):
        return Codebook(mx.array(arrays["centroids"]), mx.array(arrays["boundaries"]), int(arrays["bits"]))
    if name == "make_rotation":
        signs, matrix = arrays.get("signs"), arrays.get("matrix")
        return Rotation(int(arrays["dim"]), None if signs is None else mx.array(signs),
                        None if matrix is None else mx.array(matrix))
    raise ValueError(f"artifact_store: unknown artifact {name!r}")


def _file_name(key: tuple) -> str:
    return "-".join(str(part) for part in key) + ".npz"


def _codebook_version() -> int:
    from .codebooks import CODEBOOK_VERSION  # codebooks.py imports this module

    return CODEBOOK_VERSION


PRECOMPUTED_METHODS = ("turboquant_mse", "turboquant_prod", "turboquant_rvq", "polar", "qjl")


def precompute(folder: str, head_dims, bits, seeds=(42,), methods=PRECOMPUTED_METHODS) -> list[str]:
    """Write every artifact that `methods` need at these head dims, bits and seeds into `folder`; returns the file
    names. Bits a method does not accept (prod needs >= 2) are skipped for that method."""
    from .methods import make_method

    recorded: dict = {}
    _RECORDING.append(recorded)
    try:
        for method in methods:
            for dim in head_dims:
                for b in bits:
                    for seed in seeds:
                        try:
                            make_method(method, dim, b, seed)
                        except ValueError as err:
                            if "bits" not in str(err):
                                raise
    finally:
        _RECORDING.remove(recorded)
    os.makedirs(folder, exist_ok=True)
    entries = []
    for key, value in sorted(recorded.items(), key=lambda kv: _file_name(kv[0])):
        np.savez(os.path.join(folder, _file_name(key)), **_arrays(value))
        entries.append({"function": key[0], "args": list(key[1:]), "file": _file_name(key)})
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"format": FORMAT, "codebooks": _codebook_version(), "entries": entries}, f, indent=1)
    return [e["file"] for e in entries]


class ArtifactStore:
    """A folder written by `precompute`. `load()` makes its artifacts what the build functions return: each file is
    read when a cache first needs it, so a large store costs only what is used."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        manifest = os.path.join(self.folder, "manifest.json")
        if not os.path.isfile(manifest):
            raise ValueError(f"artifact_store: {self.folder!r} has no manifest.json (write it with kvshard precompute)")
        with open(manifest) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"artifact_store: format {self.manifest.get('format')!r}, this kvshard reads {FORMAT}")
        self._check_codebooks()

    def _check_codebooks(self) -> None:
        """Codebooks of 5-8 bits changed with codebook version 2 (quant/codebooks.py); older stores (no "codebooks":
        version 1) holding any of them are refused, the narrower ones are the same in every version."""
        from .codebooks import CHANGED_FROM_BITS

        version = self.manifest.get("codebooks", 1)
        changed = [e["file"] for e in self.manifest["entries"]
                   if e["function"].endswith("codebook") and max(e["args"][1:], default=0) >= CHANGED_FROM_BITS]
        if version != _codebook_version() and changed:
            raise ValueError(f"artifact_store: {self.folder!r} holds codebooks of version {version} ({changed[0]}, ...), "
                             f"this kvshard codes with version {_codebook_version()}: write it again with kvshard precompute")

    def load(self) -> int:
        """Register every artifact of the folder (idempotent); returns how many there are."""
        for entry in self.manifest["entries"]:
            path = os.path.join(self.folder, entry["file"])
            if not os.path.isfile(path):
                raise ValueError(f"artifact_store: {path!r} is listed in manifest.json but missing")
            _STORED.setdefault((entry["function"], *entry["args"]), path)
        return len(self.manifest["entries"])


@functools.lru_cache(maxsize=None)
def load_artifact_store(folder: str) -> ArtifactStore:
    store = ArtifactStore(folder)
    store.load()
    return store


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvshard precompute", description=__doc__.splitlines()[0])
    parser.add_argument("--head_dim", "--head-dim", type=int, nargs="+", required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--seed", type=int, nargs="+", default=[42])
    parser.add_argument("--methods", nargs="+", default=list(PRECOMPUTED_METHODS), choices=PRECOMPUTED_METHODS)
    parser.add_argument("--output_dir", "--output-dir", required=True)
    args = parser.parse_args(argv)
    for dim in args.head_dim:
        if dim < 2:
            parser.error(f"--head_dim must be >= 2, got {dim}")
    files = precompute(args.output_dir, args.head_dim, args.bits, args.seed, args.methods)
    print(f"wrote {len(files)} artifacts to {args.output_dir}")
    return 0
