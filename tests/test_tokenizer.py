# Tokenizer: specials, Hermes-2, label mask, added ids. python -m pytest -q tests/test_tokenizer.py
import json
import pickle
import random
import shutil

import pytest
import sentencepiece as spm

from sage.tokenizer import (BOS, EOS, FACT_CONTEXT, IGNORE_INDEX, IM_END, IM_START,
                            SPECIAL_TOKENS, UNK, Tokenizer)

YI_TOKENS = (UNK, BOS, EOS, IM_START, IM_END)  # the specials Yi's own tokenizer.model has
# InternVL2-style added tokens: ids far beyond the sentencepiece vocabulary, like 64000.
INTERNVL_ADDED = {"<IMG_CONTEXT>": 64000, "<img>": 64001, "</img>": 64002, "<quad>": 64003,
                  "</quad>": 64004, "<ref>": 64005, "</ref>": 64006, "<box>": 64007,
                  "</box>": 64008}

WORDS = ("the a washer capsule screw tile cable board scratch hole crack stain colour missing "
         "component top left right bottom centre region is there any defect on this yes no "
         "image shows normal anomalous reference product surface visible damage user "
         "assistant system above feature related to anomaly facts").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."
             for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(corpus, tmp_path_factory):
    """Tiny-preset style: every special token is a sentencepiece piece."""
    return Tokenizer.train(corpus, tmp_path_factory.mktemp("tok_full"), vocab_size=600)


@pytest.fixture(scope="session")
def yi_model(corpus, tmp_path_factory):
    """A Yi-like tokenizer.model: only Yi's specials; InternVL2's tokens must come from JSON."""
    out = tmp_path_factory.mktemp("tok_yi")
    Tokenizer.train(corpus, out, vocab_size=500, special_tokens=YI_TOKENS)
    return out / "tokenizer.model"


def _dir_with_model(tmp_path, yi_model):
    shutil.copy(yi_model, tmp_path / "tokenizer.model")
    return tmp_path


def _decoder_config(tokens):
    entries = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in tokens.items()}
    return {"added_tokens_decoder": entries, "tokenizer_class": "LlamaTokenizer"}


# ----------------------------------------------------------------------------- special tokens

def test_special_tokens_are_single_ids(tok, yi_model):
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_file))  # independent lookup
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [sp.piece_to_id(token)], token
        assert sp.id_to_piece(tok.token_to_id(token)) == token
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # Yi's layout for these three
    assert tok.stop_ids == (tok.eos_id, tok.im_start_id, tok.im_end_id)
    assert tok.pad_id == tok.unk_id and tok.pad_id not in tok.stop_ids


def test_special_token_inside_sentence_stays_whole(tok):
    text = "Look at<IMG_CONTEXT>this<|im_end|>and <FACT_CONTEXT><FACT_CONTEXT> now"
    ids = tok.encode(text)
    assert ids.count(tok.img_context_id) == 1 and ids.count(tok.im_end_id) == 1
    assert ids.count(tok.fact_context_id) == 2
    assert tok.decode(ids, skip_special=False) == text
    # Legacy chunking: the plain text between specials is encoded on its own.
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_file))
    assert tok.encode("a scratch<|im_end|>hole") == (
        sp.encode("a scratch") + [tok.im_end_id] + sp.encode("hole"))


def test_no_dummy_prefix_after_special(tok):
    # Documented choice (Yi: add_dummy_prefix = false): "user" after <|im_start|> has no "▁".
    ids = tok.encode("<|im_start|>user\n")
    assert ids[0] == tok.im_start_id
    assert not tok.id_to_token(ids[1]).startswith("\u2581")
    assert tok.decode(ids[1:]) == "user\n"


def test_decode_skips_special_by_default(tok):
    ids = tok.encode("<|im_start|>user\nhole<|im_end|>")
    assert tok.decode(ids) == "user\nhole"
    with pytest.raises(ValueError, match="12345"):
        tok.decode([12345])


# ----------------------------------------------------------------------------- template

# InternVL's "Hermes-2" template as InternVL publishes it (OpenGVLab/InternVL,
# internvl_chat/internvl/conversation.py, register_conv_template(Conversation(name='Hermes-2',
# ...)), written out here as data: system_template '<|im_start|>system\n{system_message}',
# system_message below, roles ('<|im_start|>user\n', '<|im_start|>assistant\n'),
# sep_style MPT, sep '<|im_end|>'. MPT style: system prompt + sep, then role + message + sep
# for each message, and the bare role for the turn left open (message None).
HERMES2 = {
    "system_template": "<|im_start|>system\n{system_message}",
    "system_message": "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                      "是一个有用无害的人工智能助手。",
    "roles": ("<|im_start|>user\n", "<|im_start|>assistant\n"),
    "sep": "<|im_end|>",
}


