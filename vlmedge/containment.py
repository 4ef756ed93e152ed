"""Containment: every path an artifact names stays inside the artifact.

An artifact is untrusted input (DESIGN.md): a camera product downloads it and
runs it for months. Its manifest names files (graphs, their external weight
data, the tokenizer, TensorRT engines), and each name is checked here, in one
place, before anything is opened:

- syntactically (`check_name`): a relative POSIX path of letters, digits,
  '.', '_' and '-' (no `..`, '.' or empty component, nothing absolute): no
  backslashes, control characters, or the wildcard names onnxruntime gives a
  meaning of its own (`*/_ORT_MEM_ADDR_/*` reads raw memory in older builds);
- on disk (`resolve_inside`): the real path (symlinks followed) lies inside the
  artifact directory's real path and is a regular file. A symlink that stays
  inside is allowed; one that leaves is refused;
- listed (`listed_file`): the name is an entry of the manifest's `files`, so it
  is hashed whenever the manifest is verified.

ONNX graphs name their external weight data themselves; `check_onnx_external_data`
holds those names to the same rules (vlmedge/onnx_refs.py reads them).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Mapping

from .errors import ArtifactError

_HINT = "an artifact names only files inside its own directory; re-export it or get it from " \
        "a trusted source"
_SAFE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def check_name(name, where: str) -> str:
    """`name` as a safe relative file name, or ArtifactError naming `where`
    (the manifest key that holds it)."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"manifest {where} is not a file name", expected="a relative path "
                            "inside the artifact", got=repr(name)[:80], hint=_HINT)
    bad = None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        bad = "outside the artifact (an absolute path)"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        bad = "outside the artifact (a '..', '.' or empty path component)"
    elif len(name) > 255 or not _SAFE.fullmatch(name):
        bad = "with characters outside [A-Za-z0-9._-/]"
    if bad:
        raise ArtifactError(f"manifest {where} names a file {bad}",
                            expected="a relative path inside the artifact, of letters, digits, "
                                     "'.', '_', '-' and '/'", got=repr(name)[:80], hint=_HINT)
    return name


def resolve_inside(directory: Path | str, name: str, where: str) -> Path:
    """The real path of artifact file `name`, refused unless it lies inside
    `directory` (symlinks followed) and is a regular file."""
    check_name(name, where)
    root = Path(os.path.realpath(directory))
    target = Path(os.path.realpath(root / name))
    if not target.is_relative_to(root):
        raise ArtifactError(f"artifact file {name} ({where}) resolves outside the artifact "
                            f"directory (a symlink?)", expected=f"a file under {root}",
                            got=str(target), hint=_HINT)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"artifact file {name} ({where}) is missing from {directory}",
                            hint="copy the whole directory, or re-export") from None
    except OSError as e:
        raise ArtifactError(f"artifact file {name} ({where}) cannot be read: {e.strerror}",
                            hint="check the artifact directory's permissions") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"artifact file {name} ({where}) is not a regular file",
                            expected="a regular file",
                            got="a directory" if stat.S_ISDIR(mode) else "a special file",
                            hint=_HINT)
    return target


def listed_file(directory: Path | str, name: str, where: str, files: Mapping) -> Path:
    """resolve_inside, and `name` must be an entry of the manifest's `files`
    (which are hashed): nothing unlisted is ever opened."""
    check_name(name, where)
    if name not in files:
        raise ArtifactError(f"manifest {where} names {name!r}, which is not listed (and so not "
                            f"hashed) in the manifest's files", expected="one of "
                            + ", ".join(sorted(files))[:200], got=repr(name)[:80], hint=_HINT)
    return resolve_inside(directory, name, where)


def check_onnx_external_data(directory: Path | str, graph_file: str, graph_bytes: bytes,
                             files: Mapping, allowed: set[str] | None = None) -> set[str]:
    """The external-data files an ONNX graph at the top of the artifact reads,
    each checked: a safe name, listed in `files`, inside `directory`, and
    (when `allowed` is given) one of `allowed` (the component's own data
    file). EPContext nodes (a file of their own) are refused. Returns the names."""
    from .onnx_refs import OnnxParseError, scan

    try:
        locations, ops = scan(graph_bytes)
    except OnnxParseError as e:
        raise ArtifactError(f"artifact graph {graph_file} is not a readable ONNX model ({e})",
                            hint="re-export the artifact") from None
    if "EPContext" in ops:
        raise ArtifactError(f"artifact graph {graph_file} has an EPContext node (it names a "
                            f"provider cache file of its own)", expected="plain ONNX graphs",
                            hint=_HINT)
    for loc in sorted(locations):
        where = f"{graph_file} external data"
        listed_file(directory, loc, where, files)
        if allowed is not None and loc not in allowed:
            raise ArtifactError(f"{graph_file} reads external data from {loc!r}, not its own "
                                f"data file", expected=" or ".join(sorted(allowed)) or "none",
                                got=repr(loc), hint=_HINT)
    return locations


def checked_graph(directory: Path | str, name: str, where: str, files: Mapping,
                  allowed: set[str] | None = None) -> Path:
    """The real path of an ONNX graph the artifact names, after every check:
    listed, a regular file directly in the artifact directory (onnxruntime
    reads its external data relative to the graph's own folder, so a graph in
    a subfolder, or reached through a symlink into one, would read files the
    names below do not describe), and its external data as above."""
    real = listed_file(directory, name, where, files)
    root = Path(os.path.realpath(directory))
    if real.parent != root:
        raise ArtifactError(f"artifact graph {name} ({where}) does not lie directly in the "
                            f"artifact directory", expected=f"a file in {root}",
                            got=str(real), hint=_HINT)
    data = read_bytes(real, name)
    check_onnx_external_data(directory, name, data, files, allowed)
    return real


def read_bytes(path: Path, name: str) -> bytes:
    """A checked artifact file's bytes, an unreadable one as an ArtifactError."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"artifact file {name} cannot be read: {e.strerror or e}",
                            hint="check the artifact directory's permissions") from None
