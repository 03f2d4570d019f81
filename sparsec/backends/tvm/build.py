"""The TVM build directory: compile a sparsec program, write it atomically, load and run it without torch models.

A build directory holds ``model.so`` (the compiled Relax VM executable: code only), ``params.bin`` (the weights,
packed for the kernels, as raw little-endian arrays at 64-byte aligned offsets) and ``manifest.json``: format and
version, the sparsec and TVM versions, the target and the CPU it was compiled for, the thread count, the input spec,
the number of outputs, each parameter's dtype, shape and offset, and the sha256 of every file. Loading checks all of
it: a build from another sparsec or TVM version, or for another CPU, is refused with a message saying how to rebuild.
A cached decoder program (:mod:`sparsec.kv_cache`) also records ``generation`` (``eos_token_id``, ``max_context`` in
tokens) and keeps the artifact's tokenizer files in ``tokenizer/``: :class:`sparsec.backends.tvm.generate.TvmStepper`
generates from the build directory alone. Its library also holds the ``decode`` function (the KV cache updated in
place, :mod:`sparsec.backends.tvm.decode`) when it could be made: the manifest's ``decode`` says how many values its
``past_length`` takes (null: no decode function, the stepper runs ``main``).
Keeping the weights out of the library keeps compiling a large model affordable: the weights are never embedded in
generated code, and each is written to ``params.bin`` one at a time.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsec import progress
from sparsec.calling import (HOW_TO_PASS, Outputs, as_array, as_numpy, complete_inputs, named_inputs, positional_names,
                             program_output_names)
from sparsec.errors import SparsecError

FORMAT = "sparsec-tvm-build"
FORMAT_VERSION = 2
LIB_FILE, PARAMS_FILE, MANIFEST_FILE, TOKENIZER_DIR = "model.so", "params.bin", "manifest.json", "tokenizer"
ALIGN = 64  # byte alignment of each parameter in params.bin
TARGETS = ("llvm", "cuda", "aarch64")
CUDA_ARCH = "sm_90"  # H100 / H200
CROSS_CC = "aarch64-linux-gnu-gcc"  # links an aarch64 model.so when installed (Debian: gcc-aarch64-linux-gnu)
AARCH64_LIB = "model.tar"  # without it: the aarch64 objects, linked by TVM with the target machine's compiler on load


def is_build_dir(path: str) -> bool:
    """True when ``path`` is a directory whose manifest says it is a TVM build (no torch or TVM import)."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def compile_program(program, out_dir: str, *, target: str = "llvm", threads: int | None = None, sparse: bool = True,
                    inputs: list | None = None, source: str | None = None, force: bool = False,
                    generation: dict | None = None, tokenizer: str | None = None,
                    output_names: list[str] | None = None, tune_seconds: float | None = None) -> dict:
    """Lower ``program`` (an ExportedProgram) with sparsec's kernels, compile it for ``target`` and write the build
    directory ``out_dir`` atomically. Returns the manifest.

    A cached program's ``generation`` facts (``eos_token_id``, ``max_context``) and the tokenizer files of the folder
    ``tokenizer`` go into the build; both default to those of the artifact directory ``source``. ``output_names``:
    as the model named its outputs (:func:`sparsec.calling.program_output_names`). ``tune_seconds``: per kernel not
    in the tuning database, how long to measure schedules on this CPU (:mod:`sparsec.backends.tvm.tuning`; 0: the
    database's or the default; None: :func:`~sparsec.backends.tvm.tuning.default_seconds`); the manifest's
    ``schedules`` say which each kernel got and from where."""
    import sparsec
    from sparsec.artifact import atomic_directory, check_output_dir, copy_tokenizer, input_spec, sha256_file
    from sparsec.backends.tvm.cuda import cuda_pipeline, cuda_sources, cuda_target, nvcc_compile, require_nvcc
    from sparsec.backends.tvm.env import cpu_target, host_cpu, import_tvm
    from sparsec.backends.tvm.lower import to_relax
    from sparsec.backends.tvm.schedule import cpu_pipeline

    if target not in TARGETS:
        raise SparsecError(f"unknown TVM target '{target}'; valid: {', '.join(TARGETS)}")
    check_output_dir(out_dir, force)
    if target == "cuda":
        require_nvcc()
    inputs = inputs if inputs is not None else input_spec(program)
    generation, tokenizer = _generation_facts(inputs, source, generation, tokenizer)
    threads = threads or os.cpu_count() or 1
    tvm = import_tvm(threads)
    start = time.perf_counter()
    from tvm.relax.transform import FoldConstant

    cpu_kind = "llvm" if target == "aarch64" else target  # the same lowering; code generated for another CPU
    scheduler = None
    if target == "llvm":  # the database is keyed by this CPU: a cross build takes the defaults
        from sparsec.backends.tvm.tuning import Scheduler, default_seconds

        scheduler = Scheduler(default_seconds() if tune_seconds is None else tune_seconds, threads)
    with progress.task("compile: lower"):
        mod, weights = _lift_weights(FoldConstant()(to_relax(program, sparse=sparse, target=cpu_kind,
                                                             schedule=scheduler)))
        decode = None
        if cpu_kind == "llvm" and generation is not None:
            from sparsec.backends.tvm.decode import add_decode

            mod, decode = add_decode(mod)
    kernels = sorted(str(gv.name_hint) for gv in mod.functions if str(gv.name_hint).startswith("sparsec_linear_"))
    lowered = time.perf_counter()
    with progress.task("compile: build"):
        if target == "cuda":
            machine = cuda_target(CUDA_ARCH)
            executable = tvm.compile(mod, target=machine, relax_pipeline=cuda_pipeline(machine))
        else:
            machine = aarch64_target() if target == "aarch64" else cpu_target()
            executable = tvm.compile(mod, target=machine, relax_pipeline=cpu_pipeline(machine))
        for code in cuda_sources(executable):  # the GPU compiles it on first load: check it compiles now
            nvcc_compile(code, CUDA_ARCH)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "sparsec": sparsec.__version__,
                "tvm": tvm.__version__, "target": target,
                "cpu": "generic (armv8-a, NEON)" if target == "aarch64" else host_cpu(), "threads": threads,
                "arch": CUDA_ARCH if target == "cuda" else None,
                "sparse": sparse, "kernels": kernels, "schedules": scheduler.chosen if scheduler else {},
                "inputs": inputs,
                "outputs": len(program.graph_signature.user_outputs),
                "output_names": program_output_names(program, output_names), "source": source,
                "seconds": {"lower": round(lowered - start, 2), "compile": round(time.perf_counter() - lowered, 2)}}
    library = LIB_FILE
    with atomic_directory(out_dir) as tmp:
        if target == "aarch64":
            from tvm.support import cc

            cross = shutil.which(CROSS_CC)
            library = LIB_FILE if cross else AARCH64_LIB
            executable.export_library(os.path.join(tmp, library),
                                      **({"fcompile": cc.cross_compiler(cross)} if cross else {}))
            manifest["library"] = library
        else:
            executable.export_library(os.path.join(tmp, LIB_FILE))
        manifest["params"] = _write_params(weights, os.path.join(tmp, PARAMS_FILE))
        names = [library, PARAMS_FILE]
        if generation is not None:
            manifest["generation"] = generation
            manifest["decode"] = None if decode is None else {"lengths": decode}
            names += [f"{TOKENIZER_DIR}/{f}" for f in copy_tokenizer(tokenizer, os.path.join(tmp, TOKENIZER_DIR))]
        manifest["files"] = {name: sha256_file(os.path.join(tmp, name)) for name in names}
        with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def aarch64_target():
    """The LLVM target of any 64-bit ARM CPU running Linux (ARMv8-A: NEON's 128-bit vectors; the kernels' 16-lane
    vectors become four NEON registers)."""
    from sparsec.backends.tvm.env import import_tvm

    return import_tvm().target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic",
                                       "mattr": ["+neon"]})


