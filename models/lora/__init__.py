"""LoRA files (kohya / AUTOMATIC1111 and diffusers / PEFT) and how they patch engine weights.

NumPy only: the runtime reads LoRA files itself (:mod:`.safetensors_np`), normalises them to
one canonical list of layers (:mod:`.formats`) and patches the weights the export mapped
(:mod:`.weights`). The export fuses LoRAs into the torch weights with the same layers.
"""

from .formats import LoraFile, LoraLayer, read_lora
from .spec import LoraSpec, normalise_loras, parse_lora_arg
from .weights import (
    MAP_VERSION,
    Patch,
    WeightMap,
    WeightRef,
    bind,
    layer_delta,
    load_weight_map,
    patched_weights,
)

__all__ = [
    "MAP_VERSION",
    "LoraFile",
    "LoraLayer",
    "LoraSpec",
    "Patch",
    "WeightMap",
    "WeightRef",
    "bind",
    "layer_delta",
    "load_weight_map",
    "normalise_loras",
    "parse_lora_arg",
    "patched_weights",
    "read_lora",
]
