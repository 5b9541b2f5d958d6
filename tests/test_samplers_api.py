"""trt_sd.samplers' public faces: name resolution, bad-input errors, dtype / batch handling, the
sample loop, CFG, the CLI table, and the behaviours chosen where diffusers has none to copy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trt_sd.models.scheduler_configs import sd15_scheduler_config
from trt_sd.samplers import SAMPLERS, cfg, describe_samplers, resolve, sample, stepper
from trt_sd.samplers.base import LinearCombination

SD15 = sd15_scheduler_config()
SHAPE = (2, 4, 8, 8)


def denoiser(x_in: np.ndarray, t: np.ndarray) -> np.ndarray:
    scale = (0.3 + np.asarray(t, dtype=np.float64) / 1000.0).reshape(-1, 1, 1, 1)
    return (np.tanh(x_in[:, ::-1]) * scale + 0.1 * x_in).astype(x_in.dtype)


def noise(dtype=np.float32, shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(
    "name,expected,options",
    [
        ("DPM++ 2M Karras", "dpm++2m", {"use_karras_sigmas": True}),
        ("DPM++ 2M", "dpm++2m", {}),
        ("dpm++", "dpm++", {}),
        ("Euler a", "euler-a", {}),
        ("EULER A", "euler-a", {}),
        ("k_euler_ancestral", "euler-a", {}),
        ("euler_ancestral", "euler-a", {}),
        ("Euler", "euler", {}),
        ("DPM++ 2M SDE Karras", "dpm++2m-sde", {"use_karras_sigmas": True}),
        ("DPM++ 2M SDE Heun", "dpm++2m-sde-heun", {}),
        ("DPM++ 3M SDE Exponential", "dpm++3m-sde", {"use_exponential_sigmas": True}),
        ("DPM++ 2S a Karras", "dpm++2s-a", {"use_karras_sigmas": True}),
        ("dpmpp_2s_ancestral", "dpm++2s-a", {}),
        ("DPM2 a", "dpm2-a", {}),
        ("DPM2 Karras", "dpm2", {"use_karras_sigmas": True}),
        ("LMS Karras", "lms", {"use_karras_sigmas": True}),
        ("Heun", "heun", {}),
        ("DDIM", "ddim", {}),
        ("PLMS", "pndm", {}),
        ("UniPC", "unipc", {}),
        ("k_dpmpp_2m", "dpm++2m", {}),
        ("dpm-solver-2m", "dpm-solver", {}),
        ("DPMSolverMultistepScheduler", "dpm++", {}),
        ("PNDMScheduler", "pndm", {}),
    ],
)
def test_resolve_webui_and_k_diffusion_names(name, expected, options) -> None:
    assert resolve(name) == (expected, options)


@pytest.mark.parametrize(
    "name,closest",
    [
        ("DPM fast", "dpm2-a"),
        ("eulr", "euler"),
        ("unipcc", "unipc"),
        ("dpm++ 2m sdee", "dpm++2m-sde"),
    ],
)
def test_unknown_name_lists_valid_names_and_closest(name, closest) -> None:
    with pytest.raises(ValueError, match="unknown sampler") as err:
        stepper(name, SD15, 10)
    assert f"closest: {closest!r}" in str(err.value)
    assert "dpm++2m-sde" in str(err.value)  # the valid names are listed


def test_every_canonical_name_builds_and_samples() -> None:
    for name in SAMPLERS:
        st = stepper(name, SD15, 8, rng=np.random.default_rng(0))
        assert st.num_model_calls == len(st.timesteps) > 0
        out = sample(name, denoiser, noise(), SD15, 8, rng=np.random.default_rng(0))
        assert out.shape == SHAPE and out.dtype == np.float32 and np.isfinite(out).all(), name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps=0 must be a positive integer"),
        ({"steps": 2.5}, "steps=2.5 must be a positive integer"),
        ({"steps": 1001}, "more than the schedule has"),
        ({"config": {"beta_schedule": "cosine"}}, "beta_schedule='cosine' is not supported"),
        ({"config": {"timestep_spacing": "uniform"}}, "timestep_spacing='uniform'"),
        ({"config": {"prediction_type": "flow"}}, "prediction_type='flow' is not supported"),
        ({"config": {"trained_betas": [0.1, 0.2]}}, "trained_betas has 2 values"),
        ({"config": "scheduler.json"}, "scheduler_config must be a dict"),
        ({"foo": 1}, "option 'foo' is not known to sampler dpm\\+\\+2m; allowed: "),
        ({"order": 3}, "dpm\\+\\+2m fixes solver_order=2"),
        ({"eta": 0.5}, "eta applies only to ddim, euler-a"),
        ({"strength": 0.0}, "strength=0.0 must be a number in \\(0, 1\\]"),
        ({"strength": 1.5}, "strength=1.5"),
        ({"strength": 0.05}, "leaves no denoising step"),
        ({"karras": True, "use_exponential_sigmas": True}, "choose one of karras"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, match) -> None:
    kwargs = dict(kwargs)
    config = (
        {**SD15, **kwargs.pop("config")}
        if isinstance(kwargs.get("config"), dict)
        else (kwargs.pop("config", SD15))
    )
    steps = kwargs.pop("steps", 10)
    with pytest.raises(ValueError, match=match):
        stepper("dpm++2m", config, steps, **kwargs)


def test_option_errors_for_samplers_without_the_feature() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas is not available for ddim"):
        stepper("ddim", SD15, 10, karras=True)
    with pytest.raises(ValueError, match="asks for Karras sigmas but karras=False"):
        stepper("DPM++ 2M Karras", SD15, 10, karras=False)
    with pytest.raises(ValueError, match="order=4 is not supported"):
        stepper("dpm++", SD15, 10, order=4)
    with pytest.raises(ValueError, match="order=5 is not supported by lms"):
        stepper("lms", SD15, 10, order=5)
    with pytest.raises(ValueError, match="does not support prediction_type='sample'"):
        stepper("pndm", {**SD15, "prediction_type": "sample"}, 10)


def test_step_checks_shapes_order_and_dtype() -> None:
    st = stepper("euler", SD15, 4)
    x = st.prepare_noise(noise())
    with pytest.raises(ValueError, match=r"model_output shape \(1, 4, 8, 8\) does not match x"):
        st.step(noise(shape=(1, 4, 8, 8)), 0, x)
    with pytest.raises(ValueError, match="i=1 is out of order"):
        st.step(noise(), 1, x)
    with pytest.raises(ValueError, match=r"i=7 is not a model-call index; allowed: 0\.\.3"):
        st.scale_model_input(x, 7)
    with pytest.raises(ValueError, match="floating-point"):
        st.step(np.zeros(SHAPE, np.int64), 0, np.zeros(SHAPE, np.int64))
    for i in range(4):
        x = st.step(denoiser(st.scale_model_input(x, i), np.full(2, st.timesteps[i])), i, x)
    with pytest.raises(ValueError, match="i=4 is not a model-call index"):
        st.step(noise(), 4, x)
    with pytest.raises(ValueError, match="strength < 1 needs init_latents"):
        sample("euler", denoiser, noise(), SD15, 10, strength=0.5)
    with pytest.raises(ValueError, match="noise shape"):
        st.add_noise(noise(), noise(shape=(1, 4, 8, 8)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", ["dpm++2m", "euler-a", "ddim", "heun", "unipc"])
def test_returns_the_input_dtype(name, dtype) -> None:
    out = sample(name, denoiser, noise(dtype), SD15, 6, rng=np.random.default_rng(1))
    assert out.dtype == dtype and np.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["dpm++2m", "dpm++3m", "dpm-solver", "dpm++2m-sde", "dpm++3s", "unipc"]
)
def test_steps_return_new_arrays_and_leave_their_inputs_alone(name) -> None:
    """The VP solvers reuse internal buffers across steps; what a step returns belongs to the
    caller: no later step writes into it, and x / model_output are only read."""
    st = stepper(name, SD15, 8, rng=np.random.default_rng(0))
    x, kept = st.prepare_noise(noise()), []
    for i, t in enumerate(st.timesteps):
        out = denoiser(st.scale_model_input(x, i), np.full(2, t))
        x_before, out_before = x.copy(), out.copy()
        new = st.step(out, i, x)
        assert not np.shares_memory(new, x) and not np.shares_memory(new, out)
        np.testing.assert_array_equal(x, x_before)
        np.testing.assert_array_equal(out, out_before)
        kept.append((new, new.copy()))
        x = new
    for result, snapshot in kept:
        np.testing.assert_array_equal(result, snapshot)


def test_linear_combination_is_the_plain_sum() -> None:
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((3, 5)) for _ in range(5)]
    coefficients = [0.7, 0.0, 1.0, -2.5, 1e-3]
    expected = sum(c * a for c, a in zip(coefficients, arrays, strict=True))
    combination = LinearCombination(coefficients)
    got = combination(arrays)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
    singles: list = [a.astype(np.float32) for a in arrays]
    singles[1] = None  # a weight-0 array is never read
    got = combination(singles)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    out = np.empty((3, 5))
    assert combination(arrays, out) is out
    with pytest.raises(ValueError, match="no terms"):
        LinearCombination([0.0, 0.0])


def test_float64_and_float32_agree() -> None:
    a = sample("dpm++2m", denoiser, noise(np.float64), SD15, 10, karras=True)
    b = sample("dpm++2m", denoiser, noise(np.float32), SD15, 10, karras=True)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5


@pytest.mark.parametrize("name", ["dpm++2m", "unipc", "heun", "dpm++3s", "pndm", "lms"])
def test_batch_rows_are_independent(name) -> None:
    """A batched stepper gives each row what a batch-of-one stepper would."""
    both = sample(name, denoiser, noise(), SD15, 7, karras=None)
    for row in range(2):
        single = sample(name, denoiser, noise()[row : row + 1], SD15, 7)
        np.testing.assert_allclose(both[row : row + 1], single, rtol=1e-6, atol=1e-6)


def test_stochastic_samplers_follow_their_rng() -> None:
    runs = [
        sample("euler-a", denoiser, noise(), SD15, 6, rng=np.random.default_rng(s))
        for s in (5, 5, 6)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3
    # eta=0 turns the ancestral sampler into plain Euler
    euler = sample("euler", denoiser, noise(), SD15, 6)
    np.testing.assert_allclose(
        sample("euler-a", denoiser, noise(), SD15, 6, eta=0.0), euler, rtol=1e-5, atol=1e-5
    )


def test_model_call_counts_and_init_noise_sigma() -> None:
    assert stepper("heun", SD15, 10).num_model_calls == 19
    assert stepper("dpm2-a", SD15, 10).num_model_calls == 19
    assert stepper("pndm", SD15, 10).num_model_calls == 11
    assert stepper("dpm++2m", SD15, 10).num_model_calls == 10
    # SD 1.5's config has no timestep_spacing, so Euler uses its class default, linspace
    linspace = stepper("euler", SD15, 10)
    assert linspace.timesteps[0] == 999
    assert linspace.init_noise_sigma == pytest.approx(float(linspace.sigmas[0]))
    leading = stepper("euler", {**SD15, "timestep_spacing": "leading"}, 10)  # sqrt(s^2 + 1)
    assert leading.timesteps[0] == 901
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(leading.sigmas[0] ** 2 + 1))
    assert stepper("dpm++2m", SD15, 10).init_noise_sigma == 1.0


def test_sample_is_the_stepper_loop() -> None:
    st = stepper("dpm++2m", SD15, 9, karras=True)
    x = st.prepare_noise(noise())
    for i, t in enumerate(st.timesteps):
        x = st.step(denoiser(st.scale_model_input(x, i), np.full(2, t)), i, x)
    np.testing.assert_array_equal(sample("DPM++ 2M Karras", denoiser, noise(), SD15, 9), x)


def test_img2img_trims_like_diffusers_get_timesteps() -> None:
    full = stepper("heun", SD15, 10)
    st = stepper("heun", SD15, 10, strength=0.5)  # t_start = 5, two calls per step
    np.testing.assert_array_equal(st.timesteps, full.timesteps[10:])
    x0 = noise(seed=3)
    out = sample("heun", denoiser, noise(), SD15, 10, strength=0.5, init_latents=x0)
    assert np.isfinite(out).all()


def test_pndm_img2img_restarts_plms_on_the_remaining_grid() -> None:
    """diffusers trims PNDM's call list so the repeated warm-up call lands on the wrong
    timestep; we restart PLMS (with its warm-up) from the first remaining timestep."""
    st = stepper("pndm", SD15, 10, strength=0.5)
    np.testing.assert_array_equal(st.timesteps, [401, 301, 301, 201, 101, 1])
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    a, b = st._noise_scales()
    assert a == pytest.approx(math.sqrt(abar[401]), rel=1e-5)
    assert b == pytest.approx(math.sqrt(1 - abar[401]), rel=1e-5)


def test_lms_img2img_uses_the_slopes_it_has() -> None:
    """diffusers' LMS weights a single slope with 4th-order coefficients after trimming; ours
    starts at first order, i.e. its first img2img step is exactly Euler's."""
    x0, z = noise(seed=3), noise(seed=4)
    steppers = [stepper(n, SD15, 10, strength=0.6) for n in ("lms", "euler")]
    outs = []
    for st in steppers:
        x = st.add_noise(x0, z)
        out = denoiser(st.scale_model_input(x, 0), np.full(2, st.timesteps[0]))
        outs.append(st.step(out, 0, x))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


