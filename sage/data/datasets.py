"""Map-style datasets that turn validated records (sage.data.schema) into examples for collate.

An example is the record's fields plus the image tiles:

    pixel_test  FloatTensor (tiles_t, 3, S, S)   test image tiles (sage.data.images)
    pixel_ref   FloatTensor (tiles_r, 3, S, S)   reference tiles; None in the zero-shot setting
    answer      str                              the SFE target: the best-ranked answers[0]

SFEDataset (Stage 1, Eq. 8), EDPODataset (Stage 2, Eq. 3-7: all L ranked answers + cached MLE
scores), GeneralDataset (kind "general" image-text pairs: no reference, single answer).

    ds = SFEDataset(load_jsonl("train.jsonl"), "data/synthad", cfg, setting="one-shot")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from sage.config import SageConfig
from sage.data.images import ImageCache, load_image_for

SETTINGS = ("one-shot", "zero-shot")


class RecordDataset(Dataset):
    """Records + image loading shared by the three datasets."""

    def __init__(self, records: list[dict], root: str | Path, cfg: SageConfig,
                 setting: str = "one-shot", images: ImageCache | None = None):
        self.images = images  # decoded tiles shared across datasets and epochs (or None)
        if setting not in SETTINGS:
            raise ValueError(f"setting={setting!r}: expected one of {SETTINGS}")
        self.records, self.root, self.cfg, self.setting = records, Path(root), cfg, setting
        if setting == "one-shot":
            missing = [r["id"] for r in records if not r.get("reference_image")]
            if missing:
                raise ValueError(f"setting 'one-shot' needs a reference_image; {len(missing)} "
                                 f"record(s) have none, e.g. id {missing[0]!r} (use "
                                 "setting='zero-shot')")

    def __len__(self) -> int:
        return len(self.records)

    def load(self, rel: str) -> torch.Tensor:
        """Record image path (relative to root) -> (tiles, 3, S, S) with the config's tiling
        (from self.images when set: shared, not to be modified in place)."""
        if self.images is not None:
            return self.images.load(self.root / rel, self.cfg)
        return load_image_for(self.root / rel, self.cfg)

    def example(self, i: int) -> dict:
        rec = self.records[i]
        ex = dict(rec)
        ex["pixel_test"] = self.load(rec["test_image"])
        ex["pixel_ref"] = self.load(rec["reference_image"]) if self.setting == "one-shot" else None
        return ex


class SFEDataset(RecordDataset):
    """Stage 1 (SFE): example = record + tiles + answer = answers[0] (best ranked)."""

    def __getitem__(self, i: int) -> dict:
        ex = self.example(i)
        ex["answer"] = ex["answers"][0]
        return ex


class EDPODataset(RecordDataset):
    """Stage 2 (E-DPO): example = record + tiles, with all ranked answers and its `mle`
    sub-scores (L, 3), which sage.losses turns into the pair choice (Eq. 3-5)."""

    def __init__(self, records: list[dict], root: str | Path, cfg: SageConfig,
                 setting: str = "one-shot", images: ImageCache | None = None):
        super().__init__(records, root, cfg, setting, images)
        for r in records:
            if r.get("mle") is None:
                raise ValueError(f"record {r['id']!r} has no 'mle' judge scores (needed by "
                                 "E-DPO, Eq. 3): run python -m sage.mle score")

    def __getitem__(self, i: int) -> dict:
        ex = self.example(i)
        ex["mle"] = torch.tensor(ex["mle"], dtype=torch.float32)  # (L, 3)
        return ex


class GeneralDataset(RecordDataset):
    """kind "general" records (pretraining): test image only, answer = answers[0].

    Pair it with `Collator(..., facts_mode="none")`: general records carry no facts.
    """

    def __init__(self, records: list[dict], root: str | Path, cfg: SageConfig,
                 images: ImageCache | None = None):
        super().__init__(records, root, cfg, setting="zero-shot", images=images)

    def __getitem__(self, i: int) -> dict:
        ex = self.example(i)
        ex["answer"] = ex["answers"][0]
        return ex
