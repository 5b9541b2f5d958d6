"""The quality harness's metrics (bench/quality.py) on synthetic data: they must mean what the
docs table says they mean. No model, no engines; well under a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_SPEC = importlib.util.spec_from_file_location("bench_quality", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_shifted_and_scaled_gaussians() -> None:
    # N(0, I) vs N(mu, s^2 I) in d dims: |mu|^2 + d (1 - s)^2; large samples get close to it.
    rng = np.random.default_rng(1)
    d, mu, s = 4, 0.5, 2.0
    a = rng.normal(size=(20000, d))
    b = rng.normal(loc=mu, scale=s, size=(20000, d))
    expected = d * mu**2 + d * (1 - s) ** 2
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


def test_frechet_distance_grows_with_the_gap_and_survives_rank_deficient_covariances() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(179, 64))
    near, far = rng.normal(0.1, size=(50, 64)), rng.normal(1.0, size=(50, 64))
    near_d, far_d = quality.frechet_distance(near, real), quality.frechet_distance(far, real)
    assert np.isfinite(near_d) and near_d < far_d  # 50 rows < 64 dims: singular covariance


def test_rms() -> None:
    a = np.zeros((2, 4, 8, 8))
    assert quality.rms(a, a) == 0.0
    assert quality.rms(a + 3.0, a) == pytest.approx(3.0)


def test_replace_section_keeps_the_other_sections() -> None:
    doc = "# Quality\n\n## A\n\nold a\n\n## S\n\nold s\n\n## B\n\nkeep b\n"
    out = quality.replace_section(doc, "## S", "new s")
    assert out == "# Quality\n\n## A\n\nold a\n\n## S\n\nnew s\n\n## B\n\nkeep b\n"
    assert quality.replace_section(out, "## S", "new s") == out  # idempotent
    assert quality.replace_section("# Q\n", "## S", "body").endswith("## S\n\nbody\n")
    last = quality.replace_section("# Q\n\n## S\n\nold\n", "## S", "new")
    assert last == "# Q\n\n## S\n\nnew\n"
