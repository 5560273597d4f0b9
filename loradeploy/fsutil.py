"""Artifacts are written to a temporary folder beside their destination and renamed into
place only when complete, so a failure or a kill never leaves a half-written output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SHA: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per (device, inode, size, mtime) in this process: a
    fleet's artifacts hard-link one base file, and its many inputs repeat."""
    st = Path(path).stat()
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if ident not in _SHA:
        _SHA[ident] = sha256_file(path)
    return _SHA[ident]


def cache_dir() -> Path:
    """Where assembled base files, dequantized references and the runtimes' reference models are
    kept (``LORADEPLOY_CACHE``, default ``~/.cache/loradeploy``)."""
    return Path(os.environ.get("LORADEPLOY_CACHE", Path.home() / ".cache" / "loradeploy"))


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier writes of ``out`` whose process is gone (killed
    mid-way: a SIGKILL runs no clean-up). Folders of a live process are left alone."""
    removed = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name[len(f".{out.name}.partial-"):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first."""
    missing, p = [], path.parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: what a failed write created."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:  # gone, or something else was written there meanwhile: keep it
            return


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``out``, on error it is removed, with
    the parent folders made for it (a failed write leaves no empty folders behind)."""
    out = Path(out).absolute()
    _check_destination(out, overwrite)
    created = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        _remove_if_empty(created)
        raise OutputError(f"{out}: cannot write here ({e.strerror or e})") from e
    try:
        yield tmp
        normal_modes(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        raise


def normal_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain write would (0666/0777 less the
    umask): temporary folders are 0700, and some writers (safetensors) create files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed into place)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: no such folder for {path.name}")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (one file on disk, no copy time), or a copy when the
    two are on different file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
