"""Tokenizer: sentencepiece with whole special tokens and the Hermes-2 chat template
(docs/design.md §5).

The real model (InternVL2-40B) uses Nous-Hermes-2-Yi-34B's `tokenizer.model` (64000 pieces,
`<unk>` 0, `<|startoftext|>` 1, `<|endoftext|>` 2, `<|im_start|>` 6, `<|im_end|>` 7) plus the
tokens InternVL2 adds after it (`<IMG_CONTEXT>` 64000, grounding tokens), listed in
`added_tokens.json` and/or `tokenizer_config.json` "added_tokens_decoder". The tiny model uses
a sentencepiece model trained by `Tokenizer.train`. Every id is looked up by its piece, never
hard-coded.

Encoding follows transformers' slow `LlamaTokenizer` in "legacy" mode, which is how InternVL2
loads Yi: the text is split on special tokens (longest first, so no special token is ever cut)
and every plain chunk is encoded by sentencepiece on its own. No BOS/EOS is added.

Dummy prefix (project choice, documented here). Whether sentencepiece puts a "▁" in front of a
chunk (at the start of the text and after every special token) is left to the model's own
`normalizer_spec.add_dummy_prefix`, exactly as the slow tokenizer does; this wrapper never
inserts or strips one. As far as we can determine, Yi's `tokenizer.model` has
add_dummy_prefix = false: the slow tokenizer encodes "<|im_end|>\\n" as [7, 144] with no "▁"
piece, and the extra "▁" (id 59568) that older fast tokenizers produced was a converter bug
fixed in transformers 4.42 (01-ai/Yi-1.5 issue #37). So "<|im_start|>user\\n" becomes
[<|im_start|>, "user", "\\n"], never "▁user". `Tokenizer.train` also sets add_dummy_prefix =
false (and keeps whitespace as is), so the tiny model renders the template the same way.

Padding: `pad_id` is `<unk>` (0 for Yi), the pad token of Yi's tokenizer config. It is not a
stop id, so a padded position can never read as end of turn; attention masks and labels = -100
decide what is ignored, never the pad id itself.

`<FACT_CONTEXT>` (the N placeholders filled by t^s, Eq. 2 / Eq. 9) is absent from InternVL2's
vocabulary; it gets the next free id (max id + 1) and `save_pretrained` writes it into
`added_tokens.json`, so ids stay stable. SageModel replaces the embeddings at these positions
and never looks the id up in the embedding table (which may be one row shorter).

    tok = Tokenizer.from_pretrained("weights/tiny")
    ids, labels = tok.encode_chat("Is there a scratch?", answer="Yes. ...")
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import sentencepiece as spm

from sage.losses import IGNORE_INDEX
from sage.names import HERMES2_SYSTEM_MESSAGE

UNK = "<unk>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The placeholders of the prompt (sage.data.prompts): the image span, one <IMG_CONTEXT> per
# visual token (InternVL2's added token 64000), one <FACT_CONTEXT> per fact token t^s (SAGE's).
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
FACT_CONTEXT = "<FACT_CONTEXT>"
GROUNDING_TOKENS = ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")  # InternVL2
# Every token kept whole when present in the vocabulary (sentencepiece piece or added token).
SPECIAL_TOKENS = (UNK, BOS, EOS, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT,
                  FACT_CONTEXT) + GROUNDING_TOKENS
REQUIRED_TOKENS = (UNK, EOS, IM_START, IM_END)  # the template and generation need these
# IGNORE_INDEX (sage.losses): the label of every position the loss skips (Eq. 8), which
# encode_chat writes for the prompt tokens.

MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


def render_prompt(user: str, system: str | None = HERMES2_SYSTEM_MESSAGE,
                  answer: str | None = None) -> str:
    """Hermes-2 text as InternVL's conversation.py renders it (docs/design.md §5): turns joined
    with no newline in between, the system turn always present (an empty message included).

    `<|im_start|>system\\n{system}<|im_end|>` + `<|im_start|>user\\n{user}<|im_end|>` +
    `<|im_start|>assistant\\n` (+ `{answer}<|im_end|>`). system None: no system turn at all
    (SAGE's tiny base was pretrained so); the default is InternVL's Hermes-2 message.
    """
    text = "" if system is None else f"{IM_START}system\n{system}{IM_END}"
    text += f"{IM_START}user\n{user}{IM_END}{IM_START}assistant\n"
    if answer is not None:
        text += answer + IM_END
    return text


# ----------------------------------------------------------------------------- added tokens

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _check_id(where: object, token: object, idx: object) -> None:
    """`where` (a file, or "added_tokens") names the source in the error."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"{where}: token {token!r} must be a non-empty string")
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise ValueError(f"{where}: id of token {token!r} must be an int >= 0, got {idx!r}")


def read_added_tokens_json(path: str | os.PathLike) -> dict[str, int]:
    """`added_tokens.json`: {"<IMG_CONTEXT>": 64000, ...} -> {token: id}."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{token: id}}, got {type(data).__name__}")
    for token, idx in data.items():
        _check_id(path, token, idx)
    return dict(data)


def read_added_tokens_decoder(path: str | os.PathLike) -> dict[str, int]:
    """`tokenizer_config.json` "added_tokens_decoder": {"64000": {"content": ...}} -> {token: id}.

    A config without the key gives {}.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    decoder = data.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise ValueError(f"{path}: 'added_tokens_decoder' must be an object {{id: {{content}}}}")
    tokens = {}
    for key, entry in decoder.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"{path}: added_tokens_decoder key {key!r} is not an integer id")
        if not isinstance(entry, dict) or "content" not in entry:
            raise ValueError(f"{path}: added_tokens_decoder[{key!r}] has no 'content' field")
        _check_id(path, entry["content"], int(key))
        if entry["content"] in tokens:
            raise ValueError(f"{path}: token {entry['content']!r} listed twice "
                             f"(ids {tokens[entry['content']]} and {key})")
        tokens[entry["content"]] = int(key)
    return tokens


