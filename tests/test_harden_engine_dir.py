"""The user's files are sacred (issue 17, class 1): ``--out`` replaces only an engine
directory this tool wrote, and publishing is atomic in the strict sense."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from trt_sd.export import engine_dir
from trt_sd.models.errors import InputError
from trt_sd.models.manifest import Manifest


@pytest.fixture
def engines(tmp_path: Path) -> Path:
    from runtime_engines import tiny_engines

    return Path(shutil.copytree(tiny_engines(), tmp_path / "out", symlinks=True))


def _build(tmp_path: Path, source: Path, tag: str) -> Path:
    """A finished build (what the exporter leaves before publishing), tagged to tell apart."""
    build = engine_dir.new_build_dir(tmp_path / "out")
    for p in source.iterdir():
        if p.name == engine_dir.MARKER:
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, build / p.name)
    (build / "tokenizer" / "special_tokens_map.json").touch()
    (build / "tag.txt").write_text(tag)  # listed in its marker at publish
    return build


def test_exported_directory_carries_a_marker_listing_its_files(engines: Path) -> None:
    import json

    marker = json.loads((engines / engine_dir.MARKER).read_text())
    assert marker["kind"] == engine_dir.MARKER_KIND
    assert {"manifest.json", "unet.onnx", "tokenizer/vocab.json"} <= set(marker["files"])
    assert engine_dir.not_ours(engines) is None


def test_a_users_folder_with_a_manifest_is_never_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"my": "packing list"}')
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(InputError, match=r"not an engine directory written by trt-sd \(no valid"):
        engine_dir.check_output_dir(folder)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def test_an_engine_directory_with_a_users_file_is_refused(engines: Path) -> None:
    (engines / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"it also holds 'notes\.txt'") as e:
        engine_dir.check_output_dir(engines)
    assert "\n" not in str(e.value)


def test_pre_marker_directories_are_ours_only_when_nothing_else_is_there(engines: Path) -> None:
    (engines / engine_dir.MARKER).unlink()
    assert engine_dir.not_ours(engines) is None  # what an older trt-sd wrote
    (engines / "tokenizer" / "my-notes.md").write_text("mine")
    assert "tokenizer/my-notes.md" in str(engine_dir.not_ours(engines))


def test_publish_is_atomic_for_every_observer(engines: Path, tmp_path: Path) -> None:
    """A reader polling ``--out`` during many replaces always sees one complete directory."""
    out = engines
    seen: list[str] = []
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            try:
                manifest = (out / "manifest.json").read_bytes()
                tag = (out / "tag.txt").read_text() if (out / "tag.txt").exists() else "orig"
                assert manifest and (out / "unet.onnx").is_file()
                seen.append(tag)
            except (OSError, AssertionError) as e:
                seen.append(f"BROKEN {e}")

    watcher = threading.Thread(target=observe)
    watcher.start()
    try:
        for i in range(12):
            engine_dir.publish(_build(tmp_path, engines, f"v{i}"), out)
    finally:
        stop.set()
        watcher.join()
    assert not [s for s in seen if s.startswith("BROKEN")], seen[:5]
    assert (out / "tag.txt").read_text() == "v11"
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # old ones removed
    Manifest.load(out)


def test_a_crash_at_any_point_keeps_a_complete_directory(
    engines: Path, tmp_path: Path, monkeypatch
) -> None:
    build = _build(tmp_path, engines, "new")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_dir, "exchange", crash)  # killed just before the swap
    with pytest.raises(KeyboardInterrupt):
        engine_dir.publish(build, engines)
    assert not (engines / "tag.txt").exists() and Manifest.load(engines)
    monkeypatch.undo()

    monkeypatch.setattr(shutil, "rmtree", crash)  # killed just after: new in place, old beside
    with pytest.raises(KeyboardInterrupt):
        engine_dir.publish(build, engines)
    monkeypatch.undo()
    assert (engines / "tag.txt").read_text() == "new" and Manifest.load(engines)
    (old,) = [p for p in tmp_path.iterdir() if ".export-" in p.name]
    assert Manifest.load(old)  # the previous directory, complete, swept by the next export


def test_a_directory_changed_during_the_export_is_not_replaced(
    engines: Path, tmp_path: Path
) -> None:
    build = _build(tmp_path, engines, "new")
    (engines / "added-meanwhile.txt").write_text("mine")
    with pytest.raises(InputError, match="changed during the export"):
        engine_dir.publish(build, engines)
    assert (engines / "added-meanwhile.txt").read_text() == "mine"


def test_no_atomic_exchange_means_refuse_before_work(engines: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_dir, "exchange_supported", lambda parent: False)
    with pytest.raises(InputError, match="atomically"):
        engine_dir.check_output_dir(engines)


def test_a_symlinked_out_replaces_its_target_and_keeps_the_link(
    engines: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(engines)
    engine_dir.check_output_dir(link)
    engine_dir.publish(_build(tmp_path, engines, "via-link"), link)
    assert link.is_symlink() and (engines / "tag.txt").read_text() == "via-link"


def test_export_cli_refuses_a_users_folder_in_one_line(tmp_path: Path, capsys) -> None:
    from runtime_engines import tiny_model

    from trt_sd.runtime.cli import main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "thesis.tex").write_text("years of work")
    model = tiny_model()
    capsys.readouterr()
    assert main(["export", str(model), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an engine directory written by trt-sd" in err
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]