def _generation_facts(inputs: list, source: str | None, generation: dict | None,
                      tokenizer: str | None) -> tuple[dict | None, str | None]:
    """``(generation, tokenizer folder)`` of a cached program (``(None, None)`` for any other): given, else the
    artifact ``source``'s manifest ``generation`` and its ``tokenizer/``, else the context limit of the inputs."""
    from sparsec.kv_cache import cache_layout

    layout = cache_layout(inputs)
    if layout is None:
        return None, None
    if source and os.path.isdir(source):
        if generation is None:
            try:
                with open(os.path.join(source, MANIFEST_FILE), encoding="utf-8") as f:
                    generation = json.load(f).get("generation")
            except (OSError, ValueError):
                generation = None
        tokenizer = tokenizer or os.path.join(source, TOKENIZER_DIR)
    facts = {"eos_token_id": None, "max_context": layout.max_context, **(generation or {})}
    return facts, tokenizer if tokenizer and os.path.isdir(tokenizer) else None


def _lift_weights(mod, min_bytes: int = 1024):
    """``(mod, weights)``: every constant of ``mod['main']`` of at least ``min_bytes`` becomes a trailing parameter
    of main, one however many times it is used (``num_input`` marks where the user inputs end); ``weights`` are their
    values, in parameter order."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def __init__(self):
            super().__init__(mod)
            self.params, self.values = [], []
            self.lifted = {}  # a constant used twice (a tied head's packed weights) is one parameter

        def visit_generic_const_(self, const):
            ty, dtype = const.ty, str(const.ty.dtype)
            if math.prod(int(d) for d in ty.shape) * np.dtype(_NUMPY.get(dtype, dtype)).itemsize < min_bytes:
                return const
            if const.__chandle__() not in self.lifted:
                self.params.append(relax.Var(f"w{len(self.params)}", ty))
                self.values.append(const.value)
                self.lifted[const.__chandle__()] = self.params[-1]
            return self.lifted[const.__chandle__()]

    main = mod["main"]
    lift = Lift()
    body = lift.visit_expr(main.body)
    mod["main"] = relax.Function(list(main.params) + lift.params, body, main.ret_ty, main.is_pure,
                                 main.attrs).with_attr("num_input", len(main.params))
    return mod, lift.values


_NUMPY = {"bfloat16": "uint16"}  # numpy has no bfloat16: its bit pattern


def _write_params(weights, path: str) -> list[dict]:
    """Write ``weights`` (TVM tensors) to ``path`` one at a time, each at an ``ALIGN``-byte offset; their specs."""
    specs = []
    with open(path, "wb") as f:
        for w in weights:
            f.write(b"\0" * (-f.tell() % ALIGN))
            array = w.numpy()
            specs.append({"dtype": str(w.dtype), "shape": list(array.shape), "offset": f.tell()})
            f.write(memoryview(np.ascontiguousarray(array).view(np.uint8)))
            del array
    return specs


def _read_params(path: str, specs: list[dict], device) -> list:
    """The parameters of ``params.bin`` as TVM tensors on ``device``. On a CPU each is read straight into its tensor's
    memory (one copy resident: a memory map would hold a second one, file pages, until loading ends); other devices
    copy from a memory map."""
    import torch
    import tvm

    out = []
    if device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for spec in specs:
            dtype = np.dtype(_NUMPY.get(spec["dtype"], spec["dtype"]))
            count = math.prod(spec["shape"])
            array = data[spec["offset"]: spec["offset"] + count * dtype.itemsize].view(dtype).reshape(spec["shape"])
            out.append(tvm.runtime.empty(spec["shape"], spec["dtype"], device).copyfrom(array))
        return out
    with open(path, "rb", buffering=0) as f:
        for spec in specs:
            tensor = tvm.runtime.empty(spec["shape"], spec["dtype"], device)
            buffer = torch.from_dlpack(tensor).reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes
            f.seek(spec["offset"])
            done = 0
            while done < buffer.size:
                read = f.readinto(memoryview(buffer[done:]))
                if not read:
                    raise SparsecError(f"'{path}' ends before parameter {len(out)} ({spec['shape']} {spec['dtype']}):"
                                       " the build is incomplete; re-run 'sparsec compile'")
                done += read
            out.append(tensor)
    return out


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
    if m.get("target") == "aarch64" and platform.machine() not in ("aarch64", "arm64"):
        raise SparsecError(f"build '{path}' was compiled for aarch64 CPUs, this machine is {platform.machine()}:"
                           f" run it on an aarch64 machine, or {rebuild}")
    for name in dict.fromkeys([m.get("library", LIB_FILE), PARAMS_FILE, *m.get("files", {})]):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or sha256_file(file) != m.get("files", {}).get(name):
            raise SparsecError(f"build '{path}': {name} is missing or does not match its checksum in {MANIFEST_FILE}"
                               f" (modified or damaged): {rebuild}")
    return m


@dataclass
class _Plan:
    """How :class:`CompiledModel` calls its VM for one input signature."""

    inputs: list  # per VM input: its name, and the TVM tensor that stands for it when the caller omits it, else None
    convert: Any  # an output tensor as the caller's kind: numpy for numpy inputs, else torch
    single: bool = False  # whether the VM returns one tensor, not an array of them (learnt at the first call)
    copied: list | None = None  # indices of outputs that alias an input or a weight (learnt at the first call)


@dataclass
class CompiledModel:
    """A loaded TVM build, called as :mod:`sparsec.calling` describes: ``compiled(input_ids=ids)`` or
    ``compiled({"input_ids": ids})`` (numpy arrays or torch tensors) gives :class:`~sparsec.calling.Outputs`.

    What a call adds to the bare VM call (``benchmarks/results/call_overhead.md``) is kept small: the inputs are
    checked against the build's input spec once per set of names, dtypes and shapes; a C-contiguous, 64-byte aligned
    CPU tensor (torch allocates so) goes in through DLPack without a copy, any other input is copied into a buffer
    kept for its shape; outputs come back as DLPack views of TVM's (a copy only of an output that aliases an input or
    a weight)."""

    path: str
    manifest: dict
    vm: Any
    params: list
    device: Any = None

    def __post_init__(self):
        self._main = self.vm["main"]
        self.input_names = [s["name"] for s in self.manifest["inputs"] if "dtype" in s]
        self.output_names = self.manifest.get("output_names") or positional_names(self.manifest["outputs"])
        self._plans: dict = {}  # input signature -> its _Plan, checked against the spec
        self._staging: dict = {}  # (name, dtype, shape) -> the aligned TVM tensor a copied input goes to
        self._cpu = self.device is None or self.device.dlpack_device_type() == 1  # kDLCPU

    def __call__(self, inputs: dict | None = None, /, **named):
        """The outputs by name for inputs given by keyword or in one dict; numpy for numpy inputs, else torch."""
        if inputs is None or named or type(inputs) is not dict:
            inputs = named_inputs(() if inputs is None else (inputs,), named)
        outs, convert = self._execute(inputs, "the call", HOW_TO_PASS)
        return Outputs(zip(self.output_names, [convert(o) for o in outs]))

    def run(self, inputs: dict, *, source: str = "inputs", hint: str = "") -> dict:
        """``{output name: numpy array}`` for ``inputs`` (``{name: array}``; a missing ``attention_mask`` is ones),
        checked against the build's input spec; ``source`` and ``hint`` word the error about a missing input."""
        return dict(zip(self.output_names, [o.numpy() for o in self._execute(inputs, source, hint)[0]]))

    def _execute(self, named: dict, source: str, hint: str) -> tuple:
        """The VM's output tensors for the inputs ``named`` (numpy arrays, torch tensors or array-likes), and the
        function that returns one as the caller's kind: numpy for numpy arrays, else torch."""
        try:
            plan = self._plans[tuple([(k, v.dtype, v.shape) for k, v in named.items()])]  # torch.Size is a tuple
            convert = plan.convert
        except (KeyError, AttributeError):  # a new signature, or lists and other array-likes
            convert = self._converter(any(isinstance(v, np.ndarray) for v in named.values()))
            named, plan = self._plan(named, source, hint)
        args = [self._tvm_input(n, named[n]) if fixed is None else fixed for n, fixed in plan.inputs]
        out = self._main(*args, *self.params)
        if plan.copied is None:
            self._learn(plan, out, args)
        outs = [out] if plan.single else list(out)
        for i in plan.copied:
            outs[i] = outs[i].copyto(self.device)
        return outs, convert

    def _converter(self, numpy: bool):
        """An output tensor as numpy (``numpy``) or torch: a DLPack view on the CPU, else a copy to the host."""
        if not self._cpu:
            if numpy:
                return lambda o: o.numpy()
            import torch

            return lambda o: torch.from_numpy(o.numpy())
        if numpy:
            return np.from_dlpack
        from torch.utils.dlpack import from_dlpack  # of a capsule: 0.6x torch.from_dlpack's time

        return lambda o: from_dlpack(o.__dlpack__())

    def _plan(self, named: dict, source: str, hint: str) -> tuple:
        """``named`` as arrays or tensors, checked against the build's input spec, and its :class:`_Plan`, kept for
        its signature (names, dtypes, shapes)."""
        named = {k: as_array(v) for k, v in named.items()}
        signature = tuple([(k, v.dtype, v.shape) for k, v in named.items()])
        plan = self._plans.get(signature)
        if plan is None:
            full = complete_inputs(named, self.manifest["inputs"], source=source, what=f"build '{self.path}'",
                                   hint=hint)
            defaults = [(n, None if n in named else self._tvm_input(n, full[n], keep=False)) for n in self.input_names]
            numpy = any(isinstance(v, np.ndarray) for v in named.values())
            plan = self._plans[signature] = _Plan(defaults, self._converter(numpy))
        return named, plan

    def _learn(self, plan: _Plan, out, args: list) -> None:
        """At a plan's first call: whether the VM returns one tensor, and which outputs are an input or a weight
        (those are copied at every call: the caller may write to an output). A VM program's outputs alias the same
        inputs at every call; a fresh output never has the address of a live input or weight."""
        plan.single = hasattr(out, "data_ptr")
        outs = [out] if plan.single else list(out)
        taken = {t.data_ptr() for t in [*self.params, *args]} if self._cpu else set()
        plan.copied = [i for i, o in enumerate(outs) if o.data_ptr() in taken]

    def _tvm_input(self, name: str, value, keep: bool = True):
        """``value`` (numpy array or torch tensor) as a TVM tensor on the build's device: a DLPack view when it can be
        one (and ``keep``: the caller's memory), else a copy into the buffer kept for its name, dtype and shape."""
        tvm = sys.modules["tvm"]
        if keep and self._cpu:
            at = value.ctypes.data if isinstance(value, np.ndarray) else value.data_ptr() if value.is_cpu else 1
            if at % ALIGN == 0:
                try:  # TVM takes a C-contiguous, aligned, writeable CPU array as it is
                    return tvm.runtime.from_dlpack(value)
                except (RuntimeError, BufferError):  # not contiguous, or read-only
                    pass
        if not isinstance(value, np.ndarray):
            value = value.detach()
        dtype = str(value.dtype).removeprefix("torch.")
        key = (name, dtype, tuple(value.shape))
        buf = self._staging.get(key) if keep else None
        if buf is None:
            buf = tvm.runtime.empty(key[2], dtype, self.device)
            if keep:
                self._staging[key] = buf
        if self._cpu and isinstance(value, np.ndarray):
            np.from_dlpack(buf)[...] = value
        else:
            buf.copyfrom(np.ascontiguousarray(as_numpy(value)))
        return buf


def load_compiled(path: str, *, threads: int | None = None, memory: str = "pooled") -> CompiledModel:
    """Load build directory ``path`` (checked by :func:`read_build_manifest`); ``threads`` overrides the build's.

    ``memory``: the VM's allocator. 'pooled' (TVM's default) keeps every freed buffer for reuse by a request of the
    same size: right for fixed shapes, but calls whose shapes keep changing (a KV cache growing by a token a step)
    never reuse them, and memory grows without bound; 'naive' frees each buffer (the C allocator reuses it)."""
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
    lib = tvm.runtime.load_module(os.path.join(path, manifest.get("library", LIB_FILE)))
    params = _read_params(os.path.join(path, PARAMS_FILE), manifest["params"], device)
    return CompiledModel(path, manifest, relax.VirtualMachine(lib, device, memory_cfg=memory), params, device)
