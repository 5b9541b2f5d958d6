"""NumPy samplers with diffusers-compatible semantics."""
