"""Offline fact sentences for SFE (paper §3.2, docs/design.md §1 step 3) and their cache.

The pretrained VLM answers each fixed prompt of sage.data.prompts.FACT_PROMPTS about the test
image (plain prompt, no facts, no reference); each answer is split into sentences and the
first N sentences over all prompts, in prompt order, are the image's facts s_1..s_N. The
asker is either a local SageModel (`--model DIR`, batched `model.generate`) or an
OpenAI-compatible VLM endpoint (`--openai`: images sent as base64 PNG data URLs; the endpoint
and key come from --base_url / OPENAI_BASE_URL and OPENAI_API_KEY; the key is never logged).

Cache: JSONL, one line per test image, keyed by the record's test_image path:
    {"test_image": "images/washer/00042.png", "facts": ["...", ...], "source": "openai:gpt-4o"}
Each image's line is appended and flushed as soon as it is answered, so an interrupted run
resumes where it stopped; a cached image is never asked again.

    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --model weights/base
    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --openai \\
        --model_name gpt-4o --n_facts 8 --fill        # adds "facts" to data/train.jsonl
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from sage.data.collate import Collator
from sage.data.images import load_image_for, open_rgb
from sage.data.prompts import FACT_PROMPTS
from sage.data.schema import warn, write_jsonl
from sage.inference import generate_answers

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split an answer into sentences at . ! ? followed by whitespace; drop empty pieces."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def select_facts(answers: list[str], n_facts: int) -> list[str]:
    """The first n_facts sentences over the prompts' answers, in prompt order."""
    return [s for a in answers for s in split_sentences(a)][:n_facts]


# ----------------------------------------------------------------------------- cache

class FactCache:
    """Append-only JSONL cache: test image path -> fact sentences. Under torchrun one rank
    writes (write=True); the others keep the same entries in memory only."""

    def __init__(self, path: str | Path, write: bool = True):
        self.path, self.write = Path(path), write
        self.entries: dict[str, dict] = {}
        # a run killed mid-write leaves a last line without "\n": the next append cuts it off
        self._truncate_at = None
        if self.path.is_file():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                self._truncate_at = raw.rfind(b"\n") + 1
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    if lineno == len(lines):  # a run killed mid-write: that image is re-asked
                        warn(f"{self.path}:{lineno}: ignoring a truncated last line")
                        continue
                    raise ValueError(f"{self.path}:{lineno}: malformed JSON in the fact "
                                     "cache") from None
                if not isinstance(e, dict) or not isinstance(e.get("test_image"), str) \
                        or not isinstance(e.get("facts"), list):
                    raise ValueError(f"{self.path}:{lineno}: field 'test_image'/'facts': "
                                     "expected {\"test_image\": str, \"facts\": [str]}")
                self.entries[e["test_image"]] = e

    def __contains__(self, image: str) -> bool:
        return image in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def facts(self, image: str) -> list[str]:
        return self.entries[image]["facts"]

    def add(self, image: str, facts: list[str], source: str) -> None:
        """Append one image's facts and flush them to disk at once."""
        entry = {"test_image": image, "facts": facts, "source": source}
        self.entries[image] = entry
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._truncate_at is not None:
            os.truncate(self.path, self._truncate_at)
            self._truncate_at = None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- askers

