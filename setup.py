"""Build hook: regenerate the gRPC stubs from proto/ before the Python files are collected.

Everything else about the build lives in pyproject.toml.
"""

import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self):
        path = pathlib.Path(__file__).resolve().parent / "wire" / "protogen.py"
        spec = importlib.util.spec_from_file_location("kvshard_protogen", path)
        protogen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protogen)
        protogen.generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
