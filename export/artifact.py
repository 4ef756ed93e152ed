"""Writing an artifact directory so that it appears whole or not at all.

Files are written under `<output>.partial-<pid>` next to the destination.
The staging directory never holds manifest.json: stages that need to open
the staged artifact (validation, calibration) pass the manifest in memory
(VLMSession(..., manifest=m)). `publish` writes the manifest last, after
validation, and renames the directory into place (an atomic rename on one
filesystem). A run that dies leaves only a directory without a manifest,
which never loads.

Two exports to one output: the first takes `<output>.lock` (created
exclusively, holding its pid); the second fails at once, naming the owner,
instead of deleting the first one's work. A lock or a staging directory left
by a process that no longer exists is stale and is cleaned up; those of a
live process are never touched.
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


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _lock_path(output: Path) -> Path:
    return output.parent / f"{output.name}.lock"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        return None


@contextmanager
def output_lock(output: Path):
    """Holds `<output>.lock` (O_EXCL, our pid) for the duration of an export."""
    path = _lock_path(output)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _read_pid(path)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise UserInputError(f"another export (pid {pid}) is writing {output}",
                                     hint="wait for it to finish, or choose another --output") \
                    from None
            path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise UserInputError(f"cannot take the export lock {path}",
                             hint="remove it if no export is running")
    try:
        yield path
    finally:
        if _read_pid(path) == os.getpid():
            path.unlink(missing_ok=True)


def _remove_stale_partials(output: Path) -> None:
    """Staging directories of dead exports (their pid is in the name)."""
    for stale in output.parent.glob(output.name + ".partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


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
        tmp = output.parent / f"{output.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # ours, from an earlier call in this process
        tmp.mkdir(parents=True)
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
                failed = output.parent / f"{output.name}.failed"
                shutil.rmtree(failed, ignore_errors=True)
                if staged.manifest is not None:
                    import json
                    (tmp / "manifest.rejected.json").write_text(
                        json.dumps(staged.manifest, indent=2, default=str) + "\n")
                tmp.rename(failed)
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
