"""A NumPy-only ``.safetensors`` reader for LoRA files (bf16 included).

The runtime reads LoRA files and must not import torch; ``safetensors``' NumPy API cannot
hold bfloat16, which many LoRAs in the wild are saved in. The format is simple enough to read
directly: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range; ``__metadata__`` -> strings), then the raw tensor bytes. Tensors come back as float32
(LoRA deltas are computed in float32 whatever the file stores). Anything that is not such a
file (a pickle ``.ckpt`` / ``.pt``, a truncated download) is refused by name: pickles can run
code when loaded, so they are never opened.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["read_safetensors"]

_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "bf16"}
#: the JSON header of a LoRA file is at most a few MB; a larger claim is a corrupt file
_MAX_HEADER = 100 << 20


def _bad(path: Path, problem: str) -> InputError:
    return InputError(f"LoRA file {path.name}: {problem}")


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 arrays, the header's ``__metadata__``) of one ``.safetensors``
    file; InputError naming the file for anything else."""
    if path.suffix.lower() != ".safetensors":
        raise _bad(path, "only .safetensors LoRA files are read (pickle formats can run code)")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise _bad(path, "not a .safetensors file (too short)")
            f.seek(0)
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_MAX_HEADER, size - 8):
                raise _bad(path, "not a .safetensors file (bad header length)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, ValueError):
                raise _bad(path, "not a .safetensors file (unreadable header)") from None
            if not isinstance(header, dict):
                raise _bad(path, "not a .safetensors file (header is not an object)")
            body = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + length else b""
    except FileNotFoundError:
        raise InputError(f"LoRA file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"LoRA file {path} is a folder; give the .safetensors file") from None
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror or e})") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (start + int(o) for o in info["data_offsets"])
        except KeyError:
            kind = info.get("dtype") if isinstance(info, dict) else None
            raise _bad(path, f"tensor {name} has unsupported dtype {kind!r}") from None
        except (TypeError, ValueError):
            raise _bad(path, f"tensor {name} has a malformed header entry") from None
        itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
        if not start <= begin <= end <= size or end - begin != itemsize * int(np.prod(shape)):
            raise _bad(path, f"tensor {name} lies outside the file (truncated?)")
        raw = np.frombuffer(body, np.uint8, end - begin, begin) if end > begin else np.zeros(0)
        if dtype == "bf16":
            value = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            value = raw.view(dtype).astype(np.float32)
        tensors[name] = value.reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}
