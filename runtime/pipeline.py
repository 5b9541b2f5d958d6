"""Text-to-image and image-to-image generation from an engine directory.

Load once (:meth:`Pipeline.load`), call many times, from many threads: a call keeps all its
state (noise, sampler, latents, timings) in local variables, and the engines are thread-safe.

How noise is drawn from a seed: see :mod:`trt_sd.runtime.noise`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.descriptors import CONTEXT, UNET, VAE_DECODER, Component
from trt_sd.models.errors import InputError
from trt_sd.models.families import PromptRows
from trt_sd.models.integrity import verify_components
from trt_sd.models.manifest import Manifest
from trt_sd.models.paths import default_engine_dir

from .backends import EngineBackend, create_backend
from .call_inputs import call_params, prepare_call, start_latents
from .chains import run_chains
from .conditioning import TextConditioner, load_tokenizers
from .controlnet import attach_controlnets, controlnet_components
from .deepcache import DeepCacheConfig, DeepCacheState, deepcache_components, resolve_deepcache
from .denoise import DenoiseStep, check_latents, unet_overflow_hint
from .handoff import end_calls, prepare_handoff
from .images import to_uint8
from .inpaint import inpaint_strength
from .lora import LoraSupport, apply_loras, lora_params
from .multidevice import StagedUNet, place
from .noise import request_noise, sampler_noise_fn
from .progress import ProgressArg
from .request import DEFAULT_SAMPLER, Request
from .sampling_loop import denoise
from .tokenizer import ClipTokenizer
from .vae import check_finite

__all__ = [
    "GenerationResult",
    "Pipeline",
    "check_latents",
    "resolve_sampler",
    "unet_overflow_hint",
]


@dataclass(frozen=True)
class GenerationResult:
    """What one call produced."""

    images: list[np.ndarray]  # HxWx3 uint8 RGB, one per batch entry (none for latents)
    timings: dict[str, float]  # seconds per component (+ "total")
    unet_calls: int
    params: dict[str, Any] = field(default_factory=dict)  # the resolved request
    #: the undecoded latents, with ``output_type="latent"`` (a refiner's ``image=``)
    latents: np.ndarray | None = None
    latent_space: str = ""  # the family's latent space (see FamilySpec.latent_space)


def _samplers() -> Any:
    import trt_sd.samplers as samplers

    return samplers


def resolve_sampler(name: str) -> tuple[str, dict[str, Any]]:
    """(canonical sampler name, options the name implies such as Karras sigmas); InputError
    listing the choices for an unknown name."""
    try:
        canonical, implied = _samplers().resolve(name)
    except (KeyError, ValueError) as e:
        raise InputError(str(e.args[0]) if e.args else f"unknown sampler {name!r}") from None
    return str(canonical), dict(implied)


class Pipeline:
    """Engines + tokenizer + scheduler config of one engine directory."""

    #: default DeepCache setting of calls (set by :meth:`load`; None = no cache)
    deepcache: DeepCacheConfig | None = None

    def __init__(
        self,
        engine_dir: Path,
        manifest: Manifest,
        engines: dict[str, EngineBackend],
        tokenizers: dict[str, ClipTokenizer],
    ) -> None:
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.engines = engines
        self.family = manifest.family
        self.components: dict[str, Component] = {
            **self.family.components(manifest.dims),
            **controlnet_components(manifest),
        }
        self.tokenizers = tokenizers
        #: the first text encoder's tokenizer (what SD 1.x / 2.x have)
        self.tokenizer = tokenizers[self.family.text_encoders[0].component]
        self.text = TextConditioner(self.family, manifest, self.components, tokenizers)
        self.denoise_step = DenoiseStep(self.components[UNET], manifest)
        self.controlnet = attach_controlnets(self)  # ControlNetPlan or None
        self.lora_support = LoraSupport(engine_dir, manifest)
        config = manifest.scheduler_config
        config["prediction_type"] = manifest.prediction_type  # the manifest is authoritative
        self.scheduler_config = config

    @classmethod
    def load(
        cls,
        engine_dir: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        devices: int | str | Sequence[int | str] | None = None,
        deepcache: Any = None,
    ) -> Pipeline:
        """Validate ``engine_dir/manifest.json`` and load every engine (default directory:
        :func:`trt_sd.models.default_engine_dir`). ``devices``: the GPU to run on (one id or a
        one-element list; None = GPU 0 on GPU backends); for engines exported with
        ``--split-unet N``, up to N devices (``["cuda:0", "cuda:1"]``, ``"cpu,cpu"``) that run
        the UNet stages concurrently (:mod:`trt_sd.runtime.multidevice`). ``deepcache``: the
        default cache interval of calls on engines exported with ``--deepcache``
        (:mod:`trt_sd.runtime.deepcache`)."""
        path = Path(engine_dir) if engine_dir is not None else default_engine_dir()
        manifest = Manifest.load(path)
        verify_components(path, manifest)  # sha256 of every engine file (stamped fast path)
        placement = place(manifest, devices)
        default_cache = resolve_deepcache(manifest, deepcache)
        components = {
            **manifest.family.components(manifest.dims),
            **deepcache_components(manifest),
            **controlnet_components(manifest),
        }
        engines: dict[str, Any] = {
            name: create_backend(backend, path, components[name], entry, placement.device_id)
            for name, entry in manifest.components.items()
            if name in components
        }
        if manifest.unet_partition:
            engines[UNET] = StagedUNet.load(path, manifest, backend, placement.stages)
        tokenizers = load_tokenizers(path, manifest, manifest.family)
        pipe = cls(path, manifest, engines, tokenizers)
        pipe.deepcache = default_cache
        return pipe

    @property
    def backend(self) -> str:
        kinds = sorted({e.kind for e in self.engines.values()})
        return "+".join(kinds)

    # ---- one generation ---------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch: int = 1,
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float | None = None,
        karras: bool | None = None,
        eta: float | None = None,
        progress: ProgressArg = None,
        guidance_rescale: float = 0.0,
        sampler_options: dict[str, Any] | None = None,
        deepcache: Any = None,
        denoising_end: float | None = None,
        denoising_start: float | None = None,
        output_type: str = "image",
        emphasis: str = "original",
        mask: Any = None,
        mask_blur: float = 0.0,
        control_image: Any = None,
        controlnet_scale: float | Sequence[float] = 1.0,
        control_start: float | Sequence[float] = 0.0,
        control_end: float | Sequence[float] = 1.0,
        loras: Any = None,
        **options: Any,
    ) -> GenerationResult:
        """Generate ``batch`` images. Unset prompt, steps, guidance, height and width come from
        the manifest's defaults; ``sampler`` defaults to ``"dpm++"``. ``batch`` is not inferred:
        a list ``prompt`` / ``negative_prompt`` and the first axis of ``latents`` must match it.

        ``latents``: initial noise (batch, C, h, w), standard normal and unscaled, like
        diffusers' ``latents=`` (it sets height / width when those are unset). ``image`` (path,
        PIL image or uint8 array) switches to img2img
        with ``strength`` (default 0.8); its size sets height / width when those are unset.
        ``mask`` (same kinds, the image's size; white = repaint) with ``image``: inpainting
        (:mod:`trt_sd.runtime.inpaint`; ``strength`` default 1.0, ``mask_blur`` in pixels).
        ``progress``: True for a tqdm bar on stderr, or a callable ``(done, total)``.
        ``deepcache``: cache interval N (``0`` off; default: the one given to :meth:`load`).
        ``emphasis``: how the prompt's ``(word:1.3)`` / ``[word]`` weight it (AUTOMATIC1111's
        modes, :mod:`trt_sd.runtime.prompt_chunks`; ``"none"`` reads them as diffusers does).
        ``control_image`` (engines exported with ``--controlnet``): one preprocessed image per
        ControlNet, each one or ``batch`` images of the output size, with ``controlnet_scale``
        and the ``control_start`` / ``control_end`` window (per ControlNet or one for all),
        as diffusers' ControlNet pipelines (:mod:`trt_sd.runtime.controlnet`).
        ``options``: the model family's own (SDXL: ``original_size``,
        ``crops_coords_top_left``, ``target_size`` and their ``negative_`` forms, diffusers'
        defaults); InputError for an option the family does not take.

        Base -> refiner hand-off (:mod:`trt_sd.runtime.handoff`): ``denoising_end`` with
        ``output_type="latent"`` on the base returns ``result.latents``; the refiner takes them
        as ``image=`` with ``denoising_start``. ``loras``: ``[(path, scale), ...]`` applied
        to this call only (:mod:`trt_sd.runtime.lora`); ``[]`` / None is the base model.
        """
        start = time.perf_counter()
        self, lora_set = apply_loras(self, loras)
        if output_type not in ("image", "latent"):
            raise InputError(f"output_type must be 'image' or 'latent', got {output_type!r}")
        dims = self.manifest.dims
        strength = inpaint_strength(dims, image, mask, strength, denoising_start, mask_blur)
        handed, image, height, width, strength = prepare_handoff(
            self, image, denoising_start, sampler, steps, height, width, strength
        )
        cache_config = (
            self.deepcache if deepcache is None else resolve_deepcache(self.manifest, deepcache)
        )
        call = prepare_call(
            self,
            resolve_sampler,
            height=height,
            width=width,
            latents=latents,
            image=image,
            handed_latents=handed is not None,
            mask=mask,
            mask_blur=mask_blur,
            control_image=control_image,
            controlnet_scale=controlnet_scale,
            control_start=control_start,
            control_end=control_end,
            options=options,
            prompt=prompt,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            seed=seed,
            batch=batch,
            strength=strength,
            karras=karras,
            eta=eta,
            sampler_options=sampler_options or {},
            emphasis=emphasis,
        )
        req, control, inpaint = call.req, call.control, call.inpaint
        noise = self._initial_noise(req, latents)
        timings: dict[str, float] = {}
        stepper = self._stepper(req)
        conditioning = self._encode_text(req, call.options, timings)
        if handed is not None:
            if handed.shape != noise.shape:
                raise InputError(
                    f"latents as image must have shape {noise.shape}, got {handed.shape}"
                )
            x = handed
        else:
            x, stepper, extra = start_latents(
                self, req, stepper, noise, call.init_image, inpaint, timings
            )
            conditioning = {**conditioning, **extra}
        calls = stepper.num_model_calls
        if denoising_end is not None:
            calls = end_calls(stepper.timesteps, denoising_end, self.scheduler_config)
        cache = None
        if cache_config is not None:
            cache = DeepCacheState(cache_config, calls, self._cache_feature())
        if isinstance(self.engines[UNET], StagedUNet) and req.batch > 1 and inpaint is None:
            x = run_chains(self, req, x, conditioning, timings, progress, calls)
        else:
            x = denoise(
                self, req, stepper, x, conditioning, timings, progress, cache, calls, control
            )
        images = self._decode(x, timings) if output_type == "image" else []
        timings["total"] = time.perf_counter() - start
        params = call_params(self, req, call.options, control, inpaint, lora_params(lora_set))
        for key, value in (("denoising_end", denoising_end), ("denoising_start", denoising_start)):
            if value is not None:
                params[key] = float(value)
        if cache is not None:
            params["deepcache"] = cache.summary()
        latents_out = x if output_type == "latent" else None
        space = self.family.latent_space
        return GenerationResult(images, timings, calls, params, latents_out, space)

    # ---- building blocks for schedulers that batch many requests (trt_sd.runtime.serve) -----
    def result_params(self, req: Request, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a result reports and its PNG embeds: the resolved request + engine identity
        (+ the family options the caller set)."""
        params = req.to_params()
        for key, value in (options or {}).items():
            if value is not None:  # JSON-friendly: sizes as lists, scores as numbers
                params[key] = list(value) if isinstance(value, tuple | list) else value
        params.update(
            backend=self.backend,
            model=self.manifest.model.get("name", ""),
            model_hash=str(self.manifest.model.get("hash", "")),
        )
        return params

    def make_stepper(self, req: Request) -> Any:
        """A fresh stepper for ``req``: its own state and noise streams (from its seeds)."""
        return self._stepper(req)

    def encode_conditioning(
        self, rows: PromptRows, timings: dict[str, float] | None = None, emphasis: str = "original"
    ) -> dict[str, Any]:
        """Host UNet conditioning of ``rows`` (rows of any requests, all padded to one context
        length) from one call per text encoder; keyed by UNet input name, rows first."""
        run = self._text_run({} if timings is None else timings)
        return self.text(rows, run, self._to_host, emphasis=emphasis)

    def _text_run(self, timings: dict[str, float]) -> Any:
        def run(name: str, feeds: dict[str, Any], keep: tuple[str, ...]) -> dict:
            return self._run(name, feeds, timings, keep=keep)

        return run

    def _to_host(self, name: str, value: Any) -> np.ndarray:
        return self.engines[name].to_host(value)

    def decode(
        self, latents: np.ndarray, timings: dict[str, float] | None = None
    ) -> list[np.ndarray]:
        """Final latents (as the sampler leaves them) -> HxWx3 uint8 images."""
        latents = np.asarray(latents, dtype=np.float32)
        return self._decode(latents, {} if timings is None else timings)

    def _initial_noise(self, req: Request, latents: np.ndarray | None) -> np.ndarray:
        dims, factor = self.manifest.dims, self.manifest.dims.vae_scale_factor
        shape = (req.batch, dims.latent_channels, req.height // factor, req.width // factor)
        return request_noise(req.seeds, shape, latents)

    def _stepper(self, req: Request) -> Any:
        kwargs: dict[str, Any] = dict(req.sampler_options)
        if req.karras is not None:
            kwargs["karras"] = req.karras
        if req.eta is not None:
            kwargs["eta"] = req.eta
        if req.strength is not None:
            kwargs["strength"] = req.strength
        noise_fn = sampler_noise_fn(req.seeds)
        try:
            return _samplers().stepper(
                req.sampler, self.scheduler_config, req.steps, noise_fn=noise_fn, **kwargs
            )
        except (TypeError, ValueError) as e:
            raise InputError(f"sampler {req.sampler}: {e}") from None

    def _run(self, name: str, feeds: dict[str, Any], timings: dict[str, float], keep=()) -> dict:
        t0 = time.perf_counter()
        outputs = self.engines[name].run(feeds, keep_on_device=keep)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return outputs

    def _cache_feature(self) -> str:
        return deepcache_components(self.manifest)[UNET].output_names[1]

    def _encode_text(
        self, req: Request, options: dict[str, Any], timings: dict[str, float]
    ) -> dict[str, Any]:
        """Prompts -> UNet conditioning, ``[uncond..., cond...]`` rows with CFG (diffusers' order),
        one call per text encoder; a passthrough family's context stays on the device."""
        size = (req.height, req.width)
        rows = PromptRows.for_request(
            req.prompts, req.negative_prompts, req.cfg, size, options, req.guidance
        )
        keep = self._embeddings_stay_on_device()
        run = self._text_run(timings)
        return self.text(rows, run, self._to_host, keep_on_device=keep, emphasis=req.emphasis)

    def _embeddings_stay_on_device(self) -> bool:
        """The UNet can take the text encoder's device tensor as it is: same GPU backend and
        the same dtype on both sides (an fp32 text encoder feeding an fp16 UNet goes through
        the host, where the UNet backend casts it)."""
        te = self.engines[self.family.text_encoders[0].component]
        unet = self.engines[UNET]
        te_dtype = te.outputs[0].dtype
        unet_dtype = next(s.dtype for s in unet.inputs if s.name == CONTEXT)
        return te.kind == unet.kind != "onnxruntime-cpu" and te_dtype == unet_dtype

    def _decode(self, x: np.ndarray, timings: dict[str, float]) -> list[np.ndarray]:
        spec = self.components[VAE_DECODER]
        latent = x / np.float32(self.manifest.vae_scaling_factor)
        out = self._run(VAE_DECODER, {spec.inputs[0].name: latent}, timings)
        decoded = np.asarray(out[spec.outputs[0].name], dtype=np.float32)
        check_finite(VAE_DECODER, decoded)
        return to_uint8(decoded)
