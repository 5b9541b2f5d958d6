"""The parts of the TensorRT builder that need no GPU: profiles, cache keys, names, errors."""

from __future__ import annotations

import sys

import pytest

from trt_sd.export import tensorrt_build as tb
from trt_sd.models import (
    BackendUnavailableError,
    InputError,
    ModelDims,
    Range,
    ShapeRange,
    all_components,
)

SHAPES = ShapeRange(Range(1, 1, 4), Range(256, 512, 768), Range(512, 512, 512))
UNET = all_components(ModelDims())["unet"]


def test_profile_comes_from_descriptor_and_static_pins_opt():
    dynamic = tb.engine_profile(UNET, SHAPES)
    assert dynamic["sample"] == ((1, 4, 32, 64), (2, 4, 64, 64), (8, 4, 96, 64))
    static = tb.engine_profile(UNET, SHAPES, static_shapes=True)
    assert set(static) == set(UNET.input_names)
    for lo, opt, hi in static.values():
        assert lo == opt == hi
    assert static["sample"][0] == (2, 4, 64, 64)


def _key(**over):
    args = {
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.13.0",
        "compute_capability": "9.0",
        "profile": tb.engine_profile(UNET, SHAPES),
        "options": tb.BuildOptions(precision="fp16"),
    }
    args.update(over)
    return tb.engine_cache_key(**args)


def test_cache_key_changes_with_every_input_and_only_then():
    base = _key()
    assert base == _key()
    variants = [
        _key(onnx_sha256="b" * 64),
        _key(tensorrt_version="10.14.1"),
        _key(compute_capability="8.9"),
        _key(profile=tb.engine_profile(UNET, SHAPES, static_shapes=True)),
        _key(options=tb.BuildOptions(precision="int8")),
        _key(options=tb.BuildOptions(precision="fp16", optimization_level=5)),
        _key(options=tb.BuildOptions(precision="fp16", version_compatible=True)),
        _key(options=tb.BuildOptions(precision="fp16", hardware_compatible="ampere+")),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_engine_file_name_is_readable_and_keyed():
    opts = tb.BuildOptions(precision="fp16")
    name = tb.engine_file_name("unet", opts, "9.0", "0123456789abcdef" * 4)
    assert name == "unet.fp16.sm90.0123456789ab.plan"


def test_flavour_targets_and_refit_are_in_the_key():
    rtx = tb.BuildOptions(precision="fp16", flavour="tensorrt-rtx")
    keys = {
        _key(),
        _key(options=rtx),
        _key(options=tb.BuildOptions(precision="fp16", flavour="tensorrt-rtx",
                                     compute_capabilities=("8.6",))),
        _key(options=tb.BuildOptions(precision="fp16", refittable=True)),
    }  # fmt: skip
    assert len(keys) == 4
    name = tb.engine_file_name("unet", rtx, "8.0,8.6", "0123456789abcdef" * 4)
    assert name == "unet.fp16.rtx.0123456789ab.plan"


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"precision": "bf8"}, "precision must be"),
        ({"optimization_level": 7}, "optimisation level"),
        ({"hardware_compatible": "turing"}, "hardware compatibility"),
        ({"flavour": "tensorrt-rtx", "hardware_compatible": "ampere+"}, "TensorRT option"),
        ({"compute_capabilities": ("8.6",)}, "needs --backend tensorrt-rtx"),
        ({"flavour": "tensorrt-12"}, "flavour must be one of"),
    ],
)
def test_bad_build_options(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        tb.BuildOptions(**kwargs)


def test_file_sha256_covers_external_data(tmp_path):
    onnx = tmp_path / "unet.onnx"
    onnx.write_bytes(b"graph")
    first = tb.file_sha256(onnx)
    (tmp_path / "unet.onnx.data").write_bytes(b"weights")
    assert tb.file_sha256(onnx) != first


def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(BackendUnavailableError, match="pip install"):
        tb.require_tensorrt()


def test_stub_only_tensorrt_is_not_taken_for_tensorrt(monkeypatch, tmp_path):
    # tensorrt-stubs in site-packages leaves a folder with only .pyi: an empty namespace package.
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="type stubs"):
        tb.require_tensorrt()


