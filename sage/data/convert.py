"""Importers from external formats into SAGE's JSONL records (docs/design.md §6).

    convert("manta", "IN.json", "OUT.jsonl", root="IMAGES")   # or: python -m sage.tools.convert

Formats: llava (InternVL/LLaVA conversation JSON, kind "general"), manta, mmad and mvtec
(an MVTec-AD folder), kind "qa".

Image paths: the input's paths are relative to --root (default: the folder of IN; for mvtec
IN itself); the output's are rewritten relative to the folder of OUT, the JSONL's data root,
so every image must lie inside that folder (put OUT at the top of the data tree). Every output
record passes sage.data.schema.validate_record; a malformed input item raises naming the file,
the item and the field, or is skipped and counted with skip_bad=True.

Assumptions about the external formats (checked where possible):
- LLaVA / InternVL conversation JSON or JSONL (one item per line, InternVL's fine-tuning
  annotation format): a list of {"id", "image": str (or a 1-element list),
  "conversations": [{"from": "human"|"gpt"|"system", "value"}]}. Each human/gpt exchange
  becomes one record (id "<source>-<item>-t<k>", level "general", answers [gpt value]) with
  the "<image>" tag removed; earlier turns are not kept as context. Items without exactly one
  image are skipped and counted.
- MANTA / MPDD-QA JSON: a list (or an object whose values are the items) of {"domain",
  "test_image", "reference_image", "pair_type", "question_answer": [{"question_en",
  "answer_options": [{"answer_en"} x 4], "answer": bool, "conclusion_en"}]}; one group per
  item, one record per question. pair_type "standard comparison" / "defect identification" /
  "defect diagnosis" -> level standard / identification / diagnosis. ASSUMPTION on order: the
  answer options are listed best -> worst (the expert ranking AD-PL publishes) and become
  `answers` in that order, except that options whose leading Yes/No (or True/False)
  contradicts `answer` are moved behind the others (a stable partition), so answers[0] always
  states the ground-truth decision. conclusion_en is kept as field "conclusion".
- MMAD (mmad.json): an object keyed by query image path (relative to the MMAD root) whose
  values hold "conversation": [{"Question", "Answer": option letter, "Options": {letter: text},
  "type"}], "similar_templates" and "random_templates": lists of normal template image paths
  (the first similar one, else the first random one, becomes the reference), optional
  "mask_path". Yes/No questions (MMAD's "Anomaly Detection") stay one record; every other
  multiple-choice question becomes one yes/no verification record per option ('<question>
  Is the answer "<option>"?', label yes for the correct option). Question type -> level:
  Anomaly Detection -> standard; Defect Classification / Localization, Object
  Classification -> identification; everything else (Defect Description / Analysis, Object
  Structure / Details / Analysis) -> diagnosis. Groups are (image, level), so MMAD groups need
  not have 5 questions; ranked answers are templated (correct + reason, correct, wrong,
  wrong + reason).
- MVTec AD layout: <category>/train/good/*, <category>/test/<defect>/* (test/good = normal),
  optional <category>/ground_truth/<defect>/<stem>_mask.png (the mask's centre gives the
  region). Each test image gets a deterministic train/good reference and one group of 5
  templated questions; levels cycle 7:6:3 (about AD-PL's 44/37/19 %).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from sage.data.oracle import extract_decision
from sage.data.schema import RecordError, check_image_file, validate_record, write_jsonl

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANTA_LEVELS = {"standard comparison": "standard", "defect identification": "identification",
                "defect diagnosis": "diagnosis"}
MMAD_LEVELS = {"anomaly detection": "standard", "defect classification": "identification",
               "defect localization": "identification", "object classification": "identification"}
REGIONS = ("top-left", "top", "top-right", "left", "center", "right",
           "bottom-left", "bottom", "bottom-right")


class ConvertError(ValueError):
    """A malformed input item: 'FILE: item I: field F: ...'."""


class Converter:
    """Shared state of one conversion: path mapping, output records, skip count."""

    def __init__(self, src: Path, root: Path, out_root: Path, source: str, skip_bad: bool):
        self.src, self.root, self.out_root = src, Path(os.path.abspath(root)), out_root
        self.source, self.skip_bad = source, skip_bad
        self.records: list[dict] = []
        self.n_skipped, self.errors = 0, []

    def fail(self, item, fld: str, msg: str) -> None:
        raise ConvertError(f"{self.src}: item {item}: field '{fld}': {msg}")

    def get(self, obj, key: str, types, item):
        """obj[key], which must exist and have one of `types` (bool only if listed)."""
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(obj, dict) or key not in obj:
            self.fail(item, key, "missing")
        v = obj[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            self.fail(item, key, f"expected {'/'.join(t.__name__ for t in types)}, got {v!r}")
        return v

    def image(self, rel, item, fld: str) -> str:
        """Input image path (relative to --root) -> path relative to OUT's folder."""
        if not isinstance(rel, str) or not rel:
            self.fail(item, fld, f"expected an image path, got {rel!r}")
        full = os.path.normpath(os.path.join(self.root, rel))
        out = os.path.relpath(full, self.out_root)
        if out.startswith(".."):
            self.fail(item, fld, f"image {full} lies outside the output's data root "
                                 f"{self.out_root}; write OUT at the top of the data tree")
        return Path(out).as_posix()

    def run(self, items, convert_one) -> None:
        """Apply convert_one(item_key, item) to each item; skip + count errors if skip_bad."""
        for key, item in items:
            try:
                convert_one(key, item)
            except (ConvertError, RecordError) as e:
                if not self.skip_bad:
                    raise
                self.n_skipped += 1
                self.errors.append(str(e))

    def add(self, rec: dict, item) -> None:
        try:
            validate_record(rec, "general" if rec["level"] == "general" else "qa",
                            self.out_root, f"{self.src}: item {item}")
        except RecordError as e:
            raise ConvertError(str(e)) from None
        self.records.append(rec)


