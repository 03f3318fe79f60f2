"""The AD-PL style JSONL record format (docs/design.md §6) and its validating loader.

One JSON object per line; image paths are relative to the data root (by default the folder of
the file). Two kinds of files:

    kind "qa"       anomaly QA: level in {standard, identification, diagnosis}, exactly
                    L = 4 ranked answers (best -> worst), label "yes" | "no", a group id;
                    optional normal_label "yes" | "no", the answer when the part is normal
    kind "general"  general image-text pairs (pretraining, imported LLaVA data): level
                    "general", >= 1 answer; group and label optional

Every error names the file, the line number and the field (ValueError); `skip_bad=True`
skips bad lines instead and reports how many through `report` (default: `warn`). Beyond the
fields' types a line is refused for: invalid UTF-8, a chat control string (CONTROL_TOKENS) in
any text, an empty string or facts list, a group that changes level, and (check_images) an
image that is missing, empty, truncated or not an image. A file with no records is an error.

    records = load_jsonl("data/synthad/train.jsonl", kind="qa", check_images=True)
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

QA_LEVELS = ("standard", "identification", "diagnosis")
GENERAL_LEVEL = "general"
N_ANSWERS = 4  # L_N: ranked answers per QA instance (paper §3.3)
LABELS = ("yes", "no")
IMAGE_FIELDS = ("test_image", "reference_image")
# Strings the chat template and the tokenizer treat as control tokens (turn markers, image and
# fact placeholders, InternVL2's grounding tokens): inside record text they would end a turn
# mid-answer or misplace the image / fact embeddings, so validation refuses them.
# TODO(lead): the single definition moves to sage/tokenizer.py; import it from there.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|startoftext|>", "<img>",
                  "</img>", "<IMG_CONTEXT>", "<FACT_CONTEXT>", "<ref>", "</ref>", "<box>",
                  "</box>", "<quad>", "</quad>")
_CONTROL = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS))


def warn(msg: str) -> None:
    """The one place library code writes to the terminal: a warning line on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class SkipReport:
    """What `load_jsonl(..., skip_bad=True)` skipped: count and one message per bad line."""

    path: str
    n_skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        first = f"; first: {self.errors[0]}" if self.errors else ""
        return f"{self.path}: skipped {self.n_skipped} bad line(s){first}"


def _default_report(rep: SkipReport) -> None:
    if rep.n_skipped:
        warn(rep.summary())


class RecordError(ValueError):
    """A bad record: message 'FILE:LINE: field 'F': what was expected'."""


