"""Export-time LoRA fusion (``trt-sd export --lora PATH[:SCALE]``): the torch weights become
``W + sum(scale * delta)`` before tracing, with the same reader and the same delta as the
run-time path (:mod:`trt_sd.models.lora`), so fused and run-time images agree.

Every export path (plain, INT8, split / DeepCache UNet) loads its modules through
:class:`~trt_sd.export.modules.ModuleLoader`, which calls :func:`fuse_loras`; the LoRA files'
sha256 and scales are part of the content key of the components they adapt and are listed in
the manifest (``export.loras``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trt_sd.models.lora import (
    LoraFile,
    WeightMap,
    WeightRef,
    bind,
    layer_delta,
    normalise_loras,
    read_lora,
)

if TYPE_CHECKING:  # torch loads only when a module is fused (build_context imports this)
    from torch import nn

__all__ = ["LORA_COMPONENTS", "fuse_loras", "lora_key", "read_export_loras"]

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

ExportLoras = tuple[tuple[LoraFile, float], ...]


def read_export_loras(loras: Sequence[Any] | None) -> ExportLoras:
    """``--lora`` values / ``loras=`` -> parsed files and scales (InputError naming a bad
    file before any export work starts)."""
    from trt_sd.models.lora import parse_lora_arg

    specs = [parse_lora_arg(x) if isinstance(x, str) else x for x in (loras or ())]
    return tuple((read_lora(s.path), s.scale) for s in normalise_loras(specs))


def lora_key(loras: ExportLoras) -> list[list[Any]]:
    """What the content key and the manifest record: [[name, sha256, scale], ...]."""
    return [[f.name, f.sha256, scale] for f, scale in loras]


def _module_map(wrapper: nn.Module, component: str) -> tuple[WeightMap, dict[str, nn.Module]]:
    """The wrapped model's Linear / Conv2d weights as a :class:`WeightMap` (shapes only), so
    LoRA layers bind exactly as they do against an engine's map."""
    from torch import nn

    modules: dict[str, nn.Module] = {}
    refs: dict[str, WeightRef] = {}
    for name, module in wrapper.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and "." in name:
            path = name.split(".", 1)[1]
            modules[path] = module
            shape = tuple(int(d) for d in module.weight.shape)
            refs[path] = WeightRef(path, "", 0, 0, "float32", shape, False)
    return WeightMap(component, Path(), refs), modules


def fuse_loras(wrapper: nn.Module, component: str, loras: ExportLoras) -> None:
    """Add the LoRAs' deltas to ``wrapper``'s weights in place (components LoRAs adapt)."""
    if not loras or component not in LORA_COMPONENTS:
        return
    import torch

    wmap, modules = _module_map(wrapper, component)
    for lora, scale in loras:
        own = type(lora)(
            lora.path,
            lora.sha256,
            lora.format,
            tuple(layer for layer in lora.layers if layer.component == component),
        )
        for path, layer in bind(own, {component: wmap}).get(component, []):
            weight = modules[path].weight
            delta = layer_delta(layer, tuple(weight.shape)) * scale
            with torch.no_grad():
                weight.add_(torch.from_numpy(delta).to(weight.dtype))
