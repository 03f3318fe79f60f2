"""InternVL image preprocessing (docs/design.md §5): RGB, bicubic resize, ImageNet mean/std,
tiling. Any size and PIL mode is read (grayscale, RGBA, palette, 16-bit: `to_rgb`).

Without tiling an image becomes one S x S tile. With `dynamic=True` it follows InternVL's
`dynamic_preprocess`: among the tile grids (cols, rows) with min_tiles <= cols*rows <= max_tiles
pick the one whose aspect ratio is closest to the image's (ties: the larger grid if the image
has more than half its pixel area), resize to (cols*S, rows*S), cut into cols*rows tiles in
raster order, and append a whole-image thumbnail when use_thumbnail and more than one tile.

    pixels = load_image("images/washer/00042.png", 448, dynamic=True)   # (tiles, 3, 448, 448)
    pixels = load_image_for("images/washer/00042.png", cfg)   # a SageConfig's size and tiling
    cache = ImageCache(max_bytes=1 << 30); pixels = cache.load(path, cfg)   # read once per run
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All tile grids (cols, rows) with min_tiles <= cols*rows <= max_tiles, by tile count."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1)
             for i in range(1, n + 1) for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, image_size: int, min_tiles: int = 1,
                 max_tiles: int = 6) -> tuple[int, int]:
    """InternVL's find_closest_aspect_ratio: the (cols, rows) grid for a width x height image."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in target_ratios(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size**2 * cols * rows:
            best = (cols, rows)  # same ratio, and the image is big enough for more tiles
    return best


def dynamic_tiles(image: Image.Image, image_size: int, min_tiles: int = 1, max_tiles: int = 6,
                  use_thumbnail: bool = False) -> list[Image.Image]:
    """InternVL's dynamic_preprocess: the S x S tiles of one image (+ thumbnail)."""
    cols, rows = closest_grid(*image.size, image_size, min_tiles, max_tiles)
    resized = image.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = []
    for i in range(cols * rows):  # raster order: left to right, then top to bottom
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def to_tensor(tile: Image.Image, image_size: int) -> torch.Tensor:
    """One RGB tile -> normalised (3, S, S) float32: bicubic resize, /255, ImageNet mean/std."""
    if tile.size != (image_size, image_size):
        tile = tile.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0)  # (S, S, 3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.permute(2, 0, 1) - mean) / std  # (3, S, S)


# Modes whose values are not 8-bit: 16-bit grayscale (PNG, TIFF), 32-bit integer and float.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (InternVL's `convert("RGB")`, alpha dropped), except that values
    beyond 8 bits are scaled, not clipped: 16-bit grayscale (I;16*) is divided by 257 (65535 ->
    255); 32-bit integer (I) likewise when any value exceeds 255 (older Pillow reads 16-bit
    PNGs as I), else kept; float (F) is taken as 0..1 when no value exceeds 1, else as
    0..255. Plain convert("RGB") would clip, turning a 16-bit photograph almost white."""
    if image.mode in HIGH_DEPTH_MODES:
        x = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and x.max(initial=0) > 255):
            x = x / 257.0
        elif image.mode == "F" and x.max(initial=0) <= 1.0:
            x = x * 255.0
        image = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for (else it warns); same RGB values
    return image.convert("RGB")


def open_rgb(image: str | Path | Image.Image) -> Image.Image:
    """A path or PIL image -> RGB PIL image (`to_rgb`: any mode, any size); errors name the
    path."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # loads the pixels, so decoding errors show here
    except Exception as e:  # PIL raises many types for a corrupt file
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def load_image(image: str | Path | Image.Image, image_size: int, dynamic: bool = False,
               max_tiles: int = 6, min_tiles: int = 1,
               use_thumbnail: bool = False) -> torch.Tensor:
    """Path or PIL image -> FloatTensor (tiles, 3, S, S), normalised with ImageNet mean/std."""
    img = open_rgb(image)
    tiles = (dynamic_tiles(img, image_size, min_tiles, max_tiles, use_thumbnail)
             if dynamic else [img])
    return torch.stack([to_tensor(t, image_size) for t in tiles])  # (tiles, 3, S, S)


def load_image_for(image: str | Path | Image.Image, cfg) -> torch.Tensor:
    """load_image with a SageConfig's fields: tile size and InternVL's dynamic tiling switches
    (dynamic_image_size, max/min_dynamic_patch, use_thumbnail) -> (tiles, 3, S, S)."""
    return load_image(image, cfg.vision.image_size, dynamic=cfg.dynamic_image_size,
                      max_tiles=cfg.max_dynamic_patch, min_tiles=cfg.min_dynamic_patch,
                      use_thumbnail=cfg.use_thumbnail)


class ImageCache:
    """load_image_for's tiles by file, kept in memory up to `max_bytes` (then no more are
    added: an epoch larger than the budget still hits on the part that fits). A training run
    reads the same files every epoch, SynthAD asks five questions of each image, and decoding
    plus normalising took 3-7 ms an image on 2 cores, 48 images in an average SFE step: a tenth
    of the step or more once InternViT's output is cached too (sage.models.feature_cache; both
    behind --vision_cache_gb).

    The key is the path with the file's size and modification time and the config's tiling,
    so a file rewritten during the run is read again. The tensor returned is shared between
    callers: read it, do not modify it in place (the collators concatenate, a copy).
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"ImageCache: max_bytes={max_bytes} must be > 0")
        self.max_bytes = max_bytes
        self.store: dict[tuple, torch.Tensor] = {}
        self.bytes = 0

    def load(self, path: str | Path, cfg) -> torch.Tensor:
        """load_image_for(path, cfg), from memory when this file was read before."""
        try:
            st = os.stat(path)
        except OSError:  # missing or unreadable: load_image_for's error names it
            return load_image_for(path, cfg)
        key = (str(path), st.st_size, st.st_mtime_ns, cfg.vision.image_size,
               cfg.dynamic_image_size, cfg.max_dynamic_patch, cfg.min_dynamic_patch,
               cfg.use_thumbnail)
        x = self.store.get(key)
        if x is None:
            x = load_image_for(path, cfg)
            size = x.numel() * x.element_size()
            if self.bytes + size <= self.max_bytes:
                self.store[key] = x
                self.bytes += size
        return x


def image_cache(gib: float) -> ImageCache | None:
    """An ImageCache of `gib` GiB, None for 0 (the scripts' --vision_cache_gb)."""
    return ImageCache(int(gib * 2**30)) if gib > 0 else None
