"""Run-time LoRA by TensorRT refit on a real GPU: a refittable engine gives the ONNX Runtime
image for the same LoRA, and A -> B -> A -> [] is exact. Skipped where TensorRT or a GPU is
absent (CI and the dev machines: the refit path is type-checked there, run here on a lent
GPU machine with ``python -m pytest -m gpu tests/test_lora_tensorrt.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_engines import tiny_engines, tiny_model
from test_lora_files import _kohya

from trt_sd.models import BackendUnavailableError
from trt_sd.runtime import Pipeline

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def refittable(tmp_path_factory):
    from trt_sd.export.tensorrt_build import compute_capability, require_tensorrt

    try:
        require_tensorrt()
        compute_capability()
    except BackendUnavailableError as e:
        pytest.skip(f"no TensorRT GPU here: {e}")
    from trt_sd.export import export_model

    out = tmp_path_factory.mktemp("trt-refit") / "engines"
    export_model(
        tiny_model(),
        out,
        backend="tensorrt",
        height="16",
        width="16",
        batch="1",
        trt_refittable=True,
        progress=False,
    )
    return out


def test_refit_matches_onnxruntime_and_switches_exactly(refittable, tmp_path) -> None:
    a, b = _kohya(tmp_path, "a"), _kohya(tmp_path, "b")
    trt_pipe = Pipeline.load(refittable, backend="tensorrt")
    ort_pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    kw = {"prompt": "a cat", "steps": 4, "seed": 3, "height": 16, "width": 16}
    base = trt_pipe(**kw).images[0]
    first = trt_pipe(**kw, loras=[(a, 0.8)]).images[0]
    trt_pipe(**kw, loras=[(b, -0.5)])
    assert np.array_equal(trt_pipe(**kw, loras=[(a, 0.8)]).images[0], first)
    assert np.array_equal(trt_pipe(**kw).images[0], base)
    reference = ort_pipe(**kw, loras=[(a, 0.8)]).images[0]
    assert np.abs(first.astype(int) - reference.astype(int)).max() <= 2
    assert np.abs(first.astype(int) - base.astype(int)).max() > 0
