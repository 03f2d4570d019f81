"""Importing TVM for sparsec: a clear error when it is missing, the thread pool sized explicitly, the host CPU target."""
from __future__ import annotations

import glob
import os
import sys

from sparsec.errors import SparsecError


def import_tvm(threads: int | None = None):
    """``import tvm``; with ``threads``, size TVM's pool to that many threads.

    TVM sizes its pool once, at import, from ``TVM_NUM_THREADS`` (else half the logical CPUs, assuming SMT: 1 thread
    on a 2-vCPU machine), and can later only shrink it; so the pool is made as large as the machine before import.
    """
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import tvm
    except ImportError as exc:
        raise SparsecError(f"the TVM backend needs Apache TVM, which is not installed ({exc}): pip install"
                           " 'sparsec[tvm]' (apache-tvm==0.27.0.post1)") from None
    if threads is not None:
        tvm.get_global_func("runtime.config_threadpool")(0, int(threads))
    return tvm


def num_threads() -> int:
    """The number of threads TVM's pool runs kernels with now."""
    return int(import_tvm().get_global_func("runtime.NumThreads")())


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. 'znver4'); ``mcpu=native`` would silently mean generic x86-64."""
    return str(import_tvm().target.codegen.llvm_get_system_cpu())


def last_level_cache_bytes() -> int:
    """The size of this machine's largest CPU cache in bytes, as Linux's sysfs reports cpu0's (0 where unknown:
    Python's ``os.sysconf`` has no cache names)."""
    sizes = [0]
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def cpu_target():
    """The LLVM target for this machine's CPU."""
    tvm = import_tvm()
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
