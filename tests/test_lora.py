"""Run-time LoRA against diffusers' ``load_lora_weights`` + ``set_adapters``.

Tiny SD 1.x pipeline (fp32 ONNX Runtime engines), LoRA files in both formats found in the wild
(diffusers / PEFT written by diffusers itself, kohya / AUTOMATIC1111 written by
tests/lora_files.py), adapting the UNet (attention, feed-forward, 1x1 ``proj_in`` and 3x3
resnet convolutions) and the text encoder; same latents, same scale on both sides. Then the
switching guarantees (A -> B -> A -> [] exact) and the one-line refusals of bad files.
"""

from __future__ import annotations

import numpy as np
import pytest
from lora_files import KOHYA_SD, make_peft_lora, to_kohya
from runtime_engines import SIZE, tiny_engines, tiny_model

from trt_sd.runtime import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "painting"
STEPS = 6
GUIDANCE = 7.5
ALPHA = 8.0  # rank 4: scale alpha / rank = 2


def _reference():
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_model()), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = make_peft_lora(_reference(), root / "a", seed=1, alpha=ALPHA)
    b = make_peft_lora(_reference(), root / "b", seed=2, alpha=ALPHA)
    kohya = to_kohya(a, root / "a_kohya.safetensors", alpha=ALPHA, prefixes=KOHYA_SD)
    return {"peft": a, "peft_b": b, "kohya": kohya}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2), np.float32)


def _ours(pipe, loras, latents) -> np.ndarray:
    out = pipe(
        PROMPT,
        NEGATIVE,
        sampler="euler",
        steps=STEPS,
        guidance=GUIDANCE,
        latents=latents,
        loras=loras,
    )
    return out.images[0]


@pytest.fixture(scope="module")
def reference(files):
    """diffusers with both files loaded as adapters (``set_adapters`` picks one per test)."""
    pipe = _reference()
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for name in ("peft", "kohya"):
        pipe.load_lora_weights(
            str(files[name].parent), weight_name=files[name].name, adapter_name=name
        )
    return pipe


def _theirs(reference, adapter: str, scale: float, latents) -> np.ndarray:
    reference.set_adapters([adapter], adapter_weights=[scale])
    with torch.no_grad():
        out = reference(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents),
            output_type="np",
        )
    return (out.images[0] * 255).round().astype(np.uint8)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize(("fmt", "scale"), [("peft", 1.0), ("peft", 0.5), ("kohya", 0.7)])
def test_matches_diffusers(pipe, files, reference, fmt: str, scale: float) -> None:
    latents = _latents()
    ours = _ours(pipe, [(files[fmt], scale)], latents)
    theirs = _theirs(reference, fmt, scale, latents)
    base = _ours(pipe, [], latents)
    assert _diff(ours, base) > 8, "the LoRA must visibly change the image"
    assert _diff(ours, theirs) <= 2, f"max diff {_diff(ours, theirs)} against diffusers"


def test_switching_is_exact_and_cached(files, monkeypatch) -> None:
    """A -> B -> A -> [] gives exactly A and exactly the base: every set is computed from the
    base weights; the second A is served by the LRU (no new session)."""
    monkeypatch.setenv("TRT_SD_LORA_SESSIONS", "2")
    pipe = Pipeline.load(tiny_engines(), backend="onnxruntime-cpu")
    latents = _latents(3)
    base = _ours(pipe, [], latents)
    a1 = _ours(pipe, [(files["peft"], 0.8)], latents)
    b = _ours(pipe, [(files["peft_b"], 0.8)], latents)
    a2 = _ours(pipe, [(files["peft"], 0.8)], latents)
    again = _ours(pipe, [], latents)
    assert np.array_equal(a1, a2) and np.array_equal(base, again)
    assert _diff(a1, b) > 8 and _diff(a1, base) > 8
    assert pipe.engines["unet"].lora_sessions.created == 2
    both = _ours(pipe, [(files["peft"], 0.8), (files["peft_b"], 0.8)], latents)
    assert _diff(both, a1) > 8 and _diff(both, b) > 8
    assert np.array_equal(_ours(pipe, [(files["peft"], 0.0)], latents), base)


def test_params_and_infotext_record_the_loras(pipe, files) -> None:
    from trt_sd.runtime.infotext import format_infotext

    out = pipe(PROMPT, steps=2, seed=1, loras=[(files["kohya"], 0.5)])
    lora = out.params["loras"][0]
    assert lora["name"] == "a_kohya" and lora["scale"] == 0.5 and len(lora["hash"]) == 12
    assert f'Lora hashes: "a_kohya: {lora["hash"]}"' in format_infotext(out.params)
    assert "loras" not in pipe(PROMPT, steps=2, seed=1).params


def test_fused_at_export_equals_run_time(pipe, files, tmp_path) -> None:
    """``export --lora`` fuses the same deltas into the torch weights: its engines give the
    run-time LoRA's image, and the manifest names the file, its sha256 and scale."""
    from trt_sd.export import export_model

    out = tmp_path / "fused"
    manifest = export_model(
        tiny_model(),
        out,
        height="16",
        width="16",
        batch="1",
        progress=False,
        loras=[f"{files['kohya']}:0.7"],
    )
    recorded = manifest.raw["export"]["loras"]
    assert [(x["name"], x["scale"]) for x in recorded] == [("a_kohya", 0.7)]
    latents = _latents(5)
    fused = _ours(Pipeline.load(out, backend="onnxruntime-cpu"), [], latents)
    run_time = _ours(pipe, [(files["kohya"], 0.7)], latents)
    assert _diff(fused, run_time) <= 1, _diff(fused, run_time)
    assert _diff(fused, _ours(pipe, [], latents)) > 8
