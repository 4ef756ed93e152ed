"""A calibration folder on disk: its images (found recursively) and its
optional prompts.jsonl.

    calib/
      prompts.jsonl          {"image": "street/a.jpg", "prompt": "what is the sign?"}  (optional)
      street/a.jpg           *.jpg, *.jpeg, *.png, *.webp, any depth
      b.png

Only listing and parsing happen here; decoding (and skipping unreadable
images) is dataset.py's job. Directory symlinks are followed, and a link back
to a folder being walked (a loop, which would otherwise recurse until the
path is too long) is an error; two links to one folder or file count it once.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlmedge.errors import CalibrationDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PROMPTS_FILE = "prompts.jsonl"
PROMPT_LINE = '{"image": "relative/path.jpg", "prompt": "a question about it"}'


@dataclass(frozen=True)
class ImageFile:
    path: Path  # as found (may pass through symlinks)
    rel: str  # POSIX path relative to the folder: its identity in hashes and prompts.jsonl


def _loop_error(root: Path, where: str) -> CalibrationDataError:
    return CalibrationDataError(
        f"calibration folder {root} contains a symlink loop at {where}",
        hint="remove the link that points back into the folder")


def check_root(root: Path) -> None:
    """The folder itself: exists, is a directory, is not a symlink loop."""
    try:
        st = os.stat(root)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CalibrationDataError(f"calibration folder {root} is a symlink loop",
                                       expected="a folder of images",
                                       hint="point --calib at the real folder") from None
        raise CalibrationDataError(f"calibration folder {root} does not exist",
                                   expected="a folder of images, or 'synthetic'",
                                   got=e.strerror) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CalibrationDataError(f"calibration path {root} is not a folder",
                                   expected="a folder of images, or 'synthetic'")


def scan_images(root: Path) -> list[ImageFile]:
    """Every image under `root`, sorted by relative path (so selection does
    not depend on the filesystem's listing order)."""
    check_root(root)
    found: dict[str, ImageFile] = {}
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    # Depth-first; each entry carries the real paths of the folders above it.
    stack = [(root, PurePosixPath(), (os.path.realpath(root),))]
    while stack:
        folder, rel, ancestors = stack.pop()
        if ancestors[-1] in seen_dirs:
            continue  # reached again through another link: already listed
        seen_dirs.add(ancestors[-1])
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise CalibrationDataError(f"cannot list calibration folder {folder}: {e.strerror}"
                                       ) from None
        for entry in entries:
            entry_rel = rel / entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _loop_error(root, str(entry_rel)) from None
                continue  # vanished or unreadable entry: not an image we can use
            if is_dir:
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    raise _loop_error(root, str(entry_rel))
                stack.append((Path(entry.path), entry_rel, ancestors + (real,)))
            elif is_file and entry.name.lower().endswith(IMAGE_SUFFIXES):
                real = os.path.realpath(entry.path)
                if real not in seen_files:
                    seen_files.add(real)
                    found[str(entry_rel)] = ImageFile(Path(entry.path), str(entry_rel))
    return [found[k] for k in sorted(found)]


def read_prompts(root: Path, images: dict[str, ImageFile]) -> dict[str, list[str]]:
    """prompts.jsonl -> {image rel path: [prompts]} ({} when there is no file).

    Each non-blank line is one JSON object {"image": path relative to the
    folder, "prompt": text}; an image may have several lines. A bad line is an
    error naming its line number."""
    path = root / PROMPTS_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})",
                                   expected=f"one JSON object per line: {PROMPT_LINE}") from None
    except OSError as e:
        raise CalibrationDataError(f"cannot read {path}: {e.strerror}") from None
    prompts: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})",
                                       expected=PROMPT_LINE) from None
        if not isinstance(obj, dict):
            raise CalibrationDataError(f"{where}: not a JSON object", expected=PROMPT_LINE,
                                       got=type(obj).__name__)
        image, prompt = obj.get("image"), obj.get("prompt")
        if not isinstance(image, str) or not image:
            raise CalibrationDataError(f"{where}: missing or empty \"image\"", expected=PROMPT_LINE,
                                       got=line.strip()[:80])
        if not isinstance(prompt, str) or not prompt.strip():
            raise CalibrationDataError(f"{where}: missing or empty \"prompt\"",
                                       expected=PROMPT_LINE, got=line.strip()[:80])
        rel = _relative(image)
        if rel is None:
            raise CalibrationDataError(f"{where}: image path {image!r} leaves the folder",
                                       expected="a path relative to the calibration folder")
        if rel not in images:
            raise CalibrationDataError(f"{where}: image {image!r} is not in the calibration folder",
                                       expected=f"one of its {len(images)} jpg/png/webp files",
                                       hint="paths are relative to the folder")
        prompts.setdefault(rel, []).append(prompt.strip())
    return prompts


def _relative(image: str) -> str | None:
    """'./a/b.jpg' -> 'a/b.jpg'; None for absolute paths or ones with '..'."""
    p = PurePosixPath(image.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return None
    return str(PurePosixPath(*[part for part in p.parts if part != "."]))
