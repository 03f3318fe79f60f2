"""Perception pretraining of the tiny InternViT: the stand-in for InternViT-6B's own pretraining.

The real pipeline starts from InternViT-6B, whose features already tell a scratch from a clean
surface on any object (web-scale pretraining). A random tiny InternViT does not: frozen, as
docs/design.md §2 keeps it in SFE, it leaves nothing for Eq. 1 to select and nothing for Eq. 2 to
fuse (docs/experiments.md, "Diagnostics of the perception problem"). This module gives the
tiny tower that general skill before the base VLM is pretrained on top of it, with generic
supervision on freshly rendered SynthAD objects (every category, none of the QA splits' images):

- per patch: which surface mark covers it, if any (none / scratch / hole / crack / stain /
  missing part), read off the pixel difference between the same shot drawn with and without
  the mark, so the labels are exact;
- per image (mean-pooled patches): the object category and its colour.

The heads are linear on the last block's patch tokens (`select_layer = -1`, what the adapter
reads), so the tower must make marks linearly visible in the features the base VLM sees.
Nothing here knows about anomalies, references or questions.

    python -m sage.tools.perception --out runs/vit   # 6,000 renders, 2,400 steps: ~15 min, 2 cores
    python -m sage.tools.pretrain --vision runs/vit ...                 # base VLM on top
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sage.config import VisionConfig
from sage.data.images import to_tensor
from sage.data.synthad import CATEGORIES, REGIONS, render
from sage.diagnose import auroc
from sage.models.intern_vit import InternViT

MARKS = ("none", "scratch", "hole", "crack", "stain", "missing part")  # per-patch classes
COLOURS = tuple(sorted({name for c in CATEGORIES for name, _ in c.variants}))
CHANGED = 30  # summed |RGB difference| above which a pixel belongs to the mark
COVER = 0.08  # share of a patch's pixels a mark must cover to label the patch


def patch_labels(changed: np.ndarray, patch: int, mark: int) -> np.ndarray:
    """(S, S) bool mask of changed pixels -> (P,) int labels: `mark` where it covers a patch."""
    g = changed.shape[0] // patch
    cover = changed[:g * patch, :g * patch].reshape(g, patch, g, patch).mean(axis=(1, 3))
    return np.where(cover.reshape(-1) >= COVER, mark, 0)  # (P,) raster order, like the tokens


def render_sample(rng: np.random.Generator, size: int, patch: int, p_mark: float = 0.6):
    """One fresh shot -> (PIL image, (P,) patch labels, category index, colour index)."""
    ci = int(rng.integers(len(CATEGORIES)))
    cat = CATEGORIES[ci]
    v = int(rng.integers(len(cat.variants)))
    scale = float(rng.choice([0.9, 1.0]))
    mark = int(rng.integers(1, len(MARKS))) if rng.random() < p_mark else 0
    kw = {}
    if MARKS[mark] == "missing part":
        kw["missing"] = cat.components[int(rng.integers(len(cat.components)))][0]
    elif mark:
        kw.update(defect=MARKS[mark], region=REGIONS[int(rng.integers(len(REGIONS)))])
    # the clean twin consumes the same draws up to the mark, so it is the same shot
    twin = copy.deepcopy(rng)
    img = render(cat, v, size, rng, scale, **kw)
    labels = np.zeros((size // patch) ** 2, dtype=np.int64)
    if mark:
        clean = render(cat, v, size, twin, scale)
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(clean, np.int16)).sum(-1)
        labels = patch_labels(diff > CHANGED, patch, mark)
    return img, labels, ci, COLOURS.index(cat.variants[v][0])


def make_pool(n: int, cfg: VisionConfig, seed: int) -> dict[str, torch.Tensor]:
    """n rendered samples as tensors: pixels (n, 3, S, S), marks (n, P), category, colour (n,)."""
    rng = np.random.default_rng(seed)
    pix, marks, cats, cols = [], [], [], []
    for _ in range(n):
        img, lab, ci, co = render_sample(rng, cfg.image_size, cfg.patch_size)
        pix.append(to_tensor(img, cfg.image_size))
        marks.append(torch.from_numpy(lab))
        cats.append(ci)
        cols.append(co)
    return {"pixels": torch.stack(pix), "marks": torch.stack(marks),
            "category": torch.tensor(cats), "colour": torch.tensor(cols)}


class PerceptionHeads(nn.Module):
    """Linear probes trained with the tower: marks per patch, category and colour per image."""

    def __init__(self, dim: int):
        super().__init__()
        self.mark = nn.Linear(dim, len(MARKS))
        self.category = nn.Linear(dim, len(CATEGORIES))
        self.colour = nn.Linear(dim, len(COLOURS))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """h (B, P, C) patch tokens -> logits {mark (B, P, 6), category (B, 8), colour (B, 12)}."""
        pooled = h.mean(1)  # (B, C)
        return {"mark": self.mark(h), "category": self.category(pooled),
                "colour": self.colour(pooled)}


def perception_loss(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
    """Marked and clean patches weigh half each (marks cover ~3% of patches), + the two
    image-level cross-entropies."""
    ce = F.cross_entropy(logits["mark"].flatten(0, 1), batch["marks"].flatten(),
                         reduction="none")  # (B*P,)
    marked = batch["marks"].flatten() > 0
    mark_loss = ce[~marked].mean()
    if marked.any():
        mark_loss = 0.5 * mark_loss + 0.5 * ce[marked].mean()
    return (mark_loss + F.cross_entropy(logits["category"], batch["category"])
            + F.cross_entropy(logits["colour"], batch["colour"]))


def patch_tokens(vit: InternViT, pixels: torch.Tensor) -> torch.Tensor:
    return vit(pixels, select_layer=-1)[:, 1:]  # drop CLS: (B, P, C)


@torch.no_grad()
def evaluate(vit: InternViT, heads: PerceptionHeads, pool: dict, batch: int = 100) -> dict:
    """Held-out figures. Marks as AUROCs of P(marked) = 1 - P(none): per patch, and per image
    from its most marked-looking patch (0.5: blind, 1: every mark seen), and the accuracy of
    the patch argmax on the marked patches (which mark); category and colour accuracy."""
    was = vit.training
    vit.eval()
    p_mark, kind, cat, col = [], [], [], []
    for i in range(0, len(pool["pixels"]), batch):
        logits = heads(patch_tokens(vit, pool["pixels"][i:i + batch]))
        p_mark.append(1 - logits["mark"].softmax(-1)[..., 0])  # (b, P)
        kind.append(logits["mark"][..., 1:].argmax(-1) + 1)
        cat.append(logits["category"].argmax(-1))
        col.append(logits["colour"].argmax(-1))
    vit.train(was)
    p_mark, kind = torch.cat(p_mark), torch.cat(kind)
    truth = pool["marks"] > 0  # (n, P)
    image, score = truth.any(1), p_mark.amax(1)
    has_both = bool(image.any()) and not bool(image.all())
    return {"image_auroc": auroc(score[image], score[~image]) if has_both else float("nan"),
            "patch_auroc": auroc(p_mark[truth], p_mark[~truth]) if has_both else float("nan"),
            "mark_kind": ((kind == pool["marks"])[truth].float().mean().item()
                          if truth.any() else float("nan")),
            "category": (torch.cat(cat) == pool["category"]).float().mean().item(),
            "colour": (torch.cat(col) == pool["colour"]).float().mean().item()}


def pretrain(vit: InternViT, train: dict, steps: int, lr: float = 1e-3, batch: int = 32,
             held_out: dict | None = None, log_every: int = 100, seed: int = 0) -> list[dict]:
    """AdamW on tower + heads over random batches of `train`; -> the logged metrics."""
    torch.manual_seed(seed)
    heads = PerceptionHeads(vit.cfg.dim)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    vit.train()
    log, t0 = [], time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # linear warmup over 5%, then cosine to 0
            w = min(1.0, step / max(1, steps // 20))
            group["lr"] = lr * w * 0.5 * (1 + np.cos(np.pi * step / steps))
        i = torch.randint(0, len(train["pixels"]), (batch,))
        b = {k: v[i] for k, v in train.items()}
        loss = perception_loss(heads(patch_tokens(vit, b["pixels"])), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            row = {"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}
            if held_out is not None:
                row.update({k: round(v, 4) for k, v in evaluate(vit, heads, held_out).items()})
            log.append(row)
            print(json.dumps(row), flush=True)
    vit.eval()
    return log


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.perception` "
                     "(--help for usage)")
