"""``trt-sd serve`` arguments: bad values are refused with one line before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_engines import tiny_engines

from trt_sd.runtime.cli import main as cli_main

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def engines() -> Path:
    return tiny_engines()  # (exported before any test captures stderr)


def test_help_lists_the_serving_options(capsys) -> None:
    assert cli_main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("ENGINE_DIR", "--host", "--port", "--replicas", "--max-batch", "--autoscale"):
        assert flag in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-batch", "9"], "error: max-batch must be in 1..4 (the UNet engine's batch range)"),
        (["--replicas", "0"], "error: replicas must be at least 1, got 0"),
        (["--autoscale", "3:1"], "error: autoscale needs 0 <= MIN <= MAX, got (3, 1)"),
        (["--port", "70000"], "error: port must be in 1..65535, got 70000"),
        (["--max-queue", "-1"], "error: max-queue must be >= 0, got -1"),
        (["--timeout", "0"], "error: timeout must be positive, got 0.0"),
        (["--cpus-per-replica", "-1"], "error: cpus-per-replica must be >= 0, got -1.0"),
        (["--target-ongoing", "0"], "error: target-ongoing must be > 0 (requests per replica)"),
    ],
)
def test_bad_options_fail_fast(engines: Path, extra: list[str], message: str, capsys) -> None:
    assert cli_main(["serve", str(engines), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message), err
    assert "\n" not in err
    assert not ray.is_initialized()


def test_missing_engine_dir_fails_fast(tmp_path: Path, capsys) -> None:
    assert cli_main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err
    assert not ray.is_initialized()


def test_replicas_get_the_ort_cache_setting(
    engines: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--ort-cache (or the driver's TRT_SD_ORT_CACHE) reaches the replicas' environment;
    a file given as the cache folder is refused before Ray starts."""
    from trt_sd.runtime.serve.app import ServeOptions, replica_actor_options

    monkeypatch.delenv("TRT_SD_ORT_CACHE", raising=False)
    plain = replica_actor_options(ServeOptions(engine_dir=str(engines)))
    assert plain == {"num_gpus": 0.0, "num_cpus": 1.0}
    cached = replica_actor_options(ServeOptions(engine_dir=str(engines), ort_cache="1"))
    assert cached["runtime_env"] == {"env_vars": {"TRT_SD_ORT_CACHE": "1"}}
    monkeypatch.setenv("TRT_SD_ORT_CACHE", str(tmp_path))
    inherited = replica_actor_options(ServeOptions(engine_dir=str(engines)))
    assert inherited["runtime_env"] == {"env_vars": {"TRT_SD_ORT_CACHE": str(tmp_path)}}
    monkeypatch.chdir(tmp_path)  # a relative folder reaches the replicas made absolute
    relative = replica_actor_options(ServeOptions(engine_dir=str(engines), ort_cache="oc"))
    assert relative["runtime_env"] == {"env_vars": {"TRT_SD_ORT_CACHE": str(tmp_path / "oc")}}
    off = replica_actor_options(ServeOptions(engine_dir=str(engines), ort_cache="off"))
    assert off["runtime_env"] == {"env_vars": {"TRT_SD_ORT_CACHE": "0"}}  # beats inherited env

    (tmp_path / "file").write_text("x")
    assert cli_main(["serve", str(engines), "--ort-cache", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the ONNX Runtime cache setting") and "\n" not in err, err
    assert not ray.is_initialized()
    assert cli_main(["serve", str(engines), "--ort-cache", str(engines)]) == 2
    assert "names an engine directory" in capsys.readouterr().err
