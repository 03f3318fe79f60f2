"""InternVL image preprocessing: shapes, ImageNet normalisation, dynamic tiling counts and order;
ImageCache (the same tiles, read once, a rewritten file read again, the budget).
Run: python -m pytest -q tests/data/test_images.py"""

import pytest
import torch
from PIL import Image

from sage.config import SageConfig
from sage.data.images import ImageCache, closest_grid, load_image, load_image_for, target_ratios


def test_constant_image_normalisation(tmp_path):
    # (v / 255 - mean) / std per channel: R (1 - 0.485) / 0.229 = 2.248908,
    # G (0 - 0.456) / 0.224 = -2.035714, B (128/255 - 0.406) / 0.225 = 0.426492
    path = tmp_path / "c.png"
    Image.new("RGB", (50, 30), (255, 0, 128)).save(path)
    x = load_image(path, 28)
    assert x.shape == (1, 3, 28, 28) and x.dtype == torch.float32
    want = torch.tensor([2.248908, -2.035714, 0.426492]).view(3, 1, 1).expand(3, 28, 28)
    torch.testing.assert_close(x[0], want, atol=1e-5, rtol=0)


def test_grayscale_and_rgba_become_rgb():
    for mode in ("L", "RGBA", "P"):
        assert load_image(Image.new(mode, (20, 20)), 14).shape == (1, 3, 14, 14)


def test_target_ratios_and_grid():
    grids = target_ratios(1, 6)
    assert all(1 <= c * r <= 6 for c, r in grids) and (3, 2) in grids and (4, 2) not in grids
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    # tie rule: (2,1) and (4,2) have the same ratio; the larger grid only for a big image
    assert closest_grid(128, 64, 32, 1, 8) == (4, 2)  # 8192 px > 0.5 * 32^2 * 8
    assert closest_grid(40, 20, 32, 1, 8) == (2, 1)  # 800 px is small


def test_wide_image_tiles(tmp_path):
    # aspect 4: the (4, 1) grid is exact -> 4 tiles, + 1 thumbnail
    img = Image.new("RGB", (1000, 250), (0, 0, 0))
    assert load_image(img, 32, dynamic=True, max_tiles=6).shape == (4, 3, 32, 32)
    assert load_image(img, 32, dynamic=True, max_tiles=6, use_thumbnail=True).shape[0] == 5
    assert load_image(img, 32, dynamic=True, max_tiles=2).shape[0] == 2  # best with <= 2
    assert load_image(img, 32, dynamic=False).shape[0] == 1
    # one tile: no thumbnail is added
    square = Image.new("RGB", (30, 30))
    assert load_image(square, 32, dynamic=True, use_thumbnail=True).shape[0] == 1


def test_tiles_in_raster_order():
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # right half blue
    x = load_image(img, 32, dynamic=True, max_tiles=2)
    assert x.shape[0] == 2
    assert x[0, 0].mean() > 2.0 and x[0, 2].mean() < -1.5  # left tile red
    assert x[1, 0].mean() < -1.5 and x[1, 2].mean() > 2.0  # right tile blue


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 14)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        load_image(bad, 14)


def test_image_cache_reads_each_file_once_and_again_when_rewritten(tmp_path, monkeypatch):
    import os

    import sage.data.images as images
    cfg = SageConfig.preset("tiny")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 30), (255, 0, 128)).save(a)
    Image.new("L", (30, 40), 7).save(b)
    reads = []
    real = images.load_image_for
    monkeypatch.setattr(images, "load_image_for", lambda p, c: reads.append(p) or real(p, c))
    cache = ImageCache(max_bytes=1 << 30)
    for path in (a, b, a, b, a):
        torch.testing.assert_close(cache.load(path, cfg), load_image_for(path, cfg),
                                   atol=0, rtol=0)
    assert reads == [a, b] and len(cache.store) == 2
    Image.new("RGB", (40, 30), (0, 255, 0)).save(a)  # rewritten: another mtime
    os.utime(a, ns=(1, 1))
    torch.testing.assert_close(cache.load(a, cfg), load_image_for(a, cfg), atol=0, rtol=0)
    assert reads == [a, b, a]
    with pytest.raises(FileNotFoundError, match="image not found"):
        cache.load(tmp_path / "missing.png", cfg)


def test_image_cache_stops_storing_at_the_budget(tmp_path):
    cfg = SageConfig.preset("tiny")
    S = cfg.vision.image_size
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (i, 0, 0)).save(paths[-1])
    cache = ImageCache(max_bytes=2 * 3 * S * S * 4)  # two fp32 tiles
    for p in paths:
        cache.load(p, cfg)
    assert len(cache.store) == 2 and cache.bytes == 2 * 3 * S * S * 4
    torch.testing.assert_close(cache.load(paths[2], cfg), load_image_for(paths[2], cfg))
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(0)
