"""weights/sage-tiny-base, the committed tiny base VLM: it loads in the InternVL2 layout, has
the tiny preset's shapes, and actually learned its pretraining task (naming the object and its
colour on freshly rendered SynthAD images it never saw, and answering Yes/No questions about
them) -- while knowing nothing of anomaly QA (it is a plain VLM: facts mode 'none')."""

from pathlib import Path

import numpy as np
import pytest
import torch

import sage
from sage.config import SageConfig
from sage.data.oracle import extract_decision
from sage.data.synthad import CATEGORIES, render, yes_no_questions
from sage.inference import chat

BASE = Path(__file__).resolve().parents[1] / "weights" / "sage-tiny-base"


@pytest.fixture(scope="module")
def model():
    return sage.load_pretrained(BASE).eval()


def test_layout_and_shapes(model):
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (BASE / f).is_file(), f
    tiny = SageConfig.preset("tiny")
    cfg = model.cfg
    assert (cfg.vision.dim, cfg.vision.n_layers, cfg.vision.image_size) == \
        (tiny.vision.dim, tiny.vision.n_layers, tiny.vision.image_size)
    assert (cfg.llm.dim, cfg.llm.n_layers, cfg.llm.n_heads, cfg.llm.n_kv_heads) == \
        (tiny.llm.dim, tiny.llm.n_layers, tiny.llm.n_heads, tiny.llm.n_kv_heads)
    assert cfg.facts_mode == "none"
    assert cfg.llm.vocab_size == model.llm.embed_tokens.weight.shape[0]


def test_names_unseen_renders_of_every_category(model):
    rng = np.random.default_rng(12345)             # not the generator's seed: new images
    right = 0
    for cat in CATEGORIES:
        v = int(rng.integers(len(cat.variants)))
        img = render(cat, v, model.cfg.vision.image_size, rng, 1.0)
        with torch.no_grad():
            obj = chat(model, img, "What object is shown in the image?", max_new_tokens=12)
            col = chat(model, img, f"What colour is the {cat.name}?", max_new_tokens=12)
        right += (cat.name in obj) + (cat.variants[v][0] in col)
    assert right >= 2 * len(CATEGORIES) - 2, right


def test_answers_yes_no_questions_on_unseen_renders(model):
    # "Is this a pcb?", "Is the washer a colour other than brass?": the answer needs the image
    # and the wording; 54/60 right on 30 renders when committed, 21/24 on these 12 (50% is
    # chance; 48% with the decision first)
    rng = np.random.default_rng(777)
    right = total = 0
    for i in range(12):
        cat = CATEGORIES[i % len(CATEGORIES)]
        v = int(rng.integers(len(cat.variants)))
        img = render(cat, v, model.cfg.vision.image_size, rng, 1.0)
        for q, a, _ in yes_no_questions(cat, cat.variants[v][0], rng):
            with torch.no_grad():
                said = chat(model, img, q, max_new_tokens=20)
            right += extract_decision(said) == extract_decision(a)
            total += 1
    assert right >= 0.8 * total, (right, total)
