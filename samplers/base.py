"""The stepper contract every sampler implements, and the array helpers they share.

A stepper is one request's sampling state: its timesteps, its history buffers and its noise
source. Nothing is global, so a service can hold one stepper per request and batch several
requests' UNet inputs into one engine call (each row with its own timestep).

Arithmetic runs in float32 (float64 when the latents are float64) with coefficients computed
in float64 at construction (the VP solvers keep them as 0-d arrays of the working dtype, see
:class:`LinearCombination`); each ``step`` returns a new array of the dtype of ``x``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]
#: the working dtypes (compared by identity on the hot path: hashing a dtype costs ~0.3 us)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def combine(
    terms: Iterable[tuple[float, np.ndarray]], dtype: np.dtype, tmp: np.ndarray | None = None
) -> np.ndarray:
    """sum(c * a) into one new array with as few full-array passes as possible.

    Zero coefficients are skipped and +-1 need no multiply: a sampler step is a handful of
    these, and each pass over a 2x4x64x64 latent costs about 2 microseconds. ``tmp`` is an
    optional scratch array of the result's shape and dtype.
    """
    out: np.ndarray | None = None
    for c, a in terms:
        if c == 0.0:
            continue
        if out is None:
            out = np.multiply(a, c, dtype=dtype) if c != 1.0 else np.array(a, dtype=dtype)
        elif c == 1.0:
            np.add(out, a, out=out)
        elif c == -1.0:
            np.subtract(out, a, out=out)
        else:
            if tmp is None:
                tmp = np.empty_like(out)
            np.multiply(a, c, out=tmp)
            np.add(out, tmp, out=out)
    if out is None:
        raise ValueError("internal error: a step combined no terms")
    return out


class LinearCombination:
    """``sum(c_i * a_i)`` with coefficients fixed at construction and arrays given per call.

    A sampler step is such a sum, and NumPy has no fused multiply-add, so each term costs a
    multiply and an add over the whole latent. Evaluated as a chain,
    ``((a_0 r_0 + a_1) r_1 + a_2) r_2 ...`` with ``r_j = c_j / c_(j+1)`` and the last ``r`` the
    last coefficient, the sum needs no temporary array (zero terms dropped, multiplies by
    exactly 1 skipped); rounding stays relative to the partial sums, as for the plain sum.
    The ratios are kept as 0-d arrays of the working dtype: NumPy converts a Python float for
    every call (~0.5 us, a quarter of a pass over a 2x4x64x64 float32 latent) and a float64
    0-d array would upcast float32 latents. (Keeping the partial sums in an aligned scratch
    array and writing only the last pass to the result measured ~0.8 us slower per 2M step.)
    """

    __slots__ = ("_dtype", "_first", "_i0", "_index", "_ratios", "_rest", "coefficients")
    _dtype: np.dtype
    _first: np.ndarray
    _rest: list[tuple[int, np.ndarray | None]]

    def __init__(self, coefficients: Iterable[float]) -> None:
        self.coefficients = [float(c) for c in coefficients]
        terms = [(i, c) for i, c in enumerate(self.coefficients) if c != 0.0]
        if not terms:
            raise ValueError("internal error: a step combines no terms")
        self._index = [i for i, _ in terms]
        self._i0 = self._index[0]
        cs = [c for _, c in terms]
        self._ratios = [a / b for a, b in itertools.pairwise(cs)] + [cs[-1]]
        # made now for float32 latents, as each step's combination runs once per request
        self._make_scalars(F32)

    def __call__(self, arrays: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """The sum over ``arrays`` (one per coefficient; those with weight 0 are not read),
        written to ``out`` or a new array of the first used array's dtype."""
        first = arrays[self._i0]
        if first.dtype is not self._dtype:  # (an identity check: hashing a dtype costs ~0.3 us)
            self._make_scalars(first.dtype)  # float64 latents: per call (~1 us)
        out = np.multiply(first, self._first, out)
        for i, r in self._rest:
            np.add(out, arrays[i], out)
            if r is not None:
                np.multiply(out, r, out)
        return out

    def _make_scalars(self, dtype: np.dtype) -> None:
        self._dtype = dtype
        self._first = np.array(self._ratios[0], dtype=dtype)
        self._rest = [
            (i, None if r == 1.0 else np.array(r, dtype=dtype))
            for i, r in zip(self._index[1:], self._ratios[1:], strict=True)
        ]

    def __repr__(self) -> str:
        return f"LinearCombination({self.coefficients})"


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    NumPy allocates with malloc (16-byte aligned); AVX-512 passes over arrays that straddle
    cache lines run ~15% slower. Finding the address costs ~1 us, so this is for buffers a
    stepper keeps across steps, not for per-step results.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding of a predicted x0, per sample (diffusers semantics)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None].astype(x0.dtype)
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_x0(x0: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """Apply the config's ``thresholding`` (dynamic) or ``clip_sample`` to a predicted x0."""
    if config.get("thresholding"):
        return dynamic_threshold(
            x0, config["dynamic_thresholding_ratio"], config["sample_max_value"]
        )
    if config.get("clip_sample"):
        r = float(config.get("clip_sample_range", 1.0))
        return np.clip(x0, -r, r)
    return x0


def needs_clip(config: Mapping[str, Any]) -> bool:
    return bool(config.get("thresholding") or config.get("clip_sample"))


def vp_x0(prediction_type: str, alpha: float, sigma_t: float) -> tuple[float, float]:
    """(a, b) with predicted x0 = a * x + b * model_output for x = alpha x0 + sigma_t eps
    (DDPM-style latents: DDPM, DDIM, DPM-Solver, UniPC)."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma_t / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma_t
    return 0.0, 1.0


def vp_eps(prediction_type: str, alpha: float, sigma_t: float) -> tuple[float, float]:
    """(a, b) with predicted noise = a * x + b * model_output for x = alpha x0 + sigma_t eps."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma_t, alpha
    return 1.0 / sigma_t, -alpha / sigma_t


def ve_x0(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(a, b) with predicted x0 = a * x + b * model_output for x = x0 + sigma eps (the Euler
    family's latents; the UNet sees x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / (sigma * sigma + 1.0) ** 0.5
    return 0.0, 1.0


class Stepper:
    """Base class: validation, strength trimming, noise, input scaling, dtype handling.

    Subclasses build their full plan for all steps, then call :meth:`_finish` with the
    per-model-call timesteps and input scales and the model-call index img2img starts at;
    they implement :meth:`_step` (absolute call index) and :meth:`_noise_scales` (model-call
    index ``i``: the noise level that call sees).

    Like diffusers' schedulers, a stepper may keep a reference to an ``x`` it was given (the
    start of a two-stage or singlestep step) and never writes into arrays it did not create:
    replace latents between steps (``x = blend(...)``) rather than editing them in place.
    """

    #: sampler name (set by the registry)
    name: str = ""
    stochastic: bool = False

    def __init__(
        self,
        config: Mapping[str, Any],
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        self.config: dict[str, Any] = dict(config)
        self.rng = rng if rng is not None else np.random.default_rng()
        self._noise_fn = noise_fn
        self._calls = 0
        self._begin = 0
        self.timesteps = np.zeros(0)
        self.init_noise_sigma = 1.0
        self._c_in = np.ones(0)
        self._n_calls = 0

    def _finish(
        self, timesteps: np.ndarray, c_in: np.ndarray, begin: int, init_noise_sigma: float
    ) -> None:
        self._begin = begin
        self.timesteps = np.ascontiguousarray(timesteps[begin:])
        self._c_in = np.asarray(c_in, dtype=np.float64)[begin:]
        self._n_calls = int(self.timesteps.size)
        self.init_noise_sigma = float(init_noise_sigma)
        if self.timesteps.size == 0:
            raise ValueError("strength leaves no denoising steps; raise strength or steps")

    @property
    def num_model_calls(self) -> int:
        return int(self.timesteps.size)

    # -- the public face -------------------------------------------------------------------
    def prepare_noise(self, noise: np.ndarray) -> np.ndarray:
        """The txt2img start: standard-normal ``noise`` scaled to the first noise level."""
        noise = np.asarray(noise)
        return noise * self.init_noise_sigma if self.init_noise_sigma != 1.0 else noise

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int = 0) -> np.ndarray:
        """The img2img start: clean latents ``x0`` noised to the first remaining timestep.

        ``i``: to the noise level of model call ``i`` instead. Inpainting with an ordinary
        UNet re-noises the known region after each step to the *next* call's level, as
        diffusers' ``scheduler.add_noise(x0, noise, [timesteps[i + 1]])`` does.
        """
        x0, noise = np.asarray(x0), np.asarray(noise)
        _check_shapes("noise", noise, x0, "x0")
        a, b = self._noise_scales(self._index(i, "i", allow_any=True))
        return combine([(a, x0), (b, noise)], _work_dtype(x0)).astype(x0.dtype, copy=False)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """What the UNet receives at model call ``i`` (0-based) for latents ``x``."""
        c = float(self._c_in[self._index(i, "i", allow_any=True)])
        x = np.asarray(x)
        return x if c == 1.0 else x * c

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        """Advance ``x`` past model call ``i`` given the raw UNet output at that call.

        Returns a new array that belongs to the caller; ``x`` and ``model_output`` are read,
        never written (a stepper may keep a reference to ``x``, see the class doc).
        """
        # The usual call - float32 (or float64) arrays of one shape and dtype, the next call
        # index - goes straight to the step: on a 2x4x64x64 latent each check costs a few
        # percent of an array pass. Anything else takes the checked, converting path.
        if (
            type(x) is np.ndarray
            and type(model_output) is np.ndarray
            and (x.dtype is F32 or x.dtype is F64)
            and model_output.dtype is x.dtype
            and model_output.shape == x.shape
            and type(i) is int
            and i == self._calls
            and i < self._n_calls
        ):
            out = self._step(model_output, self._begin + i, x)
        else:
            x, model_output = np.asarray(x), np.asarray(model_output)
            _check_shapes("model_output", model_output, x, "x")
            i = self._index(i, "i")
            dtype = _work_dtype(x)
            out = self._step(
                model_output.astype(dtype, copy=False), self._begin + i, x.astype(dtype, copy=False)
            ).astype(x.dtype, copy=False)
        self._calls += 1
        return out

    # -- for subclasses ----------------------------------------------------------------------
    def _step(self, model_output: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _noise_scales(self, i: int = 0) -> tuple[float, float]:
        """``(a, b)`` with ``a * x0 + b * noise`` at model call ``i`` (0-based, after the
        img2img trim)."""
        raise NotImplementedError

    def _noise(self, like: np.ndarray) -> np.ndarray:
        """Fresh standard-normal noise shaped like ``like`` (from ``noise_fn`` if given)."""
        if self._noise_fn is not None:
            z = np.asarray(self._noise_fn(like.shape), dtype=like.dtype)
            _check_shapes("noise_fn output", z, like, "x")
            return z
        return self.rng.standard_normal(like.shape, dtype=like.dtype)

    def _index(self, i: int, what: str, allow_any: bool = False) -> int:
        ok = isinstance(i, (int, np.integer)) and not isinstance(i, bool)
        if not ok or not 0 <= i < self.num_model_calls:
            raise ValueError(
                f"{what}={i!r} is not a model-call index; allowed: 0..{self.num_model_calls - 1}"
            )
        if not allow_any and i != self._calls:
            raise ValueError(
                f"{what}={i} is out of order: this stepper's next model call is {self._calls} "
                "(steppers keep history; make a new one to start over)"
            )
        return int(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} calls={self.num_model_calls}>"


def _work_dtype(x: np.ndarray) -> np.dtype:
    if x.dtype.kind != "f":
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    return F64 if x.dtype == F64 else F32


def _check_shapes(name: str, a: np.ndarray, x: np.ndarray, x_name: str) -> None:
    if a.shape != x.shape:
        raise ValueError(f"{name} shape {a.shape} does not match {x_name} shape {x.shape}")
