"""Writing an artifact directory so that it appears whole or not at all.

Files are written under `<output>.partial-<pid>` next to the destination;
the manifest is written last, then the directory is renamed into place (an
atomic rename on one filesystem). A run that dies leaves only the .partial
directory, which has no manifest and so never loads; the next export with
the same output removes it.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from vlmedge.errors import UserInputError, VlmedgeError


def check_output(output: Path, force: bool) -> None:
    """Fails early (before any work) on an existing output or an unwritable parent."""
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
            raise UserInputError(f"cannot create the output's parent {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"output directory {parent} is not writable",
                             hint="choose another --output")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def staging(output: Path, force: bool, keep_failed: bool = False):
    """Yields a temporary directory; on success renames it to `output`.

    On failure the temporary directory is removed, or with keep_failed
    renamed to `<output>.failed` (no manifest, so it never loads as valid)."""
    for stale in output.parent.glob(output.name + ".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f"{output.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    # A SIGTERM (a job scheduler's timeout, `kill`) becomes SystemExit so the
    # clean-up below runs as it does for Ctrl-C; Python's default would die
    # on the spot and leave the .partial directory behind. Signals can only be
    # handled in the main thread.
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield tmp
    except BaseException as e:
        if keep_failed:
            failed = output.parent / f"{output.name}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            tmp.rename(failed)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise VlmedgeError(f"the disk holding {output.parent} is full; nothing was written",
                               hint="free space or choose another --output") from None
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
