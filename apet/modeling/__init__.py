"""Torch model pieces shared by export, the torch runtime and the benchmarks."""
