"""Batching: right/left padding, answer-only labels, placeholder counts, facts, E-DPO pair layout.
Run: python -m pytest -q tests/data/test_collate.py"""

import dataclasses

import pytest
import torch

from sage.config import SageConfig
from sage.data.collate import Collator, EDPOCollator
from sage.data.prompts import FACT_PROMPTS
from sage.tokenizer import Tokenizer

CORPUS = ["Is there a scratch on the washer?", "Yes. There is a scratch at the top left.",
          "No. The surface is clean and matches the reference.", "Is the capsule cracked?",
          "Washers often show scratches, dents and stains.", "Facts: Above is the feature."
          ] + list(FACT_PROMPTS)


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Tokenizer:
    """A tiny sentencepiece tokenizer trained on a few sentences (< 0.1 s)."""
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 10) + "\n")
    return Tokenizer.train(d / "corpus.txt", d / "tok", vocab_size=400)


@pytest.fixture
def cfg() -> SageConfig:
    return SageConfig.preset("tiny", n_facts=3, max_fact_tokens=5)  # 64 image tokens per tile


def example(i, tiles=1, ref_tiles=1, n_facts=3, answer="Yes. There is a scratch."):
    return {"id": f"ex{i}", "question": "Is there a scratch on the washer?" + " Really?" * i,
            "answers": [answer, "Yes.", "No.", "No. The surface is clean."], "answer": answer,
            "facts": [f"Washers often show scratches {k}." for k in range(n_facts)],
            "pixel_test": torch.zeros(tiles, 3, 224, 224),
            "pixel_ref": None if ref_tiles is None else torch.ones(ref_tiles, 3, 224, 224)}


def answer_of(batch, b, tok):
    lab = batch["labels"][b]
    return lab[lab != -100].tolist()


def test_training_batch_right_padded_labels_on_answer(tok, cfg):
    exs = [example(0), example(3, answer="No. The surface is clean and matches the reference.")]
    batch = Collator(tok, cfg)(exs)
    ids, att = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == att.shape == batch["labels"].shape
    lengths = att.sum(1)
    for b, ex in enumerate(exs):
        n = int(lengths[b])
        assert att[b, :n].all() and not att[b, n:].any()  # right padding
        assert (ids[b, n:] == tok.pad_id).all() and (batch["labels"][b, n:] == -100).all()
        # labels: exactly the answer tokens + closing <|im_end|>, at the end of the sequence
        want = tok.encode(ex["answer"]) + [tok.im_end_id]
        assert answer_of(batch, b, tok) == want
        assert ids[b, n - len(want):n].tolist() == want
        assert (batch["labels"][b, :n - len(want)] == -100).all()
    assert batch["ids"] == ["ex0", "ex3"]


def test_generation_batch_left_padded(tok, cfg):
    exs = [example(0), example(4)]
    batch = Collator(tok, cfg, for_generation=True)(exs)
    ids, att = batch["input_ids"], batch["attention_mask"]
    assert (batch["labels"] == -100).all()
    assert att[:, -1].all() and not att[0, 0]  # the shorter prompt is padded on the LEFT
    suffix = tok.encode("<|im_start|>assistant\n")
    for b in range(2):
        n = int(att[b].sum())
        assert (ids[b, :ids.shape[1] - n] == tok.pad_id).all()
        assert ids[b, -len(suffix):].tolist() == suffix  # every row ends with the prompt end
    # prompt ids are exactly the training ids before the answer
    train = Collator(tok, cfg)(exs[:1])
    n_prompt = int((train["labels"][0] == -100).sum() - (1 - train["attention_mask"][0]).sum())
    gen_row = ids[0][att[0].bool()].tolist()
    assert gen_row == train["input_ids"][0, :n_prompt].tolist()


def test_placeholders_and_fact_tensors(tok, cfg):
    exs = [example(0, tiles=1), example(1, tiles=3, ref_tiles=2)]
    exs[1]["facts"][1] = "Washers often show scratches and dents and stains at the rim."
    batch = Collator(tok, cfg)(exs)
    ids = batch["input_ids"]
    n_img = (ids == tok.img_context_id).sum(1).tolist()
    assert n_img == [cfg.n_image_tokens * 1, cfg.n_image_tokens * 3] == [64, 192]
    assert (ids == tok.fact_context_id).sum(1).tolist() == [3, 3]
    assert batch["pixel_test"].shape == (4, 3, 224, 224)
    assert batch["tiles_test"].tolist() == [1, 3] and batch["tiles_ref"].tolist() == [1, 2]
    assert batch["pixel_ref"].shape == (3, 3, 224, 224)
    fid, fm = batch["fact_ids"], batch["fact_mask"]
    assert fid.shape == fm.shape and fid.shape[:2] == (2, 3) and fid.shape[2] <= 5
    for b, ex in enumerate(exs):
        for n in range(3):
            want = tok.encode(ex["facts"][n])[:cfg.max_fact_tokens]  # cut at max_fact_tokens
            k = int(fm[b, n].sum())
            assert fid[b, n, :k].tolist() == want and (fid[b, n, k:] == tok.pad_id).all()
    assert int(fm[1, 1].sum()) == 5  # the long sentence was cut


