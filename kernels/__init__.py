"""Triton GPU kernels (shipped as the subpackage cai_engine.kernels)."""
