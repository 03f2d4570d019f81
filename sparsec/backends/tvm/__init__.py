"""TVM backend: sparsec's own activation-sparse TIR kernels in a compiled Relax model (CPU via LLVM).

- :mod:`sparsec.backends.tvm.kernels`: the CPU linear kernels (sparse GEMV, dense, batch > 1) and weight packing.
- :mod:`sparsec.backends.tvm.attention`: the scheduled CPU attention kernel (sdpa over a KV cache, online softmax).
- :mod:`sparsec.backends.tvm.tuning`: per-CPU schedules of the linear kernels, measured and kept in a database.
- :mod:`sparsec.backends.tvm.lower`: torch.export program -> Relax, linear layers and sdpa -> those kernels.
- :mod:`sparsec.backends.tvm.schedule`: the CPU pipeline: vectorizable transcendentals, schedules for the other ops.
- :mod:`sparsec.backends.tvm.build`: build directories (compile, write atomically, check, load, run).
- :mod:`sparsec.backends.tvm.generate`: the generation stepper of a cached build (KV cache kept in TVM).
- :mod:`sparsec.backends.tvm.torch_kernels`: the same kernels in plain PyTorch (``sparsec::tvm_linear``, zero-copy).
- :mod:`sparsec.backends.tvm.env`: importing TVM, its thread pool, the host-CPU target.
"""
