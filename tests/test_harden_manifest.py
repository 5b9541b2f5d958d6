"""The engine directory is untrusted input (issue 17, classes 2 and 3): every manifest field is
validated for type and range, every named file stays inside the directory, and what is loaded
is what the manifest recorded."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_sd.models.errors import InputError, ManifestError
from trt_sd.models.manifest import Manifest
from trt_sd.models.manifest_schema import named_files

SHA = "0" * 64
TENSOR = {"name": "x", "dtype": "float32", "shape": ["batch", 4, "latent_height"]}
RANGE = {"batch": [1, 1, 4], "height": [16, 16, 24], "width": [16, 16, 24], "vae_scale_factor": 2}


def _component(name: str) -> dict[str, Any]:
    return {
        "file": f"{name}.onnx",
        "sha256": SHA,
        "backend": "onnxruntime",
        "precision": "fp32",
        "inputs": [copy.deepcopy(TENSOR)],
        "outputs": [copy.deepcopy(TENSOR)],
        "shape_range": copy.deepcopy(RANGE),
        "verification": {"max_abs_error": 0.0},
    }


def valid_manifest() -> dict[str, Any]:
    """A schema-valid manifest (no files: for from_dict)."""
    return {
        "schema_version": 1,
        "model": {"name": "tiny", "hash": "ab" * 32, "family": "sd1"},
        "components": {n: _component(n) for n in ("text_encoder", "unet", "vae_decoder")},
        "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012},
        "prediction_type": "epsilon",
        "vae_scaling_factor": 0.18215,
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt"},
        "dims": {"text_max_length": 77, "vae_scale_factor": 2, "latent_channels": 4},
        "defaults": {"height": 16, "width": 16, "steps": 20, "guidance": 7.5, "prompt": "a cat"},
        "quantization": None,
    }


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path in a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(d: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["../x", "/etc/passwd", "a/../../b", "C:\\x", "tokenizer/vocab.json"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
PATHS = _paths(valid_manifest())


def _use(manifest: Manifest) -> None:
    """Everything the runtime reads from a manifest before running an engine."""
    from trt_sd.runtime.pipeline import resolve_sampler
    from trt_sd.runtime.request import build_request, default_size

    _ = (manifest.dims, manifest.model, manifest.tokenizer, manifest.vae_scaling_factor)
    _ = (manifest.scheduler_config, manifest.prediction_type, manifest.defaults)
    for entry in manifest.components.values():
        for axis in ("batch", "unet_batch", "height", "width", "latent_height", "latent_width"):
            entry.shape_range.axis(axis)
    default_size(manifest, "height")
    with contextlib.suppress(InputError):
        build_request(
            manifest, resolve_sampler, prompt=None, negative_prompt="", sampler="euler",
            steps=None, guidance=None, guidance_rescale=0.0, seed=1, height=None, width=None,
            batch=1, img2img=False, strength=None, karras=None, eta=None, sampler_options={},
        )  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JSON_VALUES)
def test_any_field_any_value_is_accepted_or_a_manifest_error(path: tuple, value: Any) -> None:
    """Replacing any field by any JSON value: the manifest is refused with ManifestError or
    it works for everything the runtime reads (no AttributeError / TypeError / ZeroDivision)."""
    raw = valid_manifest()
    _set(raw, path, value)
    try:
        manifest = Manifest.from_dict(raw)
    except ManifestError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    _use(manifest)


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=30))
def test_accepted_file_names_stay_inside(name: str) -> None:
    raw = valid_manifest()
    raw["components"]["unet"]["file"] = name
    try:
        Manifest.from_dict(raw)
    except ManifestError:
        return
    root = Path("/srv/engines")
    resolved = Path(os.path.normpath(root / name))
    assert root in resolved.parents


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("schema_version",), 0, "schema_version must be an integer >= 1"),
        (("schema_version",), True, "schema_version must be an integer >= 1, got true"),
        (("schema_version",), "1", "schema_version"),
        (("dims", "vae_scale_factor"), 0, "dims.vae_scale_factor"),
        (("dims",), None, "field dims must be an object, got null"),
        (("components", "unet", "shape_range"), None, "components.unet.shape_range"),
        (("components", "unet", "shape_range", "batch"), [4, 2, 1], "min <= opt <= max"),
        (("components", "unet", "shape_range", "batch"), [1, 1, 10**9], "batch"),
        (("components", "unet", "file"), "../../etc/passwd", "relative path inside"),
        (("components", "unet", "file"), "/etc/passwd", "relative path inside"),
        (("components", "unet", "external_data"), {"file": "/x", "sha256": SHA}, "inside"),
        (("components", "unet", "onnx_file"), "a/../../x", "inside"),
        (("components", "unet", "sha256"), "abc", "sha256 digest"),
        (("tokenizer", "vocab"), "../vocab.json", "tokenizer.vocab"),
        (("defaults", "height"), None, "defaults.height"),
        (("defaults", "steps"), 10**12, "defaults.steps"),
        (("vae_scaling_factor",), 0, "vae_scaling_factor"),
        (("scheduler", "num_train_timesteps"), None, "num_train_timesteps"),
        (("model",), [], "field model must be an object"),
        (("components", "unet", "inputs", 0, "dtype"), "V9999", "inputs[0].dtype must be one of"),
        (("unet_deepcache",), {"layout": {}, "branch": 1}, "unet_deepcache.layout lacks"),
    ],
)
def test_bad_fields_are_named(path: tuple, value: Any, message: str) -> None:
    raw = valid_manifest()
    _set(raw, path, value)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Manifest.from_dict(raw)


def test_future_file_keys_are_paths_too() -> None:
    """A field another version adds (``timing_cache_file``) is still checked as a path."""
    raw = valid_manifest()
    raw["components"]["unet"]["timing_cache_file"] = "../../outside"
    with pytest.raises(ManifestError, match="timing_cache_file"):
        Manifest.from_dict(raw)
    raw["components"]["unet"]["timing_cache_file"] = "unet.cache"
    assert "unet.cache" in named_files(Manifest.from_dict(raw).raw)


# ---- on disk ---------------------------------------------------------------------------------
@pytest.fixture
def engines_copy(tmp_path: Path) -> Path:
    from runtime_engines import tiny_engines

    return Path(shutil.copytree(tiny_engines(), tmp_path / "engines"))


def _edit(folder: Path, edit: Any) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text("utf-8"))
    edit(data)
    path.write_text(json.dumps(data), "utf-8")


def test_symlink_out_of_the_directory_is_refused_without_echoing(engines_copy: Path) -> None:
    secret = engines_copy.parent / "secret.json"
    secret.write_text("TOP-SECRET-CONTENT", "utf-8")
    config = engines_copy / "tokenizer" / "tokenizer_config.json"
    config.unlink()
    config.symlink_to(secret)
    with pytest.raises(ManifestError, match="leads outside the engine directory") as e:
        Manifest.load(engines_copy)
    assert "TOP-SECRET" not in str(e.value)


def test_manifest_file_named_outside_is_refused(engines_copy: Path) -> None:
    outside = engines_copy.parent / "vocab.json"
    shutil.copy(engines_copy / "tokenizer" / "vocab.json", outside)
    (engines_copy / "link").symlink_to(engines_copy.parent)
    _edit(engines_copy, lambda d: d["tokenizer"].update(vocab="link/vocab.json"))
    with pytest.raises(ManifestError, match="outside"):
        Manifest.load(engines_copy)


def test_manifest_content_is_never_echoed(engines_copy: Path) -> None:
    (engines_copy / "manifest.json").write_text("SECRET-LINE-1\nSECRET-LINE-2", "utf-8")
    with pytest.raises(ManifestError) as e:
        Manifest.load(engines_copy)
    assert "SECRET" not in str(e.value)
    (engines_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000, "utf-8")
    with pytest.raises(ManifestError, match="not readable JSON"):
        Manifest.load(engines_copy)


def test_null_fields_give_one_line_errors_on_the_cli(engines_copy: Path, capsys: Any) -> None:
    from trt_sd.runtime.cli import main

    _edit(engines_copy, lambda d: d["components"]["unet"].update(shape_range=None))
    assert main(["run", "--engines", str(engines_copy), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: manifest field components.unet.shape_range") and "\n" not in err


# ---- integrity --------------------------------------------------------------------------------
def test_modified_engine_file_is_refused(engines_copy: Path, tmp_path: Path, monkeypatch) -> None:
    from trt_sd.models.integrity import verify_components

    monkeypatch.setenv("TRT_SD_HOME", str(tmp_path / "home"))
    manifest = Manifest.load(engines_copy)
    verify_components(engines_copy, manifest)  # genuine: passes, and leaves stamps
    assert list((tmp_path / "home" / "verified").iterdir())
    unet = engines_copy / "unet.onnx"
    data = bytearray(unet.read_bytes())
    st_before = unet.stat()
    data[len(data) // 2] ^= 0xFF  # same size; restore the mtime: only ctime/content differ
    unet.write_bytes(bytes(data))
    os.utime(unet, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    with pytest.raises(ManifestError, match=r"unet\.onnx \(component unet\) does not match"):
        verify_components(engines_copy, manifest)


def test_modified_tokenizer_file_is_refused(
    engines_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    """Tokenizer files are verified like engine files: a swapped vocabulary would silently
    change every prompt's token ids."""
    from trt_sd.models.integrity import verify_components

    monkeypatch.setenv("TRT_SD_HOME", str(tmp_path / "home"))
    manifest = Manifest.load(engines_copy)
    assert set(manifest.raw["tokenizer"]["sha256"]) == {"vocab", "merges"}
    verify_components(engines_copy, manifest)
    merges = engines_copy / manifest.raw["tokenizer"]["merges"]
    merges.write_text(merges.read_text("utf-8") + "x y\n", "utf-8")
    with pytest.raises(ManifestError, match=r"tokenizer file tokenizer/merges\.txt \(tokenizer\)"):
        verify_components(engines_copy, manifest)