def model_asker(model, root: Path, max_new_tokens: int = 128, decode: str = "eager") -> Callable:
    """Batched local asker: list of test image paths -> per image, the answers to FACT_PROMPTS.

    `model` exposes `cfg` (SageConfig), `tokenizer` and `generate(batch, max_new_tokens,
    decode)` as SageModel does. The prompts are plain VLM prompts (facts_mode "none",
    zero-shot). decode: SageModel.generate's decoding path (eager, static, graph).
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer (tokenizer.model missing in its directory)")
    # the base VLM answers without facts: its prompts carry no <FACT_CONTEXT>
    cfg = dataclasses.replace(model.cfg, facts_mode="none")
    model.cfg = cfg
    collate = Collator(tok, cfg, for_generation=True)

    def ask(images: list[str]) -> list[list[str]]:
        examples = []
        for img in images:
            pix = load_image_for(root / img, cfg)
            examples += [{"id": f"{img}#{k}", "question": q, "pixel_test": pix}
                         for k, q in enumerate(FACT_PROMPTS)]
        texts = generate_answers(model, examples, collate, max_new_tokens=max_new_tokens,
                                 decode=decode)
        P = len(FACT_PROMPTS)
        return [texts[i * P:(i + 1) * P] for i in range(len(images))]

    return ask


def image_data_url(path: Path) -> str:
    """An image file as a base64 PNG data URL."""
    buf = io.BytesIO()
    open_rgb(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_asker(root: Path, model_name: str = "gpt-4o", base_url: str | None = None,
                 max_tokens: int = 256) -> Callable:
    """Asker over an OpenAI-compatible chat endpoint; one request per image and prompt."""
    import openai

    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if not base_url:
            raise ValueError("--openai needs OPENAI_API_KEY (or --base-url for a local "
                             "endpoint that takes no key)")
        key = "EMPTY"  # local OpenAI-compatible servers accept any key
    client = openai.OpenAI(api_key=key, base_url=base_url)

    def ask(images: list[str]) -> list[list[str]]:
        out = []
        for img in images:
            url = image_data_url(root / img)
            answers = []
            for q in FACT_PROMPTS:
                r = client.chat.completions.create(
                    model=model_name, temperature=0.0, max_tokens=max_tokens,
                    messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": q}]}])
                answers.append(r.choices[0].message.content or "")
            out.append(answers)
        return out

    return ask


# ----------------------------------------------------------------------------- driver

def collect_facts(images: Iterable[str], cache: FactCache, ask: Callable | None, source: str,
                  n_facts: int, batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1,
                  exchange: Callable[[list], list[list]] | None = None,
                  progress: Callable[[int], None] | None = None) -> int:
    """Ask about every image not yet cached, `batch_size` images per call -> number asked.

    Data-parallel (dp_size model copies): in each round copy d asks its own batch, then
    `exchange` (an all-gather, sage.distributed.gather_objects) hands every copy's answers
    to every rank, so all caches hold the same entries and the writing rank appends them at
    once. Every rank runs the same number of rounds; a copy with nothing left asks nothing.
    """
    todo = [im for im in dict.fromkeys(images) if im not in cache]
    if todo and ask is None:
        raise ValueError(f"{len(todo)} test image(s) have no cached facts (e.g. {todo[0]!r}); "
                         "pass --model DIR or --openai to produce them")
    n_short = 0
    per_round = batch_size * dp_size
    for start in range(0, len(todo), per_round):
        mine = todo[start + dp_rank * batch_size:start + (dp_rank + 1) * batch_size]
        answered = list(zip(mine, ask(mine))) if mine else []
        if exchange is not None:
            answered = [pair for part in exchange(answered) for pair in part]
        for img, answers in answered:
            facts = select_facts(answers, n_facts)
            n_short += len(facts) < n_facts
            cache.add(img, facts, source)
        if progress is not None:
            progress(min(per_round, len(todo) - start))
    if n_short and cache.write:
        warn(f"{n_short} image(s) got fewer than {n_facts} fact sentences")
    return len(todo)


def fill_records(records: list[dict], cache: FactCache, n_facts: int, out: Path) -> None:
    """Write records with field 'facts' = the cached first n_facts sentences of their image."""
    filled = []
    for r in records:
        if r["test_image"] not in cache:
            raise ValueError(f"record {r['id']!r}: test_image {r['test_image']!r} has no facts "
                             f"in {cache.path}")
        filled.append({**r, "facts": cache.facts(r["test_image"])[:n_facts]})
    write_jsonl(filled, out)


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.facts` "
                     "(--help for usage)")
