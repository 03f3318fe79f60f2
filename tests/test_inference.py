"""Inference helpers (sage.inference): device moves, a config's image loading, and the one
collate -> generate -> decode path of chat, the fact asker and evaluate.py.
Run: python -m pytest -q tests/test_inference.py"""

import pytest
import torch
from PIL import Image

from sage.config import LLMConfig, SageConfig, VisionConfig
from sage.data.collate import Collator
from sage.data.images import load_image, load_image_for
from sage.inference import chat, generate_answers, model_device, to_device
from sage.models.sage import SageModel
from sage.tokenizer import Tokenizer

CORPUS = ["Is there a scratch on the washer?", "Yes. There is a scratch at the top-left.",
          "No. The capsule looks normal.", "Washers often show scratches and stains."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20) + "\n")
    return Tokenizer.train(d / "corpus.txt", d / "tok", vocab_size=300)


def build(tok, **kw) -> SageModel:
    """56 px tiles -> 4 LLM tokens per tile; dynamic tiling into up to 2 tiles + thumbnail."""
    cfg = SageConfig(vision=VisionConfig(image_size=56, patch_size=14, dim=32, n_layers=1,
                                         n_heads=2, ffn_dim=64),
                     llm=LLMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4,
                                   n_kv_heads=2, ffn_dim=64, max_seq_len=512),
                     n_facts=2, top_k=3, fusion_heads=2, max_fact_tokens=8,
                     dynamic_image_size=True, max_dynamic_patch=2, use_thumbnail=True, **kw)
    torch.manual_seed(0)
    model = SageModel(cfg)
    model.init_weights()
    model.tokenizer = tok
    return model.eval()


def test_to_device_and_model_device():
    batch = {"x": torch.zeros(2), "ids": ["a", "b"], "pixel_ref": None}
    moved = to_device(batch, "meta")
    assert moved["x"].device.type == "meta" and moved["ids"] == ["a", "b"]
    assert moved["pixel_ref"] is None and batch["x"].device.type == "cpu"  # a new dict
    assert model_device(torch.nn.Linear(1, 1).to("meta")).type == "meta"
    assert model_device(object()).type == "cpu"  # no parameters (a stand-in asker)


def test_load_image_for_uses_the_config_tiling(tok):
    cfg = build(tok).cfg
    wide = Image.new("RGB", (120, 60), (10, 200, 30))
    pix = load_image_for(wide, cfg)
    assert pix.shape == (3, 3, 56, 56)  # 2 x 1 tiles + thumbnail
    assert torch.equal(pix, load_image(wide, 56, dynamic=True, max_tiles=2, use_thumbnail=True))


def test_generate_answers_is_collate_generate_decode_in_order(tok):
    model = build(tok, facts_mode="none")
    imgs = [Image.new("RGB", (56, 56), c) for c in ((200, 0, 0), (0, 0, 200))]
    exs = [{"id": str(i), "question": q, "pixel_test": load_image_for(im, model.cfg)}
           for i, (im, q) in enumerate(zip(imgs, CORPUS[:2]))]
    got = generate_answers(model, exs, max_new_tokens=5)
    batch = Collator(tok, model.cfg, for_generation=True)(exs)  # by hand, independently
    want = [tok.decode(r).strip() for r in model.generate(batch, max_new_tokens=5).tolist()]
    assert got == want and len(got) == 2
    assert [generate_answers(model, [e], max_new_tokens=5)[0] for e in exs] == got  # greedy


def test_chat_is_one_example_through_the_same_path(tok):
    model = build(tok)  # facts_mode "fe"
    test, ref = Image.new("RGB", (120, 60), (90, 90, 90)), Image.new("RGB", (60, 60), (9, 9, 9))
    with pytest.raises(ValueError, match="facts_mode 'fe' needs facts"):
        chat(model, test, "Is there a scratch on the washer?")
    facts = ["Washers often show scratches.", "A normal washer is a flat ring."]
    said = chat(model, test, "Is there a scratch on the washer?", reference_image=ref,
                facts=facts, max_new_tokens=4)
    ex = {"id": "chat", "question": "Is there a scratch on the washer?", "facts": facts,
          "pixel_test": load_image_for(test, model.cfg),
          "pixel_ref": load_image_for(ref, model.cfg)}
    assert isinstance(said, str) and said == generate_answers(model, [ex], max_new_tokens=4)[0]
