"""`kvshard precompute` + with_artifact_store: a fresh process that may not compute (Lloyd-Max and QR raise)
builds every method from the folder, and its codes and attention outputs equal the computed ones bit for bit."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import child_env
from kvshard.quant import ArtifactStore, KVCacheBuilder, KVCacheConfig
from kvshard.quant.precompute import PRECOMPUTED_METHODS

DIMS, BITS = (64, 96), (1, 2, 4)

# Builds one cache per (method, head_dim, bits), appends seeded K/V and attends; saves codes and outputs.
BUILD = textwrap.dedent("""
    import sys
    import mlx.core as mx
    import numpy as np
    from kvshard.quant import KVCacheBuilder, codebooks

    def run(store, out):
        results = {}
        for method in %(methods)r:
            for dim in %(dims)r:
                for bits in %(bits)r:
                    if method == "turboquant_prod" and bits < 2:
                        continue
                    builder = KVCacheBuilder().with_method(method).with_head_dim(dim).with_bit_width(inlier=bits)
                    if store:
                        builder = builder.with_artifact_store(store)
                    cache = builder.with_kv_heads(2).build()
                    rng = np.random.default_rng(dim * 10 + bits)
                    cache.append(mx.array(rng.standard_normal((2, 40, dim)).astype(np.float16)),
                                 mx.array(rng.standard_normal((2, 40, dim)).astype(np.float16)))
                    name = f"{method}-{dim}-{bits}"
                    for side, codes in (("k", cache.key_codes), ("v", cache.value_codes)):
                        for field, a in codes.items():
                            results[f"{name}-{side}-{field}"] = np.array(a[:, :, :cache.n_encoded])
                    results[f"{name}-out"] = np.array(cache.attend(mx.array(rng.standard_normal((4, 3, dim)).astype(np.float32))))
        np.savez(out, **results)

    if __name__ == "__main__":
        store, out, forbid = sys.argv[1], sys.argv[2], sys.argv[3] == "forbid"
        if forbid:  # this process may not compute codebooks or dense rotations
            def refuse(*args, **kwargs):
                raise RuntimeError("computed instead of loaded")
            codebooks.lloyd_max = refuse
            np.linalg.qr = refuse
        run(store if store != "-" else None, out)
""") % {"methods": PRECOMPUTED_METHODS, "dims": DIMS, "bits": BITS}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kvshard.service.cli", "precompute", *args], env=child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    done = _cli("--head_dim", *map(str, DIMS), "--bits", *map(str, BITS), "--seed", "42", "--output_dir", str(folder))
    assert done.returncode == 0, done.stderr
    return folder


def _build(tmp_path, store, forbid: bool):
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    out = tmp_path / f"out-{'store' if store else 'computed'}.npz"
    done = subprocess.run([sys.executable, str(script), str(store or "-"), str(out), "forbid" if forbid else "allow"],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    return done, out


def test_loaded_artifacts_give_the_computed_codes_bit_for_bit(artifacts, tmp_path):
    loaded, loaded_out = _build(tmp_path, artifacts, forbid=True)
    assert loaded.returncode == 0, loaded.stderr
    computed, computed_out = _build(tmp_path, None, forbid=False)
    assert computed.returncode == 0, computed.stderr
    with np.load(loaded_out) as a, np.load(computed_out) as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 100
        for name in a.files:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_without_the_store_the_forbidding_process_fails(tmp_path):
    # The check above can fail: the same process without artifacts has to compute, and may not.
    done, _ = _build(tmp_path, None, forbid=True)
    assert done.returncode != 0 and "computed instead of loaded" in done.stderr


def test_manifest_lists_every_file(artifacts):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    files = {e["file"] for e in manifest["entries"]}
    assert files == {p.name for p in artifacts.glob("*.npz")}
    functions = {e["function"] for e in manifest["entries"]}
    assert functions == {"sphere_codebook", "residual_codebook", "polar_angle_codebook", "make_rotation", "gaussian_sketch"}
    assert ArtifactStore(artifacts).load() == len(manifest["entries"])


def test_bad_stores_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="artifact_store"):
        KVCacheBuilder().with_head_dim(64).with_artifact_store(tmp_path / "missing").build()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99, "entries": []}))
    with pytest.raises(ValueError, match="artifact_store.*format"):
        KVCacheBuilder(KVCacheConfig(head_dim=64, artifact_store=str(tmp_path))).build()


def test_a_store_of_older_codebooks_is_refused_where_they_changed(tmp_path):
    from kvshard.quant.precompute import precompute

    precompute(tmp_path, [64], [4, 6], methods=("turboquant_mse",))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert ArtifactStore(tmp_path).load() == len(manifest["entries"])
    del manifest["codebooks"]  # as a store written before the version was recorded
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="artifact_store: .*version 1 .*sphere_codebook-64-6"):
        ArtifactStore(tmp_path)
    manifest["entries"] = [e for e in manifest["entries"] if e["args"][-1] != 6]  # only 4-bit codebooks: unchanged
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert ArtifactStore(tmp_path).load() == len(manifest["entries"])


def test_cli_rejects_bad_arguments():
    done = _cli("--head_dim", "1", "--output_dir", "/tmp/unused-kvshard-artifacts")
    assert done.returncode == 2 and "--head_dim" in done.stderr
    done = _cli("--head_dim", "64")
    assert done.returncode == 2 and "output_dir" in done.stderr
