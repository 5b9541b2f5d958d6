"""The client-API building blocks without Ray: API-key checks, the model catalog (several
engine directories, folders of them, built size ranges) and img2img through the batching
replica (``/generate``'s ``image`` field) against ``Pipeline.__call__``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.models.errors import InputError
from trt_sd.runtime import Pipeline
from trt_sd.runtime.serve.auth import authorized, presented_key, resolve_api_key
from trt_sd.runtime.serve.catalog import expand_dirs, find_model, load_catalog
from trt_sd.runtime.serve.front import Limits
from trt_sd.runtime.serve.replica import Generator


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_bearer_and_basic_auth() -> None:
    assert authorized(None, None)  # no key: open
    assert authorized("Bearer s3cret", "s3cret")
    assert authorized(_basic("anyone", "s3cret"), "s3cret")
    for header in (
        None,
        "",
        "Bearer",
        "Bearer nope",
        _basic("s3cret", ""),
        "Basic !!",
        "Token s3cret",
    ):
        assert not authorized(header, "s3cret"), header
    assert presented_key(_basic("u", "a:b")) == "a:b"  # the password may hold a colon


def test_api_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRT_SD_API_KEY", raising=False)
    assert resolve_api_key(None, None) is None
    monkeypatch.setenv("TRT_SD_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, str(key_file)) == "from-file"
    assert resolve_api_key("flag", None) == "flag"
    with pytest.raises(InputError, match="not both"):
        resolve_api_key("a", str(key_file))
    with pytest.raises(InputError, match="one word"):
        resolve_api_key("two words", None)
    with pytest.raises(InputError, match="cannot read"):
        resolve_api_key(None, str(tmp_path / "missing"))


def test_catalog_folder_of_engine_dirs(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("beta", "alpha"):
        shutil.copytree(tiny_engines(), folder / name)
    assert [p.name for p in expand_dirs([str(folder)])] == ["alpha", "beta"]
    models = load_catalog([str(folder)])
    assert [m.name for m in models] == ["alpha", "beta"]
    alpha = models[0]
    assert (alpha.width, alpha.height, alpha.img2img) == ((16, 24), (16, 24), True)
    assert find_model(models, None) is alpha
    assert find_model(models, "BETA") is models[1]
    assert find_model(models, alpha.title) is alpha
    assert find_model(models, "gamma") is None
    with pytest.raises(InputError, match="two engine directories have the model name 'alpha'"):
        load_catalog([str(folder / "alpha"), str(folder)])
    with pytest.raises(InputError, match=r"width 16\.\.24, height 16\.\.24"):
        alpha.check_size(32, 16)
    with pytest.raises(InputError, match="multiples of 8"):
        alpha.check_size(20, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no manifest\.json"):
        expand_dirs([str(tmp_path / "empty")])


def test_limits_name_what_is_over() -> None:
    limits = Limits(max_images=4, max_steps=50, max_pixels=16 * 16 * 4, max_prompt_chars=10)
    limits.check(4, 50, 16, 16, ["short"])
    for args, words in [
        ((5, 1, 16, 16, []), "allowed 1..4"),
        ((1, 51, 16, 16, []), "limit of 50"),
        ((2, 1, 32, 32, []), "pixels per request"),
        ((1, 1, 16, 16, ["x" * 11]), "at most 10"),
    ]:
        with pytest.raises(InputError, match=words):
            limits.check(*args)


def test_generate_image_field_is_img2img_like_the_pipeline() -> None:
    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu")
    try:
        init = (np.arange(16 * 24 * 3) % 253).astype(np.uint8).reshape(16, 24, 3)
        png = io.BytesIO()
        Image.fromarray(init).save(png, "PNG")
        body = {
            "prompt": "a cat",
            "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
            "strength": 0.6,
            "seed": 9,
            "steps": 5,
            "sampler": "euler",
        }
        reply = asyncio.run(gen.generate(json.dumps(body).encode()))
        assert reply.status == 200, reply.body
        served = np.asarray(Image.open(io.BytesIO(reply.body)).convert("RGB"), dtype=np.int16)
        pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
        ref = pipe(prompt="a cat", image=init, strength=0.6, seed=9, steps=5, sampler="euler")
        assert served.shape == (16, 24, 3)  # the size comes from the init image
        assert np.abs(served - ref.images[0]).max() <= 1
        bad = dict(body, image="bm90IGFuIGltYWdl")
        reply = asyncio.run(gen.generate(json.dumps(bad).encode()))
        assert reply.status == 400 and reply.json["error"].startswith("image is not a readable")
        reply = asyncio.run(gen.generate(json.dumps(dict(body, strength=0)).encode()))
        assert reply.status == 400 and "strength must be in (0, 1]" in reply.json["error"]
    finally:
        gen.close()


def _front_client(limits: Limits | None = None, key: str | None = "k"):
    """Front behind a bare ASGI app, replicas replaced by a canned 16x16 PNG."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.testclient import TestClient

    from trt_sd.runtime.serve.front import DEFAULT_LIMITS, Front, FrontConfig
    from trt_sd.runtime.serve.replica import PARAMS_HEADER, Reply

    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")
    calls: list[dict] = []

    async def generate(model: str, kwargs: dict) -> Reply:
        calls.append(dict(kwargs, model=model))
        if kwargs.get("prompt") == "boom":
            raise RuntimeError("a bug")
        params = {"seed": kwargs["seed"], "sampler": "euler", "guidance": 7.0}
        return Reply(200, png.getvalue(), "image/png", {PARAMS_HEADER: json.dumps(params)})

    models = tuple(load_catalog([str(tiny_engines()), str(tiny_engines(v_prediction=True))]))
    front = Front(FrontConfig(models, key, limits or DEFAULT_LIMITS), generate, generate)

    async def app(scope, receive, send) -> None:
        reply = await front.route(Request(scope, receive))
        if reply is None:
            reply = Reply(404, b"{}")
        response = Response(reply.body, reply.status, reply.headers, reply.content_type)
        await response(scope, receive, send)

    return TestClient(app, headers={"Authorization": "Bearer k"}), calls


