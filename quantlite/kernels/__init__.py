"""Kernels for y = x @ dequant(qw).T: the torch reference, Triton, and the native CPU/CUDA library.
`quantlite.kernels.dispatch.qmatmul` picks one; see docs/kernels.md."""
