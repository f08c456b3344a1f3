"""Files and folders written whole or not at all (`rsmatch.atomic`)."""

from pathlib import Path

import pytest

from rsmatch.atomic import write_folder, write_text_atomic


def _fill_with(text: str):
    return lambda folder: (folder / "f.txt").write_text(text, encoding="utf-8")


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_write_folder_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "best"
    write_folder(out, _fill_with("one"))
    (out / "stale.txt").write_text("from the first", encoding="utf-8")
    write_folder(out, _fill_with("two"))
    assert _tree(tmp_path) == {"best/f.txt": "two"}  # no stale file, no .tmp or .old left


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_fill_leaves_the_old_folder_and_no_temporary_one(tmp_path, error):
    out = tmp_path / "best"
    write_folder(out, _fill_with("one"))

    def failing(folder: Path) -> None:
        (folder / "half.txt").write_text("half", encoding="utf-8")
        raise error

    with pytest.raises(type(error)):
        write_folder(out, failing)
    assert _tree(tmp_path) == {"best/f.txt": "one"}


def test_a_writer_killed_between_the_renames_loses_nothing(tmp_path):
    """Killed after moving `out` aside and before moving the new one in: the next writer puts
    the old folder back first, and a failure then still leaves it."""
    out, old = tmp_path / "best", tmp_path / ".best.old"
    write_folder(out, _fill_with("one"))
    out.rename(old)
    with pytest.raises(OSError):
        write_folder(out, lambda folder: (_ for _ in ()).throw(OSError("no space")))
    assert _tree(tmp_path) == {"best/f.txt": "one"}
    # a killed writer that had already moved the new folder in left `.old` next to `out`
    write_folder(tmp_path / "spare", _fill_with("older"))
    (tmp_path / "spare").rename(old)
    write_folder(out, _fill_with("two"))
    assert _tree(tmp_path) == {"best/f.txt": "two"}


def test_write_text_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert _tree(tmp_path) == {"metrics.json": "two\n"}
    blocked = tmp_path / "a_folder"
    blocked.mkdir()
    with pytest.raises(OSError):  # the rename onto a folder fails after the write
        write_text_atomic(blocked, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "metrics.json"]


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    import os

    out = tmp_path / "best"
    write_folder(out, _fill_with("one"))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == ".best.tmp":
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr("rsmatch.atomic.os.replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_folder(out, _fill_with("two"))
    assert _tree(tmp_path) == {"best/f.txt": "one"}


def test_an_out_that_is_a_file_becomes_the_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "best"
    out.write_text("a file", encoding="utf-8")
    write_folder(out, _fill_with("one"))
    write_folder(out, _fill_with("two"))
    assert _tree(tmp_path) == {"best/f.txt": "two"}
