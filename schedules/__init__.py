"""Kernels (TIR compute definitions) and their schedules per backend."""
