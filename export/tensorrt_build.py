"""TensorRT engine builder: component ONNX -> serialized engine (``.plan``), one code path for
TensorRT 10.8+ / 11.x (``tensorrt``) and TensorRT-RTX 1.x (``tensorrt_rtx``).

TensorRT is imported lazily, so this module (and its pure parts: profiles, cache keys, file
names) imports and is unit-tested where TensorRT is absent. CI type-checks it twice with mypy:
against the TensorRT 10 stubs and, with ``--always-true TRT_RTX_TYPES``, against stubs generated
from the installed TensorRT-RTX bindings (``scripts/generate_tensorrt_rtx_stubs.py``).

Decisions, and why:

* **Strongly typed only.** TensorRT 11 removed weak typing (the FP16 / INT8 builder flags, int8
  calibrators, precision constraints, the fast-precision platform queries) and TensorRT-RTX
  never had it.
  Precision therefore comes from the ONNX graph: fp16 engines from fp16 graphs (the fp32
  islands the export keeps stay fp32), int8 engines from explicit Q/DQ graphs, fp32 from fp32.
  ``tests/test_tensorrt_api.py`` fails if a removed name appears anywhere in our code.
* **Profiles come from the component descriptors** (``Component.profile(ShapeRange)``); the
  builder never names a tensor itself, and refuses a parsed network whose inputs, outputs or
  dtypes differ from the descriptor. What the parsed network declared (names, dtypes, shapes,
  the profile set on it) is returned as ``network_io`` and recorded in the manifest, so tests
  and users can check it without deserializing the engine (which needs a GPU).
* **Engine cache keyed by content**: ONNX sha256 + flavour + version + target GPUs (the local
  compute capability for TensorRT, the target list for TensorRT-RTX) + profile + options.
* **Timing cache persisted** per flavour next to the engine cache and merged after each build.
* **Direct API rather than polygraphy**: the build stays visible to mypy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from trt_sd.models.descriptors import Component, Shape, ShapeRange
from trt_sd.models.errors import InputError, TrtSdError
from trt_sd.models.tensorrt_check import FLAVOURS, import_tensorrt

from .trt_logger import collecting_logger, label
from .trt_targets import compute_capability, resolve_rtx_targets, set_rtx_targets

#: mypy: ``--always-true TRT_RTX_TYPES`` checks this module against the TensorRT-RTX bindings.
TRT_RTX_TYPES = False
if TYPE_CHECKING:
    from typing_extensions import Buffer

    if TRT_RTX_TYPES:
        import tensorrt_rtx as trt
    else:
        import tensorrt as trt

HARDWARE_LEVELS = ("none", "ampere+", "same-cc")
#: Manifest / CLI name of the TensorRT-RTX flavour.
RTX = "tensorrt-rtx"

__all__ = [
    "RTX",
    "BuildOptions",
    "BuildResult",
    "build_engine",
    "compute_capability",
    "engine_cache_key",
    "engine_file_name",
    "engine_profile",
    "file_sha256",
    "require_tensorrt",
]


@dataclass(frozen=True)
class BuildOptions:
    """What changes the engine TensorRT produces (and therefore its cache key)."""

    precision: str = "fp16"  # fp32 | fp16 | int8: what the ONNX graph holds (strongly typed)
    optimization_level: int = 3  # 0..5; 3 is TensorRT's default, 5 searches longest
    version_compatible: bool = False  # engine loads on later runtimes of the same major version
    hardware_compatible: str = "none"  # none | ampere+ | same-cc (TensorRT only)
    static_shapes: bool = False  # min = opt = max, for CUDA graph capture
    workspace_mib: int | None = None  # cap on tactic scratch memory; None = TensorRT's default
    flavour: str = "tensorrt"  # tensorrt | tensorrt-rtx
    #: TensorRT-RTX build targets ("8.6", ...); empty = every one it supports.
    compute_capabilities: tuple[str, ...] = field(default=())
    refittable: bool = False  # weights can be refit after load (LoRA)

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
        if self.flavour not in FLAVOURS:
            raise InputError(f"TensorRT flavour must be one of {', '.join(FLAVOURS)}")
        if self.flavour == RTX and self.hardware_compatible != "none":
            raise InputError(
                "--hardware-compatible is a TensorRT option; TensorRT-RTX engines target the "
                "compute capabilities given by --compute-capability"
            )
        if self.flavour != RTX and self.compute_capabilities:
            raise InputError(
                "--compute-capability needs --backend tensorrt-rtx (TensorRT builds for the "
                "GPU it runs on)"
            )


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
    #: The GPU the engine was built on (TensorRT) or its targets joined by "," (TensorRT-RTX).
    compute_capability: str
    flavour: str = "tensorrt"
    network_io: dict[str, Any] = field(default_factory=dict)


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
    """Content key of an engine: everything that changes what TensorRT would build (the
    flavour is part of ``options``)."""
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
    """``unet.fp16.sm90.<key12>.plan`` (TensorRT) or ``unet.fp16.rtx.<key12>.plan``."""
    target = "rtx" if options.flavour == RTX else "sm" + compute_capability.replace(".", "")
    return f"{component}.{options.precision}.{target}.{key[:12]}.plan"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of an ONNX file and its external-data files beside it (``*.onnx.data``)."""
    h = hashlib.sha256()
    for p in [path, *sorted(path.parent.glob(path.name + ".*data*"))]:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def require_tensorrt(flavour: str = "tensorrt") -> str:
    """The flavour's version, or BackendUnavailableError with how to install it."""
    return str(import_tensorrt(flavour).__version__)


