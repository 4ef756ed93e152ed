"""Calibration data sets: the images and prompts INT8 calibration and its
accuracy gate see, chosen deterministically, with a content hash.

Two sources (`--calib`):

  DIR        images found recursively (folder.py), each with its prompts from
             DIR/prompts.jsonl, or DEFAULT_PROMPTS where the file names none;
  synthetic  the demo scene world (vlmedge.demo.scenes): each scene with its
             eight questions and their answers, so the gate can also score
             answers. Seeds come from SYNTHETIC_SEEDS, disjoint from the
             training seeds [0, 10^7) and from vlm-eval's [10^9, ...).

Selection: candidates (sorted) are shuffled by a seeded numpy generator and
decoded in that order; unreadable images are skipped and counted; the first
`calib` readable ones calibrate, the next `holdout` ones form the held-out
split the accuracy gate measures on. Same folder, size and seed: same
samples, same hash, on every machine.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmedge.errors import CalibrationDataError, UserInputError
from vlmedge.runtime.image_io import load_image

from . import folder

SYNTHETIC = "synthetic"
DEFAULT_CALIB_SIZE = 64
DEFAULT_PROMPTS = ("describe the image.",)
SYNTHETIC_SEEDS = range(500_000_000, 500_100_000)
MIN_CALIB, MIN_HOLDOUT, MAX_HOLDOUT = 2, 2, 32


@dataclass(frozen=True)
class Sample:
    """One image and the prompts asked about it."""
    key: str  # "scene:<seed>" or the image's path relative to the folder
    prompts: tuple[str, ...]
    answers: tuple[str, ...] | None = None  # expected answers (synthetic scenes only)
    kinds: tuple[str, ...] | None = None  # question kinds (synthetic scenes only)
    path: Path | None = None
    scene_seed: int | None = None

    def image(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB pixels (decoded again on each call: a folder
        of camera frames would not fit in memory all at once)."""
        if self.scene_seed is not None:
            from vlmedge.demo import scenes
            return np.asarray(scenes.make_scene(self.scene_seed).image)
        return load_image(self.path)


@dataclass
class CalibrationSet:
    source: str  # "synthetic" or the folder's path
    seed: int
    calib: list[Sample]
    holdout: list[Sample]
    candidates: int  # images found in the folder / scenes available
    hash: str  # sha256 over the whole selection (both splits): the manifest's data set hash
    calib_hash: str  # over the calibration split only: keys the activation-range cache
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, why) unreadable

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "hash": self.hash, "seed": self.seed,
                "samples": len(self.calib), "prompts": sum(len(s.prompts) for s in self.calib),
                "holdout_samples": len(self.holdout),
                "holdout_prompts": sum(len(s.prompts) for s in self.holdout),
                "candidates": self.candidates, "skipped_unreadable": len(self.skipped)}


