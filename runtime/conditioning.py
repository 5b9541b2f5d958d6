"""The text step: prompt rows -> the UNet's per-row conditioning, for any model family.

Per text encoder of the family (:class:`trt_sd.models.families.TextEncoding`): chunk and
weight the rows with its own tokenizer (:mod:`.prompt_chunks`, AUTOMATIC1111's long prompts
and emphasis) and run it; then the family's ``combine`` turns every encoder's outputs into
UNet feeds.

* A batch of plain rows (one chunk, no emphasis) is one encoder call on the ids the plain
  tokenizer gives, outputs untouched (a passthrough family's context may stay on the
  device): today's path, bit for bit.
* Otherwise every chunk of every row runs through the encoder (in calls of at most the
  engine's batch), emphasis is applied on the host and each row's chunks are concatenated on
  the sequence axis: the context is (rows, chunks * 77, D). An encoder's other outputs (SDXL's
  pooled embedding) come from each row's first chunk, as in the WebUI.

All rows of one call get the same chunk count (shorter ones padded with empty chunks, as the
WebUI pads prompt and negative prompt), the same for every encoder so SDXL's two contexts can
be concatenated. The count is capped by the UNet's built context range
(:func:`prompt_chunk_limit`): engines exported before that range existed take one chunk, so
longer prompts are truncated with a warning, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.descriptors import TIMESTEP_COND, Component
from trt_sd.models.errors import ManifestError, NumericalError
from trt_sd.models.families import FamilySpec, PromptRows, family_config
from trt_sd.models.manifest import Manifest

from .guidance_embedding import guidance_embedding
from .prompt_chunks import (
    COMMA_BACKTRACK,
    PromptBatch,
    encode_prompts,
    pooled_first_chunk,
    tokenize_prompts,
)
from .tokenizer import ClipTokenizer

#: ``run(component, feeds, keep_on_device) -> outputs``
RunFn = Callable[[str, dict[str, Any], tuple[str, ...]], dict[str, Any]]
#: ``to_host(component, value) -> ndarray``
HostFn = Callable[[str, Any], np.ndarray]


def load_tokenizers(
    engine_dir: Path, manifest: Manifest, family: FamilySpec
) -> dict[str, ClipTokenizer]:
    """One tokenizer per text encoder, from the manifest key the family names."""
    max_length = manifest.dims.text_max_length
    out = {}
    for enc in family.text_encoders:
        settings = manifest.raw.get(enc.tokenizer)
        if not isinstance(settings, dict):
            raise ManifestError(f"manifest lacks the {enc.tokenizer!r} settings of {enc.component}")
        tok = ClipTokenizer.from_engine_dir(engine_dir, settings, max_length)
        if tok.max_length != max_length:
            raise ManifestError(
                f"tokenizer max_length {tok.max_length} differs from the text encoder's "
                f"input length {max_length}"
            )
        out[enc.component] = tok
    return out


def prompt_chunk_limit(manifest: Manifest) -> int:
    """Prompt chunks every engine of ``manifest`` takes: the context range its export recorded
    (all components share one shape range); 1 for manifests written before it existed."""
    length = manifest.dims.text_max_length
    ranges = [e.shape_range for e in manifest.components.values()]
    return min((r.prompt_chunks(length) for r in ranges), default=1)


class TextConditioner:
    """Prompt rows -> UNet conditioning for one engine directory (module docstring)."""

    def __init__(
        self,
        family: FamilySpec,
        manifest: Manifest,
        components: dict[str, Component],
        tokenizers: dict[str, ClipTokenizer],
    ) -> None:
        self.family = family
        self.settings = family_config(manifest.raw)
        self.components = components
        self.tokenizers = tokenizers
        self.guidance_dim = manifest.dims.time_cond_proj_dim
        self.max_chunks = prompt_chunk_limit(manifest)
        #: rows per text-encoder call (its built batch), for the chunks of long prompts
        self.max_rows = {
            enc.component: manifest.components[enc.component].shape_range.axis("unet_batch").max
            for enc in family.text_encoders
            if enc.component in manifest.components
        }

    def tokenize(
        self, texts: tuple[str, ...], emphasis: str, limit: bool = True
    ) -> dict[str, PromptBatch]:
        """Each encoder's chunks of ``texts``, every encoder padded to the same chunk count
        (``limit``: at most :attr:`max_chunks`, the rest dropped with a warning)."""

        def chunk(component: str, min_chunks: int = 1) -> PromptBatch:
            return tokenize_prompts(
                self.tokenizers[component],
                texts,
                emphasis=emphasis,
                # one chunk: plain truncation, as the plain tokenizer does (no word wrap)
                comma_backtrack=COMMA_BACKTRACK if self.max_chunks > 1 else 0,
                min_chunks=min_chunks,
                max_chunks=self.max_chunks if limit else None,
            )

        batches = {enc.component: chunk(enc.component) for enc in self.family.text_encoders}
        n = max(b.chunks for b in batches.values())
        return {c: b if b.chunks == n else chunk(c, n) for c, b in batches.items()}

    def sequence_length(self, texts: tuple[str, ...], emphasis: str = "original") -> int:
        """The context length (chunks * 77) that encoding ``texts`` together gives (without
        the truncation warning: encoding them gives it)."""
        batch = next(iter(self.tokenize(texts, emphasis, limit=False).values()))
        return min(batch.chunks, self.max_chunks) * batch.ids.shape[2]

    def encoder_outputs(
        self,
        component: str,
        batch: PromptBatch,
        run: RunFn,
        to_host: HostFn,
        emphasis: str,
        keep: tuple[str, ...],
    ) -> dict[str, Any]:
        """One text encoder's outputs for ``batch`` (module docstring: plain or chunked)."""
        spec = self.components[component]
        feed = spec.inputs[0].name
        if batch.plain:
            return run(component, {feed: batch.ids[:, 0]}, keep)
        hidden, *others = spec.output_names
        collected: dict[str, list[np.ndarray]] = {name: [] for name in others}

        def encode(ids: np.ndarray) -> np.ndarray:
            out = run(component, {feed: ids}, ())
            for name, parts in collected.items():
                parts.append(to_host(component, out[name]))
            return to_host(component, out[hidden])

        rows = self.max_rows.get(component)
        result = {hidden: encode_prompts(encode, batch, emphasis=emphasis, max_rows=rows)}
        for name, parts in collected.items():
            result[name] = pooled_first_chunk(np.concatenate(parts), batch)
        return result

    def __call__(
        self,
        rows: PromptRows,
        run: RunFn,
        to_host: HostFn,
        keep_on_device: bool = False,
        emphasis: str = "original",
    ) -> dict[str, Any]:
        """The UNet conditioning of ``rows`` (keyed by UNet input name, rows first).

        ``keep_on_device``: a passthrough family's context may stay a device buffer (the
        caller checked that the UNet takes it as it is) when the rows are plain; other
        families and weighted or long prompts are combined on the host. ``emphasis``: one of
        :data:`~.prompt_chunks.EMPHASIS_MODES`.
        """
        batches = self.tokenize(rows.texts, emphasis)
        plain = all(b.plain for b in batches.values())
        keep_any = keep_on_device and self.family.passthrough and plain
        outputs = {}
        for enc in self.family.text_encoders:
            names = tuple(self.components[enc.component].output_names)
            out = self.encoder_outputs(
                enc.component,
                batches[enc.component],
                run,
                to_host,
                emphasis,
                names if keep_any else (),
            )
            for name in names:
                value = to_host(enc.component, out[name])
                if not np.isfinite(value).all():
                    raise NumericalError(
                        f"{enc.component} produced NaN or inf; export the text encoder in fp32"
                    )
                if not keep_any:
                    out[name] = value
            outputs[enc.component] = out
        feeds = self.family.combine(outputs, rows, self.settings)
        if self.guidance_dim:  # an LCM-distilled UNet: guidance is an input, not CFG rows
            if len(rows.guidance) != len(rows.texts):
                raise ValueError("an LCM-distilled UNet needs each row's guidance scale")
            feeds[TIMESTEP_COND] = guidance_embedding(rows.guidance, self.guidance_dim)
        return feeds
