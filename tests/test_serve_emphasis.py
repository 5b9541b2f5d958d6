"""The client adapters pass the emphasis mode on: the WebUI's ``override_settings.emphasis``
(its option names: Original, No norm, Ignore, None) and the OpenAI adapter's ``emphasis``
extension reach the pipeline, and the served image is the one ``Pipeline.__call__`` makes with
that mode (a real replica behind the adapters, no Ray); bad values are one-line 4xx errors."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.runtime import Pipeline
from trt_sd.runtime.serve.catalog import load_catalog
from trt_sd.runtime.serve.replica import Generator

pytest.importorskip("starlette")
PROMPT = "a (red:1.6) cat on the [moon]"


@pytest.fixture(scope="module")
def served():
    """(client, calls): the front behind a bare ASGI app, one real replica behind it."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.testclient import TestClient

    from trt_sd.runtime.serve.front import DEFAULT_LIMITS, Front, FrontConfig
    from trt_sd.runtime.serve.replica import Reply

    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu")
    calls: list[dict] = []

    async def generate(model: str, kwargs: dict) -> Reply:
        calls.append(dict(kwargs))
        return await gen.generate(json.dumps(kwargs).encode())

    models = tuple(load_catalog([str(tiny_engines())]))
    front = Front(FrontConfig(models, "k", DEFAULT_LIMITS), generate, generate)

    async def app(scope, receive, send) -> None:
        reply = await front.route(Request(scope, receive))
        response = Response(reply.body, reply.status, reply.headers, reply.content_type)
        await response(scope, receive, send)

    yield TestClient(app, headers={"Authorization": "Bearer k"}), calls
    gen.close()


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def _ref(pipe: Pipeline, **kw) -> np.ndarray:
    args = {"prompt": PROMPT, "seed": 5, "steps": 3, "sampler": "euler", "guidance": 6.0}
    return pipe(**args, width=16, height=16, **kw).images[0].astype(np.int16)


def _pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return np.asarray(image, dtype=np.int16)


def test_webui_override_settings_emphasis(served, pipe) -> None:
    client, calls = served
    body = {"prompt": PROMPT, "seed": 5, "steps": 3, "cfg_scale": 6.0, "width": 16,
            "height": 16, "sampler_name": "Euler"}  # fmt: skip
    body["override_settings"] = {"emphasis": "No norm"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert calls[-1]["emphasis"] == "no_norm"
    image = _pixels(r.json()["images"][0])
    assert np.abs(image - _ref(pipe, emphasis="no_norm")).max() <= 1
    assert np.abs(image - _ref(pipe)).max() > 1  # the mode changed the image
    assert "Emphasis: No norm" in json.loads(r.json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json=dict(body, override_settings={}))
    assert r.status_code == 200 and "emphasis" not in calls[-1]  # unset: the default mode
    bad = dict(body, override_settings={"emphasis": "strong"})
    r = client.post("/sdapi/v1/txt2img", json=bad)
    assert r.status_code == 422 and "\n" not in r.text
    assert r.json()["error"] == (
        "override_settings.emphasis 'strong' is not an emphasis mode; allowed: Original, "
        "No norm, Ignore, None"
    )


def test_openai_emphasis_extension(served, pipe) -> None:
    client, calls = served
    body = {"prompt": PROMPT, "size": "16x16", "seed": 5, "steps": 3, "sampler": "euler",
            "guidance": 6.0, "emphasis": "ignore"}  # fmt: skip
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    assert calls[-1]["emphasis"] == "ignore"
    image = _pixels(r.json()["data"][0]["b64_json"])
    assert np.abs(image - _ref(pipe, emphasis="ignore")).max() <= 1
    r = client.post("/v1/images/generations", json=dict(body, emphasis="No norm"))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "emphasis"
    assert error["message"] == (
        "emphasis 'No norm' is not an emphasis mode; allowed: original, no_norm, ignore, none"
    )