def test_fact_modes(tok, cfg):
    short = example(7, n_facts=2)
    with pytest.raises(ValueError, match="record 'ex7'.*3 fact sentence"):
        Collator(tok, cfg)([short])
    none = Collator(tok, cfg, facts_mode="none")([short])
    assert not (none["input_ids"] == tok.fact_context_id).any() and none["fact_ids"] is None
    hard = Collator(tok, cfg, facts_mode="hard")([short])
    text = tok.decode(hard["input_ids"][0].tolist())
    assert "Facts: Washers often show scratches 0. Washers often show scratches 1." in text
    assert not (hard["input_ids"] == tok.fact_context_id).any()


def test_zero_shot_and_mixed(tok, cfg):
    batch = Collator(tok, cfg)([example(0, ref_tiles=None), example(1, ref_tiles=None)])
    assert batch["pixel_ref"] is None and batch["tiles_ref"] is None
    with pytest.raises(ValueError, match="mixes one-shot and zero-shot.*ex1"):
        Collator(tok, cfg)([example(0), example(1, ref_tiles=None)])


def test_max_len_truncates_answer_only(tok, cfg):
    full = Collator(tok, cfg)([example(0)])["input_ids"].shape[1]
    cut = Collator(tok, cfg, max_len=full - 2)([example(0)])
    assert cut["input_ids"].shape[1] == full - 2 and (cut["labels"][0] != -100).sum() > 0
    with pytest.raises(ValueError, match="record 'ex0': the prompt alone"):
        Collator(tok, cfg, max_len=50)([example(0)])


def segment_answer(batch: dict, seq: int) -> list[int]:
    """The labelled tokens of packed sequence `seq` (its answer and closing <|im_end|>)."""
    b = int((batch["segments"] == seq).any(dim=1).nonzero()[0])
    keep = (batch["segments"][b] == seq) & (batch["labels"][b] != -100)
    return batch["labels"][b][keep].tolist()


def test_packed_rows_position_and_mask(tok, cfg):
    """A segment restarts at the prompt's last position and sees the prompt (without its last
    token, which the segment's first token repeats) and itself only."""
    ex = example(0)
    batch = EDPOCollator(tok, cfg).pack([ex], [[0, 2]])
    ids, pos, seg = batch["input_ids"][0], batch["position_ids"][0], batch["segments"][0]
    mask = batch["attention_mask"][0, 0]
    n = int((seg >= 0).nonzero()[0])  # prompt length
    first, second = ((seg == s).nonzero()[:, 0] for s in (0, 1))
    for span in (first, second):
        a = int(span[0])
        assert ids[a] == ids[n - 1] and pos[a] == n - 1  # the prompt's last token again
        assert pos[span].tolist() == list(range(n - 1, n - 1 + len(span)))
        assert mask[a, :n - 1].all() and not mask[a, n - 1]  # prompt minus its last token
    assert not mask[second][:, first].any() and not mask[first][:, second].any()
    assert mask[:n, :n].equal(torch.ones(n, n, dtype=torch.bool).tril())


