"""Builds cachedattn._core with CMake.

Build options come from the environment (each AUTO, ON or OFF):
  CACHEDATTN_CUDA   compile the CUDA copy engine (AUTO: when nvcc is found)
  CACHEDATTN_URING  compile the io_uring backend (AUTO: when liburing is found)
CACHEDATTN_BUILD_TYPE (Release) and CMAKE_ARGS are passed through as well.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("CUDACXX") and not shutil.which("nvcc"):
            default_nvcc = Path("/usr/local/cuda/bin/nvcc")
            if default_nvcc.exists():
                os.environ["CUDACXX"] = str(default_nvcc)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CACHEDATTN_BUILD_TYPE', 'Release')}",
            f"-DCACHEDATTN_CUDA={os.environ.get('CACHEDATTN_CUDA', 'AUTO')}",
            f"-DCACHEDATTN_URING={os.environ.get('CACHEDATTN_URING', 'AUTO')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += os.environ.get("CMAKE_ARGS", "").split()
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("cachedattn._core")],
    cmdclass={"build_ext": CMakeBuild},
)