# ----------------------------------------------------------------------------- answers

def stated_decision(text: str) -> bool | None:
    """True / False for the Yes / No decision `text` states, None for none: the rule every
    accuracy uses (sage.data.oracle.extract_decision: a final statement wins, else a leading
    Yes./No.; True/False count as Yes/No)."""
    decision = extract_decision(text)
    return None if decision is None else decision == "yes"


def templated_answers(label: bool, reason_right: str, reason_wrong: str) -> list[str]:
    """Four ranked answers: correct + reason > correct > wrong > wrong + wrong reason."""
    yes, no = ("Yes", "No") if label else ("No", "Yes")
    return [f"{yes}. {reason_right}", f"{yes}.", f"{no}.", f"{no}. {reason_wrong}"]


# ----------------------------------------------------------------------------- LLaVA

def convert_llava(c: Converter, data) -> None:
    if not isinstance(data, list):
        raise ConvertError(f"{c.src}: expected a JSON list of conversation items")
    n_no_image = 0

    def one(i, item):
        nonlocal n_no_image
        image = item.get("image") if isinstance(item, dict) else None
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if not isinstance(image, str):
            n_no_image += 1  # text-only or multi-image: not a single-image exchange
            return
        convs = c.get(item, "conversations", list, i)
        turns = [t for t in convs if not (isinstance(t, dict) and t.get("from") == "system")]
        if len(turns) < 2 or len(turns) % 2:
            c.fail(i, "conversations", f"expected human/gpt pairs, got {len(turns)} turns")
        for k in range(0, len(turns), 2):
            h, g = turns[k], turns[k + 1]
            if not isinstance(h, dict) or h.get("from") != "human":
                c.fail(i, f"conversations[{k}].from", f"expected 'human', got {h!r}")
            if not isinstance(g, dict) or g.get("from") != "gpt":
                c.fail(i, f"conversations[{k + 1}].from", f"expected 'gpt', got {g!r}")
            question = c.get(h, "value", str, i).replace("<image>", "").strip()
            c.add({"id": f"{c.source}-{i}-t{k // 2}", "test_image": c.image(image, i, "image"),
                   "reference_image": None, "category": "", "source": c.source,
                   "level": "general", "group": f"{c.source}-{i}", "question": question,
                   "answers": [c.get(g, "value", str, i).strip()],
                   "source_id": str(item.get("id", i))}, i)

    c.run(enumerate(data), one)
    c.n_skipped += n_no_image


# ----------------------------------------------------------------------------- MANTA / MPDD-QA

def rank_options(options: list[str], answer: bool) -> list[str]:
    """Stable partition: options whose leading decision contradicts `answer` go last."""
    keep = [o for o in options if stated_decision(o) in (None, answer)]
    return keep + [o for o in options if o not in keep]


