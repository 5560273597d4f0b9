"""Atomic output folders (loradeploy.fsutil): a failed write takes away the folders it made for
its output, and only those."""

import pytest

from loradeploy.fsutil import atomic_output_dir


def test_a_failed_write_removes_the_parents_it_made_and_keeps_the_others(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "made" / "also-made" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            assert (tmp_path / "kept" / "made" / "also-made").is_dir()
            (tmp / "half-written").write_text("x")
            raise RuntimeError("the export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    with atomic_output_dir(out) as tmp:  # a write that succeeds keeps them
        (tmp / "done").write_text("x")
    assert (out / "done").is_file()


def test_a_parent_another_writer_filled_meanwhile_stays(tmp_path):
    out = tmp_path / "made" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out):
            (tmp_path / "made" / "other").write_text("someone else's")
            raise RuntimeError("failed")
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["other"]
