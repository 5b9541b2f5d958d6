"""NumPy samplers with diffusers-compatible semantics (diffusers 0.42.1, step for step).

A checkpoint's ``scheduler_config.json`` means the same schedule here as in diffusers, for
every sampler: same betas, spacings, sigma grids, timesteps handed to the UNet and update
formulas (``tests/test_samplers_parity.py``). NumPy only.

Service face (explicit per-request state; batch many requests' UNet calls)::

    from trt_sd.samplers import stepper, cfg
    st = stepper("DPM++ 2M Karras", scheduler_config, steps=25, rng=np.random.default_rng(0))
    x = st.prepare_noise(noise)                 # or st.add_noise(x0, noise) with strength < 1
    for i, t in enumerate(st.timesteps):
        x_in = st.scale_model_input(x, i)
        eps = cfg(*unet(x_in, t), guidance_scale=7.5)
        x = st.step(eps, i, x)

Convenience face: ``sample(name, denoise_fn, noise, scheduler_config, steps, **options)``.
``trt-sd samplers`` lists the names; deviations from diffusers (only where diffusers errors,
returns NaN or mis-pairs img2img timesteps) are documented in the modules that make them.
"""

from .api import sample, stepper
from .base import Stepper
from .guidance import cfg
from .registry import SAMPLERS, SamplerInfo, describe_samplers, resolve

__all__ = [
    "SAMPLERS",
    "SamplerInfo",
    "Stepper",
    "cfg",
    "describe_samplers",
    "resolve",
    "sample",
    "stepper",
]