def convert_manta(c: Converter, data) -> None:
    items = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConvertError(f"{c.src}: expected a JSON list (or object) of items")

    def one(i, item):
        pair_type = c.get(item, "pair_type", str, i)
        level = MANTA_LEVELS.get(pair_type.strip().lower())
        if level is None:
            c.fail(i, "pair_type", f"unknown pair_type {pair_type!r}; expected one of "
                                   f"{sorted(MANTA_LEVELS)}")
        test = c.image(c.get(item, "test_image", str, i), i, "test_image")
        ref = item.get("reference_image")
        ref = c.image(ref, i, "reference_image") if ref else None
        domain = c.get(item, "domain", str, i)
        group = f"{c.source}-{i:05d}"
        for j, qa in enumerate(c.get(item, "question_answer", list, i)):
            at = f"{i}.question_answer[{j}]"
            opts = c.get(qa, "answer_options", list, at)
            if len(opts) != 4:
                c.fail(at, "answer_options", f"expected 4 options, got {len(opts)}")
            texts = [c.get(o, "answer_en", str, f"{at}.answer_options[{k}]").strip()
                     for k, o in enumerate(opts)]
            answer = c.get(qa, "answer", bool, at)
            rec = {"id": f"{group}-q{j}", "test_image": test, "reference_image": ref,
                   "category": domain, "source": c.source, "level": level, "group": group,
                   "question": c.get(qa, "question_en", str, at).strip(),
                   "answers": rank_options(texts, answer), "label": "yes" if answer else "no"}
            if qa.get("conclusion_en"):
                rec["conclusion"] = qa["conclusion_en"]
            c.add(rec, at)

    c.run(enumerate(items), one)


# ----------------------------------------------------------------------------- MMAD

def convert_mmad(c: Converter, data) -> None:
    if not isinstance(data, dict):
        raise ConvertError(f"{c.src}: expected a JSON object keyed by query image path")

    def one(i, key_item):
        image, item = key_item
        test = c.image(image, i, "<key>")
        templates = (item.get("similar_templates") or []) + (item.get("random_templates") or [])
        ref = c.image(templates[0], i, "similar_templates") if templates else None
        category = Path(image).parts[1] if len(Path(image).parts) > 2 else ""
        for j, qa in enumerate(c.get(item, "conversation", list, i)):
            at = f"{i}.conversation[{j}]"
            options = c.get(qa, "Options", dict, at)
            letter = c.get(qa, "Answer", str, at).strip().rstrip(".")
            if letter not in options:
                c.fail(at, "Answer", f"{letter!r} is not one of the options {sorted(options)}")
            qtype = str(qa.get("type", "")).strip()
            level = MMAD_LEVELS.get(qtype.lower(), "diagnosis")
            group = f"{c.source}-{i:05d}-{level}"
            question = c.get(qa, "Question", str, at).strip()
            right = str(options[letter]).strip()
            base = {"test_image": test, "reference_image": ref, "category": category,
                    "source": c.source, "level": level, "group": group, "mmad_type": qtype}
            decisions = {stated_decision(str(t)) for t in options.values()}
            if decisions == {True, False} and len(options) == 2:  # a native yes/no question
                label = bool(stated_decision(right))
                c.add({**base, "id": f"{group}-q{j}", "question": question,
                       "answers": templated_answers(label, "The images show it.",
                                                    "The images show otherwise."),
                       "label": "yes" if label else "no"}, at)
                continue
            for k, (opt, text) in enumerate(sorted(options.items())):
                text = str(text).strip()
                label = opt == letter
                wrong = next(str(t) for o, t in sorted(options.items()) if o != opt)
                c.add({**base, "id": f"{group}-q{j}-{opt}",
                       "question": f'{question} Is the answer "{text}"?',
                       "answers": templated_answers(
                           label, f"The answer is: {right}" if not label else text,
                           f"The answer is: {wrong}" if label else text),
                       "label": "yes" if label else "no"}, at)

    c.run(enumerate(data.items()), one)


# ----------------------------------------------------------------------------- MVTec AD

def mask_region(mask_path: Path) -> str | None:
    """Which of the 3 x 3 regions holds the centre of the defect mask (None if empty)."""
    m = np.asarray(Image.open(mask_path).convert("L")) > 0
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    row = min(2, int(3 * ys.mean() / m.shape[0]))
    col = min(2, int(3 * xs.mean() / m.shape[1]))
    return REGIONS[3 * row + col]


_LEVEL_CYCLE = ("standard",) * 7 + ("identification",) * 6 + ("diagnosis",) * 3


def mvtec_questions(cat: str, level: str, defect: str | None, region: str | None,
                    other: str) -> list[tuple[str, bool]]:
    """Five templated (question, answer) pairs for one test/reference pair."""
    bad = defect is not None
    if level == "standard":
        return [(f"Compared with the reference image, is there any anomaly in the {cat}?", bad),
                (f"Does the {cat} look the same as the normal reference?", not bad),
                (f"Is the {cat} free of defects?", not bad),
                (f"Would this {cat} pass a visual quality inspection?", not bad),
                (f"Is there any visible damage on the {cat}?", bad)]
    asked = defect or other
    where = region or "center"
    if level == "identification":
        return [(f"Is there a {asked} on the {cat}?", bad),
                (f"Is there a {other} on the {cat}?", bad and other == defect),
                (f"Is there a defect in the {where} part of the {cat}?", bad and region == where),
                (f"Is the {cat} anomalous compared with the reference?", bad),
                (f"Is the {cat} identical to the reference image?", not bad)]
    return [(f"Should this {cat} be rejected by quality control?", bad),
            (f"Could the condition of this {cat} affect its function or appearance?", bad),
            (f"Is a {asked} the reason this {cat} differs from the reference?", bad),
            (f"Can this {cat} be shipped without rework?", not bad),
            (f"Does the {cat} need further inspection for a {asked}?", bad)]