def internvl_get_prompt(messages, system_message=HERMES2["system_message"]):
    """The MPT separator style of InternVL's Conversation.get_prompt, from its definition."""
    out = HERMES2["system_template"].format(system_message=system_message) + HERMES2["sep"]
    for role, message in messages:
        out += role + message + HERMES2["sep"] if message else role
    return out


def test_render_prompt_equals_internvl_hermes2():
    from sage.names import HERMES2_SYSTEM_MESSAGE
    from sage.tokenizer import render_prompt
    user, asst = HERMES2["roles"]
    q = "<img><IMG_CONTEXT></img>\nIs there a scratch?"
    assert HERMES2_SYSTEM_MESSAGE == HERMES2["system_message"]
    assert render_prompt(q) == internvl_get_prompt([(user, q), (asst, None)])
    # training: InternVL's preprocessing renders the answer turn closed by the separator
    assert render_prompt(q, answer="No.") == internvl_get_prompt([(user, q), (asst, "No.")])
    for system in ("Be brief.", ""):  # a set message; an empty one still renders the turn
        assert render_prompt(q, system=system) == internvl_get_prompt([(user, q), (asst, None)],
                                                                      system)
    assert render_prompt(q, system="") == (
        "<|im_start|>system\n<|im_end|><|im_start|>user\n" + q +
        "<|im_end|><|im_start|>assistant\n")


def test_render_prompt_without_system_turn(tok):
    # system None: SAGE's tiny base, pretrained without a system turn (docs/design.md §5)
    assert tok.render_prompt("Is there a scratch?", system=None) == (
        "<|im_start|>user\nIs there a scratch?<|im_end|><|im_start|>assistant\n")
    assert tok.render_prompt("Q?", system=None, answer="No.") == (
        "<|im_start|>user\nQ?<|im_end|><|im_start|>assistant\nNo.<|im_end|>")


def test_config_system_message_is_the_rendered_one(tmp_path):
    from sage.config import SageConfig
    big, tiny = SageConfig.preset("internvl2-40b"), SageConfig.preset("tiny")
    assert big.system_message == HERMES2["system_message"] and tiny.system_message is None
    for cfg in (big, tiny, SageConfig.preset("tiny", system_message="Be brief.")):
        cfg.save(tmp_path)
        assert SageConfig.from_pretrained(tmp_path).system_message == cfg.system_message


def test_encode_chat_inference_prompt(tok):
    ids, labels = tok.encode_chat("Is there a hole?", system="Be brief.")
    assert ids == tok.encode("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"
                             "Is there a hole?<|im_end|><|im_start|>assistant\n")
    assert labels == [IGNORE_INDEX] * len(ids)
    tail = [tok.im_start_id] + tok.encode("assistant\n")
    assert ids[-len(tail):] == tail


def test_encode_chat_labels_cover_only_answer_and_im_end(tok):
    user = "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nIs there a scratch on the washer?"
    answer = "Yes. There is a scratch at the top left."
    ids, labels = tok.encode_chat(user, answer=answer)
    prompt_ids, _ = tok.encode_chat(user)
    assert len(ids) == len(labels)
    assert ids[:len(prompt_ids)] == prompt_ids  # training ids = inference prompt + answer
    assert labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    labelled = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):] == labelled
    assert tok.decode(labelled, skip_special=False) == answer + "<|im_end|>"
    assert labelled[-1] == tok.im_end_id


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("text", [
    "Is there a scratch on the washer?",
    "  two  spaces, a\ttab,\nnew lines\n\nand a trailing space ",
    "Ünïcödé never seen in training: 検査 ✓ 42%",
    "",
])
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    text = "<img><IMG_CONTEXT></img>\nA stain? Yes."
    assert clone.encode(text) == tok.encode(text) and clone.vocab_size == tok.vocab_size


# ----------------------------------------------------------------------------- added tokens

def _check_internvl_ids(t, n_pieces):
    assert t.n_pieces == n_pieces < 64000
    assert t.img_context_id == 64000 and (t.img_start_id, t.img_end_id) == (64001, 64002)
    assert t.fact_context_id == 64009  # next free id: max id + 1
    assert t.vocab_size == 64010
    assert t.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img><box>") == [
        64001, 64000, 64000, 64002, 64007]
    text = "user\n<img><IMG_CONTEXT></img>\n<FACT_CONTEXT>Is it <ref>ok</ref>?"
    assert t.decode(t.encode(text), skip_special=False) == text
    assert t.decode(t.encode(text)) == "user\n\nIs it ok?"


