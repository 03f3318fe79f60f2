"""Answering questions with a loaded model: what chat, the fact asker (sage.facts) and
evaluate.py share (docs/design.md §1, §3).

    examples -> Collator(for_generation=True) -> to_device -> model.generate (Eq. 10,
    KV cache) -> tokenizer.decode (special tokens dropped, stop and pad included) -> answers

An example is a dict as sage.data.datasets gives it: `question`, `pixel_test` (tiles, 3, S, S),
optionally `pixel_ref` (None: zero-shot) and `facts` (list of str, facts_mode "fe"/"hard").
Images of a model come from `load_image_for(image, model.cfg)` (sage.data.images).

    model = sage.load_pretrained("weights/sage-tiny-base")
    print(chat(model, "washer.png", "Is there a scratch on the washer?"))
"""

from __future__ import annotations

import torch

from sage.checkpoint import local_tensor
from sage.data.collate import Collator
from sage.data.images import load_image_for

__all__ = ["to_device", "model_device", "nonfinite_parameters", "load_image_for",
           "generate_answers", "chat"]


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Every tensor of a batch dict on `device`; other values (ids, lists, None) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    p = next(iter(params), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def nonfinite_parameters(model) -> list[str]:
    """Names of parameters holding NaN or inf (this rank's shard of a sharded model): such a
    checkpoint generates empty or garbage answers without any other sign."""
    return [n for n, p in model.named_parameters()
            if not torch.isfinite(local_tensor(p)).all()]


@torch.no_grad()
def generate_answers(model, examples: list[dict], collate: Collator | None = None,
                     **gen) -> list[str]:
    """One answer per example, in order: collate -> generate -> decode.

    model: exposes `cfg`, `tokenizer` and `generate(batch, **gen)` as SageModel does.
    collate: a Collator built with for_generation=True (default: the model's cfg).
    gen: max_new_tokens, temperature, top_p, generator, use_cache, decode (SageModel.generate).
    """
    if collate is None:
        collate = Collator(model.tokenizer, model.cfg, for_generation=True)
    batch = to_device(collate(examples), model_device(model))
    out = model.generate(batch, **gen)  # (B, n_new), stop token then pad_id after it
    return [model.tokenizer.decode(row).strip() for row in out.tolist()]


def chat(model, test_image, question: str, reference_image=None,
         facts: list[str] | None = None, **gen) -> str:
    """One answer to one question; images are paths or PIL images, facts a list of str.

    facts_mode "fe" / "hard" (model.cfg) need the image's fact sentences (sage.facts); without
    a reference image the model answers zero-shot.
    """
    mode = model.cfg.facts_mode
    if mode in ("fe", "hard") and not facts:
        raise ValueError(f"facts_mode {mode!r} needs facts (a list of fact sentences); "
                         "produce them with sage.facts (python -m sage.tools.facts)")
    example = {"id": "chat", "question": question, "facts": facts or [],
               "pixel_test": load_image_for(test_image, model.cfg),
               "pixel_ref": (None if reference_image is None
                             else load_image_for(reference_image, model.cfg))}
    return generate_answers(model, [example], **gen)[0]
