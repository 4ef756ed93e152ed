"""Writing an artifact directory so that it appears whole or not at all.

Files are written under `<output>.partial-<pid>` next to the destination.
The staging directory never holds manifest.json: stages that need to open
the staged artifact (validation, calibration) pass the manifest in memory
(VLMSession(..., manifest=m)). `publish` writes the manifest last, after
validation, and renames the directory into place (an atomic rename on one
filesystem). A run that dies leaves only a directory without a manifest,
which never loads.

Two exports to one output: the first holds an flock on `<output>.lock`
(released by the kernel however the process ends); the second fails at
once, naming the owner's pid, instead of deleting the first one's work.
Staging directories (`<output>.partial-<pid>-<random>`) found by an export
that holds the lock belong to dead exports and are removed.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmedge import manifest as manifest_mod
from vlmedge.errors import UserInputError, VlmedgeError


def check_output(output: Path, force: bool) -> None:
    """Fails early (before any work) on an existing output or an unwritable
    parent: a probe directory is made and removed there, so a read-only or
    virtual filesystem (/proc) fails now, not after minutes of export."""
    if output.exists() and not force:
        raise UserInputError(f"output {output} already exists",
                             hint="pass --force to replace it, or choose --output")
    if output.exists() and not output.is_dir():
        raise UserInputError(f"output {output} exists and is not a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise UserInputError(f"cannot create the output's parent {parent}: "
                                 f"{e.strerror or e}", hint="choose another --output") from None
    try:
        probe = tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise UserInputError(f"cannot write in the output directory {parent}: "
                             f"{e.strerror or e}", hint="choose another --output") from None


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _lock_path(output: Path) -> Path:
    return output.parent / f"{output.name}.lock"


@contextmanager
def output_lock(output: Path):
    """Holds an exclusive flock on `<output>.lock` for the duration of an
    export. The kernel releases it when the process dies however it dies,
    so a lock can never be stale and pid reuse cannot confuse it; the file
    records the holder's pid for the message. Two opens of the file conflict
    even within one process, so two threads exporting to one output are
    refused like two processes."""
    import fcntl

    path = _lock_path(output)
    while True:
        try:  # O_NOFOLLOW: a planted symlink must not make us truncate its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise UserInputError(f"cannot open the export lock {path}: {e.strerror or e}",
                                 hint="remove it if it is not a regular file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserInputError(f"another export (pid {holder}) is writing {output}",
                                 hint="wait for it to finish, or choose another --output") \
                from None
        # The holder before us unlinks the file as it finishes: a lock on that
        # unlinked file guards nothing, so lock the file the path names now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still locked: see the check above
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_stale_partials(output: Path) -> None:
    """Staging directories left by exports that died: the caller holds the
    output's lock, so no live export owns any of them."""
    prefix = output.name + ".partial-"
    for stale in output.parent.iterdir():
        if stale.name.startswith(prefix) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _keep_failed(tmp: Path, output: Path, manifest: dict | None) -> None:
    """--keep-failed: the staged directory as <output>.failed, its manifest as
    manifest.rejected.json (never loads). Best effort: a failure here (a full
    disk) must not hide the error that failed the export."""
    import json

    failed = output.parent / f"{output.name}.failed"
    try:
        shutil.rmtree(failed, ignore_errors=True)
        if manifest is not None:
            (tmp / "manifest.rejected.json").write_text(
                json.dumps(manifest, indent=2, default=str) + "\n")
        tmp.rename(failed)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class Staged:
    """The staging directory and the manifest that `publish` will write."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict[str, Any] | None = None


@contextmanager
def staging(output: Path, force: bool, keep_failed: bool = False):
    """Yields a Staged directory; when the block ends without error, writes
    its manifest (set by the caller: it must be) and renames the directory to
    `output`.

    On failure the directory is removed, or with keep_failed renamed to
    `<output>.failed` with the manifest as `manifest.rejected.json` (for
    inspection; it never loads)."""
    with output_lock(output):
        _remove_stale_partials(output)
        tmp = Path(tempfile.mkdtemp(prefix=f"{output.name}.partial-{os.getpid()}-",
                                    dir=output.parent))
        staged = Staged(tmp)
        # A SIGTERM (a job scheduler's timeout, `kill`) becomes SystemExit so the
        # clean-up below runs as it does for Ctrl-C; Python's default would die
        # on the spot and leave the .partial directory behind. Signals can only be
        # handled in the main thread.
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            yield staged
            if staged.manifest is None:
                raise RuntimeError("staging: the block set no manifest")  # a bug
            manifest_mod.write(tmp, staged.manifest)  # last: after validation
        except BaseException as e:
            (tmp / manifest_mod.MANIFEST).unlink(missing_ok=True)
            if keep_failed:
                _keep_failed(tmp, output, staged.manifest)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise VlmedgeError(f"the disk holding {output.parent} is full; nothing was "
                                   f"written", hint="free space or choose another --output") \
                    from None
            if isinstance(e, OSError) and not isinstance(e, VlmedgeError):
                raise VlmedgeError(f"cannot write the artifact: {e}",
                                   hint="check the output directory") from None
            raise
        finally:
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)
        if output.exists():
            old = output.parent / f"{output.name}.old-{os.getpid()}"
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
