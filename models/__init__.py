"""Component descriptors, the engine-directory manifest, and the bundled default model.

NumPy-only (and mostly standard library): both the export stage and the lean runtime import it.
"""

from .descriptors import (
    COMPONENT_NAMES,
    Component,
    ModelDims,
    Range,
    ShapeRange,
    TensorSpec,
    all_components,
)
from .errors import (
    BackendUnavailableError,
    InputError,
    ManifestError,
    NumericalError,
    TrtSdError,
)
from .manifest import SCHEMA_VERSION, Manifest
from .paths import DEFAULT_MODEL_DIR, default_engine_dir

__all__ = [
    "COMPONENT_NAMES",
    "DEFAULT_MODEL_DIR",
    "SCHEMA_VERSION",
    "BackendUnavailableError",
    "Component",
    "InputError",
    "Manifest",
    "ManifestError",
    "ModelDims",
    "NumericalError",
    "Range",
    "ShapeRange",
    "TensorSpec",
    "TrtSdError",
    "all_components",
    "default_engine_dir",
]