THIRD_ORDER = [("dpm++3m", "dpm++3m-compat"), ("dpm-solver-3m", "dpm-solver-3m-compat")]


@pytest.mark.parametrize("true3,compat", THIRD_ORDER)
def test_third_order_second_difference_integrates_quadratics_exactly(true3, compat) -> None:
    """The derivation in dpm_solver's docstring: with outputs m(tau) quadratic in lambda, the
    true third-order step equals the exact exponential integral, for x0 (dpm++3m) and noise
    (dpm-solver-3m) prediction; diffusers' update (-compat) misses it by the halved D2 term."""

    def p(tau: float) -> float:
        return 0.3 + 0.7 * tau - 0.9 * tau * tau

    errors = {}
    for name in (true3, compat):
        st = stepper(name, SD15, 20)
        k = 10
        _, weights, _ = st._plan[k]
        lam, h = st.lambdas, st.lambdas[k + 1] - st.lambdas[k]
        approx = sum(w * p(lam[k - j] - lam[k]) for j, w in enumerate(weights))
        alpha_t = 1 / math.sqrt(1 + st.sigmas[k + 1] ** 2)
        if name.startswith("dpm++"):  # alpha_t * int_0^h e^(tau-h) tau^n
            e = math.expm1(-h)
            scale, moments = alpha_t, [-e, h + e, h * h - 2 * h - 2 * e]
        else:  # -sigma_t * int_0^h e^(h-tau) tau^n
            e = math.expm1(h)
            scale, moments = -alpha_t * st.sigmas[k + 1], [e, e - h, 2 * (e - h) - h * h]
        exact = scale * (0.3 * moments[0] + 0.7 * moments[1] - 0.9 * moments[2])
        errors[name] = abs(approx - exact) / abs(exact)
    assert errors[true3] < 1e-10
    assert errors[compat] > 1e-6