def test_added_tokens_json(tmp_path, yi_model):
    d = _dir_with_model(tmp_path, yi_model)
    (d / "added_tokens.json").write_text(json.dumps(INTERNVL_ADDED))
    t = Tokenizer.from_pretrained(d)
    _check_internvl_ids(t, spm.SentencePieceProcessor(model_file=str(yi_model)).get_piece_size())


def test_tokenizer_config_added_tokens_decoder(tmp_path, yi_model):
    d = _dir_with_model(tmp_path, yi_model)
    sp = spm.SentencePieceProcessor(model_file=str(yi_model))
    base = {t: sp.piece_to_id(t) for t in YI_TOKENS}  # real configs list these too
    (d / "tokenizer_config.json").write_text(json.dumps(_decoder_config(base | INTERNVL_ADDED)))
    _check_internvl_ids(Tokenizer.from_pretrained(d), sp.get_piece_size())


def test_both_formats_must_agree(tmp_path, yi_model):
    d = _dir_with_model(tmp_path, yi_model)
    (d / "added_tokens.json").write_text(json.dumps(INTERNVL_ADDED))
    (d / "tokenizer_config.json").write_text(json.dumps(_decoder_config(INTERNVL_ADDED)))
    assert Tokenizer.from_pretrained(d).img_context_id == 64000
    (d / "tokenizer_config.json").write_text(
        json.dumps(_decoder_config(INTERNVL_ADDED | {"<IMG_CONTEXT>": 64100})))
    with pytest.raises(ValueError, match="tokenizer_config.json.*added_tokens.json"):
        Tokenizer.from_pretrained(d)


def test_longest_added_token_wins(yi_model):
    t = Tokenizer(yi_model, added_tokens={"<x>": 64000, "<x><y>": 64001})
    assert t.encode("a<x><y>b<x>") == t.encode("a") + [64001] + t.encode("b") + [64000]
    with pytest.raises(ValueError, match="share id 64000"):
        Tokenizer(yi_model, added_tokens={"<x>": 64000, "<z>": 64000})


def test_fact_context_id_stable_across_save_load(tmp_path, yi_model):
    (tmp_path / "src").mkdir()
    src = _dir_with_model(tmp_path / "src", yi_model)
    (src / "added_tokens.json").write_text(json.dumps(INTERNVL_ADDED))
    first = Tokenizer.from_pretrained(src)
    first.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "added_tokens.json").read_text())
    assert saved[FACT_CONTEXT] == first.fact_context_id == 64009
    # Add a token after the save: a fresh assignment would now move FACT_CONTEXT; the saved one
    # must not.
    saved["<extra>"] = 64050
    (tmp_path / "saved" / "added_tokens.json").write_text(json.dumps(saved))
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert again.fact_context_id == 64009 and again.vocab_size == 64051
    assert again.encode("<FACT_CONTEXT><IMG_CONTEXT>") == [64009, 64000]


def test_trained_fact_context_is_a_piece_and_save_is_stable(tok, tmp_path):
    assert tok.fact_context_id < tok.n_pieces and tok.added_tokens == {}
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {}  # nothing beyond
    assert Tokenizer.from_pretrained(tmp_path).special_tokens == tok.special_tokens


# ----------------------------------------------------------------------------- training

def test_train_is_deterministic_and_within_vocab(corpus, tok, yi_model, tmp_path):
    again = Tokenizer.train(corpus, tmp_path, vocab_size=600)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.model_file.read_bytes()
    assert again.vocab_size == tok.vocab_size <= 600
    yi = Tokenizer.from_pretrained(yi_model.parent)  # FACT_CONTEXT added after the pieces
    assert yi.fact_context_id == yi.n_pieces and yi.vocab_size <= 500


# ----------------------------------------------------------------------------- bad input

def test_missing_model_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        Tokenizer(tmp_path / "nothere.model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.model")):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,content", [
    ("added_tokens.json", "{not json"),
    ("added_tokens.json", '["<img>", 64001]'),
    ("added_tokens.json", '{"<img>": "64001"}'),
    ("added_tokens.json", '{"<img>": -1}'),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"x": {"content": "<img>"}}}'),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"64001": {"text": "<img>"}}}'),
])
def test_malformed_added_tokens_name_file(tmp_path, yi_model, name, content):
    d = _dir_with_model(tmp_path, yi_model)
    (d / name).write_text(content)
    with pytest.raises(ValueError, match=name):
        Tokenizer.from_pretrained(d)