def test_stamp_is_keyed_on_identity(tmp_path: Path, monkeypatch) -> None:
    from trt_sd.models import integrity

    monkeypatch.setenv("TRT_SD_HOME", str(tmp_path / "home"))
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 1000)
    first = integrity.file_digest(f)
    f.write_bytes(b"b" * 1000)  # same size
    assert integrity.file_digest(f) != first
    replacement = tmp_path / "g.bin"
    replacement.write_bytes(b"a" * 1000)
    os.replace(replacement, f)  # new inode
    assert integrity.file_digest(f) == first


def test_ort_cache_is_keyed_on_the_bytes_not_the_claim(engines_copy: Path, tmp_path: Path) -> None:
    """A modified copy whose manifest claims the genuine sha256 gets another cache entry."""
    from trt_sd.runtime.backends import ort_cache

    manifest = Manifest.load(engines_copy)
    entry = manifest.components["unet"]
    genuine = ort_cache.entry_for(tmp_path, entry, "1.0", engines_copy / entry.file)
    copy_dir = Path(shutil.copytree(engines_copy, tmp_path / "copy"))
    with open(copy_dir / entry.file, "ab") as f:
        f.write(b"\x00")
    forged = ort_cache.entry_for(tmp_path, entry, "1.0", copy_dir / entry.file)
    assert forged.folder != genuine.folder
    same = ort_cache.entry_for(tmp_path, entry, "1.0", engines_copy / entry.file)
    assert same.folder == genuine.folder


def test_serve_on_a_corrupt_engine_dir_is_one_line(engines_copy: Path, capsys: Any) -> None:
    """Refused before Ray starts: one line, exit 2 (schema, then integrity)."""
    pytest.importorskip("ray.serve")
    from trt_sd.runtime.cli import main

    good = json.loads((engines_copy / "manifest.json").read_text("utf-8"))
    _edit(engines_copy, lambda d: d["dims"].update(vae_scale_factor=None))
    assert main(["serve", str(engines_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dims.vae_scale_factor" in err and "Traceback" not in err

    (engines_copy / "manifest.json").write_text(json.dumps(good), "utf-8")
    with open(engines_copy / "unet.onnx", "ab") as f:
        f.write(b"tampered")
    assert main(["serve", str(engines_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the sha256" in err
