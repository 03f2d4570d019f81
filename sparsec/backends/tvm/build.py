"""The TVM build directory: compile a sparsec program, write it atomically, load and run it without torch models.

A build directory holds ``model.so`` (the compiled Relax VM executable, weights packed inside as constants) and
``manifest.json``: format and version, the sparsec and TVM versions, the target and the CPU it was compiled for,
the thread count, the input spec and the number of outputs, and the sha256 of model.so. Loading checks all of it:
a build from another sparsec or TVM version, or for another CPU, is refused with a message saying how to rebuild.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from sparsec.errors import SparsecError

FORMAT = "sparsec-tvm-build"
FORMAT_VERSION = 1
LIB_FILE, MANIFEST_FILE = "model.so", "manifest.json"
TARGETS = ("llvm", "cuda")
CUDA_ARCH = "sm_90"  # H100 / H200


def is_build_dir(path: str) -> bool:
    """True when ``path`` is a directory whose manifest says it is a TVM build (no torch or TVM import)."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def compile_program(program, out_dir: str, *, target: str = "llvm", threads: int | None = None, sparse: bool = True,
                    inputs: list | None = None, source: str | None = None, force: bool = False) -> dict:
    """Lower ``program`` (an ExportedProgram) with sparsec's kernels, compile it for ``target`` and write the build
    directory ``out_dir`` atomically. Returns the manifest."""
    import sparsec
    from sparsec.artifact import atomic_directory, check_output_dir, input_spec, sha256_file
    from sparsec.backends.tvm.cuda import cuda_sources, cuda_target, nvcc_compile, require_nvcc
    from sparsec.backends.tvm.env import cpu_target, host_cpu, import_tvm
    from sparsec.backends.tvm.lower import to_relax

    if target not in TARGETS:
        raise SparsecError(f"unknown TVM target '{target}'; valid: {', '.join(TARGETS)}")
    check_output_dir(out_dir, force)
    if target == "cuda":
        require_nvcc()
    threads = threads or os.cpu_count() or 1
    tvm = import_tvm(threads)
    start = time.perf_counter()
    mod = to_relax(program, sparse=sparse, target=target)
    kernels = sorted(str(gv.name_hint) for gv in mod.functions if str(gv.name_hint).startswith("sparsec_linear_"))
    lowered = time.perf_counter()
    executable = tvm.compile(mod, target=cuda_target(CUDA_ARCH) if target == "cuda" else cpu_target())
    for code in cuda_sources(executable):  # the GPU compiles it on first load: check it compiles now
        nvcc_compile(code, CUDA_ARCH)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "sparsec": sparsec.__version__,
                "tvm": tvm.__version__, "target": target, "cpu": host_cpu(), "threads": threads,
                "arch": CUDA_ARCH if target == "cuda" else None,
                "sparse": sparse, "kernels": kernels, "inputs": inputs if inputs is not None else input_spec(program),
                "outputs": len(program.graph_signature.user_outputs), "source": source,
                "seconds": {"lower": round(lowered - start, 2), "compile": round(time.perf_counter() - lowered, 2)}}
    with atomic_directory(out_dir) as tmp:
        executable.export_library(os.path.join(tmp, LIB_FILE))
        manifest["files"] = {LIB_FILE: sha256_file(os.path.join(tmp, LIB_FILE))}
        with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_build_manifest(path: str) -> dict:
    """The manifest of build directory ``path``, checked against this sparsec, this TVM and this CPU."""
    import sparsec
    from sparsec.artifact import sha256_file
    from sparsec.backends.tvm.env import host_cpu, import_tvm

    if not is_build_dir(path):
        raise SparsecError(f"'{path}' is not a sparsec TVM build directory (no {MANIFEST_FILE} with format"
                           f" '{FORMAT}'); create one with 'sparsec compile OUT/ -o BUILD/'")
    with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
        m = json.load(f)
    rebuild = "rebuild it here with 'sparsec compile OUT/ -o BUILD/ --force'"
    if m.get("format_version") != FORMAT_VERSION:
        raise SparsecError(f"build '{path}' has format version {m.get('format_version')!r}; this sparsec reads"
                           f" version {FORMAT_VERSION}: {rebuild}")
    if m.get("sparsec") != sparsec.__version__:
        raise SparsecError(f"build '{path}' was made by sparsec {m.get('sparsec')}, this is sparsec"
                           f" {sparsec.__version__}: {rebuild}")
    tvm = import_tvm()
    if m.get("tvm") != tvm.__version__:
        raise SparsecError(f"build '{path}' was made with TVM {m.get('tvm')}, this is TVM {tvm.__version__}: {rebuild}")
    if m.get("target") == "llvm" and m.get("cpu") != host_cpu():
        raise SparsecError(f"build '{path}' was compiled for CPU '{m.get('cpu')}', this machine is '{host_cpu()}':"
                           f" {rebuild}")
    lib = os.path.join(path, LIB_FILE)
    if not os.path.isfile(lib) or sha256_file(lib) != m.get("files", {}).get(LIB_FILE):
        raise SparsecError(f"build '{path}': {LIB_FILE} is missing or does not match its checksum in {MANIFEST_FILE}"
                           f" (modified or damaged): {rebuild}")
    return m


@dataclass
class CompiledModel:
    """A loaded TVM build: call it with inputs by name (numpy arrays or torch tensors); returns numpy outputs."""

    path: str
    manifest: dict
    vm: Any

    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["inputs"] if "dtype" in s]

    device: Any = None

    def __call__(self, inputs: dict) -> dict:
        """``{output_i: numpy array}`` for ``inputs`` (``{name: array}``), checked against the build's input spec."""
        import numpy as np

        from sparsec.backends.tvm.env import import_tvm
        from sparsec.inputs import check_inputs, output_names

        tvm = import_tvm()
        arrays = {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in inputs.items()}
        check_inputs(arrays, self.manifest["inputs"], source="inputs", what=f"build '{self.path}'")
        out = self.vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(arrays[n]), device=self.device)
                                for n in self.input_names])
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return dict(zip(output_names(len(outs)), (o.numpy() for o in outs)))


def load_compiled(path: str, *, threads: int | None = None) -> CompiledModel:
    """Load build directory ``path`` (checked by :func:`read_build_manifest`); ``threads`` overrides the build's."""
    manifest = read_build_manifest(path)
    from sparsec.backends.tvm.env import import_tvm

    tvm = import_tvm(threads or manifest.get("threads"))
    from tvm import relax

    device = tvm.cpu()
    if manifest.get("target") == "cuda":
        from sparsec.backends.tvm.cuda import require_gpu

        require_gpu()
        if shutil.which("nvcc"):  # TVM compiles the CUDA source on first load: with nvcc, not NVRTC, if it is here
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        device = tvm.cuda(0)
    lib = tvm.runtime.load_module(os.path.join(path, LIB_FILE))
    return CompiledModel(path, manifest, relax.VirtualMachine(lib, device), device)