def build_targets(options: BuildOptions, device: int = 0) -> str:
    """What the engine is built for: the local GPU's compute capability (TensorRT; needs a
    GPU) or the TensorRT-RTX target list (no GPU needed)."""
    if options.flavour == RTX:
        module = import_tensorrt(RTX)
        return ",".join(resolve_rtx_targets(module, options.compute_capabilities))
    return compute_capability(device)


def _network_flags(module: ModuleType) -> int:
    """STRONGLY_TYPED where the flag exists (10.x needs it; later versions are strongly typed
    only and may drop the flag)."""
    flag = getattr(module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def network_io(
    flavour: str, network: trt.INetworkDefinition, profile: trt.IOptimizationProfile
) -> dict[str, Any]:
    """The parsed network's inputs (name, dtype, declared shape, profile min/opt/max) and
    outputs (name, dtype, shape): what the engine will expose."""
    import numpy as np

    if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
        if TRT_RTX_TYPES:
            import tensorrt_rtx as trt
        else:
            import tensorrt as trt
    else:
        trt = import_tensorrt(flavour)

    def dtype_name(dtype: trt.DataType) -> str:
        return str(np.dtype(trt.nptype(dtype)).name)

    inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = profile.get_shape(tensor.name)
        inputs.append(
            {
                "name": tensor.name,
                "dtype": dtype_name(tensor.dtype),
                "shape": _dims(tensor.shape),
                "profile": [_dims(s) for s in shapes],
            }
        )
    outputs = []
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        outputs.append(
            {
                "name": tensor.name,
                "dtype": dtype_name(tensor.dtype),
                "shape": _dims(tensor.shape),
            }
        )
    return {"inputs": inputs, "outputs": outputs}


def _dims(dims: trt.Dims) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def check_network_io(io: dict[str, Any], component: Component, precision: str) -> None:
    """Refuse a network whose I/O differs from the descriptor (names, order-free; dtypes)."""
    for kind, specs in (("inputs", component.inputs), ("outputs", component.outputs)):
        got = {t["name"]: t["dtype"] for t in io[kind]}
        want = {s.name: s.resolved_dtype(precision) for s in specs}
        if got != want:
            raise TrtSdError(
                f"{component.name}: the parsed network's {kind} {got} differ from the "
                f"descriptor's {want}"
            )


def _configure(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    profile: dict[str, tuple[Shape, Shape, Shape]],
    options: BuildOptions,
    timing_cache: bytes,
) -> tuple[trt.IBuilderConfig, trt.IOptimizationProfile]:
    if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
        if TRT_RTX_TYPES:
            import tensorrt_rtx as trt
        else:
            import tensorrt as trt
    else:
        trt = import_tensorrt(options.flavour)
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.hardware_compatible == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif options.hardware_compatible == "same-cc":
        level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
        config.hardware_compatibility_level = level
    if options.flavour == RTX:
        set_rtx_targets(config, trt, resolve_rtx_targets(trt, options.compute_capabilities))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise TrtSdError(f"ONNX input {name!r} has no shape profile in the descriptor")
        lo, opt, hi = profile[name]
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(opt_profile)
    if options.flavour != RTX:  # TensorRT-RTX times nothing ahead of time (it compiles at load)
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, opt_profile


def build_engine(
    onnx_path: Path,
    component: Component,
    shapes: ShapeRange,
    options: BuildOptions,
    cache_dir: Path,
    device: int = 0,
) -> BuildResult:
    """Build (or reuse from ``cache_dir``) the engine of one component's ONNX graph."""
    trt_version = require_tensorrt(options.flavour)
    if TYPE_CHECKING:  # one code path, type-checked against each flavour's API
        if TRT_RTX_TYPES:
            import tensorrt_rtx as trt
        else:
            import tensorrt as trt
    else:
        trt = import_tensorrt(options.flavour)
    targets = build_targets(options, device)
    profile = engine_profile(component, shapes, options.static_shapes)
    key = engine_cache_key(file_sha256(onnx_path), trt_version, targets, profile, options)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine = cache_dir / engine_file_name(component.name, options, targets, key)
    log_path = cache_dir / (engine.name + ".json")
    if engine.is_file() and log_path.is_file():
        logged = json.loads(log_path.read_text())
        return BuildResult(
            component.name, engine, key, True, 0.0, engine.stat().st_size, trt_version,
            targets, options.flavour, logged.get("network_io", {}),
        )  # fmt: skip

    start = time.perf_counter()
    logger = collecting_logger(options.flavour)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtSdError(f"{label(options.flavour)} could not parse {onnx_path.name}: {errors}")
    timing_path = cache_dir / f"timing.{options.flavour}.cache"
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    config, opt_profile = _configure(builder, network, profile, options, timing)
    io = network_io(options.flavour, network, opt_profile)
    check_network_io(io, component, options.precision)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(getattr(logger, "errors", [])) or "see the log above"
        raise TrtSdError(
            f"{label(options.flavour)} could not build the {component.name} engine: {errors}"
        )
    _atomic_write(engine, _buffer(serialized))
    if options.flavour != RTX:
        _atomic_write(timing_path, _buffer(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - start
    result = BuildResult(
        component.name, engine, key, False, seconds, engine.stat().st_size, trt_version,
        targets, options.flavour, io,
    )  # fmt: skip
    log = {**asdict(result), "engine": engine.name, "options": asdict(options)}
    _atomic_write(log_path, json.dumps(log, indent=2).encode())
    return result


def _buffer(memory: trt.IHostMemory) -> memoryview:
    """IHostMemory implements the buffer protocol; the stubs generated from the TensorRT-RTX
    bindings do not declare it (pybind11 buffers carry no signature)."""
    return memoryview(cast("Buffer", memory))


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
