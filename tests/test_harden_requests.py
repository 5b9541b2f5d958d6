"""Requests are untrusted input (issue 17, classes 4, 5 and 6): absurd sizes are refused before
allocation, every bad value is an InputError (HTTP 400 / 413), and one bad request never fails
the requests batched with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_harden_manifest import valid_manifest

from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest
from trt_sd.runtime.pipeline import resolve_sampler
from trt_sd.runtime.request import MAX_PROMPT_CHARS, Request, build_request
from trt_sd.runtime.serve.b64images import decode_image
from trt_sd.runtime.serve.replica import (
    FIELDS,
    MAX_BODY_BYTES,
    PayloadTooLargeError,
    parse_generate_body,
)

MANIFEST = Manifest.from_dict(valid_manifest())
ARGS = dict(
    prompt="a cat", negative_prompt="", sampler="euler", steps=4, guidance=7.5,
    guidance_rescale=0.0, seed=1, height=16, width=16, batch=1, img2img=False, strength=None,
    karras=None, eta=None, sampler_options={},
)  # fmt: skip

VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.lists(st.text(max_size=4), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
    | st.sampled_from(
        [np.int64(5), np.int32(-1), np.float32(2.5), np.float64("inf"), np.bool_(True), b"x"]
    )
    | st.just("\ud800")
    | st.just(object())
)


@settings(max_examples=80, deadline=None)
@given(field=st.sampled_from(sorted(set(ARGS) - {"img2img"})), value=VALUES)
def test_any_argument_is_a_request_or_an_input_error(field: str, value: Any) -> None:
    try:
        req = build_request(MANIFEST, resolve_sampler, **{**ARGS, field: value})
    except InputError as e:
        assert "\n" not in str(e) and len(str(e)) < 800
        return
    assert isinstance(req, Request) and isinstance(req.steps, int)
    assert all(isinstance(p, str) for p in req.prompts)


@settings(max_examples=80, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), VALUES).map(
        lambda d: json.dumps(d, default=str).encode()
    )
    | st.binary(max_size=64)
)
def test_any_body_parses_or_is_an_input_error(body: bytes) -> None:
    try:
        kwargs = parse_generate_body(body)
    except InputError:
        return
    image = kwargs.pop("image", None)  # the replica decodes it, the engine passes img2img on
    mask = kwargs.pop("mask", None)  # inpainting: decoded like the image
    for engine_field in ("mask_blur", "loras"):  # checked by the engine, not build_request
        kwargs.pop(engine_field, None)
    with contextlib.suppress(InputError):
        for value, what in ((image, "image"), (mask, "mask")):
            if value is not None:
                decode_image(value, what)
        build_request(MANIFEST, resolve_sampler, **{**ARGS, **kwargs, "img2img": image is not None})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"steps": Infinity}', "steps must be an integer, got inf"),
        (b'{"steps": 1e400}', "steps must be an integer, got inf"),
        (b'{"guidance": NaN}', "guidance must be finite"),
        (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
        (json.dumps({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}).encode(), "prompt is 4097"),
        (b'{"prompt": "\\ud800"}', "prompt is not valid Unicode"),
    ],
)
def test_hostile_bodies_are_input_errors(body: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_request(MANIFEST, resolve_sampler, **{**ARGS, **parse_generate_body(body)})


def test_oversized_body_is_413() -> None:
    from trt_sd.runtime.serve.replica import _error_for

    with pytest.raises(PayloadTooLargeError) as e:
        parse_generate_body(b" " * (MAX_BODY_BYTES + 1))
    assert _error_for(e.value).status == 413


def test_ingress_refuses_a_large_body_while_streaming() -> None:
    pytest.importorskip("ray.serve")
    from starlette.requests import Request as HttpRequest

    from trt_sd.runtime.serve.app import read_body

    def request(chunks: list[bytes], length: int | None) -> HttpRequest:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]

        async def receive() -> dict:
            return messages.pop(0)

        scope = {"type": "http", "method": "POST", "headers": headers, "path": "/generate"}
        return HttpRequest(scope, receive)

    big = MAX_BODY_BYTES + 1
    with pytest.raises(PayloadTooLargeError):  # declared: refused before reading
        asyncio.run(read_body(request([b""], big)))
    with pytest.raises(PayloadTooLargeError):  # undeclared (chunked): refused mid-stream
        asyncio.run(read_body(request([b"x" * 65536] * 8, None)))
    assert asyncio.run(read_body(request([b'{"a":', b" 1}"], None))) == b'{"a": 1}'


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", float("inf"), "steps must be an integer, got inf"),
        ("steps", 10**9, "steps must be at most 1000"),
        ("prompt", 5, "prompt must be a string or a list of strings, got 5"),
        ("prompt", b"cat", "prompt must be a string"),
        ("negative_prompt", ["\udfff"], "negative_prompt is not valid Unicode"),
        ("batch", 10**9, "batch must be at most 4096"),
        ("height", 10**12, "height must be at most 16384"),
        ("seed", np.float64("nan"), "seed must be an integer"),
        ("karras", "yes", "karras must be true, false or unset"),
        ("sampler", 3, "sampler must be a sampler name"),
        ("guidance", "7", "guidance must be a number"),
        ("guidance", True, "guidance must be a number"),
    ],
)
def test_api_arguments_are_typed(field: str, value: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_request(MANIFEST, resolve_sampler, **{**ARGS, field: value})


def test_numpy_integers_are_integers() -> None:
    req = build_request(
        MANIFEST, resolve_sampler, **{**ARGS, "steps": np.int64(5), "seed": np.uint32(3)}
    )
    assert req.steps == 5 and type(req.steps) is int and req.seed == 3


def test_huge_batch_is_refused_at_once_on_the_cli(tmp_path: Path) -> None:
    """Used to hang building a billion output paths before anything was checked."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trt_sd.runtime.cli", "run", "--engines", str(tmp_path),
         "--batch", "1000000000", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: batch must be at most 4096, got 1000000000"
    assert time.monotonic() - start < 30


