"""OpenVINO backend: the same ONNX engine files on the CPU, in bf16 where the CPU computes it.

Why it exists: on CPUs with native bf16 arithmetic (AVX512-BF16, AMX) OpenVINO runs fp32 weights
with bf16 matmuls and convolutions (its default ``INFERENCE_PRECISION_HINT`` there), ~1.5x
faster than fp32 in ONNX Runtime or OpenVINO (docs/benchmarks.md "## CPU peers"), and that is
what CPU users pick (FastSD CPU, optimum-intel). ONNX Runtime has no bf16 path on the CPU
provider, so the engine library itself is the difference, not trt-sd's graph.

No separate export: OpenVINO 2026's ONNX frontend reads the graphs ``trt-sd export`` writes for
ONNX Runtime, including the ``com.microsoft.MultiHeadAttention`` fusion (it becomes OpenVINO's
``ScaledDotProductAttention``; fp32 outputs match ONNX Runtime to ~1e-6) and INT8 Q/DQ graphs.

Two names: ``openvino`` computes in bf16 where :func:`.hardware.cpu_bf16` says the CPU has it
natively, else fp32; ``openvino-fp32`` always fp32 (bit-for-bit comparisons, CPUs where bf16
costs quality). bf16 keeps fp32 weights and tensors: only the arithmetic of matmuls and
convolutions rounds its inputs to bf16 (8 mantissa bits), with fp32 accumulation.

Settings, and why: intra-op threads from :func:`.onnxruntime.intra_op_threads` (physical cores,
``TRT_SD_NUM_THREADS``) so both CPU backends share one knob; the ``LATENCY`` hint with one stream,
since a generation is a chain of dependent calls; dynamic shapes as the manifest allows, one
compiled model for every size. ``openvino`` is imported when a backend is created, never at
``import trt_sd.runtime``.

Compiling is the load's cost (SD 1.5 UNet in bf16: 15.6 s at load ~7, docs/benchmarks.md "## CPU
peers, session 2"); the CPU cache switch ONNX Runtime uses (``TRT_SD_ORT_CACHE``, ``--ort-cache``,
:mod:`.ort_cache`) also turns on OpenVINO's own compiled-model cache in its ``openvino/``
subfolder: 3.4 s to load the UNet from it, for 3.3 GB of disk. OpenVINO keys its entries by
model, settings and device itself.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import BackendUnavailableError, InputError, ManifestError
from trt_sd.models.manifest import ComponentEntry

from . import ort_cache
from .base import EngineBackend
from .hardware import cpu_bf16

INSTALL_HINT = "install OpenVINO with: pip install 'trt-sd[openvino]'"
#: backend name -> inference precision ("auto": bf16 where the CPU has it natively)
PRECISIONS = {"openvino": "auto", "openvino-fp32": "f32", "openvino-bf16": "bf16"}


def import_openvino() -> Any:
    """The ``openvino`` module, or BackendUnavailableError with the install command."""
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(f"OpenVINO is not installed; {INSTALL_HINT}") from None
    return openvino


def openvino_installed() -> bool:
    """Whether ``import openvino`` would find the package, without importing it (~0.3 s)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def inference_precision(kind: str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for backend name ``kind``."""
    try:
        wanted = PRECISIONS[kind]
    except KeyError:
        raise InputError(
            f"unknown OpenVINO backend {kind!r}; choose from {', '.join(PRECISIONS)}"
        ) from None
    if wanted == "auto":
        return "bf16" if cpu_bf16() else "f32"
    if wanted == "bf16" and not cpu_bf16():
        raise BackendUnavailableError(
            "this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); use --backend openvino"
        )
    return wanted


class OpenVinoBackend(EngineBackend):
    """One compiled OpenVINO model on the CPU; infer requests are pooled for concurrent calls."""

    def __init__(
        self,
        path: Path,
        component: Component,
        entry: ComponentEntry,
        kind: str = "openvino",
        config: dict[str, Any] | None = None,
    ) -> None:
        """``config``: OpenVINO properties instead of trt-sd's (``{}`` = OpenVINO's defaults,
        how bench/bench_cpu_peers.py measures the peer)."""
        super().__init__(component, entry)
        self.precision = inference_precision(kind)
        ov = import_openvino()
        from .onnxruntime import intra_op_threads  # the shared thread knob; no ORT import

        self.kind = kind
        if config is None:
            config = {
                "INFERENCE_PRECISION_HINT": self.precision,
                "INFERENCE_NUM_THREADS": intra_op_threads(),
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            }
        cache = ort_cache.cache_dir()  # InputError for a bad setting, as ONNX Runtime's
        try:
            core = ov.Core()
            if cache is not None:
                core.set_property({"CACHE_DIR": str(cache / "openvino")})
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long traces
            text = str(e).strip()
            first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
            raise ManifestError(
                f"engine file {path.name} (component {entry.name}) could not be loaded by "
                f"OpenVINO: {first.strip()[:300]}"
            ) from None
        self._names = {s.name for s in self.outputs}
        self._ports = [(p, p.get_any_name()) for p in self.compiled.outputs]
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def _request(self) -> Any:
        with self._lock:
            return self._idle.pop() if self._idle else self.compiled.create_infer_request()

    def run(self, feeds: Mapping[str, Any], keep_on_device: Collection[str] = ()) -> dict[str, Any]:
        """Outputs are fresh host arrays (``share_outputs=False``): the request's buffers are
        reused by the next call, which may come from another thread."""
        cast = self.cast_feeds(feeds)
        request = self._request()
        try:
            result = request.infer(cast, share_inputs=True, share_outputs=False)
            return {name: result[port] for port, name in self._ports if name in self._names}
        finally:
            with self._lock:
                self._idle.append(request)
