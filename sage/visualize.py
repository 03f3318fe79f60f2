"""Patch-selection pictures (Eq. 1): test and reference side by side, the K selected test
patches outlined, and a heat map of 1 - s_i (how unlike the reference each test patch is).
Pillow only.

    visualize_selection(model, example, "test.png", "ref.png", "out/selection.png")

From the command line: `python -m sage.tools.visualize --model DIR --data DIR`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sage.data.images import open_rgb, to_rgb
from sage.kernels import topk_cosine


def heat_colour(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (black -> red -> yellow), shape (..., 3)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(2 * x, 0, 1)
    g = np.clip(2 * x - 1, 0, 1)
    return (np.stack([r, g, np.zeros_like(x)], -1) * 255).astype(np.uint8)


def selection_png(test_img: Image.Image, ref_img: Image.Image, scores: np.ndarray,
                  selected: list[int], grid: int, out: str | Path, size: int = 336) -> Path:
    """Write the picture. scores: s_i per test token in raster order (grid x grid);
    selected: token indices of the K chosen patches."""
    if scores.shape != (grid * grid,):
        raise ValueError(f"scores has shape {scores.shape}, expected ({grid * grid},)")
    test = to_rgb(test_img).resize((size, size), Image.BICUBIC)  # any mode, 16-bit scaled
    ref = to_rgb(ref_img).resize((size, size), Image.BICUBIC)
    heat = 1.0 - scores  # 1 - s_i: high where no reference token is similar
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / (span if span > 0 else 1.0)
    heat_img = Image.fromarray(heat_colour(heat.reshape(grid, grid))).resize(
        (size, size), Image.NEAREST)
    overlay = Image.blend(test, heat_img, 0.45)
    cell = size / grid
    for img in (test, overlay):
        draw = ImageDraw.Draw(img)
        for i in selected:
            r, c = divmod(int(i), grid)
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                           outline=(0, 255, 0), width=2)
    canvas = Image.new("RGB", (3 * size + 20, size), "white")
    for j, img in enumerate((test, ref, overlay)):
        canvas.paste(img, (j * (size + 10), 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


@torch.no_grad()
def visualize_selection(model, example: dict, test_image, reference_image, out) -> Path:
    """Run Eq. 1 of `model` on one example (single-tile test and reference) and draw it."""
    device = model.adapter.fc1.weight.device
    v_t = model.encode_images(example["pixel_test"][:1].to(device))  # (1, P, C)
    v_r = model.encode_images(example["pixel_ref"][:1].to(device))  # (1, R, C)
    P = v_t.shape[1]
    # k = P: every test token's score, sorted; scatter back to raster order
    idx, s, _ = topk_cosine(v_t, v_r, P, mode=model.cfg.selection)
    scores = torch.empty(P).scatter_(0, idx[0].cpu(), s[0].cpu()).numpy()
    selected = idx[0, :model.cfg.top_k].tolist()
    return selection_png(open_rgb(test_image), open_rgb(reference_image), scores, selected,
                         int(P**0.5), out)


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.visualize` "
                     "(--help for usage)")
