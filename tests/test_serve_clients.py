"""``trt-sd serve`` through the clients people already use: the ``openai`` package (Images
API) and the ``webuiapi`` package (AUTOMATIC1111 API), against a real server on 127.0.0.1 with
an API key and two models (one Ray instance for the whole module).

Every image is checked against what ``Pipeline.__call__`` makes for the same arguments, so an
adapter that mistranslates a field (seed, steps, sampler, size, strength, model) fails here.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from runtime_engines import tiny_engines

from trt_sd.runtime import Pipeline
from trt_sd.runtime.infotext import PNG_KEY

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.slow

KEY = "test-key-1234"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``trt-sd serve A B --api-key KEY`` in a subprocess; (base URL, port)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "trt_sd.runtime.cli", "serve"]
    command += [str(tiny_engines()), str(tiny_engines(v_prediction=True))]
    command += ["--port", str(port), "--backend", "onnxruntime-cpu", "--api-key", KEY]
    command += ["--cpus-per-replica", "0.5", "--max-images", "4"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"trt-sd serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                ok = requests.get(f"{base}/health", timeout=5).status_code == 200
                ok = ok and requests.get(f"{base}/health?model=engines-v", timeout=5).ok
                # ours (not another test's server that took the port): the key and the models
                models = requests.get(f"{base}/v1/models", auth=("u", KEY), timeout=5)
                ok = ok and models.ok and len(models.json()["data"]) == 2
                if ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"trt-sd serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pipes() -> dict[str, Pipeline]:
    return {
        "engines": Pipeline.load(tiny_engines(), backend="onnxruntime-cpu"),
        "engines-v": Pipeline.load(tiny_engines(v_prediction=True), backend="onnxruntime-cpu"),
    }


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Same image up to batch-size float rounding (continuous batching: within 1/255)."""
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1


@pytest.fixture(scope="module")
def webui(server: tuple[str, int]) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[1], username="anyone", password=KEY)
    return api


def test_webuiapi_txt2img_matches_the_pipeline(webui, pipes) -> None:
    result = webui.txt2img(
        prompt="a red cube",
        negative_prompt="blur",
        seed=11,
        steps=4,
        cfg_scale=6.0,
        width=24,
        height=16,
        batch_size=2,
        sampler_name="DPM++ 2M",
        scheduler="karras",
    )
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [11, 12]
    assert result.info["sd_model_name"] == "engines"
    for i, image in enumerate(result.images):
        ref = pipes["engines"](
            prompt="a red cube", negative_prompt="blur", seed=11 + i, steps=4, guidance=6.0,
            width=24, height=16, sampler="DPM++ 2M Karras",
        )  # fmt: skip
        assert close(pixels(image), ref.images[0].astype(np.int16))
        text = image.info[PNG_KEY]
        assert text == result.info["infotexts"][i]
        assert f"Seed: {11 + i}" in text and "Sampler: DPM++ 2M Karras" in text
        assert "Size: 24x16" in text and "Negative prompt: blur" in text


def test_webuiapi_img2img_matches_the_pipeline(webui, pipes) -> None:
    init = Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3))
    result = webui.img2img(
        images=[init], prompt="a cat", seed=3, steps=6, denoising_strength=0.5,
        width=16, height=16, sampler_name="Euler",
    )  # fmt: skip
    ref = pipes["engines"](
        prompt="a cat", image=init, strength=0.5, seed=3, steps=6, guidance=7.0, sampler="Euler",
        width=16, height=16,
    )  # fmt: skip
    assert close(pixels(result.images[0]), ref.images[0].astype(np.int16))
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]


def test_webuiapi_inpainting_matches_the_pipeline(webui, pipes) -> None:
    init = Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3))
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 4:12] = 255
    result = webui.img2img(
        images=[init], mask_image=Image.fromarray(255 - mask), inpainting_mask_invert=1,
        mask_blur=1, prompt="a cat", seed=3, steps=4, denoising_strength=0.9, width=16,
        height=16, sampler_name="Euler",
    )  # fmt: skip
    ref = pipes["engines"](
        prompt="a cat", image=init, mask=mask, mask_blur=1, strength=0.9, seed=3, steps=4,
        guidance=7.0, sampler="Euler", width=16, height=16,
    )  # fmt: skip
    assert close(pixels(result.images[0]), ref.images[0].astype(np.int16))
    assert "Mask blur: 1.0" in result.info["infotexts"][0]


