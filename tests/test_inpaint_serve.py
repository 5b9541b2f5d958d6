"""Inpainting through the service: the batching engine carries each request's mask rows, and
``POST /generate`` takes ``mask`` / ``mask_blur``; every image equals ``Pipeline.__call__``'s.
(The AUTOMATIC1111 route with the real ``webuiapi`` client: tests/test_serve_clients.py.)"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
from PIL import Image
from runtime_engines import SIZE, tiny_engines
from test_inpaint import _pipe

from trt_sd.runtime.serve.engine import BatchingEngine
from trt_sd.runtime.serve.replica import Generator


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)


def _mask(top: int, left: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top : top + 8, left : left + 6] = 255
    return mask


REQUESTS = [
    {"prompt": "a cat", "seed": 1, "image": _image(1), "mask": _mask(2, 4), "strength": 1.0},
    {"prompt": "a dog", "seed": 2, "image": _image(2), "mask": _mask(6, 8), "strength": 0.7},
]


def test_engine_batches_inpainting_requests_like_the_pipeline() -> None:
    pipe = _pipe("sd9")  # a 9-channel UNet: the mask rows are UNet feeds
    engine = BatchingEngine(pipe, max_batch=2)
    try:
        tickets = [engine.submit(steps=4, sampler="euler", guidance=5.0, **r) for r in REQUESTS]
        results = [t.future.result(timeout=120) for t in tickets]
        assert engine.stats.max_rows == 4  # both requests (CFG: 2 rows each) in one UNet call
    finally:
        engine.close()
    for request, result in zip(REQUESTS, results, strict=True):
        alone = pipe(steps=4, sampler="euler", guidance=5.0, **request)
        diff = np.abs(result.image.astype(int) - alone.images[0].astype(int)).max()
        assert diff <= 1 and result.params["strength"] == request["strength"]


def _b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_generate_takes_a_mask() -> None:
    gen = Generator(str(tiny_engines()), backend="onnxruntime-cpu", max_queue=4, timeout_s=60)
    try:
        body = {"prompt": "a cat", "seed": 3, "steps": 3, "sampler": "euler", "mask_blur": 1}
        body.update(image=_b64(_image(3)), mask=_b64(_mask(4, 4)))
        reply = asyncio.run(gen.generate(json.dumps(body).encode()))
        assert reply.status == 200, reply.body
        bad = dict(body, mask=_b64(np.zeros((SIZE, SIZE), np.uint8)))
        refused = asyncio.run(gen.generate(json.dumps(bad).encode()))
        assert refused.status == 400 and b"no white pixels" in refused.body
        pipe = gen.pipe
    finally:
        gen.close()
    with Image.open(io.BytesIO(reply.body)) as im:
        served = np.asarray(im.convert("RGB"))
    mask = np.repeat(_mask(4, 4)[:, :, None], 3, axis=2)  # as decoded: RGB
    alone = pipe("a cat", seed=3, steps=3, sampler="euler", image=_image(3), mask=mask, mask_blur=1)
    assert np.array_equal(served, alone.images[0])
