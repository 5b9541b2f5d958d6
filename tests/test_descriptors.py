"""The component descriptors resolve shapes the way export, builder and runtime expect."""

import pytest

from trt_sd.models import InputError, ModelDims, Range, ShapeRange, all_components


def test_range_parse_forms():
    assert Range.parse("512", "height", 8).to_list() == [512, 512, 512]
    assert Range.parse("256:768", "height", 8).to_list() == [256, 512, 768]
    assert Range.parse("1:2:4", "batch").to_list() == [1, 2, 4]


@pytest.mark.parametrize(
    "text,msg",
    [
        ("500", "multiple of 8"),
        ("768:256", "greater than MAX"),
        ("a:b", "integers"),
        ("0", "positive"),
    ],
)
def test_range_parse_rejects(text, msg):
    with pytest.raises(InputError, match=msg):
        Range.parse(text, "height", 8)


def test_unet_profile_doubles_batch_for_cfg():
    shapes = ShapeRange(Range(1, 1, 4), Range(256, 512, 768), Range(512, 512, 512))
    unet = all_components(ModelDims())["unet"]
    prof = unet.profile(shapes)
    assert prof["sample"] == ((1, 4, 32, 64), (2, 4, 64, 64), (8, 4, 96, 64))
    assert prof["timestep"] == ((1,), (2,), (8,))
    assert unet.dynamic_axes()["sample"] == {0: "unet_batch", 2: "latent_height", 3: "latent_width"}


def test_names_are_unique_per_component():
    for comp in all_components(ModelDims()).values():
        names = comp.input_names + comp.output_names
        assert len(names) == len(set(names))
