"""The build: feature flags, runtime fallbacks, and the layering rules that
keep one binary working with any torch."""

import os
import re
import subprocess
from pathlib import Path

import pytest

import cachedattn
from cachedattn import _core, native

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_flags_are_reported():
    assert isinstance(native.HAS_CUDA, bool)
    assert isinstance(native.HAS_URING, bool)
    assert native.io_backend() in {"io_uring", "threads"}
    feats = native.features()
    assert feats["cuda_built"] is native.HAS_CUDA
    if not native.HAS_URING:
        assert feats["io_backend"] == "threads"


@pytest.mark.skipif(os.environ.get("CACHEDATTN_EXPECT_CUDA_BUILD") != "1", reason="CUDA build not required here")
def test_cuda_code_was_compiled():
    # CI sets this where nvcc exists: a build that silently dropped CUDA fails here.
    assert native.HAS_CUDA


@pytest.mark.skipif(os.environ.get("CACHEDATTN_EXPECT_URING") != "1", reason="io_uring build not required here")
def test_uring_backend_was_compiled():
    assert native.HAS_URING


def test_no_gpu_is_reported_not_hidden():
    if native.cuda_available():
        pytest.skip("a GPU is present")
    assert native.cuda_unavailable_reason()
    with pytest.raises(RuntimeError, match="GPU"):
        native.CopyEngine(0, 4)
    with pytest.raises(RuntimeError, match="no usable GPU"):
        native.HostPool(1 << 20, 1 << 16, register_cuda=True)


def test_extension_does_not_link_torch_or_dynamic_cudart():
    so = Path(_core.__file__)
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart.so", "libcuda.so", "libpython"):
        assert lib not in out, f"{so.name} links {lib}:\n{out}"


def _sources():
    return [p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"}]


def test_native_sources_never_include_torch():
    for p in _sources():
        text = p.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), p


def test_liburing_included_by_one_file():
    users = [p.relative_to(CSRC).as_posix() for p in _sources() if "liburing.h" in p.read_text()]
    assert users == ["io/uring_io.cpp"]


def test_cuda_headers_only_under_csrc_cuda():
    pat = re.compile(r"#include\s*[<\"](cuda_runtime|cuda_fp16|cuda_bf16|cuda)\w*\.h[>\"]")
    for p in _sources():
        if pat.search(p.read_text()):
            assert p.relative_to(CSRC).parts[0] == "cuda", p


def test_only_native_imports_the_extension():
    pkg = ROOT / "cachedattn"
    # An import of the extension, in any spelling (not an attribute that happens to be called `_core`).
    imports = re.compile(r"^\s*(from\s+[\w.]+\s+import\s+[^\n]*\b_core\b|import\s+[\w.]*\b_core\b)|cachedattn\._core|"
                         r"import_module\([^)]*_core", re.M)
    importers = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if imports.search(p.read_text()))
    assert importers == ["native.py"]


def test_version():
    assert cachedattn.__version__


def test_transformers_imported_only_under_hf():
    pkg = ROOT / "cachedattn"
    users = sorted(
        p.relative_to(pkg).as_posix()
        for p in pkg.rglob("*.py")
        if re.search(r"^\s*(from|import) transformers", p.read_text(), re.M)
    )
    assert users and all(u.startswith("hf/") for u in users), users
