"""A model's preprocessing, as timm's pretrained config states it."""
from __future__ import annotations

import secrets
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import ExifTags, Image
from torch import nn

from .errors import MixdeployError, is_number


CHANNELS = (1, 3)  # grayscale or RGB
MIN_SIDE = 32  # pixels: a MixNet halves its input five times
MAX_SIDE = 1024  # pixels: export's float64 reference at 2048 needs more memory than a 24 GB machine has


@dataclass(frozen=True)
class PreprocessConfig:
    """What an image must go through before the model sees it (NCHW, float32)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        channels = self.input_size[0]
        if channels not in CHANNELS or len(self.mean) != channels or len(self.std) != channels:
            raise MixdeployError(f"preprocessing for input size {tuple(self.input_size)} with mean {tuple(self.mean)} "
                                 f"and std {tuple(self.std)}: inputs must have 1 (grayscale) or 3 (RGB) channels, "
                                 "with a mean and std per channel")

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """From to_dict() output or JSON (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def updated(self, data: object, source: str) -> "PreprocessConfig":
        """This config with the entries of a user's mapping (a checkpoint's 'preprocess'), every key
        known and every value usable, else MixdeployError naming the first that is not."""
        base = asdict(self)
        if not isinstance(data, dict) or set(data) - set(base):
            extra = sorted(map(str, set(data) - set(base))) if isinstance(data, dict) else []
            raise MixdeployError(f"{source}: 'preprocess' must map some of {', '.join(base)} to values"
                                 + (f"; unknown: {', '.join(extra)}" if extra else ""))
        ok = {
            "input_size": lambda v: len(v) == 3 and type(v[0]) is int and v[0] in CHANNELS and all(isinstance(s, int) and MIN_SIDE <= s <= MAX_SIDE for s in v[1:]),
            "mean": lambda v: len(v) in CHANNELS and all(is_number(x) for x in v),
            "std": lambda v: len(v) in CHANNELS and all(is_number(x) and x > 0 for x in v),
            "crop_pct": lambda v: is_number(v) and 0 < v <= 1,
            "crop_mode": lambda v: v in ("center", "squash", "border"),
            "interpolation": lambda v: v in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"),
        }
        for key, value in data.items():
            try:
                good = ok[key](value)
            except TypeError:
                good = False
            if not good:
                raise MixdeployError(f"{source}: preprocess {key} {value!r} is not usable (like {base[key]!r})")
        try:
            return self.from_dict({**base, **data})
        except MixdeployError as exc:  # the entries together: channels, mean and std must agree
            raise MixdeployError(f"{source}: {exc}") from None

    @classmethod
    def from_model(cls, model: nn.Module) -> "PreprocessConfig":
        """Resolve the config the way timm's eval transform does."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        try:
            made = cls(input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
        except MixdeployError as exc:
            raise MixdeployError(f"the model's pretrained_cfg: {exc}") from None
        # checked as a checkpoint's are: an unknown interpolation would fail later, in the middle of an export
        return made.updated({k: cfg[k] for k in ("crop_pct", "crop_mode", "interpolation") if k in cfg},
                            "the model's pretrained_cfg")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


SAMPLE_IMAGES = Path(__file__).parent / "sample_images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def eval_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's own eval transform for this config (resize, centre crop, to tensor, normalize)."""
    from timm.data import create_transform

    return create_transform(input_size=cfg.input_size, interpolation=cfg.interpolation, mean=cfg.mean,
                            std=cfg.std, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode, is_training=False)


WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale (PNG); convert("RGB") would clip it


MAX_ASPECT = 100  # longer side / shorter side; above it an image is no photo (a 1x20000 banner)


# EXIF orientation -> the turn that shows the image upright (Pillow's ImageOps.exif_transpose, without
# rewriting the EXIF block: that fails on some phones' GPS and maker data)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says (unchanged without one, or with an unreadable EXIF block)."""
    try:
        turn = UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation))
    except Exception:  # a damaged EXIF block is no reason to drop the photo: its pixels decode
        turn = None
    return img.transpose(turn) if turn is not None else img


def read_image(path: Path, transform: Callable[[Image.Image], torch.Tensor], channels: int = 3) -> torch.Tensor:
    """One image decoded with Pillow as RGB, or grayscale for a one-channel model (16-bit grayscale
    scaled to 8 bits), turned upright by its EXIF orientation, and passed through `transform`. A
    ValueError for one more than MAX_ASPECT times longer than wide."""
    # images of 1-2x Pillow's pixel limit decode (above it they raise); a palette PNG's transparency
    # warns on stderr mid-run: it is dropped, as timm's own loader drops it (convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        warnings.filterwarnings("ignore", "(Possibly )?[Cc]orrupt EXIF|Metadata Warning", UserWarning)
        with Image.open(path) as img:
            if max(img.size) > MAX_ASPECT * min(img.size):  # its shorter side resized to ~256: gigabytes
                raise ValueError(f"{path.name} is {img.width}x{img.height}: more than {MAX_ASPECT}:1")
            img = _upright(img)
            if img.mode in WIDE_GRAY:
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            return transform(img.convert("L" if channels == 1 else "RGB"))


def load_images(paths: list[Path], cfg: PreprocessConfig) -> torch.Tensor:
    """Decode and preprocess exactly as the model's config says: (N, C, H, W)."""
    transform = eval_transform(cfg)
    return torch.stack([read_image(path, transform, cfg.input_size[0]) for path in paths])


def sample_photos(cfg: PreprocessConfig, limit: int | None = None) -> torch.Tensor:
    """The real photos shipped with mixdeploy, preprocessed for the model."""
    paths = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return load_images(paths[:limit], cfg)


def random_images(n: int, input_size: tuple[int, int, int], seed: int | None = None) -> torch.Tensor:
    """Fresh random images in the model's normalized input space, with the smooth, mostly coarse
    structure of photos (noise at several scales, finer scales weaker: a pink-noise spectrum) and
    unit standard deviation. Unlike i.i.d. pixel noise, they keep a network whose BatchNorm was
    fitted to photos within the activation range it works in."""
    # a fresh seed without reseeding torch's global generator (torch.seed() would)
    gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    c, h, w = input_size
    image = torch.zeros(n, c, h, w)
    for cells, weight in ((4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35), (64, 0.25)):
        noise = torch.randn(n, c, min(cells, h), min(cells, w), generator=gen)
        image += weight * torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    return (image - image.mean()) / image.std()
