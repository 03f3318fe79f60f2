"""Data: JSONL records (schema), image tiling (images), datasets, batching (collate), the
resumable sampler (sampler), prompt assembly (prompts) and importers (convert)."""

from sage.data.collate import Collator, EDPOCollator
from sage.data.datasets import EDPODataset, GeneralDataset, SFEDataset
from sage.data.images import load_image
from sage.data.sampler import ResumableDistributedSampler
from sage.data.schema import SkipReport, load_jsonl, validate_record, write_jsonl

__all__ = ["Collator", "EDPOCollator", "EDPODataset", "GeneralDataset", "SFEDataset",
           "load_image", "ResumableDistributedSampler", "SkipReport", "load_jsonl",
           "validate_record", "write_jsonl"]
