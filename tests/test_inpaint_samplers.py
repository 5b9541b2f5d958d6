"""``Stepper.add_noise(x0, noise, i)`` vs diffusers' ``scheduler.add_noise`` inside its
inpainting loop.

diffusers' StableDiffusionInpaintPipeline, with a 4-channel UNet, re-noises the known region
after step ``i`` with ``scheduler.add_noise(image_latents, noise, [timesteps[i + 1]])``; the
scheduler then reads its own position (``step_index`` after a step, ``begin_index`` before the
first). The test runs diffusers' loop for real (scale, step with a dummy denoiser, add_noise)
and compares each re-noised latent with ours at model call ``i + 1``.
"""

from __future__ import annotations

import numpy as np
import pytest

from trt_sd.models.scheduler_configs import sd15_scheduler_config
from trt_sd.samplers import stepper

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = sd15_scheduler_config()
STEPS = 10
SHAPE = (1, 4, 4, 4)

CASES = {  # our sampler -> (diffusers class, extra config)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def _denoise(x: np.ndarray, t: float) -> np.ndarray:
    return (np.tanh(x) * (0.3 + t / 1000.0)).astype(np.float32)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", list(CASES))
def test_add_noise_at_the_next_call_matches_diffusers(name: str, strength: float) -> None:
    cls, extra = CASES[name]
    rng = np.random.default_rng(3)
    x0, noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    ours = stepper(name, SD15, STEPS, strength=strength, rng=np.random.default_rng(0))
    sched = getattr(diffusers, cls).from_config({**SD15, **extra})
    sched.set_timesteps(STEPS)
    t_start = STEPS - min(int(STEPS * strength), STEPS)
    timesteps = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    assert len(timesteps) == ours.num_model_calls
    first = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    np.testing.assert_allclose(ours.add_noise(x0, noise), first.numpy(), rtol=1e-5, atol=1e-5)
    latents = torch.from_numpy(x0)
    checked = 0
    for i, t in enumerate(timesteps[:-1]):
        scaled = sched.scale_model_input(latents, t)
        out = torch.from_numpy(_denoise(scaled.numpy(), float(t)))
        latents = sched.step(out, t, latents, return_dict=False)[0]
        theirs = sched.add_noise(
            torch.from_numpy(x0), torch.from_numpy(noise), timesteps[i + 1 :][:1]
        )
        np.testing.assert_allclose(
            ours.add_noise(x0, noise, i + 1), theirs.numpy(), rtol=1e-5, atol=1e-5
        )
        checked += 1
    assert checked == len(timesteps) - 1 > 0


def test_add_noise_index_is_checked() -> None:
    st = stepper("euler", SD15, 4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="model-call index"):
        st.add_noise(x, x, 4)
    assert np.array_equal(st.add_noise(x, x + 1, 3), st.add_noise(x, x + 1, 3))
    assert st.add_noise(x, x + 1, 0).max() > st.add_noise(x, x + 1, 3).max()  # less noise later
