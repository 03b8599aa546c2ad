"""`kvshard bench --single` (benchmarks/single.py): the seed's one-configuration benchmark, over the real CLI."""

import json
import subprocess
import sys

import pytest

from conftest import child_env


def _single(*args):
    return subprocess.run([sys.executable, "-m", "kvshard.service.cli", "bench", "--single", *args], env=child_env(),
                          capture_output=True, text=True, timeout=300)


def test_single_configuration_bytes_and_distortion(tmp_path):
    out = tmp_path / "single.json"
    done = _single("--method", "turboquant_mse", "--head_dim", "64", "--bits", "4", "--seq_len", "64",
                   "--repeats", "3", "--json", str(out))
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())
    # Per token, keys and values: 64 codes of 4 bits (32 bytes) + an fp16 norm; plus the fp16 key mean.
    assert row["bytes"] == 2 * 64 * (32 + 2) + 64 * 2
    assert row["effective_bits"] == pytest.approx(8 * row["bytes"] / (2 * 64 * 64))
    assert 4.0**-4 < row["key_relative_mse"] < 0.0095 * 1.3 and 4.0**-4 < row["value_relative_mse"] < 0.0095 * 1.3
    assert 0 < row["attention_relative_error"] < 0.05
    assert "effective_bits" in done.stdout


def test_bad_arguments_name_the_flag():
    done = _single("--method", "qjl", "--bits", "9")
    assert done.returncode == 2 and "bits" in done.stderr
    done = _single("--method", "turboquant_mse", "--seq_len", "0")
    assert done.returncode == 2 and "--seq_len" in done.stderr