# ---- isolation ------------------------------------------------------------------------------
def test_one_failing_prompt_fails_only_its_own_request(monkeypatch) -> None:
    """Validation refuses an unencodable prompt at submit; and should encoding still fail in
    the scheduler, only the request it belongs to fails, not the ones batched with it."""
    from runtime_engines import tiny_engines

    from trt_sd.runtime.pipeline import Pipeline
    from trt_sd.runtime.serve.engine import BatchingEngine

    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    encode = pipe.encode_conditioning

    def fragile(rows: Any, *args: Any, **kwargs: Any) -> Any:
        if any("poison" in t for t in rows.texts):
            raise RuntimeError("tokenizer exploded")
        return encode(rows, *args, **kwargs)

    monkeypatch.setattr(pipe, "encode_conditioning", fragile)
    engine = BatchingEngine(pipe, max_batch=4)
    try:
        with pytest.raises(InputError, match="not valid Unicode"):
            engine.submit(prompt="a \ud800 cat", steps=2, seed=1)
        with engine._cond:  # hold the scheduler so both are admitted in one turn
            good = engine.submit(prompt="a cat", steps=2, seed=1)
            bad = engine.submit(prompt="poison", steps=2, seed=2)
        assert good.future.result(timeout=60).image.shape == (16, 16, 3)
        with pytest.raises(RuntimeError, match="exploded"):
            bad.future.result(timeout=60)
    finally:
        engine.close()


def test_http_hostile_requests_are_400_and_neighbours_succeed() -> None:
    from runtime_engines import tiny_engines

    from trt_sd.runtime.serve.replica import Generator

    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu", timeout_s=60)
    try:

        async def both() -> list[Any]:
            return await asyncio.gather(
                gen.generate(b'{"prompt": "\\ud800", "steps": 2}'),
                gen.generate(b'{"prompt": "a cat", "steps": 2, "seed": 3}'),
                gen.generate(b'{"steps": Infinity}'),
                gen.generate(b'{"seed": 1e400}'),
                gen.generate(b"[" * 100_000),
            )

        bad, good, inf, big, nested = asyncio.run(both())
        assert (bad.status, good.status, inf.status, big.status) == (400, 200, 400, 400)
        assert nested.status == 400 and "nested too deeply" in nested.json["error"]
    finally:
        gen.close()


def test_pipeline_api_takes_numpy_integers_and_refuses_inf() -> None:
    from runtime_engines import tiny_engines

    from trt_sd.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    result = pipe("a cat", steps=np.int64(2), seed=np.int32(5), height=np.int64(16))
    assert result.params["steps"] == 2 and result.params["seed"] == 5
    for bad in ({"steps": float("inf")}, {"prompt": 5}, {"batch": 10**12}):
        with pytest.raises(InputError):
            pipe(**{"prompt": "a cat", "steps": 2, **bad})