@pytest.mark.parametrize("true3,compat", THIRD_ORDER)
def test_third_order_variants_share_the_first_two_steps(true3, compat) -> None:
    runs = {}
    for name in (true3, compat):
        st, x, xs = stepper(name, SD15, 12), noise(), []
        for i, t in enumerate(st.timesteps):
            x = st.step(denoiser(x, np.full(2, t)), i, x)
            xs.append(x)
        runs[name] = xs
    np.testing.assert_array_equal(runs[true3][1], runs[compat][1])
    assert np.abs(runs[true3][2] - runs[compat][2]).max() > 1e-6


@pytest.mark.parametrize("family", ["dpm-solver", "dpm++"])
def test_diffusers_class_names_at_order_3_keep_diffusers_update(family) -> None:
    """``dpm-solver`` and ``dpm++`` follow diffusers' class: with order=3 (a config's
    ``solver_order: 3``) they take its update, as the -3m-compat names do; the true third-order
    step is only the explicit ``-3m`` name's."""
    a = stepper(family, SD15, 12, order=3)
    assert a._plan == stepper(f"{family}3m-compat".replace("solver3", "solver-3"), SD15, 12)._plan
    assert a._plan != stepper(f"{family}3m".replace("solver3", "solver-3"), SD15, 12)._plan


