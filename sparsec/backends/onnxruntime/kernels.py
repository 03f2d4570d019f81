"""The ONNX Runtime custom-op library of sparsec (``csrc/sparse_linear.cc``): built once per host, cached.

The library registers domain :data:`DOMAIN` with one op, ``SparseLinear(X, t, Wt[, B])`` =
``(X * (|X| > t)) @ Wt + B`` (float32; ``Wt`` is the weight pre-transposed to ``[K, N]``), which reads only the
weight rows of active inputs. It is compiled on first use with the host's C++ compiler (``$CXX``, else ``g++``,
``-O3 -march=native``: AVX2 / AVX-512 where the CPU has them) against ``csrc/ort_api_subset.h``, this project's
declaration of the few ONNX Runtime C API entries the op calls (at their positions in ORT's function table as of
ORT_API_VERSION 21; the C API only appends, so any ORT >= 1.21 loads the library; no ONNX Runtime header needed).
The result is cached under ``$SPARSEC_CACHE/ort-kernels/`` keyed by the source files, the flags and the compiler;
without a compiler :func:`library_path` returns None and exports keep the standard-op formulation.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from sparsec.errors import SparsecError

#: ONNX domain of sparsec's custom ops
DOMAIN = "ai.sparsec"
SOURCE = Path(__file__).with_name("csrc") / "sparse_linear.cc"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]


def compiler() -> str | None:
    """The C++ compiler to build with ($CXX, else g++ or c++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _target(cxx: str) -> Path:
    """Where the library built by ``cxx`` from this source with these flags is cached."""
    from sparsec.models import cache_dir

    h = hashlib.sha256()
    for f in sorted(SOURCE.parent.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    h.update(" ".join([cxx, *FLAGS]).encode())
    return cache_dir() / "ort-kernels" / f"libsparsec_ort-{h.hexdigest()[:16]}.so"


@lru_cache(maxsize=None)
def library_path() -> str | None:
    """Path of the built custom-op library (built on first call, then cached on disk); None without a compiler.

    Raises :class:`SparsecError` when the compiler is there but the build fails (its first error line)."""
    cxx = compiler()
    if cxx is None:
        return None
    target = _target(cxx)
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-I", str(SOURCE.parent), str(SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["?"]
            raise SparsecError(f"building the ONNX Runtime sparse kernels with {cxx} failed: {errors[0][:300]}"
                               " (export without --sparse-kernel, or set CXX to a working C++17 compiler)")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temporary
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(target)


def cached_library() -> str | None:
    """The library if it is already built for this source and compiler (no build), else None."""
    cxx = compiler()
    target = _target(cxx) if cxx else None
    return str(target) if target is not None and target.is_file() else None
