"""Loading engine directories: every broken or incompatible directory is a clear typed error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import tiny_engines

from trt_sd.models.errors import BackendUnavailableError, InputError, ManifestError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.backends import create_backend, resolve_backend


@pytest.fixture
def engines_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_engines(), tmp_path / "engines"))


def _edit_manifest(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "manifest.json"
    data = json.loads(path.read_text("utf-8"))
    edit(data)
    path.write_text(json.dumps(data), "utf-8")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        Pipeline.load(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        Pipeline.load(tmp_path)


def test_corrupt_manifest(engines_copy: Path) -> None:
    (engines_copy / "manifest.json").write_text('{"schema_version": 1, "compo', "utf-8")
    with pytest.raises(ManifestError, match="not readable JSON"):
        Pipeline.load(engines_copy)


def test_newer_schema(engines_copy: Path) -> None:
    _edit_manifest(engines_copy, lambda d: d.update(schema_version=d["schema_version"] + 1))
    with pytest.raises(ManifestError, match="newer"):
        Pipeline.load(engines_copy)


def test_missing_engine_file(engines_copy: Path) -> None:
    (engines_copy / "unet.onnx").unlink()
    with pytest.raises(ManifestError, match="incomplete"):
        Pipeline.load(engines_copy)


def test_corrupt_engine_file(engines_copy: Path) -> None:
    (engines_copy / "vae_decoder.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ManifestError, match=r"vae_decoder.*does not match the sha256"):
        Pipeline.load(engines_copy)


def test_missing_tokenizer(engines_copy: Path) -> None:
    shutil.rmtree(engines_copy / "tokenizer")
    with pytest.raises(ManifestError, match="tokenizer"):
        Pipeline.load(engines_copy)


def test_io_names_must_match_the_descriptors(engines_copy: Path) -> None:
    def rename(d: dict) -> None:
        d["components"]["unet"]["inputs"][0]["name"] = "latent_model_input"

    _edit_manifest(engines_copy, rename)
    with pytest.raises(ManifestError, match="lacks input 'sample'"):
        Pipeline.load(engines_copy)


def test_backend_choice() -> None:
    entry = Pipeline.load(tiny_engines()).manifest.components["unet"]
    with pytest.raises(InputError, match="unknown backend"):
        resolve_backend("cuda-magic", entry)
    assert resolve_backend("onnxruntime-cpu", entry) == "onnxruntime-cpu"
    assert resolve_backend("auto", entry) in (
        "tensorrt",
        "onnxruntime-cuda",
        "onnxruntime-cpu",
        "openvino",  # fp32 engines on a CPU with native bf16 (tests/test_openvino_backend.py)
    )


def test_unavailable_backends_say_how_to_install(engines_copy: Path) -> None:
    from trt_sd.runtime.backends import cuda_device_count

    if cuda_device_count():
        pytest.skip("a GPU is present: these backends may be available")
    with pytest.raises(BackendUnavailableError, match="pip install"):
        Pipeline.load(engines_copy, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="pip"):
        Pipeline.load(engines_copy, backend="onnxruntime-cuda")


def test_auto_on_this_machine_serves_onnx(engines_copy: Path) -> None:
    pipe = Pipeline.load(engines_copy, backend="auto")
    assert pipe.backend in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "openvino")


def test_tensorrt_engine_file_refuses_onnxruntime(engines_copy: Path) -> None:
    from trt_sd.models import all_components
    from trt_sd.models.manifest import ComponentEntry

    manifest = Pipeline.load(engines_copy).manifest
    raw = manifest.components["unet"].to_dict() | {"backend": "tensorrt", "file": "unet.plan"}
    entry = ComponentEntry.from_dict("unet", raw)
    unet = all_components(manifest.dims)["unet"]
    with pytest.raises(InputError, match="TensorRT engine"):
        create_backend("onnxruntime-cpu", engines_copy, unet, entry)


def test_backend_casts_feeds_to_the_manifest_dtypes() -> None:
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    unet, spec = pipe.engines["unet"], pipe.components["unet"]
    sample, timestep, context = spec.input_names
    feeds = {
        sample: np.zeros((1, 4, 8, 8), np.float64),
        timestep: np.array([10], np.int64),
        context: np.zeros((1, 77, pipe.manifest.dims.text_hidden_size), np.float64),
    }
    out = unet.run(feeds)[spec.output_names[0]]
    assert out.dtype == np.float32 and out.shape == (1, 4, 8, 8)
    with pytest.raises(InputError, match="missing inputs"):
        unet.run({sample: feeds[sample]})


@pytest.mark.gpu
def test_cuda_backend_matches_cpu() -> None:
    from trt_sd.runtime.backends.onnxruntime import cuda_provider_usable

    if not cuda_provider_usable():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    cpu = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    gpu = Pipeline.load(tiny_engines(), backend="onnxruntime-cuda", devices=0)
    assert gpu._embeddings_stay_on_device()  # text embeddings bound on the GPU (IO binding)
    a = cpu("cat", steps=4, seed=1, batch=2).images
    b = gpu("cat", steps=4, seed=1, batch=2).images
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 2


def test_optimised_graph_cache(tmp_path: Path, monkeypatch) -> None:
    """TRT_SD_ORT_CACHE: the first load writes each component's optimised graph, the next loads
    it with optimisation off, same images; a damaged entry is rebuilt, not trusted."""
    import onnxruntime as ort

    from trt_sd.runtime.backends import ort_cache

    engines = tiny_engines()
    plain = Pipeline.load(engines, backend="onnxruntime-cpu")("a cat", steps=3, seed=4)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRT_SD_ORT_CACHE", str(cache))
    first = Pipeline.load(engines, backend="onnxruntime-cpu")
    entries = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert [p.name.rsplit("-", 1)[0] for p in entries] == sorted(first.manifest.components)
    assert all((p / "complete.json").is_file() and (p / "model.onnx").is_file() for p in entries)

    levels = []
    created = ort.InferenceSession

    def spy(path, sess_options=None, **kwargs):  # type: ignore[no-untyped-def]
        levels.append((Path(path).parent, sess_options.graph_optimization_level))
        return created(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    second = Pipeline.load(engines, backend="onnxruntime-cpu")
    assert {level for _, level in levels} == {ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    assert sorted(folder for folder, _ in levels) == entries  # every component from the cache
    for pipe in (first, second):
        result = pipe("a cat", steps=3, seed=4)
        assert np.array_equal(result.images[0], plain.images[0])

    (entries[0] / "model.onnx").write_bytes(b"damaged")
    levels.clear()
    Pipeline.load(engines, backend="onnxruntime-cpu")
    assert (entries[0] / "complete.json").is_file()  # rebuilt
    assert ort.GraphOptimizationLevel.ORT_ENABLE_ALL in {level for _, level in levels}

    # Another process holds an entry's lock: load the plain way, write nothing.
    busy = tmp_path / "busy"
    monkeypatch.setenv("TRT_SD_ORT_CACHE", str(busy))
    unet = first.manifest.components["unet"]
    ort_cache.entry_for(busy, unet, ort.__version__, engines / unet.file).lock()
    Pipeline.load(engines, backend="onnxruntime-cpu")
    assert not [p for p in busy.iterdir() if p.name.startswith("unet-")]

    monkeypatch.setenv("TRT_SD_ORT_CACHE", str(entries[0] / "complete.json"))
    with pytest.raises(InputError, match="must be 1, 0 or a folder"):
        ort_cache.cache_dir()
    assert ort_cache.cache_dir("off") is None and ort_cache.cache_dir("TRUE").name == "ort-cache"
