"""LoRAs in the batching engine: named from the server's LoRA folder (``loras`` field or the
WebUI's ``<lora:name:w>`` prompt tags), each request's image equal to ``Pipeline.__call__``
with the same LoRAs, and requests of different LoRA sets never in one UNet call."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from runtime_engines import tiny_engines
from test_lora_files import _kohya

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.serve.engine import BatchingEngine
from trt_sd.runtime.serve.lora_requests import LORA_DIR_ENV, request_loras


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def test_prompt_tags_are_stripped_and_resolved(tmp_path) -> None:
    _kohya(tmp_path, "style")
    prompt, loras = request_loras("a cat <lora:style:0.6>, painting", None, tmp_path)
    assert prompt == "a cat , painting" and loras == [(tmp_path / "style.safetensors", 0.6)]
    _, loras = request_loras("<lora:style>", [{"name": "style", "scale": 0.5}], tmp_path)
    assert [s for _, s in loras] == [1.0, 0.5]
    for bad, problem in (("<lora:../x:1>", "file stems"), ("<lora:nope:1>", "unknown LoRA")):
        with pytest.raises(InputError, match=problem):
            request_loras(bad, None, tmp_path)
    with pytest.raises(InputError, match="no --lora-dir"):
        request_loras("<lora:style:1>", None, None)


def test_requests_with_different_loras_batch_apart(pipe, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(_kohya(tmp_path, "style"), folder / "style.safetensors")
    monkeypatch.setenv(LORA_DIR_ENV, str(folder))
    engine = BatchingEngine(pipe, max_batch=4)
    try:
        common = {"steps": 4, "seed": 9, "sampler": "euler"}
        tickets = [
            engine.submit(prompt="a cat <lora:style:0.8>", **common),
            engine.submit(prompt="a cat", **common),
            engine.submit(prompt="a cat", loras=[{"name": "style", "scale": 0.8}], **common),
        ]
        results = [t.future.result(timeout=120) for t in tickets]
    finally:
        engine.close()
    lora = pipe("a cat", loras=[(folder / "style.safetensors", 0.8)], **common).images[0]
    base = pipe("a cat", **common).images[0]
    for result, expected in zip(results, (lora, base, lora), strict=True):
        assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
    assert results[0].params["loras"][0]["name"] == "style" and "loras" not in results[1].params
    # a base request batched into a LoRA call (or the reverse) would not match its image above
