"""Model-family specs and the shared denoise-step helpers, without engines."""

from __future__ import annotations

import numpy as np
import pytest

from trt_sd.models.descriptors import CONTEXT, ModelDims
from trt_sd.models.errors import InputError, ManifestError
from trt_sd.models.families import FAMILIES, PromptRows, detect_family, family_of, get_family
from trt_sd.models.families.sdxl import SDXL, time_ids
from trt_sd.runtime.denoise import DenoiseStep, Lane, split_rows, take_rows

SDXL_DIMS = ModelDims(
    text_hidden_size=768, text_hidden_size_2=1280, text_pooled_size=1280, time_ids_size=6
)


def test_old_manifests_mean_their_recorded_family_or_sd1() -> None:
    assert family_of({"model": {"family": "sd2"}}).name == "sd2"
    assert family_of({"model": {}}).name == "sd1"
    with pytest.raises(ManifestError, match=r"SD 1\.x, SD 2\.x, SDXL"):
        get_family("sd3")


def test_sd_dims_dict_is_unchanged_and_sdxl_context_is_both_widths() -> None:
    assert set(ModelDims().to_dict()) == {
        "text_max_length",
        "text_hidden_size",
        "unet_in_channels",
        "unet_out_channels",
        "latent_channels",
        "image_channels",
        "vae_scale_factor",
    }
    unet = SDXL.components(SDXL_DIMS)["unet"]
    assert unet.input(CONTEXT).shape == ("unet_batch", "text_length", 2048)
    assert SDXL.unet_conditioning(unet) == [CONTEXT, "text_embeds", "time_ids"]
    assert ModelDims.from_dict(SDXL_DIMS.to_dict()) == SDXL_DIMS


def test_detection_order() -> None:
    part = ["x", "y"]
    index = {"text_encoder": part, "unet": part, "vae": part}
    configs = {"index": index, "unet": {}, "text_encoder": {}, "scheduler": {}}
    assert detect_family(configs) is FAMILIES["sd1"]
    v = {**configs, "scheduler": {"prediction_type": "v_prediction"}}
    assert detect_family(v) is FAMILIES["sd2"]
    xl = {"index": {**index, "text_encoder_2": part}, "unet": {"addition_embed_type": "text_time"}}
    assert detect_family({**configs, **xl}) is SDXL
    no_time = {"index": {**index, "text_encoder_2": part}}
    assert detect_family({**configs, **no_time}) is None


def test_prompt_rows_are_in_diffusers_cfg_order() -> None:
    rows = PromptRows.for_request(["a", "b"], ["", "n"], True, (16, 24), {})
    assert rows.texts == ("", "n", "a", "b")
    assert rows.negative == (True, True, False, False)
    assert PromptRows.for_request(["a"], [""], False, (8, 8), {}).texts == ("a",)


def test_sdxl_micro_conditioning_defaults() -> None:
    opts = SDXL.check_options({}, 1024, 768)
    assert time_ids(opts, negative=False) == [1024, 768, 0, 0, 1024, 768]
    assert time_ids(opts, negative=True) == [1024, 768, 0, 0, 1024, 768]
    only_one = SDXL.check_options({"negative_original_size": (512, 512)}, 1024, 1024)
    assert time_ids(only_one, negative=True)[:2] == [1024, 1024]  # needs both, as diffusers
    both = SDXL.check_options(
        {"negative_original_size": (512, 512), "negative_target_size": (256, 256)}, 64, 64
    )
    assert time_ids(both, negative=True) == [512, 512, 0, 0, 256, 256]
    with pytest.raises(InputError, match="crops_coords_top_left must be two integers"):
        SDXL.check_options({"crops_coords_top_left": "x"}, 64, 64)


def test_sdxl_zeros_empty_negatives_only() -> None:
    rows = PromptRows.for_request(
        ["a", "b"], ["", "n"], True, (16, 16), SDXL.check_options({}, 16, 16)
    )
    ones = {"text_embeddings": np.ones((4, 77, 2), np.float32)}
    outputs = {
        "text_encoder": ones,
        "text_encoder_2": {**ones, "text_embeds": np.ones((4, 3), np.float32)},
    }
    cond = SDXL.combine(outputs, rows, {"force_zeros_for_empty_prompt": True})
    assert cond[CONTEXT].shape == (4, 77, 4)
    assert cond[CONTEXT][0].max() == 0 and cond["text_embeds"][0].max() == 0
    assert cond[CONTEXT][1:].min() == 1 and cond["text_embeds"][1:].min() == 1
    kept = SDXL.combine(outputs, rows, {"force_zeros_for_empty_prompt": False})
    assert kept[CONTEXT].min() == 1
    assert cond["time_ids"].shape == (4, 6)


def test_row_slicing_keeps_each_images_cfg_pair() -> None:
    cond = {"c": np.arange(6)[:, None]}  # [u0 u1 u2 c0 c1 c2]
    assert take_rows(cond, 1, 3, 3, True)["c"].ravel().tolist() == [1, 2, 4, 5]
    assert take_rows(cond, 1, 2, 6, False)["c"].ravel().tolist() == [1]
    parts = split_rows(cond, [2, 1, 3])
    assert [p["c"].ravel().tolist() for p in parts] == [[0, 1], [2], [3, 4, 5]]


def test_denoise_step_feeds_rows_in_lane_order() -> None:
    step = DenoiseStep(SDXL.components(SDXL_DIMS)["unet"])
    x = np.zeros((1, 4, 2, 2), np.float32)
    cfg_lane = Lane(x, 10.0, True, {n: np.full((2, 1), 1.0) for n in step.conditioning})
    plain = Lane(x + 1, 20.0, False, {n: np.full((1, 1), 2.0) for n in step.conditioning})
    feeds = step.feeds([cfg_lane, plain])
    assert feeds["timestep"].tolist() == [10.0, 10.0, 20.0]
    assert feeds["sample"][:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert feeds["time_ids"].ravel().tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(Exception, match=r"NaN or inf at step 3 of 5"):
        DenoiseStep(SDXL.components(SDXL_DIMS)["unet"]).output(
            {"model_output": np.array([np.nan])}, 2, 5
        )
