"""The READMEs' examples, run as written against a live server, so they cannot rot.

README.md and then service/README.md, in document order, against ONE server (as a newcomer follows them):
every `.venv/bin/...` line of a bash block runs in bash from the checkout root and must succeed and print
something; every `make` line names a real target; every python block runs as a script. Only the address
changes: the READMEs say 127.0.0.1:50051 / localhost:50051, the test's server listens on a free port.
"""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ShardProcess, child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
READMES = ["README.md", "service/README.md"]
README_ADDRESSES = ("127.0.0.1:50051", "localhost:50051")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)


def examples(readme: str) -> list[tuple[str, str]]:
    """(kind, text) in document order: kind "command" (one bash line, continuations joined), "make", "python"."""
    found = []
    for language, body in BLOCK.findall((ROOT / readme).read_text()):
        if language == "python":
            found.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("make "):
                found.append(("make", line.split(" #")[0]))
            elif line and not line.startswith("#"):
                found.append(("command", line))
    return found


@pytest.fixture(scope="module")
def server(module_tmp):
    shard = ShardProcess(module_tmp, store=f"sqlite:///{module_tmp}/readme.sqlite3").start()
    yield shard
    shard.stop()


def run_example(kind: str, text: str, target: str) -> subprocess.CompletedProcess:
    for address in README_ADDRESSES:
        text = text.replace(address, target)
    env = {**child_env(), "KVSHARD_TARGET": target}
    if kind == "make":
        # The target must exist; -n prints its recipe without running it (the server is already up).
        return subprocess.run(["make", "-n", *text.split()[1:]], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    if kind == "python":
        return subprocess.run([sys.executable, "-c", text], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.run(["bash", "-c", text], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)


def test_both_readmes_have_examples():
    for readme in READMES:
        kinds = {kind for kind, _ in examples(readme)}
        assert kinds == {"command", "make", "python"}, readme
    commands = [text for readme in READMES for kind, text in examples(readme) if kind == "command"]
    assert all(text.startswith((".venv/bin/", "echo ")) for text in commands), "a command that only works with the venv on PATH"


@pytest.mark.parametrize("readme", READMES)
def test_readme_examples_run_as_written(server, readme):
    for kind, text in examples(readme):
        done = run_example(kind, text, server.target)
        where = f"{readme}: {text[:200]}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
        assert done.returncode == 0, where
        assert done.stdout.strip() or "chat" in text and "echo" not in text, "printed nothing: " + where
        if "KVShard/Generate" in text:
            assert '"text"' in done.stdout, "a Generate example that generates nothing: " + where


def fake_python(folder: pathlib.Path, name: str, fails_on: str, version: str = "") -> str:
    """A stand-in for `python3` that fails every -c check mentioning `fails_on` (and says `version` to -V)."""
    script = folder / name
    say_version = f'-V) echo "{version}"; exit 0;;' if version else ""
    script.write_text(f'#!/bin/sh\ncase "$*" in *{fails_on}*) exit 1;; {say_version} esac\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def preflight(tmp_path, **variables) -> subprocess.CompletedProcess:
    """`make preflight` on a machine without apt-get (so nothing is installed): (exit code, output)."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for tool in ("uname", "id"):
        (tools / tool).unlink(missing_ok=True)
        (tools / tool).symlink_to(shutil.which(tool))
    assignments = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run([shutil.which("make"), "--no-print-directory", "preflight", *assignments], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": str(tools), "HOME": str(tmp_path)}, timeout=60)


def test_preflight_explains_a_fresh_machines_traps(tmp_path):
    old = fake_python(tmp_path, "python3.9", "version_info", version="Python 3.9.2")
    done = preflight(tmp_path, PYTHON=old)
    assert done.returncode != 0 and "needs Python >= 3.11" in done.stderr and "is Python 3.9.2" in done.stderr, done.stderr
    assert "PYTHON=python3.12" in done.stderr
    no_venv = fake_python(tmp_path, "python3-novenv", "ensurepip")  # Debian's python3 without python3-venv
    done = preflight(tmp_path, PYTHON=no_venv)
    assert done.returncode != 0 and "python3-venv" in done.stderr, done.stderr
    done = preflight(tmp_path, PYTHON=sys.executable, OPENBLAS="/nonexistent/libblas.so.3")
    assert done.returncode == 0 and "WARNING" in done.stderr and "60x slower" in done.stderr and "libopenblas0-pthread" in done.stderr, done.stderr
    done = preflight(tmp_path, PYTHON=sys.executable)
    assert done.returncode == 0 and done.stderr == "", done.stderr
