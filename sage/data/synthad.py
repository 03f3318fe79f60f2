"""SynthAD: a generated industrial anomaly-reasoning benchmark in the AD-PL JSONL format
(docs/design.md §6-7), so that the whole SAGE pipeline runs offline on a CPU.

Products (8 categories, 3 colour variants each, two sizes; on request 6 more, EXTRA_CATEGORIES,
in training only) are drawn with Pillow on a lit, noisy background; an anomalous test image
carries one defect at one of 9 regions:
scratch, hole, crack, stain, colour deviation (the object is drawn in another variant's
colour: abnormal only relative to the reference) or a missing component. Every test image has
a normal reference: another instance of the same variant on the same inspection station, with
small pose and lighting jitter.
Half of the pairs are anomalous, and no question template can be answered from its wording
alone (label balance, P_TRUE below).

Each test/reference pair gets a group of 5 questions of one level (standard comparison ~44%,
defect identification ~37%, deep diagnosis ~19%, as in AD-PL), each with 4 ranked answers:
  A1 right decision + right defect type + right region + sound reasoning
  A2 right decision, vague or wrong detail
  A3 hedged decision with faulty reasoning
  A4 wrong decision
plus structured truth (for the oracle judge, sage.data.oracle), per-image fact sentences
(one per prompt of sage.data.prompts.FACT_PROMPTS, from category knowledge) and each
question's normal_label, its answer for a normal part (evaluate.py's "Always normal" row).

Splits: pretrain (captions, general questions and fact prompts on normal images of the 8
categories; no anomaly QA), sfe_train, edpo_train, test_seen (seen categories; `generate`'s
sfe_groups adds SFE groups, with extra_categories of the EXTRA_CATEGORIES too), test_unseen
(the UNSEEN categories only), corpus.txt (all text, for the tiny tokenizer), facts.jsonl,
manifest.json.

    generate("data/synthad", seed=0)   # or: python -m sage.tools.synthad --out data/synthad
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sage.data.prompts import FACT_PROMPTS
# the pictures (re-exported: callers import them from here)
from sage.data.synthad_render import (BY_NAME, CATEGORIES, EXTRA_CATEGORIES,  # noqa: F401
                                      REGIONS, Category, fixture, render)

DEFECTS = ("scratch", "hole", "crack", "stain", "colour deviation", "missing component")
LEVELS = ("standard", "identification", "diagnosis")
LEVEL_WEIGHTS = (0.44, 0.37, 0.19)
# Label balance: no question template may be answerable from its wording alone. Half the
# pairs are anomalous; a type / region / cause question names the true one with P_TRUE.
# Measured on the default seed: majority label per template answers 57% of test_unseen
# (was 72% before the balance), so accuracy above that needs the images.
P_TRUE = 0.7
# A general VLM describes surface marks it sees (InternVL2 does): half the pretrain shots
# carry one of these, named in the caption; the anomaly splits' images are untouched.
SURFACE_MARKS = ("scratch", "hole", "crack", "stain")
P_MARK = 0.5
UNSEEN = ("nut", "cable")  # evaluation-only categories (paper protocol: unseen categories)

CONSEQUENCE = {
    "scratch": "a scratch breaks the surface finish and can grow into a crack under load",
    "hole": "a hole lets dirt and moisture in and weakens the part",
    "crack": "a crack can spread and make the part break in use",
    "stain": "a stain shows contamination from the process and fails the visual check",
    "colour deviation": "the colour does not match the reference variant, so the wrong "
                        "material or coating was used",
    "missing component": "a missing component means the part cannot work as designed",
}
CAUSE = {"scratch": "rough handling", "hole": "a punching fault", "crack": "stress in the material",
         "stain": "oil contamination", "colour deviation": "a wrong coating batch",
         "missing component": "an assembly error"}


# ----------------------------------------------------------------------------- text

def facts_for(cat: Category, variant: int) -> list[str]:
    """One sentence per prompt of FACT_PROMPTS (category knowledge + the image's variant)."""
    comps = " and ".join(n for n, _ in cat.components)
    return [f"A {cat.name} tends to show {', '.join(cat.typical[:-1])} or {cat.typical[-1]}.",
            f"A normal {cat.name} is {cat.description}.",
            f"The {comps} of a {cat.name} matter most in inspection.",
            f"This {cat.name} is the {cat.variants[variant][0]} variant."]


def other(rng: np.random.Generator, options, exclude):
    choices = [o for o in options if o != exclude]
    return choices[int(rng.integers(len(choices)))]


def finding(t: dict, cat: str) -> str:
    """The A1 explanation of what is (not) there."""
    if not t["anomalous"]:
        return f"the {cat} matches the normal reference and is free of defects"
    where = f"at the {t['region']}"
    if t["defect"] == "colour deviation":
        return (f"the {cat} is {t['colour']} while the reference is {t['reference_colour']}, a "
                f"colour deviation over the whole part")
    if t["defect"] == "missing component":
        return f"the {t['component']} is missing {where} of the {cat}, a missing component"
    return f"there is a {t['defect']} {where} of the {cat}"


def decide(label: str) -> str:
    """The closing sentence that states the decision: answers give the evidence first."""
    return f"So the answer is {'Yes' if label == 'yes' else 'No'}."


def answers_for(label: str, t: dict, cat: str, rng: np.random.Generator) -> list[str]:
    """4 ranked answers (A1 > A2 > A3 > A4) for a question whose truth is `label`.

    Each states what the inspection shows and then the decision (`decide`): a model that
    must say Yes/No first has to see the part, read the question's polarity and combine the
    two in one step, which the tiny model never learnt (docs/experiments.md, "Why the evidence
    comes first"); with the evidence first the Yes/No follows from text already written."""
    wrong = "no" if label == "yes" else "yes"
    why = (CONSEQUENCE[t["defect"]] if t["anomalous"]
           else "so the part is fit for use and can pass inspection")
    a1 = f"The inspection shows that {finding(t, cat)}; {why}. {decide(label)}"
    if t["anomalous"]:
        fake = other(rng, [d for d in DEFECTS if d not in ("colour deviation", "missing component")],
                     t["defect"])
        a2 = (f"There is a {fake} at the {other(rng, REGIONS, t['region'])} of the {cat}. "
              f"{decide(label)}")
        a4 = f"The {cat} looks normal and matches the reference. {decide(wrong)}"
    else:
        a2 = f"The {cat} seems fine overall. {decide(label)}"
        fake = DEFECTS[int(rng.integers(4))]
        a4 = (f"There is a {fake} at the {REGIONS[int(rng.integers(9))]} of the {cat}. "
              f"{decide(wrong)}")
    a3 = (f"Maybe, it is hard to tell from this image whether the {cat} is defective. "
          f"{decide(label)}")
    return [a1, a2, a3, a4]


def neighbour(region: str, rng: np.random.Generator) -> str:
    """A region next to `region` on the 3 x 3 grid (the oracle's "neighbouring region")."""
    r, c = divmod(REGIONS.index(region), 3)
    near = [REGIONS[3 * rr + cc] for rr in range(3) for cc in range(3)
            if max(abs(rr - r), abs(cc - c)) == 1]
    return near[int(rng.integers(len(near)))]


def graded_answers(label: str, t: dict, cat: str, rng: np.random.Generator) -> list[str]:
    """4 ranked answers whose errors grow one at a time, as an expert ranking orders them:
    A1 right in every part; A2 the right type at a neighbouring region (a normal part: a
    harmless spot named at a region); A3 a wrong type (normal: a minor mark called a named
    defect); A4 the wrong decision. The oracle judge (sage.data.oracle) gives the four
    different scores, anomalous 5 > 4.33 > 3.67 > 1.33 and normal 5 > 4 > 3.33 > 1.33, so
    Eq. 5's adjacent pairs have entropy gaps to choose from (`answers_for`: two of the four
    scored the same in 64% of E-DPO instances)."""
    wrong = "no" if label == "yes" else "yes"
    a1 = answers_for(label, t, cat, rng)[0]  # the same A1 (its wording draws nothing)
    drawable = [d for d in DEFECTS if d not in ("colour deviation", "missing component")]
    if t["anomalous"]:
        d = t["defect"]
        near = neighbour(t["region"], rng)
        # A2 never names the component: "top wire" would name the true region "top"
        what = ("a component is missing" if d == "missing component" else f"there is a {d}")
        a2 = f"The inspection shows that {what} at the {near} of the {cat}; {CONSEQUENCE[d]}."
        fake = other(rng, drawable, d)
        a3 = (f"The inspection shows that there is a {fake} at the {t['region']} of the {cat}; "
              f"this means the part fails the check.")
        a4 = f"The {cat} looks normal and matches the reference."
    else:
        a2 = (f"The {cat} matches the reference apart from a faint spot at the "
              f"{REGIONS[int(rng.integers(9))]}, within tolerance; so the part is fit for use.")
        a3 = (f"There is a faint {drawable[int(rng.integers(4))]} on the {cat}, but it is minor, "
              f"so the part can pass.")
        a4 = (f"There is a {drawable[int(rng.integers(4))]} at the "
              f"{REGIONS[int(rng.integers(9))]} of the {cat}.")
    return [a1, f"{a2} {decide(label)}", f"{a3} {decide(label)}", f"{a4} {decide(wrong)}"]


def questions_for(level: str, t: dict, cat: Category, rng: np.random.Generator):
    """Five (question, label, normal_label) triples of one level about one test/reference
    pair: normal_label is the answer the question has for a normal part (evaluate.py's
    "Always normal" row). Computing it draws nothing from rng."""
    n, anom, dfc = cat.name, t["anomalous"], t["defect"]
    yn = lambda b: "yes" if b else "no"  # noqa: E731

    def ask(question: str, answer) -> tuple[str, str, str]:
        """answer(anomalous) -> bool: the label for this part and for a normal one."""
        return question, yn(answer(anom)), yn(answer(False))

    if level == "standard":
        return [ask(f"Is there any anomaly in the test {n} compared with the reference?",
                    lambda a: a),
                ask(f"Does the test {n} look the same as the normal reference?", lambda a: not a),
                ask(f"Is the test {n} defective?", lambda a: a),
                ask(f"Does the test {n} show any difference from the reference?", lambda a: a),
                ask(f"Should the test {n} pass the quality inspection?", lambda a: not a)]
    if level == "identification":
        qs = []
        for _ in range(3):
            ask_type = dfc if (anom and rng.random() < P_TRUE) else other(rng, DEFECTS, dfc)
            qs.append(ask(f"Is there a {ask_type} on the {n}?",
                          lambda a, d=ask_type: a and d == dfc))
        reg = (t["region"] if (anom and rng.random() < P_TRUE)
               else other(rng, REGIONS, t["region"]))
        qs.append(ask(f"Is there a defect at the {reg} of the {n}?",
                      lambda a: a and reg == t["region"]))
        qs.append(ask(f"Is the {n} free of defects?", lambda a: not a))
        return qs
    cause = (CAUSE[dfc] if (anom and rng.random() < P_TRUE)
             else CAUSE[other(rng, DEFECTS, dfc)])
    return [ask(f"Would this {n} work reliably in use?", lambda a: not a),
            ask(f"Could a defect on this {n} cause it to fail?", lambda a: a),
            ask(f"Does this {n} need rework or rejection?", lambda a: a),
            ask(f"Could the condition of this {n} come from {cause}?",
                lambda a: a and cause == CAUSE[dfc]),
            ask(f"Is it safe to ship this {n} to a customer?", lambda a: not a)]


# ----------------------------------------------------------------------------- generation

def sample_pair(cat: Category, rng: np.random.Generator, size: int, anomalous: bool,
                p_shared_mark: float = 0.0):
    """-> (test image, reference image, truth). With probability `p_shared_mark` both shots
    carry the same surface mark (truth["shared_mark"]), away from the defect's region: the
    reference shows it, so it belongs to the product and only the comparison tells whether
    the test part is normal. With `p_shared_mark` 0 nothing more is drawn from `rng`."""
    v = int(rng.integers(len(cat.variants)))
    scale = float(rng.choice([0.9, 1.0]))
    truth = {"anomalous": anomalous, "defect": None, "region": None,
             "variant": cat.variants[v][0], "reference_variant": cat.variants[v][0],
             "colour": cat.variants[v][0], "reference_colour": cat.variants[v][0],
             "component": None}
    kw = {}
    if anomalous:
        defect = DEFECTS[int(rng.integers(len(DEFECTS)))]
        truth["defect"] = defect
        if defect == "missing component":
            comp, region = cat.components[int(rng.integers(len(cat.components)))]
            truth.update(component=comp, region=region)
            kw["missing"] = comp
        elif defect == "colour deviation":
            cv = (v + 1 + int(rng.integers(len(cat.variants) - 1))) % len(cat.variants)
            truth.update(region="center", colour=cat.variants[cv][0], variant=cat.variants[cv][0])
            kw["colour_variant"] = cv
        else:
            truth["region"] = REGIONS[int(rng.integers(9))]
            kw.update(defect=defect, region=truth["region"])
    mark = None
    if p_shared_mark > 0 and rng.random() < p_shared_mark:
        region = other(rng, REGIONS, truth["region"])
        mark = (SURFACE_MARKS[int(rng.integers(len(SURFACE_MARKS)))], region,
                int(rng.integers(2 ** 31)))
        truth["shared_mark"] = f"{mark[0]} at the {region}"
    station = fixture(size, rng)
    test = render(cat, v, size, rng, scale, fixture=station, mark=mark, **kw)
    ref = render(cat, v, size, rng, scale, fixture=station, mark=mark)
    return test, ref, truth


def make_groups(split: str, cats: list[Category], n_groups: int, out: Path, size: int,
                rng: np.random.Generator, p_anomalous: float = 0.5,
                graded_rng: np.random.Generator | None = None, first: int = 0,
                p_shared_mark: float = 0.0) -> list[dict]:
    """n_groups test/reference pairs, 5 QA records each, numbered from `first`. With
    `graded_rng` the ranked answers are `graded_answers`, drawn from it (the E-DPO split);
    `answers_for` still draws from `rng`, so that every later split comes out as it did before
    graded answers existed. `p_shared_mark`: see `sample_pair`."""
    records = []
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    n_anom = int(round(p_anomalous * n_groups))
    anomalous = rng.permutation([True] * n_anom + [False] * (n_groups - n_anom))
    for g in range(first, first + n_groups):
        cat = cats[g % len(cats)]
        test, ref, truth = sample_pair(cat, rng, size, bool(anomalous[g - first]),
                                       p_shared_mark)
        gid = f"synth-{split}-{cat.name}-{g:05d}"
        test.save(img_dir / f"{gid}.png")
        ref.save(img_dir / f"{gid}_ref.png")
        level = LEVELS[int(rng.choice(3, p=LEVEL_WEIGHTS))]
        facts = facts_for(cat, cat.variants.index(next(
            x for x in cat.variants if x[0] == truth["reference_variant"])))
        for q, (question, label, normal) in enumerate(questions_for(level, truth, cat, rng)):
            answers = answers_for(label, truth, cat.name, rng)
            if graded_rng is not None:
                answers = graded_answers(label, truth, cat.name, graded_rng)
            records.append({
                "id": f"{gid}-q{q}", "test_image": f"images/{split}/{gid}.png",
                "reference_image": f"images/{split}/{gid}_ref.png", "category": cat.name,
                "source": "synthad", "level": level, "group": gid, "question": question,
                "answers": answers, "label": label, "normal_label": normal,
                "facts": facts,
                "truth": {k: truth[k] for k in ("anomalous", "defect", "region", "variant",
                                                "reference_variant", "shared_mark")
                          if k in truth}})
    return records


def yes_no_questions(cat: Category, colour: str, rng: np.random.Generator
                     ) -> list[tuple[str, str, str]]:
    """Two general Yes/No questions about what the image shows (which object, which colour),
    each asked in a positive or a negated form about the true or another value, so that
    "Yes" and "No" are equally likely and the answer needs both the image and the wording.
    A real VLM brings this skill to the anomaly task; without it SFE must learn the
    question's polarity and the image at once (docs/experiments.md, "Why the evidence comes first").
    -> [(question, answer, label)]."""
    others = [c for c in CATEGORIES if c.name != cat.name]
    asked = []
    for kind in ("object", "colour"):
        true = bool(rng.random() < 0.5)
        negated = bool(rng.random() < 0.5)
        if kind == "object":
            name = cat.name if true else others[int(rng.integers(len(others)))].name
            q = (f"Is the object something other than a {name}?" if negated
                 else f"Is this a {name}?")
            fact = f"It is a {cat.name}" + ("." if true else f", not a {name}.")
        else:
            wrong = [c for c, _ in cat.variants if c != colour]
            c = colour if true else wrong[int(rng.integers(len(wrong)))]
            q = (f"Is the {cat.name} a colour other than {c}?" if negated
                 else f"Is the {cat.name} {c}?")
            fact = f"The {cat.name} is {colour}" + ("." if true else f", not {c}.")
        label = "yes" if true != negated else "no"
        asked.append((q, f"{fact} {decide(label)}", label))
    return asked


def surface_mark(cat: Category, rng: np.random.Generator) -> tuple[str | None, str | None, str]:
    """-> (mark, region, sentence): half the pretrain shots carry a surface mark, described
    the way a general VLM describes what it sees (no reference, no verdict, no anomaly)."""
    if rng.random() >= P_MARK:
        return None, None, f"The surface of the {cat.name} is clean."
    mark = SURFACE_MARKS[int(rng.integers(len(SURFACE_MARKS)))]
    region = REGIONS[int(rng.integers(len(REGIONS)))]
    return mark, region, f"The {cat.name} has a {mark} at the {region}."


def make_pretrain(cats: list[Category], n_images: int, out: Path, size: int,
                  rng: np.random.Generator, yn_rng: np.random.Generator,
                  mark_rng: np.random.Generator) -> list[dict]:
    """Captions, general questions and fact prompts: no anomaly QA.

    `yn_rng` draws the Yes/No questions (`yes_no_questions`) and `mark_rng` the surface marks
    (`surface_mark`: which, where, and their shapes) apart from `rng`, so adding them left
    every other split as it was."""
    records = []
    img_dir = out / "images" / "pretrain"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        cat = cats[i % len(cats)]
        v = int(rng.integers(len(cat.variants)))
        colour = cat.variants[v][0]
        rel = f"images/pretrain/{cat.name}-{i:05d}.png"
        mark, where, seen = surface_mark(cat, mark_rng)
        render(cat, v, size, rng, float(rng.choice([0.9, 1.0])), defect=mark, region=where,
               defect_rng=mark_rng).save(out / rel)
        comp, region = cat.components[int(rng.integers(len(cat.components)))]
        qa = [("Describe the image.", f"A {colour} {cat.name} on a grey bench. It is "
                                      f"{cat.description}. {seen}"),
              ("What object is shown in the image?", f"It is a {cat.name}."),
              (f"What colour is the {cat.name}?", f"The {cat.name} is {colour}."),
              (f"Where is the {comp} of the {cat.name}?", f"The {comp} is at the {region}.")]
        qa += list(zip(FACT_PROMPTS, facts_for(cat, v)))
        for k in rng.choice(len(qa), size=3, replace=False):
            q, a = qa[int(k)]
            rid = f"synth-pretrain-{i:05d}-q{int(k)}"
            records.append({"id": rid, "test_image": rel, "reference_image": None,
                            "category": cat.name, "source": "synthad", "level": "general",
                            "group": rid, "question": q, "answers": [a], "label": None})
        rid = f"synth-pretrain-{i:05d}-surface"
        records.append({"id": rid, "test_image": rel, "reference_image": None,
                        "category": cat.name, "source": "synthad", "level": "general",
                        "group": rid, "question": f"Describe the surface of the {cat.name}.",
                        "answers": [seen], "label": None})
        for k, (q, a, label) in enumerate(yes_no_questions(cat, colour, yn_rng)):
            rid = f"synth-pretrain-{i:05d}-yn{k}"
            records.append({"id": rid, "test_image": rel, "reference_image": None,
                            "category": cat.name, "source": "synthad", "level": "general",
                            "group": rid, "question": q, "answers": [a], "label": label})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


SIZES = {"pretrain": 700, "sfe_train": 300, "edpo_train": 100, "test_seen": 40,
         "test_unseen": 40}  # images (pretrain) or groups of 5 questions, at scale 1


def scaled(groups: int, scale: float) -> int:
    """A split's size at `scale`: never fewer than one group per category."""
    return max(len(CATEGORIES), int(round(groups * scale)))


def generate(out: str | Path, seed: int = 0, size: int = 224, scale: float = 1.0,
             sfe_groups: int | None = None, extra_categories: bool = False,
             shared_marks: float = 0.0) -> dict:
    """Write every split into `out`; -> the manifest. `sfe_groups` (default SIZES x scale)
    sets the SFE training split's size: groups beyond the default come from their own random
    stream after the others, so every other split (and the first groups) stays as it is.
    `extra_categories`: those extra groups cycle over the seen and the EXTRA_CATEGORIES (never
    an unseen one); the manifest lists the extra ones under categories["extra"].
    `shared_marks`: the share of those extra pairs whose test and reference carry the same
    surface mark (`sample_pair`), normal and anomalous pairs alike, so that a mark alone does
    not tell the label; the manifest records it when used."""
    if not 0 <= shared_marks <= 1:
        raise ValueError(f"shared_marks={shared_marks}: a share between 0 and 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen = [c for c in CATEGORIES if c.name not in UNSEEN]
    unseen = [c for c in CATEGORIES if c.name in UNSEEN]
    n = {k: scaled(v, scale) for k, v in SIZES.items()}
    splits = {"pretrain": make_pretrain(list(CATEGORIES), n["pretrain"], out, size, rng,
                                        np.random.default_rng([seed, 1]),
                                        np.random.default_rng([seed, 2]))}
    for split, cats in (("sfe_train", seen), ("edpo_train", seen), ("test_seen", seen),
                        ("test_unseen", unseen)):
        splits[split] = make_groups(split, cats, n[split], out, size, rng, graded_rng=(
            np.random.default_rng([seed, 3]) if split == "edpo_train" else None))
    extra = (n["sfe_train"] if sfe_groups is None else sfe_groups) - n["sfe_train"]
    if extra < 0:
        raise ValueError(f"sfe_groups={sfe_groups}: at least the default {n['sfe_train']} "
                         f"(SIZES x scale {scale})")
    extra_cats = seen + list(EXTRA_CATEGORIES) if extra_categories else seen
    splits["sfe_train"] += make_groups("sfe_train", extra_cats, extra, out, size,
                                       np.random.default_rng([seed, 4]), first=n["sfe_train"],
                                       p_shared_mark=shared_marks)
    for split, recs in splits.items():
        write_jsonl(recs, out / f"{split}.jsonl")
    texts = set()
    for recs in splits.values():
        for r in recs:
            texts.update([r["question"], *r["answers"], *(r.get("facts") or [])])
    (out / "corpus.txt").write_text("\n".join(sorted(texts)) + "\n")
    facts = {r["test_image"]: r["facts"] for k, recs in splits.items() if k != "pretrain"
             for r in recs}
    write_jsonl([{"test_image": k, "facts": v, "source": "synthad"} for k, v in facts.items()],
                out / "facts.jsonl")
    categories = {"seen": [c.name for c in seen], "unseen": [c.name for c in unseen]}
    if extra_categories and extra:  # only when used
        categories["extra"] = [c.name for c in EXTRA_CATEGORIES]
    manifest = {"seed": seed, "size": size, "scale": scale,
                "categories": categories, "counts": {k: len(v) for k, v in splits.items()}}
    if shared_marks and extra:  # only when used
        manifest["shared_marks"] = shared_marks
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