def test_webuiapi_lists_models_samplers_and_switches_model(webui, pipes) -> None:
    models = webui.get_sd_models()
    assert [m["model_name"] for m in models] == ["engines", "engines-v"]
    names = [s["name"] for s in webui.get_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert "DPM++ SDE" not in names  # not in our registry: not offered
    assert [s["name"] for s in webui.get_schedulers()] == ["automatic", "karras", "exponential"]
    webui.util_set_model("engines-v")
    try:
        assert webui.util_get_current_model().startswith("engines-v")
        result = webui.txt2img(prompt="p", seed=5, steps=3, width=16, height=16)
        # webuiapi's default sampler is "Euler a" (eta 1.0)
        ref = pipes["engines-v"](prompt="p", seed=5, steps=3, guidance=7.0, sampler="Euler a")
        assert result.info["sd_model_name"] == "engines-v"
        assert close(pixels(result.images[0]), ref.images[0].astype(np.int16))
    finally:
        webui.util_set_model("engines")


def test_webui_refusals_name_the_field(server) -> None:
    base = server[0]
    auth = ("u", KEY)
    cases = [
        ("txt2img", {"enable_hr": True}, 422, "enable_hr"),
        ("txt2img", {"restore_faces": True}, 422, "restore_faces"),
        ("txt2img", {"promt": "typo"}, 422, "'promt'"),
        ("txt2img", {"scheduler": "beta"}, 422, "scheduler 'beta'"),
        ("txt2img", {"width": 512, "height": 16}, 400, "width 16..24"),
        ("txt2img", {"batch_size": 5}, 400, "allowed 1..4"),
        ("txt2img", {"steps": 500}, 400, "limit of 150"),
        ("img2img", {"init_images": ["AAAA"], "latent_mask": "AAAA"}, 422, "latent_mask"),
        ("img2img", {"init_images": ["bm90IGFuIGltYWdl"]}, 400, "init_images[0] is not"),
    ]
    for route, payload, status, words in cases:
        r = requests.post(f"{base}/sdapi/v1/{route}", json=payload, auth=auth, timeout=60)
        assert r.status_code == status, (payload, r.text)
        assert words in r.json()["error"] and "\n" not in r.text, r.text


def test_openai_generate_and_edit(server, pipes) -> None:
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["engines", "engines-v"]
    result = client.images.generate(
        prompt="a blue ball", n=2, size="16x24", model="engines-v", response_format="b64_json",
        extra_body={"seed": 21, "steps": 3, "sampler": "euler_a", "guidance": 5.0},
    )  # fmt: skip
    assert len(result.data) == 2
    for i, item in enumerate(result.data):
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        ref = pipes["engines-v"](
            prompt="a blue ball", seed=21 + i, steps=3, sampler="euler_a", guidance=5.0,
            width=16, height=24,
        )  # fmt: skip
        assert close(pixels(image), ref.images[0].astype(np.int16))
    init = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(init, "PNG")
    edited = client.images.edit(
        image=("init.png", init.getvalue(), "image/png"), prompt="make it blue",
        extra_body={"seed": 4, "steps": 4, "strength": 0.75},
    )  # fmt: skip
    image = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    ref = pipes["engines"](
        prompt="make it blue", image=Image.new("RGB", (16, 16), (200, 40, 40)), strength=0.75,
        seed=4, steps=4,
    )  # fmt: skip
    assert close(pixels(image), ref.images[0].astype(np.int16))


def test_openai_edit_with_a_mask_inpaints(server, pipes) -> None:
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
    init = Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3))
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[4:12, 2:10] = 0  # OpenAI's convention: transparent = edit
    mask, image = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((16, 16, 3), np.uint8), alpha]), "RGBA").save(mask, "PNG")
    init.save(image, "PNG")
    edited = client.images.edit(
        image=("init.png", image.getvalue(), "image/png"), prompt="a cat",
        mask=("mask.png", mask.getvalue(), "image/png"), extra_body={"seed": 5, "steps": 3},
    )  # fmt: skip
    result = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    ref = pipes["engines"](prompt="a cat", image=init, mask=255 - alpha, seed=5, steps=3)
    assert close(pixels(result), ref.images[0].astype(np.int16))


def test_openai_errors_are_openai_shaped(server) -> None:
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", response_format="url")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="1024x1024", response_format="b64_json")
    assert "width 16..24" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="dall-e-3", response_format="b64_json")
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_is_required_except_for_health(server) -> None:
    base = server[0]
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    r = requests.get(f"{base}/health?model=nope", timeout=30)
    assert r.status_code == 404
    assert r.json()["error"] == "no model 'nope'; models: engines, engines-v"
    for method, path in [
        ("GET", "/sdapi/v1/sd-models"),
        ("POST", "/generate"),
        ("GET", "/metrics"),
    ]:
        r = requests.request(method, f"{base}{path}", timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = requests.request(method, f"{base}{path}", timeout=30, auth=("u", "nope"))
        assert r.status_code == 401
    r = requests.post(
        f"{base}/generate", json={"steps": 2, "seed": 1}, timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_metrics_are_prometheus_text(server) -> None:
    r = requests.get(f"{server[0]}/metrics", auth=("u", KEY), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'trt_sd_up{model="engines"} 1' in text and 'trt_sd_up{model="engines-v"} 1' in text
    assert 'trt_sd_request_seconds_bucket{route="/sdapi/v1/txt2img",le="+Inf"}' in text
    calls = [line for line in text.splitlines() if line.startswith("trt_sd_unet_calls_total")]
    assert any(int(line.split()[-1]) > 0 for line in calls)
    json.dumps(text)  # plain text, one sample per line


def test_progress_and_interrupt(webui, server) -> None:
    """A long request shows in /progress; /interrupt ends it early with the images done so far
    (none or some, never an error)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            webui.txt2img, prompt="long", seed=1, steps=150, batch_size=4, width=16, height=16
        )
        deadline = time.monotonic() + 60
        while webui.get_progress()["state"]["job_count"] == 0:
            assert time.monotonic() < deadline and not future.done()
            time.sleep(0.05)
        assert webui.interrupt() == {}
        result = future.result(timeout=60)
    assert result.info["interrupted"] is True
    assert len(result.images) < 4
    assert webui.get_progress()["state"]["job_count"] == 0
