"""The runtime stays lean: no torch / diffusers / transformers / cupy, engine library lazily."""

from __future__ import annotations

import json
import subprocess
import sys

from runtime_engines import tiny_engines

FORBIDDEN = ("torch", "diffusers", "transformers", "cupy")

GENERATE = """
import json, sys
import trt_sd.runtime
after_import = sorted(m for m in ("onnxruntime", "tokenizers", "PIL") if m in sys.modules)
from trt_sd.runtime import Pipeline
from trt_sd.runtime.cli import main
pipe = Pipeline.load(sys.argv[1], backend="onnxruntime-cpu")
result = pipe("a cat", steps=2, seed=0, sampler="euler_a")
assert result.images[0].shape == (16, 16, 3)
code = main(["run", "--engines", sys.argv[1], "--steps", "2", "--out", sys.argv[2], "--quiet"])
assert code == 0
print(json.dumps({"after_import": after_import, "modules": sorted(sys.modules)}))
"""


def test_generation_imports_no_torch_stack(tmp_path) -> None:
    engines = tiny_engines()
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE, str(engines), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = {m.split(".")[0] for m in report["modules"]}
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    assert "onnxruntime" in loaded  # the generation did use the engine library...
    assert report["after_import"] == []  # ...but `import trt_sd.runtime` loaded none of these
