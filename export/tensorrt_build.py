"""TensorRT engine builder: component ONNX -> serialized engine (``.plan``).

Written against the TensorRT 10 Python API and type-checked with mypy over the
``tensorrt-stubs`` package (``scripts/install_tensorrt_stubs.py``); TensorRT itself is imported
lazily, so this module (and its pure parts: profiles, cache keys, file names) imports and is
unit-tested where TensorRT is absent.

Decisions, and why:

* **Profiles come from the component descriptors** (``Component.profile(ShapeRange)``): the
  builder never names a tensor itself. ``static_shapes`` collapses min/opt/max to opt so the
  runtime can capture the engine in a CUDA graph.
* **Strongly typed networks for Q/DQ (int8) graphs.** TensorRT 10 deprecates implicit INT8
  calibration; an explicit Q/DQ graph built strongly typed runs exactly the precisions the
  graph says. fp16 graphs exported with fp16 weights are also built strongly typed (the ONNX
  types already say which ops stay fp32); an fp32 ONNX asked to become fp16 uses the FP16 flag
  (weakly typed: TensorRT may choose fp16 kernels where it sees fit).
* **Engine cache keyed by content**: ONNX sha256 + TensorRT version + GPU compute capability +
  profile + build options. A path that merely exists is never trusted.
* **Timing cache persisted** next to the engine cache and merged after every build, so a
  second build (another resolution range, another component sharing layer shapes) skips most
  tactic timing.
* **Direct API rather than polygraphy**: the build is ~40 lines here and stays visible to
  mypy; polygraphy's loaders would hide the same calls behind untyped wrappers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trt_sd.models.descriptors import Component, Shape, ShapeRange
from trt_sd.models.errors import BackendUnavailableError, InputError, TrtSdError
from trt_sd.models.tensorrt_check import import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

HARDWARE_LEVELS = ("none", "ampere+", "same-cc")


@dataclass(frozen=True)
class BuildOptions:
    """What changes the engine TensorRT produces (and therefore its cache key)."""

    precision: str = "fp16"  # fp32 | fp16 | int8 (int8 = a Q/DQ ONNX, built strongly typed)
    optimization_level: int = 3  # 0..5; 3 is TensorRT's default, 5 searches longest
    version_compatible: bool = False  # engine loads on later TensorRT 10.x runtimes
    hardware_compatible: str = "none"  # none | ampere+ | same-cc
    static_shapes: bool = False  # min = opt = max, for CUDA graph capture
    workspace_mib: int | None = None  # cap on tactic scratch memory; None = TensorRT's default

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise InputError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(
                f"builder optimisation level must be 0..5, got {self.optimization_level}"
            )
        if self.hardware_compatible not in HARDWARE_LEVELS:
            raise InputError(
                f"hardware compatibility must be one of {', '.join(HARDWARE_LEVELS)}, "
                f"got {self.hardware_compatible!r}"
            )

    @property
    def strongly_typed(self) -> bool:
        return self.precision == "int8"


@dataclass(frozen=True)
class BuildResult:
    """One engine build (or cache hit), as recorded in the build log and the manifest."""

    component: str
    engine: Path
    cache_key: str
    cache_hit: bool
    seconds: float
    size_bytes: int
    tensorrt_version: str
    compute_capability: str


def engine_profile(
    component: Component, shapes: ShapeRange, static_shapes: bool = False
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per-input (min, opt, max) shapes; static mode pins every input at its optimum."""
    profile = component.profile(shapes)
    if static_shapes:
        return {name: (opt, opt, opt) for name, (_, opt, _) in profile.items()}
    return profile


def engine_cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
    profile: dict[str, tuple[Shape, Shape, Shape]],
    options: BuildOptions,
) -> str:
    """Content key of an engine: everything that changes what TensorRT would build."""
    payload = {
        "onnx": onnx_sha256,
        "tensorrt": tensorrt_version,
        "sm": compute_capability,
        "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())},
        "options": asdict(options),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def engine_file_name(
    component: str, options: BuildOptions, compute_capability: str, key: str
) -> str:
    """``unet.fp16.sm90.<key12>.plan``: readable, and unique per content key."""
    sm = compute_capability.replace(".", "")
    return f"{component}.{options.precision}.sm{sm}.{key[:12]}.plan"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of an ONNX file and its external-data files beside it (``*.onnx.data``)."""
    h = hashlib.sha256()
    for p in [path, *sorted(path.parent.glob(path.name + ".*data*"))]:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def require_tensorrt() -> str:
    """TensorRT's version, or BackendUnavailableError with how to install it."""
    return str(import_tensorrt().__version__)


def compute_capability(device: int = 0) -> str:
    """``"9.0"`` for an H100: part of the engine cache key (engines are per-architecture)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.x layout
        except ImportError:
            raise BackendUnavailableError(
                "cuda-python is needed to query the GPU: pip install 'trt-sd[tensorrt]'"
            ) from None
    attr = cudart.cudaDeviceAttr
    err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
    err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
    if int(err) or int(err2):
        raise BackendUnavailableError(f"no usable CUDA device {device} ({err})")
    return f"{major}.{minor}"


def _configure(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    profile: dict[str, tuple[Shape, Shape, Shape]],
    options: BuildOptions,
    timing_cache: bytes,
) -> trt.IBuilderConfig:
    import tensorrt as trt

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.precision == "fp16" and not options.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif options.hardware_compatible == "same-cc":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise TrtSdError(f"ONNX input {name!r} has no shape profile in the descriptor")
        lo, opt, hi = profile[name]
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build_engine(
    onnx_path: Path,
    component: Component,
    shapes: ShapeRange,
    options: BuildOptions,
    cache_dir: Path,
    device: int = 0,
) -> BuildResult:
    """Build (or reuse from ``cache_dir``) the engine of one component's ONNX graph."""
    trt_version = require_tensorrt()
    import tensorrt as trt

    cc = compute_capability(device)
    profile = engine_profile(component, shapes, options.static_shapes)
    key = engine_cache_key(file_sha256(onnx_path), trt_version, cc, profile, options)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine = cache_dir / engine_file_name(component.name, options, cc, key)
    if engine.is_file() and (cache_dir / (engine.name + ".json")).is_file():
        return BuildResult(
            component.name, engine, key, True, 0.0, engine.stat().st_size, trt_version, cc
        )

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtSdError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    timing_path = cache_dir / "timing.cache"
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    config = _configure(builder, network, profile, options, timing)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtSdError(f"TensorRT failed to build the {component.name} engine (see log above)")
    _atomic_write(engine, memoryview(serialized))
    _atomic_write(timing_path, memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - start
    result = BuildResult(
        component.name, engine, key, False, seconds, engine.stat().st_size, trt_version, cc
    )
    log = {
        **asdict(result),
        "engine": engine.name,
        "options": asdict(options),
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
    }
    _atomic_write(cache_dir / (engine.name + ".json"), json.dumps(log, indent=2).encode())
    return result


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