def convert_mvtec(c: Converter, folder: Path) -> None:
    folder = Path(os.path.abspath(folder))
    categories = sorted(p for p in folder.iterdir() if (p / "test").is_dir())
    if not categories:
        raise ConvertError(f"{folder}: no <category>/test folders (MVTec AD layout)")

    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS) if d.is_dir() \
            else []

    k = 0
    for cat_dir in categories:
        cat = cat_dir.name.replace("_", " ")
        goods = images(cat_dir / "train" / "good")
        if not goods:
            c.fail(cat_dir.name, "train/good", "no normal training images for references")
        defects = sorted(d.name for d in (cat_dir / "test").iterdir()
                         if d.is_dir() and d.name != "good")
        for d_name in ["good"] + defects:
            for img in images(cat_dir / "test" / d_name):
                defect = None if d_name == "good" else d_name.replace("_", " ")
                mask = cat_dir / "ground_truth" / d_name / f"{img.stem}_mask.png"
                region = mask_region(mask) if defect and mask.is_file() else None
                others = [x.replace("_", " ") for x in defects if x != d_name] or ["scratch"]
                other = others[k % len(others)]
                level = _LEVEL_CYCLE[k % len(_LEVEL_CYCLE)]
                ref = goods[k % len(goods)]
                group = f"{c.source}-{cat_dir.name}-{d_name}-{img.stem}"
                right = (f"The {cat} shows a {defect}" + (f" in the {region} area" if region
                                                          else "") + " that the reference lacks."
                         if defect else f"The {cat} matches the normal reference; no defect "
                                        "is visible.")
                wrong = (f"The {cat} matches the normal reference." if defect
                         else f"The {cat} shows a {other}.")
                truth = {"anomalous": bool(defect), "defect": defect, "region": region}
                for j, (q, ans) in enumerate(mvtec_questions(cat, level, defect, region, other)):
                    c.add({"id": f"{group}-q{j}", "group": group, "level": level,
                           "test_image": c.image(str(img), group, "test_image"),
                           "reference_image": c.image(str(ref), group, "reference_image"),
                           "category": cat_dir.name, "source": c.source, "question": q,
                           "answers": templated_answers(ans, right, wrong),
                           "label": "yes" if ans else "no", "truth": truth}, group)
                k += 1


# ----------------------------------------------------------------------------- entry point

def read_json_or_jsonl(src: Path):
    """One JSON document, or JSON Lines (one item per line, as InternVL's fine-tuning
    annotations are written) -> the list of items. Errors name the file and the line."""
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{src}: not UTF-8 text ({e})") from None
    if src.suffix.lower() != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data" after a first object: JSON Lines under another file name
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):
                raise ConvertError(f"{src}: line {e.lineno}: malformed JSON: {e.msg}") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConvertError(f"{src}: line {n}: malformed JSON Lines item: {e.msg} "
                                   f"(column {e.colno})") from None
    return items


IMPORTERS = {"llava": convert_llava, "manta": convert_manta, "mmad": convert_mmad,
             "mvtec": convert_mvtec}


def convert(fmt: str, src: str | Path, out: str | Path, root: str | Path | None = None,
            source: str | None = None, skip_bad: bool = False,
            check_images: bool = False) -> tuple[int, int, list[str]]:
    """Convert `src` in format `fmt` into JSONL `out` -> (records written, items skipped,
    skip messages). Written atomically; nothing is written if conversion raises."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(IMPORTERS)}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: input not found")
    out_root = Path(os.path.abspath(out.parent))
    if root is None:
        root = src if fmt == "mvtec" else src.parent
    c = Converter(src, Path(root), out_root, source or fmt, skip_bad)
    if fmt == "mvtec":
        convert_mvtec(c, src)
    else:
        IMPORTERS[fmt](c, read_json_or_jsonl(src))
    if check_images:
        for r in c.records:
            for fld in ("test_image", "reference_image"):
                if r.get(fld):
                    check_image_file(out_root / r[fld], r[fld], f"{out} (id {r['id']})", fld)
    write_jsonl(c.records, out)
    return len(c.records), c.n_skipped, c.errors
