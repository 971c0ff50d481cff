"""Packaging lives in pyproject.toml; this file adds `build_native`, which compiles csrc/ into
quantlite/_native/ (the CPU library with the system compiler, the CUDA library when nvcc exists)."""
from setuptools import Command, setup


class BuildNative(Command):
    description = "compile csrc/ into quantlite/_native/"
    user_options: list = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        pass  # filled in by the native-kernel work (issue 6)


setup(cmdclass={"build_native": BuildNative})
