"""Typed exceptions shared by export and runtime.

Every bad input surfaces as one of these (or a plain ``ValueError`` from the NumPy-only
samplers); the CLI turns them into a single ``error: ...`` line and exit code 2, the Python API
lets them propagate so services can catch them by type.
"""

from __future__ import annotations


class TrtSdError(Exception):
    """Base class of every error trt-sd raises on purpose."""


class InputError(TrtSdError, ValueError):
    """A user-supplied argument is invalid (wrong size, unknown name, out of range, ...)."""


class ManifestError(TrtSdError):
    """The engine directory is missing, corrupt, or was written by an incompatible version."""


class BackendUnavailableError(TrtSdError):
    """The requested engine library (TensorRT, ONNX Runtime CUDA, ...) is not installed here."""


class NumericalError(TrtSdError):
    """A component produced NaN or inf; the message names the component."""
