"""TVM backend: sparsec's own activation-sparse TIR kernels (CPU via LLVM; CUDA source compiled with nvcc).

- :mod:`sparsec.backends.tvm.kernels`: the CPU linear kernels (sparse GEMV, dense, batch > 1) and weight packing.
"""