def _fail(where: str, fld: str, msg: str) -> None:
    raise RecordError(f"{where}: field '{fld}': {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_image_path(rel: Any, root: Path, where: str, fld: str) -> Path:
    """A record image path must be relative and stay inside the data root -> absolute path."""
    if not isinstance(rel, str) or not rel:
        _fail(where, fld, f"expected a non-empty relative path string, got {rel!r}")
    if Path(rel).is_absolute():
        _fail(where, fld, f"image path {rel!r} is absolute; paths are relative to the data "
                          f"root {root}")
    # '..' is resolved lexically: a symlinked dataset folder inside the root is allowed
    root = Path(os.path.abspath(root))
    full = Path(os.path.normpath(root / rel))
    if not full.is_relative_to(root):
        _fail(where, fld, f"image path {rel!r} escapes the data root {root}")
    return full


def image_problem(full: Path, rel: str, decode: bool = False) -> str | None:
    """What is wrong with an image file, or None. Fast by default: PNG chunks are read and
    CRC-checked without decompressing (PIL `verify`), a JPEG must end with its EOI marker,
    other formats are decoded; decode=True decodes every image in full."""
    try:
        size = full.stat().st_size
    except FileNotFoundError:
        return f"image {rel!r} not found (looked at {full})"
    except OSError as e:
        return f"image {rel!r} cannot be read ({e.strerror or e})"
    if not full.is_file():
        return f"image {rel!r} is not a file ({full})"
    if size == 0:
        return f"image {rel!r} is empty (0 bytes)"
    try:
        with Image.open(full) as im:
            fmt, (w, h) = im.format, im.size
            if decode or fmt not in ("PNG", "JPEG", "MPO"):
                im.load()
            else:
                im.verify()
        if fmt in ("JPEG", "MPO") and not decode:
            with open(full, "rb") as f:  # a truncated JPEG passes verify(); its end does not
                f.seek(max(0, size - 1024))
                if b"\xff\xd9" not in f.read():
                    return f"image {rel!r} is truncated (no JPEG end marker)"
    except Exception as e:  # PIL raises many types for a corrupt file
        return f"image {rel!r} cannot be decoded ({type(e).__name__}: {e})"
    if w < 1 or h < 1:
        return f"image {rel!r} has size {w}x{h}"
    return None


def check_image_file(full: Path, rel: str, where: str, fld: str, decode: bool = False,
                     cache: dict | None = None) -> None:
    """The image exists and is whole (`image_problem`), else RecordError naming `where` and
    `fld`. cache: {path: problem}, so an image shared by several records is read once."""
    if cache is not None and full in cache:
        problem = cache[full]
    else:
        problem = image_problem(full, rel, decode)
        if cache is not None:
            cache[full] = problem
    if problem is not None:
        _fail(where, fld, problem)


def _check_strings(value: Any, fld: str, where: str) -> None:
    """No chat control string (CONTROL_TOKENS) in any string of the record, nested included."""
    if isinstance(value, str):
        m = _CONTROL.search(value)
        if m:
            _fail(where, fld, f"contains the chat control string {m.group(0)!r}, which the "
                              f"prompt would read as a control token; remove or rewrite it")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, fld, where)
            _check_strings(v, f"{fld}.{k}" if fld else str(k), where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{fld}[{i}]", where)


def validate_record(rec: Any, kind: str, root: Path, where: str,
                    check_images: bool | str = False, image_cache: dict | None = None) -> dict:
    """Check one parsed record against docs/design.md §6; `where` is 'FILE:LINE'. Returns rec.

    check_images: True checks each image fast (`image_problem`), "decode" decodes it in full;
    image_cache: {path: problem} shared across the records of one file."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def need(fld: str, types: tuple, what: str) -> Any:
        if fld not in rec:
            _fail(where, fld, "missing required field")
        if not isinstance(rec[fld], types) or isinstance(rec[fld], bool):
            _fail(where, fld, f"expected {what}, got {rec[fld]!r}")
        return rec[fld]

    def text(fld: str) -> str:
        v = need(fld, (str,), "a non-empty string")
        if not v.strip():
            _fail(where, fld, "expected a non-empty string, got an empty one")
        return v

    text("id")
    text("question")
    answers = need("answers", (list,), "a list of answer strings")
    if kind == "qa":
        if len(answers) != N_ANSWERS:
            _fail(where, "answers", f"expected {N_ANSWERS} ranked answers (best -> worst), "
                                    f"got {len(answers)}")
        level = need("level", (str,), "a level string")
        if level not in QA_LEVELS:
            _fail(where, "level", f"unknown level {level!r}; expected one of {QA_LEVELS}")
        text("group")
        if need("label", (str,), "'yes' or 'no'") not in LABELS:
            _fail(where, "label", f"expected 'yes' or 'no', got {rec['label']!r}")
    elif kind == "general":
        if len(answers) < 1:
            _fail(where, "answers", "expected at least 1 answer, got 0")
        if need("level", (str,), "a level string") != GENERAL_LEVEL:
            _fail(where, "level", f"expected {GENERAL_LEVEL!r} in a kind 'general' file, "
                                  f"got {rec['level']!r}")
        if "label" in rec and rec["label"] is not None and rec["label"] not in LABELS:
            _fail(where, "label", f"expected 'yes', 'no' or null, got {rec['label']!r}")
    else:
        raise ValueError(f"kind={kind!r}: expected 'qa' or 'general'")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            _fail(where, f"answers[{i}]", f"expected a non-empty string, got {a!r}")

    # images: test_image required, reference_image optional (null -> zero-shot only)
    if "test_image" not in rec:
        _fail(where, "test_image", "missing required field")
    for fld in IMAGE_FIELDS:
        rel = rec.get(fld)
        if rel is None and fld == "reference_image":
            continue
        check_image_path(rel, root, where, fld)

    for fld in ("category", "source", "group"):
        if rec.get(fld) is not None and not isinstance(rec[fld], str):
            _fail(where, fld, f"expected a string, got {rec[fld]!r}")
    if isinstance(rec.get("group"), str) and not rec["group"].strip():
        _fail(where, "group", "expected a non-empty string or null, got an empty one")
    facts = rec.get("facts")
    if facts is not None:
        if not isinstance(facts, list):
            _fail(where, "facts", f"expected a list of sentences, got {facts!r}")
        if not facts:
            _fail(where, "facts", "expected at least one sentence (or no 'facts' field), got "
                                  "an empty list")
        for i, s in enumerate(facts):
            if not isinstance(s, str) or not s.strip():
                _fail(where, f"facts[{i}]", f"expected a non-empty string, got {s!r}")
    mle = rec.get("mle")
    if mle is not None:
        # Eq. 3: per answer (type, location, logic) judge sub-scores on a 1-5 scale
        if not isinstance(mle, list) or len(mle) != len(answers):
            _fail(where, "mle", f"expected {len(answers)} rows (one per answer) of 3 sub-scores, "
                                f"got {mle!r}")
        for i, row in enumerate(mle):
            if (not isinstance(row, list) or len(row) != 3
                    or not all(_is_int(s) and 1 <= s <= 5 for s in row)):
                _fail(where, f"mle[{i}]", f"expected 3 integers in 1..5 (type, location, "
                                          f"logic), got {row!r}")
    normal = rec.get("normal_label")
    if normal is not None and normal not in LABELS:
        _fail(where, "normal_label", f"expected 'yes' or 'no' (the answer when the part is "
                                     f"normal), got {normal!r}")
    truth = rec.get("truth")
    if truth is not None and not isinstance(truth, dict):
        _fail(where, "truth", f"expected an object, got {truth!r}")
    _check_strings(rec, "", where)
    if check_images:  # last: the only check that reads files
        for fld in IMAGE_FIELDS:
            if rec.get(fld) is not None:
                check_image_file(check_image_path(rec[fld], root, where, fld), rec[fld], where,
                                 fld, decode=check_images == "decode", cache=image_cache)
    return rec


def load_jsonl(path: str | Path, kind: str = "qa", skip_bad: bool = False,
               check_images: bool | str = False, root: str | Path | None = None,
               report: Callable[[SkipReport], None] | None = None,
               allow_empty: bool = False, min_facts: int = 0) -> list[dict]:
    """Read and validate a JSONL file of records (docs/design.md §6) -> list of dicts.

    root: data root of the image paths (default: the file's folder).
    check_images: also check every referenced image once: True reads its header (PNG chunks,
        JPEG end marker; about 0.1 ms an image), "decode" decodes it in full.
    skip_bad: skip bad lines instead of raising; `report(SkipReport)` is then called once
        (default `warn`s a one-line summary when anything was skipped).
    allow_empty: return [] for a file without records instead of raising.
    min_facts: every record needs at least this many sentences in 'facts' (what the model
        that reads them needs: N for Fact[FE], 1 for Fact[Hard]), checked here rather than
        when the record is first drawn, hours into a run.
    Raises ValueError 'FILE:LINE: field 'F': ...' on the first bad line otherwise; ids must
    be unique within the file and a group keeps one level (kind "qa").
    """
    if kind not in ("qa", "general"):
        raise ValueError(f"kind={kind!r}: expected 'qa' or 'general'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    root = Path(root) if root is not None else path.parent
    rep = SkipReport(str(path))
    records, seen, levels, images = [], {}, {}, {}
    with open(path, "rb") as f:  # bytes: a decoding error is one bad line, not the file
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RecordError(f"{where}: invalid UTF-8 at byte {e.start + 1} of the line "
                                      f"({raw[e.start:e.start + 4]!r}); save the file as "
                                      f"UTF-8") from None
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: malformed JSON (column {e.colno}): "
                                      f"{e.msg}") from None
                validate_record(rec, kind, root, where, check_images, images)
                if len(rec.get("facts") or []) < min_facts:
                    _fail(where, "facts", f"{len(rec.get('facts') or [])} sentence(s), the "
                                          f"model needs {min_facts}: fill them with `python -m "
                                          f"sage.tools.facts --fill` (more --max_new_tokens), "
                                          f"or lower --n_facts")
                if rec["id"] in seen:
                    _fail(where, "id", f"duplicate id {rec['id']!r} (first on line "
                                       f"{seen[rec['id']]})")
                group = rec.get("group")
                if kind == "qa" and group in levels and levels[group][0] != rec["level"]:
                    _fail(where, "level", f"group {group!r} is {levels[group][0]!r} on line "
                                          f"{levels[group][1]}, {rec['level']!r} here; a group "
                                          f"has one level")
            except RecordError as e:
                if not skip_bad:
                    raise
                rep.n_skipped += 1
                rep.errors.append(str(e))
                continue
            seen[rec["id"]] = lineno
            levels.setdefault(rec.get("group"), (rec["level"], lineno))
            records.append(rec)
    if skip_bad:
        (report or _default_report)(rep)
    if not records and not allow_empty:
        bad = f" (all {rep.n_skipped} bad; first: {rep.errors[0]})" if rep.n_skipped else ""
        raise RecordError(f"no records in {path}{bad}")
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write records one per line, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