def test_edpo_pairs_one_forward_layout(tok, cfg):
    e0, e1 = example(0), example(1, tiles=2)
    e0["answers"] = ["Yes. best answer.", "Yes. second.", "No. third.", "No. worst."]
    # S = (5, 3, 3, 1): H_2 = H_3 so the adjacent pair is ranks (1, 2) with dH_min = 0;
    # p = e^S / 191.302, H_1 = 0.196950, H_4 = 0.060444 -> dH_max = 0.136498
    e0["mle"] = [[5, 5, 5], [3, 3, 3], [3, 3, 3], [1, 1, 1]]
    # S = (5, 4.33, 2, 1): H = (0.2898, 0.3652, 0.1089, 0.0516), gaps (0.075, 0.256, 0.057)
    e1["mle"] = [[5, 5, 5], [5, 4, 4], [2, 2, 2], [1, 1, 1]]
    batch = EDPOCollator(tok, cfg)([e0, e1])
    M = batch["n_pairs"]
    assert M == 4 and batch["input_ids"].shape[0] == 2  # one packed row per instance
    assert batch["pair_index"].tolist() == [0, 0, 1, 1]
    assert batch["pair_kind"] == ["extreme", "adjacent", "extreme", "adjacent"]
    assert batch["pair_ranks"].tolist() == [[0, 3], [1, 2], [0, 3], [2, 3]]
    torch.testing.assert_close(batch["pair_delta_h"][:2], torch.tensor([0.136498, 0.0]),
                               atol=1e-5, rtol=0)
    # the answers each row needs, once: ranks (0, 1, 2, 3) of e0, (0, 2, 3) of e1
    assert batch["seq_ranks"].tolist() == [0, 1, 2, 3, 0, 2, 3] and batch["n_segments"] == 7
    assert batch["pair_w"].tolist() == [0, 1, 4, 5] and batch["pair_l"].tolist() == [3, 2, 6, 6]
    exs = [e0, e0, e1, e1]
    for m, (w, l) in enumerate(batch["pair_ranks"].tolist()):
        for seq, r in ((batch["pair_w"][m], w), (batch["pair_l"][m], l)):
            assert segment_answer(batch, int(seq)) == (tok.encode(exs[m]["answers"][r])
                                                       + [tok.im_end_id])
    # images once per instance
    assert batch["tiles_test"].tolist() == [1, 2] and batch["pixel_test"].shape[0] == 3
    assert batch["ids"] == ["ex0", "ex1"]
    dpo = EDPOCollator(tok, cfg, pairs="extreme")([e0, e1])
    assert dpo["n_pairs"] == 2 and dpo["pair_kind"] == ["extreme", "extreme"]
    del e1["mle"]
    with pytest.raises(ValueError, match="'ex1' has no 'mle'.*sage.mle score"):
        EDPOCollator(tok, cfg)([e0, e1])


def test_datasets_feed_the_collator(tok, cfg, tmp_path):
    from PIL import Image

    from sage.data.datasets import EDPODataset, GeneralDataset, SFEDataset

    Image.new("RGB", (300, 100), (9, 9, 9)).save(tmp_path / "t.png")
    Image.new("RGB", (50, 50), (9, 9, 9)).save(tmp_path / "r.png")
    rec = {"id": "a", "test_image": "t.png", "reference_image": "r.png", "question": "Any?",
           "answers": ["Yes. best.", "Yes.", "No.", "No. worst."], "label": "yes",
           "facts": ["One.", "Two.", "Three."], "mle": [[5, 5, 5], [4, 4, 4], [2, 2, 2],
                                                         [1, 1, 1]]}
    ex = SFEDataset([rec], tmp_path, cfg)[0]
    assert ex["answer"] == "Yes. best." and ex["pixel_test"].shape == (1, 3, 224, 224)
    assert ex["pixel_ref"].shape == (1, 3, 224, 224) and ex["facts"] == rec["facts"]
    tiled = dataclasses.replace(cfg, dynamic_image_size=True, use_thumbnail=True)
    assert SFEDataset([rec], tmp_path, tiled)[0]["pixel_test"].shape[0] == 3 + 1  # 3x1 grid
    zero = SFEDataset([rec], tmp_path, cfg, setting="zero-shot")[0]
    assert zero["pixel_ref"] is None
    batch = Collator(tok, cfg)([ex, SFEDataset([rec], tmp_path, cfg)[0]])
    assert batch["tiles_test"].tolist() == [1, 1] and batch["fact_ids"].shape[:2] == (2, 3)
    edpo = EDPOCollator(tok, cfg)([EDPODataset([rec], tmp_path, cfg)[0]])
    assert edpo["n_pairs"] == 2
    with pytest.raises(ValueError, match="'a' has no 'mle'.*python -m sage.mle score"):
        EDPODataset([{**rec, "mle": None}], tmp_path, cfg)
    with pytest.raises(ValueError, match="one-shot.*id 'a'"):
        SFEDataset([{**rec, "reference_image": None}], tmp_path, cfg)
    gen = GeneralDataset([{**rec, "answers": ["A caption."]}], tmp_path, cfg)[0]
    assert gen["answer"] == "A caption." and gen["pixel_ref"] is None