@pytest.mark.parametrize(
    "name,default_exact",
    [
        ("dpm++3m", True),
        ("dpm-solver-3m", True),
        ("dpm++3m-compat", False),
        ("unipc", False),
        ("dpm++3s", False),
        ("dpm-solver", False),
    ],
)
def test_exact_timesteps_hand_the_model_the_timestep_of_its_sigma(name, default_exact) -> None:
    default = stepper(name, SD15, 10, karras=True)
    exact = stepper(name, SD15, 10, karras=True, exact_timesteps=True)
    rounded = stepper(name, SD15, 10, karras=True, exact_timesteps=False)
    assert default.timesteps.dtype == (np.float32 if default_exact else np.int64)
    assert exact.timesteps.dtype == np.float32 and rounded.timesteps.dtype == np.int64
    np.testing.assert_allclose(exact.timesteps, exact.grid.t_of(exact.grid.sigmas[:-1]), rtol=1e-6)
    np.testing.assert_array_equal(rounded.timesteps, np.round(exact.timesteps).astype(np.int64))


def test_dpm_solver_to_sigma_zero_uses_the_finite_limit() -> None:
    """diffusers refuses final_sigmas_type='zero' for noise prediction; ours lands on x0."""
    out = sample("dpm-solver", denoiser, noise(), SD15, 10, final_sigmas_type="zero")
    assert np.isfinite(out).all()