def test_front_errors_are_one_line_with_the_right_status() -> None:
    client, calls = _front_client(Limits(max_body_bytes=4096))
    r = client.post("/sdapi/v1/txt2img", content=b"x" * 5000)
    assert r.status_code == 413 and "at most 4096" in r.json()["error"]
    r = client.post("/v1/images/generations", content=b"x" * 5000)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "Bearer" in r.headers["www-authenticate"]
    assert client.get("/sdapi/v1/txt2img").status_code == 405
    assert client.get("/sdapi/v1/nothing").status_code == 404
    r = client.post("/v1/images/generations", json={"prompt": "x", "quality": "hd"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "quality"
    r = client.post("/v1/images/generations", json={"prompt": "x", "colour": 1})
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: colour"
    r = client.post("/v1/images/generations", json={"prompt": "x", "n": 11})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")  # an inpainting mask must be a readable PNG
    for mask in (b"x", png.getvalue()):  # with an alpha channel (transparent = edit)
        files = {"image": ("a.png", png.getvalue(), "image/png"), "mask": ("m.png", mask)}
        r = client.post("/v1/images/edits", files=files, data={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "boom"})
    assert r.status_code == 500 and "Traceback" not in r.text and r.text.count("\n") == 0
    assert not [c for c in calls if c["prompt"] != "boom"]


def test_front_options_and_model_routing() -> None:
    client, calls = _front_client()
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("engines [")
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and "choose one of engines [" in r.json()["error"]
    r = client.post("/sdapi/v1/options", json={"sd_vae": "x"})
    assert r.status_code == 422 and "'sd_vae'" in r.json()["error"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "engines-v"}).is_success
    client.post("/sdapi/v1/txt2img", json={"seed": 3, "n_iter": 2, "steps": 2})
    override = {"sd_model_checkpoint": "engines"}
    client.post("/sdapi/v1/txt2img", json={"seed": 3, "override_settings": override})
    client.post("/v1/images/generations", json={"prompt": "p", "seed": 8})
    assert [(c["model"], c["seed"]) for c in calls] == [
        ("engines-v", 3), ("engines-v", 4), ("engines", 3), ("engines", 8),
    ]  # fmt: skip
    assert calls[0]["sampler"] == "Euler" and calls[0]["guidance"] == 7.0  # WebUI defaults


def test_generate_limits_are_checked_at_the_ingress() -> None:
    from trt_sd.runtime.serve.front import Front, FrontConfig

    models = tuple(load_catalog([str(tiny_engines())]))
    front = Front(FrontConfig(models, None, Limits(max_steps=10, max_prompt_chars=5)), None, None)  # type: ignore[arg-type]
    assert front.check_generate(b'{"steps": 10, "prompt": "short"}', None) is None
    assert front.check_generate(b"not json", None) is None  # the replica's message
    reply = front.check_generate(b'{"steps": 11}', None)
    assert reply is not None and reply.status == 400
    assert reply.json["error"] == "steps 11 is over this server's limit of 10"
    reply = front.check_generate(b'{"prompt": "too long"}', None)
    assert reply is not None and "at most 5 allowed" in reply.json["error"]