def _entry(**extra):
    from trt_sd.models.manifest import ComponentEntry

    return ComponentEntry(
        name="unet",
        file="unet.fp16.sm90.0123456789ab.plan",
        sha256="",
        backend="tensorrt",
        precision="fp16",
        inputs=[],
        outputs=[],
        shape_range=SHAPES,
        verification={},
        extra={"tensorrt_version": "10.13.0", "compute_capability": "9.0", **extra},
    )


def test_runtime_backend_checks_engine_version_and_gpu():
    from trt_sd.models import ManifestError
    from trt_sd.runtime.backends.tensorrt import can_serve, check_compatibility

    assert can_serve(_entry())
    check_compatibility(_entry(), "10.13.0", "9.0")
    with pytest.raises(
        ManifestError, match=r"built with TensorRT 10\.13\.0, this is TensorRT 10\.14\.1"
    ):
        check_compatibility(_entry(), "10.14.1", "9.0")
    with pytest.raises(ManifestError, match=r"capability 9\.0, this GPU is 8\.9"):
        check_compatibility(_entry(), "10.13.0", "8.9")
    # Version-compatible engines load on a later 10.x; hardware-compatible on any Ampere+ GPU.
    check_compatibility(_entry(version_compatible=True), "10.14.1", "9.0")
    with pytest.raises(ManifestError, match="cannot load it"):
        check_compatibility(_entry(version_compatible=True), "10.12.0", "9.0")
    check_compatibility(_entry(hardware_compatible="ampere+"), "10.13.0", "8.6")
    with pytest.raises(ManifestError, match="Ampere"):
        check_compatibility(_entry(hardware_compatible="ampere+"), "10.13.0", "7.5")


def test_rtx_targets_parse_and_refuse():
    trt = pytest.importorskip("tensorrt_rtx")
    from trt_sd.export.trt_targets import default_rtx_targets, resolve_rtx_targets, rtx_supported

    assert "8.6" in rtx_supported(trt) and "9.0" not in rtx_supported(trt)
    assert resolve_rtx_targets(trt, None) == default_rtx_targets(trt)
    assert "7.5" not in default_rtx_targets(trt)  # Turing refuses our fp32 GEMMs
    assert resolve_rtx_targets(trt, "89, sm86,12.0,8.6") == ("8.6", "8.9", "12.0")
    assert resolve_rtx_targets(trt, "7.5") == ("7.5",)  # on request
    with pytest.raises(InputError, match=r"'9\.0' is not one TensorRT-RTX builds for"):
        resolve_rtx_targets(trt, "9.0")


def test_runtime_refuses_rtx_engine_on_a_gpu_outside_its_targets():
    from trt_sd.models import ManifestError
    from trt_sd.runtime.backends.tensorrt import check_compatibility

    rtx = _entry(compute_capabilities=["8.0", "8.6"], compute_capability="8.0,8.6")
    rtx = type(rtx)(**{**rtx.__dict__, "backend": "tensorrt-rtx"})
    check_compatibility(rtx, "10.13.0", "8.6")
    with pytest.raises(ManifestError, match=r"built for GPU compute capabilities 8\.0, 8\.6; "
                       r"this GPU is 9\.0.*Hopper"):  # fmt: skip
        check_compatibility(rtx, "10.13.0", "9.0")
    with pytest.raises(ManifestError, match=r"built with TensorRT-RTX 10\.13\.0"):
        check_compatibility(rtx, "1.7.1", "8.6")


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--backend", "tensorrt-rtx", "--compute-capability", "9.0"], "not one TensorRT-RTX"),
        (["--backend", "onnxruntime", "--compute-capability", "8.6"], "needs --backend tensorrt"),
        (["--backend", "onnxruntime", "--runtime-cache", "x"], "TensorRT-RTX option"),
        (["--backend", "tensorrt-rtx", "--hardware-compatible", "ampere+"], "TensorRT option"),
    ],
)
def test_export_cli_refuses_bad_rtx_options_in_one_line(argv, msg, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    from trt_sd.runtime.cli import main

    code = main(["export", "--out", str(tmp_path / "e"), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and msg in err and "\n" not in err, err
