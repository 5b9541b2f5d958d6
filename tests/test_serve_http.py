"""What an HTTP client of ``trt-sd serve`` sees, without Ray: the replica's replies
(trt_sd.runtime.serve.replica.Generator) compared with what ``trt-sd run`` does."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.runtime.cli import main as cli_main
from trt_sd.runtime.infotext import PNG_KEY, read_infotext
from trt_sd.runtime.serve.replica import SEED_HEADER, Generator, Reply, parse_generate_body


@pytest.fixture(scope="module")
def generator() -> Iterator[Generator]:
    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu", max_queue=4, timeout_s=30)
    yield gen
    gen.close()


def post(generator: Generator, payload: object) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return asyncio.run(generator.generate(body))


def test_png_is_what_trt_sd_run_writes(generator: Generator, tmp_path: Path) -> None:
    request = {
        "prompt": "a photo of a cat, painting",  # a comma: quoted in the infotext
        "negative_prompt": "dog",
        "sampler": "DPM++ 2M Karras",
        "steps": 4,
        "guidance": 5.0,
        "seed": 42,
        "height": 16,
        "width": 24,
    }
    reply = post(generator, request)
    assert reply.status == 200 and reply.content_type == "image/png"
    assert reply.headers[SEED_HEADER] == "42"
    with Image.open(io.BytesIO(reply.body)) as im:
        served, served_text = np.asarray(im.convert("RGB")), im.info[PNG_KEY]

    out = tmp_path / "run.png"
    argv = ["run", "--engines", str(tiny_engines()), "--backend", "onnxruntime-cpu", "--quiet"]
    for key, value in request.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert cli_main([*argv, "--out", str(out)]) == 0
    with Image.open(out) as im:
        written = np.asarray(im.convert("RGB"))
    assert served_text == read_infotext(out)
    assert np.array_equal(served, written)


# (JSON body, the CLI flags for the same values) -> the same one-line message
BAD_REQUESTS = [
    ({"steps": 0}, ["--steps", "0"]),
    ({"height": 20}, ["--height", "20"]),
    ({"width": 4096}, ["--width", "4096"]),
    ({"sampler": "nope"}, ["--sampler", "nope"]),
    ({"guidance": float("inf")}, ["--guidance", "inf"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"sampler": "heun", "eta": 0.5}, ["--sampler", "heun", "--eta", "0.5"]),
    ({"sampler": "karras dpm++", "karras": False}, ["--sampler", "karras dpm++", "--no-karras"]),
]


@pytest.mark.parametrize(("payload", "flags"), BAD_REQUESTS)
def test_invalid_request_gets_the_cli_message(generator, payload, flags, capsys, tmp_path) -> None:
    reply = post(generator, payload)
    argv = ["run", "--engines", str(tiny_engines()), "--backend", "onnxruntime-cpu", "--quiet"]
    assert cli_main([*argv, *flags, "--out", str(tmp_path / "o.png")]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert reply.status == 400, reply.body
    assert reply.content_type == "application/json"
    assert reply.body.count(b"\n") == 0
    assert cli_line == f"error: {reply.json['error']}", (cli_line, reply.json)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b'{"prompts": "x"}', "unknown field 'prompts'; allowed: prompt, negative_prompt"),
        (b'{"prompt": 3}', "prompt must be a string, got 3"),
        (b'{"steps": "many"}', "steps must be an integer, got 'many'"),
        (b'{"karras": "yes"}', "karras must be true or false"),
    ],
)
def test_malformed_body_is_a_400(generator: Generator, body: bytes, message: str) -> None:
    reply = post(generator, body)
    assert reply.status == 400
    assert reply.json["error"].startswith(message), reply.json


def test_empty_body_uses_the_model_defaults() -> None:
    assert parse_generate_body(b"") == {}
    assert parse_generate_body(b'{"seed": null, "prompt": "x"}') == {"prompt": "x"}


def test_health_reports_load_and_identity(generator: Generator) -> None:
    reply = generator.health()
    assert reply.status == 200
    status = reply.json
    assert status["status"] == "ok" and status["backend"] == "onnxruntime-cpu"
    assert status["max_batch"] == 4 and status["rss_bytes"] > 0
    assert {"active", "waiting", "stats", "pid"} <= set(status)


def test_overload_timeout_and_stop_statuses() -> None:
    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu", max_batch=1, max_queue=0)
    try:

        async def burst() -> list[Reply]:
            body = json.dumps({"steps": 40, "seed": 1}).encode()
            return list(await asyncio.gather(*(gen.generate(body) for _ in range(3))))

        statuses = sorted(r.status for r in asyncio.run(burst()))
        assert statuses == [200, 429, 429]
        gen.engine.timeout_s = 1e-3
        reply = post(gen, {"steps": 40, "seed": 2})
        assert reply.status == 504 and "timed out" in reply.json["error"]
    finally:
        gen.close()
    assert post(gen, {"steps": 1}).status == 503
    assert gen.health().status == 503