def test_repeated_timesteps_lower_the_order_instead_of_dividing_by_zero() -> None:
    """1000 linspace steps round to repeated timesteps (diffusers: inf / NaN)."""
    st = stepper("dpm++2m", SD15, 1000)
    assert len(np.unique(st.timesteps)) < 1000
    for name in ("dpm++3m-compat", "unipc", "dpm++3s"):
        out = sample(name, denoiser, noise(shape=(1, 4, 2, 2)), SD15, 1000)
        assert np.isfinite(out).all(), name


def test_cfg_matches_diffusers_pipeline() -> None:
    cond, uncond = noise(seed=1), noise(seed=2)
    np.testing.assert_allclose(cfg(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond), rtol=1e-6)
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    guided = torch.from_numpy(uncond + 7.5 * (cond - uncond))
    ref = rescale_noise_cfg(guided, torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    ours = cfg(cond, uncond, 7.5, guidance_rescale=0.7)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cond shape"):
        cfg(cond, uncond[:1], 7.5)


def test_describe_and_cli_table(capsys) -> None:
    rows = describe_samplers()
    assert [r["name"] for r in rows] == list(SAMPLERS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["euler-a"]["kind"] == "stochastic" and "Euler a" in by_name["euler-a"]["aliases"]
    assert by_name["heun"]["calls_per_step"].startswith("2")
    from trt_sd.runtime.cli import main

    assert main(["samplers"]) == 0
    table = capsys.readouterr().out
    assert "dpm++2m" in table and "CALLS/STEP" in table
    assert main(["samplers", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows


def test_dpmpp_2s_ancestral_is_k_diffusions() -> None:
    """No diffusers class exists for DPM++ 2S a; compare with a literal port of k-diffusion's
    ``sample_dpmpp_2s_ancestral`` (CompVis denoiser wrapper, same sigma grid and noise)."""
    config = {**SD15, "timestep_spacing": "linspace"}
    st = stepper("dpm++2s-a", config, 8, karras=True)
    draws = [noise(np.float64, seed=10 + i) for i in range(8)]
    x = st.prepare_noise(noise(np.float64))
    it = iter(draws)
    st._noise_fn = lambda shape: next(it)
    for i, t in enumerate(st.timesteps):
        x = st.step(denoiser(st.scale_model_input(x, i), np.full(2, t)), i, x)

    def model(x: np.ndarray, sigma: float) -> np.ndarray:  # k-diffusion's CompVisDenoiser
        t = float(st.grid.t_of(np.array(sigma)))
        return x - sigma * denoiser(x / math.sqrt(sigma**2 + 1), np.full(2, t))

    sigmas, ref, it = st.sigmas, noise(np.float64) * st.sigmas[0], iter(draws)
    for i in range(len(sigmas) - 1):
        denoised = model(ref, sigmas[i])
        up = min(
            sigmas[i + 1],
            math.sqrt(sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2),
        )
        down = math.sqrt(sigmas[i + 1] ** 2 - up**2)
        if down == 0:
            ref = ref + (ref - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / math.exp(-t)) * ref - math.expm1(-h * 0.5) * denoised
            denoised_2 = model(x_2, math.exp(-s))
            ref = (math.exp(-t_next) / math.exp(-t)) * ref - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            ref = ref + next(it) * up
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm"])
def test_steps_past_the_leading_grid_are_refused(name) -> None:
    """SD 1.5's ``leading`` spacing with ``steps_offset=1`` puts 1000 steps at t = 1..1000, one
    past the table (diffusers indexes out of bounds there): a ValueError, not an IndexError."""
    with pytest.raises(ValueError, match="steps=1000 is too many for this schedule"):
        stepper(name, SD15, 1000)
    assert stepper(name, SD15, 999).timesteps.max() == 999
