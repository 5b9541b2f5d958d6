"""TensorRT on a real GPU: build every component of a tiny pipeline and compare each engine,
and a whole generation, with ONNX Runtime. Skipped where TensorRT or a GPU is absent (CI);
run on a lent GPU machine with ``python -m pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import tiny_engines, tiny_model

from trt_sd.models import BackendUnavailableError, Manifest, all_components

pytestmark = pytest.mark.gpu


def _tensorrt_or_skip() -> None:
    from trt_sd.export.tensorrt_build import compute_capability, require_tensorrt

    try:
        require_tensorrt()
        compute_capability()
    except BackendUnavailableError as e:
        pytest.skip(f"no TensorRT GPU here: {e}")


@pytest.fixture(scope="module")
def trt_engines(tmp_path_factory):
    _tensorrt_or_skip()
    from trt_sd.export import export_model

    out = tmp_path_factory.mktemp("trt") / "engines"
    export_model(
        tiny_model(),
        out,
        precision="fp32",
        backend="tensorrt",
        height="16:24",
        width="16:24",
        batch="1:4",
        progress=False,
    )
    return out


def test_each_engine_matches_onnxruntime(trt_engines):
    from trt_sd.runtime.backends import create_backend

    onnx_dir = tiny_engines()
    trt_manifest, ort_manifest = Manifest.load(trt_engines), Manifest.load(onnx_dir)
    components = all_components(trt_manifest.dims)
    rng = np.random.default_rng(0)
    for name, entry in trt_manifest.components.items():
        assert entry.backend == "tensorrt"
        comp = components[name]
        feeds = {}
        for spec in comp.inputs:
            shape = spec.resolve(entry.shape_range, "opt")
            if spec.dtype.startswith("int"):
                feeds[spec.name] = rng.integers(0, 500, shape).astype(np.int32)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
        got = create_backend("tensorrt", trt_engines, comp, entry).run(feeds)
        want = create_backend("onnxruntime-cpu", onnx_dir, comp, ort_manifest.components[name]).run(
            feeds
        )
        for key, value in want.items():
            scale = max(float(np.abs(value).max()), 1e-6)
            assert float(np.abs(got[key] - value).max()) / scale < 1e-2, (name, key)


def test_generation_matches_onnxruntime(trt_engines):
    from trt_sd.runtime import Pipeline

    args = {"prompt": "a cat", "steps": 8, "seed": 3, "height": 16, "width": 16}
    trt_image = Pipeline.load(trt_engines, backend="tensorrt")(**args).images[0]
    ort_image = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")(**args).images[0]
    close = np.abs(trt_image.astype(int) - ort_image.astype(int)) <= 2
    assert close.mean() >= 0.99
