"""The text step: prompt rows -> the UNet's per-row conditioning, for any model family.

Per text encoder of the family (:class:`trt_sd.models.families.TextEncoding`): tokenize the
rows with its own tokenizer and run it; then the family's ``combine`` turns every encoder's
outputs into UNet feeds. :meth:`TextConditioner.encoder_outputs` is the one place that
decides how an encoder is called, so a long-prompt / weighted-prompt encoder (chunks of 75
tokens concatenated on the sequence axis, per-token weights) replaces that method and
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trt_sd.models.descriptors import Component
from trt_sd.models.errors import ManifestError, NumericalError
from trt_sd.models.families import FamilySpec, PromptRows, family_config
from trt_sd.models.manifest import Manifest

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


class TextConditioner:
    """Prompt rows -> UNet conditioning for one engine directory."""

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

    def encoder_outputs(
        self, component: str, texts: tuple[str, ...], run: RunFn, keep: tuple[str, ...]
    ) -> dict[str, Any]:
        """One text encoder's outputs for ``texts`` (one call, every row)."""
        spec = self.components[component]
        ids = self.tokenizers[component](list(texts))
        return run(component, {spec.inputs[0].name: ids}, keep)

    def __call__(
        self, rows: PromptRows, run: RunFn, to_host: HostFn, keep_on_device: bool = False
    ) -> dict[str, Any]:
        """The UNet conditioning of ``rows`` (keyed by UNet input name, rows first).

        ``keep_on_device``: a passthrough family's context may stay a device buffer (the
        caller checked that the UNet takes it as it is); other families combine on the host.
        """
        keep_any = keep_on_device and self.family.passthrough
        outputs = {}
        for enc in self.family.text_encoders:
            names = tuple(self.components[enc.component].output_names)
            out = self.encoder_outputs(enc.component, rows.texts, run, names if keep_any else ())
            for name in names:
                value = to_host(enc.component, out[name])
                if not np.isfinite(value).all():
                    raise NumericalError(
                        f"{enc.component} produced NaN or inf; export the text encoder in fp32"
                    )
                if not keep_any:
                    out[name] = value
            outputs[enc.component] = out
        return self.family.combine(outputs, rows, self.settings)
