"""Calibration and evaluation images: every readable photo under a folder, preprocessed exactly
as the model's config says (timm's eval transform)."""
from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, UnidentifiedImageError

from mixnet_deploy.errors import MixdeployError
from mixnet_deploy.preprocess import IMAGE_SUFFIXES, PreprocessConfig, eval_transform, read_image

MIN_IMAGES = 2
SAMPLE_SEED = 0


@dataclass
class ImageSet:
    """Preprocessed images (N, C, H, W), their files, ImageFolder labels when the layout has them,
    and the files that could not be read."""

    images: torch.Tensor
    paths: list[Path]
    labels: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def split(self, n: int) -> tuple["ImageSet", "ImageSet"]:
        """The first n images and the rest."""
        cut = lambda v: (v[:n], v[n:]) if v is not None else (None, None)  # noqa: E731
        (a, b), (pa, pb), (la, lb) = cut(self.images), cut(self.paths), cut(self.labels)
        return ImageSet(a, pa, la, self.skipped), ImageSet(b, pb, lb, [])


def _folder(folder: str | Path) -> Path:
    """`folder` as a Path; a usage error when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MixdeployError(f"image folder {folder} does not exist or is not a folder; pass a folder of photos")
    return folder


def _image_files(folder: str | Path, unreadable: list[tuple[str, str]] | None = None) -> Iterator[Path]:
    """The JPEG, PNG, WebP and BMP files under `folder`, recursively (symlinked class folders too, each
    real folder once), as the walk finds them. A subfolder that cannot be listed is added to
    `unreadable`; `folder` itself raises (PermissionError: one line naming it)."""
    top = _folder(folder)

    def refused(exc: OSError) -> None:
        if Path(exc.filename) == top:
            raise exc
        if unreadable is not None:
            unreadable.append((exc.filename, type(exc).__name__))

    seen = set()
    for current, subfolders, files in os.walk(top, onerror=refused, followlinks=True):
        if os.path.realpath(current) in seen:  # a link back up, or a second link to one folder
            subfolders.clear()
            continue
        seen.add(os.path.realpath(current))
        subfolders.sort()  # which of two links to one folder names its images: the same on every machine
        yield from (p for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES and (p := Path(current, f)).is_file())


def find_images(folder: str | Path, unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every JPEG, PNG, WebP and BMP under `folder`, recursively, in a stable order; subfolders that
    cannot be listed are added to `unreadable`."""
    return sorted(_image_files(folder, unreadable))


def check_folder(folder: str | Path, minimum: int = MIN_IMAGES) -> Path:
    """`folder` as a Path, checked before any work: a folder holding at least `minimum` image files
    (not decoded yet: an unreadable one is found, and skipped, when read; the walk stops at `minimum`,
    so a large dataset is not listed twice)."""
    count = sum(1 for _ in itertools.islice(_image_files(folder), minimum))
    if count < minimum:
        raise MixdeployError(f"image folder {folder} holds {count} JPEG, PNG, WebP or BMP file(s) (searched "
                             f"recursively; need at least {minimum}); pass a folder of photos")
    return Path(folder)


def load_folder(folder: str | Path, cfg: PreprocessConfig, limit: int | None = None, minimum: int = MIN_IMAGES,
                step: Callable[[str], None] = lambda _: None) -> ImageSet:
    """Decode and preprocess the readable images in a stable order, or with `limit` as many of them
    in a seeded random order (an ImageFolder's classes in about their proportions, not its first
    files, and so quantize's held-out last fifth too); unreadable ones are skipped and listed. `step`
    reports progress (the caller's spinner or heartbeat)."""
    folder = Path(folder)
    skipped: list[tuple[str, str]] = []  # files, and folders that could not be listed (their classes missing)
    paths = find_images(folder, skipped)
    layout = [p.relative_to(folder).parts for p in paths]
    labelled = all(len(parts) == 2 for parts in layout) and len({parts[0] for parts in layout}) > 1
    if limit is not None:
        random.Random(SAMPLE_SEED).shuffle(paths)
    transform = eval_transform(cfg)
    used: list[Path] = []
    total = len(paths) if limit is None else min(limit, len(paths))
    images = torch.empty((total, *cfg.input_size))  # filled in place: no second copy of them all at the end
    for path in paths:
        if len(used) >= total:
            break
        step(f"reading {folder} [{len(used)}/{total}]")
        try:
            images[len(used)] = read_image(path, transform, cfg.input_size[0])
            used.append(path)
        # a damaged file: Pillow raises SyntaxError for a broken PNG chunk, EOFError or struct.error for a cut one
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
                struct.error) as exc:
            skipped.append((str(path), type(exc).__name__))
    if len(used) < minimum:
        raise MixdeployError(f"{folder} has {len(used)} usable image(s) (need at least {minimum}; "
                             f"{len(skipped)} unreadable); add JPEG, PNG, WebP or BMP photos")
    labels = [p.relative_to(folder).parts[0] for p in used] if labelled else None
    return ImageSet(images[:len(used)], used, labels, skipped)