def read_added_tokens(directory: str | os.PathLike) -> dict[str, int]:
    """Union of `added_tokens.json` and `tokenizer_config.json` in `directory` (either optional).

    The two files must agree on every token they both list.
    """
    directory = Path(directory)
    tokens: dict[str, int] = {}
    source: dict[str, Path] = {}
    for path, reader in ((directory / ADDED_TOKENS_FILE, read_added_tokens_json),
                         (directory / CONFIG_FILE, read_added_tokens_decoder)):
        if not path.is_file():
            continue
        for token, idx in reader(path).items():
            if token in tokens and tokens[token] != idx:
                raise ValueError(f"{path}: token {token!r} has id {idx}, but "
                                 f"{source[token]} gives {tokens[token]}")
            tokens[token], source[token] = idx, path
    return tokens


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """A sentencepiece model plus added tokens; special tokens always encode to one id each.

    model_file: path of a sentencepiece `tokenizer.model`.
    added_tokens: {token: id} beyond (or overriding) the sentencepiece pieces, e.g.
        {"<IMG_CONTEXT>": 64000}; every added token is special (kept whole).
    """

    def __init__(self, model_file: str | os.PathLike,
                 added_tokens: dict[str, int] | None = None) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_file}")
        try:
            self._load_proto(self.model_file.read_bytes())
        except RuntimeError as e:  # sentencepiece reports a bad file as RuntimeError
            raise ValueError(f"{self.model_file}: not a sentencepiece model ({e})") from e
        self._build_specials(dict(added_tokens or {}))

    def _load_proto(self, proto: bytes) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.n_pieces = self.sp.get_piece_size()  # ids [0, n_pieces) are sentencepiece's

    def _has_piece(self, token: str) -> bool:
        idx = self.sp.piece_to_id(token)  # unknown pieces map to unk_id, so check back
        return self.sp.id_to_piece(idx) == token

    def _build_specials(self, added: dict[str, int]) -> None:
        """Special-token table, FACT_CONTEXT id, vocab_size and the splitting regex."""
        by_id: dict[int, str] = {}
        for token, idx in added.items():
            _check_id("added_tokens", token, idx)
            if idx in by_id:
                raise ValueError(f"added tokens {by_id[idx]!r} and {token!r} share id {idx}")
            by_id[idx] = token
        if FACT_CONTEXT not in added and not self._has_piece(FACT_CONTEXT):
            # Next free id; saved to added_tokens.json so it never moves (module docstring).
            added[FACT_CONTEXT] = max([self.n_pieces - 1, *added.values()]) + 1
        self.added_tokens = added
        special = {t: self.sp.piece_to_id(t) for t in SPECIAL_TOKENS if self._has_piece(t)}
        special.update(added)  # added tokens override pieces, as in transformers
        missing = [t for t in REQUIRED_TOKENS if t not in special]
        if missing:
            raise ValueError(f"{self.model_file}: tokens {missing} are neither sentencepiece "
                             f"pieces nor added tokens; the Hermes-2 template needs them")
        self.special_tokens: dict[str, int] = special
        self._special_by_id = {idx: t for t, idx in special.items()}
        self.vocab_size = max(self.n_pieces, max(special.values()) + 1)  # total ids
        # Longest first, so a special token that contains another one is matched whole.
        alternatives = sorted(special, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

        self.pad_id = special[UNK]  # module docstring: <unk> pads, never a stop id
        self.unk_id = special[UNK]
        self.bos_id = special.get(BOS)
        self.eos_id = special[EOS]
        self.im_start_id = special[IM_START]
        self.im_end_id = special[IM_END]
        self.stop_ids = (self.eos_id, self.im_start_id, self.im_end_id)  # generation stops
        self.img_start_id = special.get(IMG_START)
        self.img_end_id = special.get(IMG_END)
        self.img_context_id = special.get(IMG_CONTEXT)
        self.fact_context_id = special[FACT_CONTEXT]

    # -- pickling (DataLoader workers): sentencepiece state travels as its serialized proto
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("sp", "_split_re")}
        state["_proto"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        proto = state.pop("_proto")
        self.__dict__.update(state)
        self._load_proto(proto)
        self._build_specials(dict(self.added_tokens))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_file}, vocab_size={self.vocab_size}, "
                f"added={len(self.added_tokens)})")

    # -- loading and saving
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":
        """`tokenizer.model` + added tokens from `added_tokens.json` / `tokenizer_config.json`."""
        directory = Path(directory)
        model_file = directory / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
        return cls(model_file, read_added_tokens(directory))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.model`, `added_tokens.json` (if any, incl. `<FACT_CONTEXT>`) and
        transformers' `tokenizer_config.json` / `special_tokens_map.json`: a slow
        LlamaTokenizer in legacy mode, no BOS/EOS added, every special token kept whole, so
        `AutoTokenizer.from_pretrained(directory, use_fast=False)` encodes as we do."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_bytes(directory / MODEL_FILE, self.sp.serialized_model_proto())
        extra = {t: i for t, i in sorted(self.added_tokens.items(), key=lambda kv: kv[1])
                 if not (i < self.n_pieces and self.sp.id_to_piece(i) == t)}
        _write_json(directory / ADDED_TOKENS_FILE, extra)  # always: never a stale one
        roles = self.special_token_roles()
        _write_json(directory / SPECIAL_MAP_FILE, roles)
        decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
                   for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])}
        _write_json(directory / CONFIG_FILE, {
            "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": False,
            "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
            **roles, "added_tokens_decoder": decoder})

    def special_token_roles(self) -> dict[str, str]:
        """transformers' roles: bos / eos / unk / pad token (pad is <unk>, module docstring)."""
        roles = {"bos_token": BOS if self.bos_id is not None else None, "eos_token": EOS,
                 "unk_token": UNK, "pad_token": UNK}
        return {k: v for k, v in roles.items() if v is not None}

    def generation_config(self) -> dict:
        """transformers' generation_config.json: stop on every stop id, pad with <unk>."""
        return {"bos_token_id": self.bos_id, "eos_token_id": list(self.stop_ids),
                "pad_token_id": self.pad_id, "do_sample": False}

    # -- ids
    def token_to_id(self, token: str) -> int:
        """Id of a special token or sentencepiece piece; KeyError if there is none."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self._has_piece(token):
            return self.sp.piece_to_id(token)
        raise KeyError(f"token {token!r} is not in the vocabulary of {self.model_file}")

    def id_to_token(self, idx: int) -> str:
        """Special token or sentencepiece piece of one id."""
        if idx in self._special_by_id:
            return self._special_by_id[idx]
        self._check_plain_id(idx)
        return self.sp.id_to_piece(idx)

    def _check_plain_id(self, idx: int) -> None:
        if not 0 <= idx < self.n_pieces:
            raise ValueError(f"token id {idx} is neither a sentencepiece id "
                             f"(< {self.n_pieces}) nor an added token")

    # -- text
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens one id each, no BOS/EOS added."""
        ids: list[int] = []
        # re.split with one group: even items are plain text, odd items special tokens
        for i, chunk in enumerate(self._split_re.split(text)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))  # legacy: each chunk on its own
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (list or 1-D tensor); special tokens dropped if `skip_special`."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        parts: list[str] = []
        run: list[int] = []  # consecutive sentencepiece ids, decoded together
        for idx in ids:
            idx = int(idx)
            token = self._special_by_id.get(idx)
            if token is None:
                self._check_plain_id(idx)
                run.append(idx)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if not skip_special:
                parts.append(token)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    # -- chat template (docs/design.md §5)
    def render_prompt(self, user: str, system: str | None = HERMES2_SYSTEM_MESSAGE,
                      answer: str | None = None) -> str:
        """Hermes-2 text of one exchange; see the module-level `render_prompt`."""
        return render_prompt(user, system, answer)

    def encode_chat(self, user: str, answer: str | None = None,
                    system: str | None = HERMES2_SYSTEM_MESSAGE) -> tuple[list[int], list[int]]:
        """(ids, labels) of one Hermes-2 exchange.

        answer=None: the inference prompt, ending in "<|im_start|>assistant\\n", labels all -100.
        Otherwise prompt + answer + <|im_end|>; labels are -100 except the answer tokens and the
        closing <|im_end|> (Eq. 8). The answer is encoded apart from the prompt, so the training
        ids are exactly the inference prompt followed by the tokens the model should generate.
        """
        prompt = self.encode(render_prompt(user, system))
        if answer is None:
            return prompt, [IGNORE_INDEX] * len(prompt)
        target = self.encode(answer) + [self.im_end_id]
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    # -- training the tiny model's tokenizer
    @classmethod
    def train(cls, corpus_file: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int,
              model_type: str = "bpe",
              special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> "Tokenizer":
        """Train a sentencepiece model on `corpus_file` (one sentence per line) into `out_dir`.

        `<unk>`, `<|startoftext|>`, `<|endoftext|>` take ids 0, 1, 2 (as in Yi); the other
        `special_tokens` become user-defined pieces (single ids). byte_fallback makes any text
        encodable; the result has at most `vocab_size` ids in all (a soft limit: a small
        corpus gives fewer). Deterministic: fixed seed, one thread.
        """
        corpus_file, out_dir = Path(corpus_file), Path(out_dir)
        if not corpus_file.is_file():
            raise FileNotFoundError(f"tokenizer corpus not found: {corpus_file}")
        symbols = [t for t in special_tokens if t not in (UNK, BOS, EOS)]
        # an absent <FACT_CONTEXT> takes one id after the pieces: leave room for it
        n_pieces = vocab_size - (FACT_CONTEXT not in special_tokens)
        model = io.BytesIO()
        spm.set_random_generator_seed(0)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus_file), model_writer=model, vocab_size=n_pieces,
                model_type=model_type, hard_vocab_limit=False, byte_fallback=True,
                character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, user_defined_symbols=symbols,
                # Yi-like text handling (module docstring): no dummy "▁", whitespace and
                # characters kept as they are, so decode(encode(text)) == text.
                add_dummy_prefix=False, remove_extra_whitespaces=False,
                normalization_rule_name="identity",
                num_threads=1, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"training sentencepiece on {corpus_file} with "
                             f"vocab_size={vocab_size} failed: {e}") from e
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_bytes(out_dir / MODEL_FILE, model.getvalue())
        tok = cls(out_dir / MODEL_FILE)
        tok.save_pretrained(out_dir)  # writes added_tokens.json if <FACT_CONTEXT> was added
        assert tok.vocab_size <= vocab_size, (tok.vocab_size, vocab_size)
        return tok


def _write_json(path: Path, content) -> None:
    _write_bytes(path, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.tokenizer` "
                     "(--help for usage)")
