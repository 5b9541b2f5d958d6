"""Our TensorRT code uses only the strongly typed API that TensorRT 11 and TensorRT-RTX keep.

* No name TensorRT 11 removed (weak typing: ``BuilderFlag.FP16`` / ``INT8`` / ``BF16`` /
  ``FP8``, INT8 calibrators, precision-constraint flags, ``platform_has_fast_*``) appears as an
  attribute anywhere in the project's Python files; the list is checked against the installed
  TensorRT-RTX, which never had weak typing.
* mypy over stubs generated from the real TensorRT-RTX bindings catches a planted wrong call
  (a removed flag, a wrong argument) and passes a correct one: the type check CI runs on our
  TensorRT code has teeth.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("export", "runtime", "models", "samplers", "scripts", "bench", "tests")

#: (attribute, what it hangs off or None) removed in TensorRT 11 / absent from TensorRT-RTX.
REMOVED = {
    "FP16": "BuilderFlag",
    "INT8": "BuilderFlag",
    "BF16": "BuilderFlag",
    "FP8": "BuilderFlag",
    "STRICT_TYPES": "BuilderFlag",
    "OBEY_PRECISION_CONSTRAINTS": "BuilderFlag",
    "PREFER_PRECISION_CONSTRAINTS": "BuilderFlag",
    "int8_calibrator": None,
    "IInt8Calibrator": None,
    "IInt8EntropyCalibrator": None,
    "IInt8EntropyCalibrator2": None,
    "IInt8MinMaxCalibrator": None,
    "IInt8LegacyCalibrator": None,
    "platform_has_fast_fp16": None,
    "platform_has_fast_int8": None,
    "platform_has_tf32": None,
}


def removed_uses(source: str) -> list[str]:
    """``BuilderFlag.FP16``-style uses of a removed name in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in REMOVED:
            owner = REMOVED[node.attr]
            base = node.value
            base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            if owner is None or base_name == owner:
                found.append(f"{base_name}.{node.attr} (line {node.lineno})")
    return found


def test_no_removed_tensorrt_api_in_our_code():
    hits = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            uses = removed_uses(path.read_text("utf-8"))
            hits += [f"{path.relative_to(REPO)}: {u}" for u in uses]
    assert not hits, "removed-in-TensorRT-11 API in use:\n" + "\n".join(hits)


def test_scanner_catches_a_planted_use():
    planted = "config.set_flag(trt.BuilderFlag.FP16)\nconfig.int8_calibrator = c\n"
    assert len(removed_uses(planted)) == 2
    assert removed_uses("trt.DataType.FP16\nflags.FP16_ok = 1\n") == []  # other owners


def test_removed_names_are_absent_from_tensorrt_rtx():
    trt = pytest.importorskip("tensorrt_rtx")
    for name, owner in REMOVED.items():
        where = getattr(trt, owner) if owner else trt
        assert not hasattr(where, name), f"{owner or 'tensorrt_rtx'}.{name} exists"
    assert not hasattr(trt.Builder, "platform_has_fast_fp16")
    assert not hasattr(trt.IBuilderConfig, "int8_calibrator")


PLANTED = """
import tensorrt_rtx as trt

def build(builder: trt.Builder) -> None:
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_compute_capability("8.6", 0)
"""

CORRECT = """
import tensorrt_rtx as trt

def build(builder: trt.Builder) -> None:
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
"""


def test_mypy_over_generated_rtx_stubs_catches_a_planted_wrong_call(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    pytest.importorskip("pybind11_stubgen")
    pytest.importorskip("mypy")
    stubs = tmp_path / "stubs"
    script = REPO / "scripts" / "generate_tensorrt_rtx_stubs.py"
    subprocess.run([sys.executable, str(script), str(stubs)], check=True, capture_output=True)
    config = tmp_path / "mypy.ini"  # errors inside the generated stubs are not ours
    config.write_text(
        "[mypy]\n[mypy-tensorrt_rtx.*,tensorrt_rtx_bindings.*]\nignore_errors = True\n"
    )
    results = {}
    for name, source in (("planted", PLANTED), ("correct", CORRECT)):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(config),
             "--follow-imports", "silent", str(path)],
            env={**os.environ, "MYPYPATH": str(stubs)},
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )  # fmt: skip
        results[name] = proc
    planted = results["planted"].stdout
    assert results["planted"].returncode == 1, planted
    assert '"type[BuilderFlag]" has no attribute "FP16"' in planted, planted
    assert 'incompatible type "str"; expected "ComputeCapability"' in planted, planted
    assert results["correct"].returncode == 0, results["correct"].stdout