def holdout_size(calib: int) -> int:
    """Held-out images for a calibration split of `calib` images."""
    return min(MAX_HOLDOUT, max(MIN_HOLDOUT, calib // 2))


def check_calib_size(calib_size: int | None) -> None:
    if calib_size is not None and calib_size < MIN_CALIB:
        raise UserInputError(f"--calib-size must be >= {MIN_CALIB}", got=str(calib_size))


def load(spec: str, calib_size: int | None = None, seed: int = 0,
         log: Callable[[str], None] = lambda s: None) -> CalibrationSet:
    """`spec` ("synthetic" or a folder) -> the selected CalibrationSet.

    calib_size None takes DEFAULT_CALIB_SIZE, or fewer when a folder is
    smaller; an explicit size the data cannot supply is an error."""
    check_calib_size(calib_size)
    requested = calib_size or DEFAULT_CALIB_SIZE
    if spec == SYNTHETIC:
        result = _synthetic(requested, seed)
    else:
        result = _folder(Path(spec).expanduser(), requested, calib_size is not None, seed)
    skipped = ""
    if result.skipped:
        rel, why = result.skipped[0]
        skipped = f", {len(result.skipped)} unreadable skipped (e.g. {rel}: {why})"
    log(f"calibration data: {result.source}: {len(result.calib)} to calibrate, "
        f"{len(result.holdout)} held out (of {result.candidates}{skipped}); "
        f"hash {result.hash[:12]}")
    return result


def _too_big(requested: int, available: int, what: str) -> CalibrationDataError:
    need = requested + holdout_size(requested)
    return CalibrationDataError(
        f"--calib-size {requested} is larger than the data",
        expected=f"{requested} images to calibrate + {holdout_size(requested)} held out = {need}",
        got=f"{available} {what}", hint="lower --calib-size or add images")


def _synthetic(requested: int, seed: int) -> CalibrationSet:
    from vlmedge.demo import scenes

    hold = holdout_size(requested)
    if requested + hold > len(SYNTHETIC_SEEDS):
        raise _too_big(requested, len(SYNTHETIC_SEEDS), "synthetic scenes")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(SYNTHETIC_SEEDS), size=requested + hold, replace=False)
    samples, digests = [], []
    for i in picks:
        scene = scenes.make_scene(SYNTHETIC_SEEDS[int(i)])
        qs = scenes.questions(scene)
        samples.append(Sample(f"scene:{scene.seed}", tuple(q.question for q in qs),
                              tuple(q.answer for q in qs), tuple(q.kind for q in qs),
                              scene_seed=scene.seed))
        digests.append(hashlib.sha256(np.asarray(scene.image).tobytes()).hexdigest())
    return _make_set(SYNTHETIC, seed, samples, digests, requested, len(SYNTHETIC_SEEDS), [])


def _folder(root: Path, requested: int, explicit: bool, seed: int) -> CalibrationSet:
    images = folder.scan_images(root)
    if not images:
        raise CalibrationDataError(
            f"calibration folder {root} has no images",
            expected=f"{', '.join(s[1:] for s in folder.IMAGE_SUFFIXES)} files (searched "
                     f"recursively)", hint="or use --calib synthetic for the demo model")
    prompts = folder.read_prompts(root, {im.rel: im for im in images})
    need = requested + holdout_size(requested)
    if explicit and need > len(images):
        raise _too_big(requested, len(images), f"images in {root}")
    order = np.random.default_rng(seed).permutation(len(images))
    samples, digests, skipped = [], [], []
    for i in order:  # decode in the seeded order until enough are readable
        im = images[int(i)]
        try:
            load_image(im.path)
        except UserInputError as e:
            skipped.append((im.rel, e.got or e.what))
            continue
        samples.append(Sample(im.rel, tuple(prompts.get(im.rel, DEFAULT_PROMPTS)), path=im.path))
        digests.append(_file_sha256(im.path))
        if len(samples) == need:
            break
    calib = requested
    if len(samples) < need:
        if explicit:
            raise _too_few(root, len(samples), skipped, need)
        calib = len(samples) * 2 // 3  # short folder: two thirds calibrate, a third held out
        if calib < MIN_CALIB or len(samples) - calib < MIN_HOLDOUT:
            raise _too_few(root, len(samples), skipped, MIN_CALIB + MIN_HOLDOUT)
    return _make_set(str(root), seed, samples, digests, calib, len(images), skipped)


def _too_few(root: Path, readable: int, skipped: list, need: int) -> CalibrationDataError:
    example = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    return CalibrationDataError(
        f"calibration folder {root} has too few readable images: {readable} readable, "
        f"{len(skipped)} unreadable skipped{example}",
        expected=f"at least {need} ({MIN_HOLDOUT}+ are held out for the accuracy gate)",
        hint="add images, fix the unreadable ones, or lower --calib-size")


def _make_set(source: str, seed: int, samples: list[Sample], digests: list[str], calib: int,
              candidates: int, skipped: list) -> CalibrationSet:
    hold = min(holdout_size(calib), len(samples) - calib)
    calib_part = _digest(source, seed, "calib", samples[:calib], digests[:calib])
    held = _digest(source, seed, "holdout", samples[calib:calib + hold], digests[calib:calib + hold])
    full = hashlib.sha256((calib_part + held).encode()).hexdigest()
    return CalibrationSet(source, seed, samples[:calib], samples[calib:calib + hold], candidates,
                          full, calib_part, skipped)


def _digest(source: str, seed: int, role: str, samples: list[Sample], digests: list[str]) -> str:
    """sha256 over what the samples are (key, pixel or file bytes, prompts),
    in order; the folder's location is left out so a moved copy hashes alike."""
    h = hashlib.sha256(json.dumps({"kind": "synthetic" if source == SYNTHETIC else "folder",
                                   "seed": seed, "role": role}).encode())
    for s, d in zip(samples, digests):
        h.update(json.dumps([s.key, d, list(s.prompts)]).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
