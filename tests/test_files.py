"""Atomic writes: a failed write leaves the previous file whole and no temporary behind; modes follow the umask."""
import os
import stat

import pytest

from utils.files import atomic_output, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as stream:
            stream.write(b"half of the second")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write_text(target, "second")
    assert target.read_text() == "second"


def test_written_files_get_the_mode_open_would_give_them(tmp_path):
    reference = tmp_path / "plain.txt"
    with open(reference, "w") as stream:  # what the user's umask makes of a new file
        stream.write("x")
    written = atomic_write_text(tmp_path / "nested" / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(reference).st_mode)
