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
  optional <category>/ground_truth/<defect>/<stem>_mask.* (or <stem>.*; any size and mode;
  the centre of its pixels above half its largest value gives the 3 x 3 region; an empty or
  missing mask: region unknown). Images of any size and mode (grayscale, RGB, RGBA, palette,
  16-bit; sage.data.images.to_rgb). Each test image gets a deterministic train/good reference
  and one group of 5 templated yes/no questions; levels cycle 7:6:3 (about AD-PL's
  44/37/19 %). The 4 ranked answers follow SynthAD's graded scheme, evidence first and the
  decision last ("... So the answer is Yes."; `mvtec_answers`), and every record carries
  `normal_label`, the answer its question has for a normal part (evaluate.py's "Always
  normal" row). A category without masks asks no region question.

Held-out split (`holdout_split`; `python -m sage.tools.convert mvtec FOLDER OUT.jsonl --holdout
0.5 --seed 0`): besides OUT.jsonl, OUT_train.jsonl and OUT_test.jsonl in the same folder. Whole
groups (a test image's questions together) are split per stratum, category x defect type
("good" is one type), seeded by (seed, stratum), so a seed gives the same split every time: a
stratum of n >= 2 images holds out holdout * n of them (rounded half up), at least 1 and at
most n - 1, so both parts get every such stratum; a stratum of one image goes to the training
part. --holdout must lie strictly between 0 and 1. Every format can be split this way (stratum:
category x truth.defect).
"""

from __future__ import annotations

import json
import os
import zlib
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

# Wrong defect types the graded answers name (A3, and A4 of a normal part): words the oracle
# judge knows (sage.data.oracle.DEFECT_WORDS), so a wrong type never outscores the right one.
WRONG_TYPES = ("scratch", "crack", "hole", "stain")


def article(word: str) -> str:
    """'a' or 'an' before `word`."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def a_defect(defect: str) -> str:
    """'a crack defect', 'an oil defect': how answers and questions name a defect type."""
    return f"{article(defect)} {defect} defect"


def mask_files(gt_dir: Path) -> dict[str, Path]:
    """The masks of one defect type's folder, by file stem ({} when there is no folder)."""
    if not gt_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(gt_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def find_mask(masks: dict[str, Path], stem: str) -> Path | None:
    """The defect mask of test image `stem`: <stem>_mask.* (MVTec AD), else <stem>.* (VisA and
    others in the same layout), any image extension; None if there is none."""
    return masks.get(f"{stem}_mask") or masks.get(stem)


def mask_region(mask_path: Path) -> str | None:
    """Which of the 3 x 3 regions holds the centre of the defect mask (None if empty).

    Any size (the region is a fraction of the mask's own width and height, so a mask of
    another size than its image gives the same region) and any mode: a pixel belongs to the
    defect when it exceeds half the mask's largest value (0/255, 0/1 and 16-bit masks alike;
    colour masks by luminance). An undecodable mask raises ConvertError naming the file."""
    try:
        with Image.open(mask_path) as im:
            high = im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
            m = np.asarray(im if high else im.convert("L"), dtype=np.float64)
    except Exception as e:  # PIL raises many types for a corrupt file
        raise ConvertError(f"{mask_path}: cannot decode the defect mask "
                           f"({type(e).__name__}: {e})") from None
    top = m.max(initial=0)
    if top <= 0:
        return None
    ys, xs = np.nonzero(m > top / 2)
    row = min(2, int(3 * ys.mean() / m.shape[0]))
    col = min(2, int(3 * xs.mean() / m.shape[1]))
    return REGIONS[3 * row + col]


def neighbours(region: str) -> list[str]:
    """The regions next to `region` on the 3 x 3 grid (the oracle's "neighbouring region")."""
    r, c = divmod(REGIONS.index(region), 3)
    return [REGIONS[3 * rr + cc] for rr in range(3) for cc in range(3)
            if max(abs(rr - r), abs(cc - c)) == 1]


def wrong_types(defect: str | None) -> list[str]:
    """WRONG_TYPES that neither name nor are named in `defect` ('scratch head': no scratch)."""
    if not defect:
        return list(WRONG_TYPES)
    return [w for w in WRONG_TYPES if w not in defect and defect not in w] or ["stain"]


_LEVEL_CYCLE = ("standard",) * 7 + ("identification",) * 6 + ("diagnosis",) * 3


def mvtec_questions(cat: str, level: str, defect: str | None, region: str | None,
                    others: tuple[str, str], where: str | None) -> list[tuple[str, bool, bool]]:
    """Five templated (question, label, normal_label) for one test/reference pair: label is the
    answer for this part, normal_label the answer the same question has for a normal part (the
    always-normal answerer's, docs/design.md §6).

    defect: the part's defect type (None: normal); region: where it is (None: unknown);
    others: two distinct defect types the part does not have; where: the region a normal part's
    region question asks about (None: the category has no masks, ask about no region)."""
    bad = defect is not None
    o1, o2 = others
    # (question, answer for a defective part, answer for a normal part)
    if level == "standard":
        qs = [(f"Compared with the reference image, is there any anomaly in the {cat}?",
               True, False),
              (f"Does the {cat} look the same as the normal reference?", False, True),
              (f"Is the {cat} free of defects?", False, True),
              (f"Would this {cat} pass a visual quality inspection?", False, True),
              (f"Is there any visible damage on the {cat}?", True, False)]
    elif level == "identification":
        asked = region if bad else where
        qs = [(f"Is there {a_defect(defect or o1)} on the {cat}?", True, False),
              (f"Is there {a_defect(o1 if bad else o2)} on the {cat}?", False, False),
              (f"Is there a defect in the {asked} part of the {cat}?", True, False) if asked
              else (f"Is there a defect anywhere on the {cat}?", True, False),
              (f"Is the {cat} anomalous compared with the reference?", True, False),
              (f"Is the {cat} identical to the reference image?", False, True)]
    else:
        asked = defect or o1
        qs = [(f"Should this {cat} be rejected by quality control?", True, False),
              (f"Could the condition of this {cat} affect its function or appearance?",
               True, False),
              (f"Is {a_defect(asked)} the reason this {cat} differs from the reference?",
               True, False),
              (f"Can this {cat} be shipped without rework?", False, True),
              (f"Does the {cat} need further inspection for {a_defect(asked)}?", True, False)]
    return [(q, when_bad if bad else when_normal, when_normal) for q, when_bad, when_normal in qs]


def decide(label: bool) -> str:
    """The closing sentence that states the decision (as SynthAD's `decide`)."""
    return f"So the answer is {'Yes' if label else 'No'}."


def mvtec_answers(label: bool, cat: str, defect: str | None, region: str | None,
                  k: int) -> list[str]:
    """Four ranked answers in SynthAD's graded scheme (sage.data.synthad.graded_answers), the
    evidence first and the decision last (docs/experiments.md, "Why the evidence comes first").

    Defective part: A1 right type at the right region; A2 the right type at a neighbouring
    region (region unknown: a defect of no named type); A3 a wrong type at the right region;
    A4 calls the part normal, the wrong decision. Normal part: A1 normal; A2 a harmless spot
    named at a region; A3 a minor mark called a named defect; A4 a defect, the wrong decision.
    The oracle judge scores them 5 > 4.33 > 3.67 > 1.33 (defective, type in its vocabulary,
    region known) and 5 > 4 > 3.33 > 1.33 (normal). k (the image's index) picks the wrong
    type and the regions, deterministically."""
    fake = wrong_types(defect)[k % len(wrong_types(defect))]
    if defect is not None:
        at = f"at the {region} of the {cat}" if region else f"on the {cat}"
        fails = "so the part fails the inspection"
        a1 = (f"The inspection shows that there is {a_defect(defect)} {at}; the reference has "
              f"no such mark, {fails}.")
        if region:
            near = neighbours(region)[k % len(neighbours(region))]
            a2 = (f"The inspection shows that there is {a_defect(defect)} at the {near} of the "
                  f"{cat}; {fails}.")
        else:
            a2 = f"The inspection shows that the {cat} has a defect, {fails}."
        a3 = (f"The inspection shows that there is {a_defect(fake)} {at}; this means the part "
              f"fails the check.")
        a4 = f"The {cat} looks normal and matches the reference."
    else:
        spot, other_spot = REGIONS[k % 9], REGIONS[(k + 4) % 9]
        a1 = (f"The inspection shows that the {cat} matches the normal reference and is free "
              f"of defects; so the part is fit for use and can pass inspection.")
        a2 = (f"The {cat} matches the reference apart from a faint spot at the {spot}, within "
              f"tolerance; so the part is fit for use.")
        a3 = f"There is a faint {fake} on the {cat}, but it is minor, so the part can pass."
        a4 = f"There is {a_defect(fake)} at the {other_spot} of the {cat}."
    return [f"{a1} {decide(label)}", f"{a2} {decide(label)}", f"{a3} {decide(label)}",
            f"{a4} {decide(not label)}"]


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
        # a category without any mask asks no region question (its answer would be unknown)
        has_masks = any(images(cat_dir / "ground_truth" / d) for d in defects)
        for d_name in ["good"] + defects:
            masks = mask_files(cat_dir / "ground_truth" / d_name) if d_name != "good" else {}
            for img in images(cat_dir / "test" / d_name):
                defect = None if d_name == "good" else d_name.replace("_", " ")
                mask = find_mask(masks, img.stem)
                region = mask_region(mask) if mask is not None else None
                # two defect types the part does not have: the category's others, else generic
                pool = [x.replace("_", " ") for x in defects if x != d_name]
                pool += [w for w in wrong_types(defect) if w not in pool]
                others = (pool[k % len(pool)], pool[(k + 1) % len(pool)])
                level = _LEVEL_CYCLE[k % len(_LEVEL_CYCLE)]
                ref = goods[k % len(goods)]
                group = f"{c.source}-{cat_dir.name}-{d_name}-{img.stem}"
                truth = {"anomalous": bool(defect), "defect": defect, "region": region}
                where = REGIONS[k % 9] if has_masks else None
                for j, (q, ans, normal) in enumerate(
                        mvtec_questions(cat, level, defect, region, others, where)):
                    c.add({"id": f"{group}-q{j}", "group": group, "level": level,
                           "test_image": c.image(str(img), group, "test_image"),
                           "reference_image": c.image(str(ref), group, "reference_image"),
                           "category": cat_dir.name, "source": c.source, "question": q,
                           "answers": mvtec_answers(ans, cat, defect, region, k),
                           "label": "yes" if ans else "no",
                           "normal_label": "yes" if normal else "no", "truth": truth}, group)
                k += 1


# ----------------------------------------------------------------------------- held-out split

def check_holdout(holdout) -> float:
    """The held-out share: a number strictly between 0 and 1, else ValueError."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) \
            or not 0 < holdout < 1:
        raise ValueError(f"--holdout {holdout!r}: expected a fraction strictly between 0 and 1 "
                         "(the share of each category x defect type's test images held out "
                         "for evaluation), e.g. 0.5")
    return float(holdout)


def stratum(rec: dict) -> tuple[str, str]:
    """A record's stratum: (category, defect type; "good" for a normal part or no truth)."""
    return rec.get("category") or "", (rec.get("truth") or {}).get("defect") or "good"


def holdout_split(records: list[dict], holdout: float, seed: int = 0
                  ) -> tuple[list[dict], list[dict]]:
    """Split whole groups (a group's questions stay together) into (train, test) records, file
    order kept, stratified by `stratum` (category x defect type): a stratum of n >= 2 groups
    holds out holdout * n of them (half up), at least 1 and at most n - 1, so both parts get
    every such stratum; a stratum of one group goes to train. Which groups is drawn from a
    generator seeded by (seed, the stratum's name), so a stratum's split depends on nothing
    else (adding a category moves no other image)."""
    holdout = check_holdout(holdout)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed {seed!r}: expected a non-negative integer")
    strata: dict[tuple, list[str]] = {}
    for r in records:
        gid = r.get("group") or r["id"]
        members = strata.setdefault(stratum(r), [])
        if gid not in members:
            members.append(gid)
    seen, test_groups = set(), set()
    for key in sorted(strata):
        groups = sorted(g for g in strata[key] if g not in seen)  # a group in one stratum only
        seen.update(groups)
        n = len(groups)
        if n < 2:
            continue
        n_test = min(n - 1, max(1, int(holdout * n + 0.5)))
        rng = np.random.default_rng([seed, zlib.crc32("/".join(key).encode())])
        test_groups.update(groups[i] for i in rng.permutation(n)[:n_test])
    train = [r for r in records if (r.get("group") or r["id"]) not in test_groups]
    test = [r for r in records if (r.get("group") or r["id"]) in test_groups]
    return train, test


def holdout_paths(out: str | Path) -> tuple[Path, Path]:
    """OUT.jsonl -> (OUT_train.jsonl, OUT_test.jsonl), beside it (the same data root)."""
    out = Path(out)
    return out.with_name(f"{out.stem}_train.jsonl"), out.with_name(f"{out.stem}_test.jsonl")


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
            source: str | None = None, skip_bad: bool = False, check_images: bool = False,
            holdout: float | None = None, seed: int = 0) -> tuple[int, int, list[str]]:
    """Convert `src` in format `fmt` into JSONL `out` -> (records written, items skipped,
    skip messages). Written atomically; nothing is written if conversion raises. With
    `holdout` the records are also split (`holdout_split`, `seed`) into `holdout_paths(out)`."""
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(IMPORTERS)}")
    if holdout is not None:
        check_holdout(holdout)
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
    if holdout is not None:
        parts = holdout_split(c.records, holdout, seed)  # before any file is written
    write_jsonl(c.records, out)
    if holdout is not None:
        for part, path in zip(parts, holdout_paths(out)):
            write_jsonl(part, path)
    return len(c.records), c.n_skipped, c.errors
