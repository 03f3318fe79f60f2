"""SynthAD's deterministic MLE judge (Eq. 3 sub-scores) and the Yes/No decision rule.

`extract_decision(text)` -> "yes" / "no" / None, the decision the answer states
(docs/design.md §3):

  1. A statement of the decision, the last one in the answer winning: "(the/final) answer
     (to ...) is / : / = X" ("So the answer is Yes", "The answer is no", "answer: yes"), a
     conclusion word before X ("Therefore, yes", "Hence: No.", "so yes", "Overall, no.",
     "Conclusion: yes") or a sentence that is only X ("... on the washer. Yes.").
  2. Otherwise a leading X: "Yes, there is ...", "No. The washer ...", "True: ...", "No -
     ...", "No because ...".
  3. Otherwise None (evaluate.py counts it as wrong, separately).

  X is yes / no / true / false (any case, optionally in quotes or **bold**), true counting as
  yes and false as no. X counts only when it stands alone: followed by punctuation, a line
  end, the end of the answer, a dash or a reason ("because", "since", "as", "but", "and",
  "so", ...), never when it leads the words after it: "No scratch is present", "so no
  defect is visible", "There is no scratch" are evidence, not decisions (after "answer is"
  any X counts: "The answer is Yes there is a scratch").

`oracle_scores(answer, truth, label, question) -> (type, loc, logic)`, each 1..5, from the
record's structured truth {"anomalous", "defect", "region", ...}:

  type   anomalous: names the true defect type 5; names only "defect/anomaly/damage" without
         a type 3; names a wrong type 1; claims the part is normal 1.
         normal: says normal / no defect and names no defect type 5; hedges 3; names a
         defect type 1.
  loc    anomalous: names the true region 5 (a colour deviation covers the whole part, so any
         of "whole", "overall", "center" counts); names a neighbouring region 3; no region 2;
         a wrong, non-neighbouring region 1. normal: names no region 5; names one 2.
  logic  no decision 1; wrong decision 1; right decision that hedges ("maybe", "hard to tell",
         "not sure", "might") 2; right decision with no reason 3; right decision with a reason
         (a clause, before or after the decision, with "so", "because", "can", "could",
         "which", "means", "fit for use") 5, minus 1 if the reason contradicts the decision
         (claims a defect while deciding the part is normal, or the reverse).
  Words count only as words of their own, with an -s / -es / -d / -ed / -ing ending: "the
  whole part" names no hole, "abnormal" does not say normal, "also" gives no reason.
"""

from __future__ import annotations

import re

REGIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
           "bottom-right")
DEFECT_WORDS = {
    "scratch": ("scratch",), "hole": ("hole",), "crack": ("crack",), "stain": ("stain",),
    "colour deviation": ("colour deviation", "color deviation", "wrong colour", "colour"),
    "missing component": ("missing",),
}
GENERIC = ("defect", "anomaly", "anomalous", "damage", "damaged", "issue", "fault")
NORMAL = ("normal", "no defect", "matches the", "fine", "intact", "fit for use")
HEDGES = ("maybe", "hard to tell", "not sure", "might", "perhaps", "unclear")
REASONS = ("so", "because", "can", "could", "which", "means", "fit for use", ";")

_X = r"(yes|no|true|false)"
_OPEN = r"""[*_"'`“‘(\[]*\s*"""          # markup or quotes before X: **Yes**, "no", (yes)
_CLOSE = r"""[*_"'`”’)\]]*"""             # ... and after it
# X stands alone: punctuation, a line end, the end, a dash or a reason follows
_ALONE = (_CLOSE + r"(?=[^\S\n]*(?:[.!](?!\w)|[,;:)]|\n|$)|\s+[-–—]|\s+(?:because|since|"
          r"as|but|and|so|given|while|though|although|however|there(?:'s| is| are)?)\b)")
_IS = r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\b\s*:?|\s*[:=]|\s+[-–—])\s*"
_F = re.IGNORECASE
_STATEMENTS = [
    # "So the answer is Yes", "The answer is no", "answer: yes", "final answer = No"
    re.compile(r"\banswer" + _IS + _OPEN + _X + r"\b(?!\s*(?:/|or\b))", _F),
    # "My decision is no.", "Verdict: yes"
    re.compile(r"\b(?:decision|verdict)" + _IS + _OPEN + _X + _ALONE, _F),
    # "The answer to whether the washer is scratched is no." (X must stand alone here)
    re.compile(r"\banswer\s+(?:to|for)\s+[^.?!\n]{1,120}?\s(?:is|would\s+be)\s*:?\s*" + _OPEN
               + _X + _ALONE, _F),
    # "Therefore, yes", "Hence: No.", "so yes", "In conclusion, no", "Conclusion: yes"
    re.compile(r"\b(?:so|therefore|thus|hence|consequently|accordingly|overall|in\s+"
               r"conclusion|in\s+summary|in\s+short|to\s+conclude|to\s+sum\s+up|conclusion)"
               r"\s*[,:;]?\s*(?:[-–—]\s*)?" + _OPEN + _X + _ALONE, _F),
    # a sentence that is only X: "... no scratch on the washer. Yes."
    re.compile(r"(?:^|(?<=[.!?;:\n]))\s*" + _OPEN + _X + _CLOSE
               + r"[^\S\n]*(?:[.!]+(?=\s|$)|(?=\n)|$)", _F),
]
# "Yes, ...", "No. ...", "True: ...", "No - ...", "No because ..." at the start
_LEADING = re.compile(r"^\s*" + _OPEN + _X + _ALONE, _F)


def _yes_no(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


def extract_decision(text: str | None) -> str | None:
    """'yes' / 'no' / None: the decision `text` states (rule: module docstring)."""
    text = text or ""
    last = None  # (end position, word) of the last statement of the decision
    for pat in _STATEMENTS:
        for m in pat.finditer(text):
            if last is None or m.end(1) > last[0]:
                last = (m.end(1), m.group(1))
    if last is not None:
        return _yes_no(last[1])
    m = _LEADING.match(text)
    return None if m is None else _yes_no(m.group(1))


def _neighbours(region: str) -> set[str]:
    r, c = divmod(REGIONS.index(region), 3)
    return {REGIONS[3 * rr + cc] for rr in range(3) for cc in range(3)
            if max(abs(rr - r), abs(cc - c)) == 1}


def _regions_named(text: str) -> list[str]:
    """Regions named in text; "top-left" does not also count as "top" or "left"."""
    found, rest = [], text
    for reg in sorted(REGIONS, key=len, reverse=True):
        pat = re.compile(rf"\b{re.escape(reg)}\b")
        if pat.search(rest):
            found.append(reg)
            rest = pat.sub(" ", rest)
    return found


def _word_pattern(words: tuple[str, ...]) -> re.Pattern:
    """One regex naming any of words as a word of its own, with an -s / -es / -d / -ed / -ing
    ending ("holes", "cracked", "no defects"): "whole" names no hole, "abnormal" says nothing
    is normal, "also" gives no "so", "stainless" no stain. Punctuation (";") matches as is."""
    def one(w: str) -> str:
        return ((r"(?<![a-z])" if w[0].isalpha() else "") + re.escape(w)
                + (r"(?:s|es|d|ed|ing)?(?![a-z])" if w[-1].isalpha() else ""))
    return re.compile("|".join(one(w) for w in words))


_DEFECT_PATTERNS = {d: _word_pattern(words) for d, words in DEFECT_WORDS.items()}
_GENERIC, _CLAIMS = _word_pattern(GENERIC), _word_pattern(GENERIC[:3])
_NORMAL, _HEDGES, _REASONS = _word_pattern(NORMAL), _word_pattern(HEDGES), _word_pattern(REASONS)
_WHOLE = _word_pattern(("whole", "overall"))  # where a colour deviation is


def _types_named(text: str) -> list[str]:
    return [d for d, pat in _DEFECT_PATTERNS.items() if pat.search(text)]


def _type_score(text: str, truth: dict) -> int:
    types = _types_named(text)
    hedged = _HEDGES.search(text)
    if truth["anomalous"]:
        if truth["defect"] in types:
            return 5
        if types:
            return 1
        if _GENERIC.search(text) and not _NORMAL.search(text):
            return 3
        return 3 if hedged else 1
    if types:
        return 1
    return 3 if hedged else (5 if _NORMAL.search(text) else 3)


def _loc_score(text: str, truth: dict) -> int:
    named = _regions_named(text)
    if not truth["anomalous"]:
        return 2 if named else 5
    if truth["defect"] == "colour deviation" and (
            _WHOLE.search(text) or "center" in named):
        return 5
    if truth["region"] in named:
        return 5
    if not named:
        return 2
    return 3 if any(n in _neighbours(truth["region"]) for n in named) else 1


def _logic_score(text: str, decision: str | None, label: str, truth: dict) -> int:
    if decision is None or decision != label:
        return 1
    if _HEDGES.search(text):
        return 2
    score = 5 if _REASONS.search(text) else 3
    claims_defect = bool(_types_named(text) or _CLAIMS.search(text))
    claims_normal = bool(_NORMAL.search(text))
    if (truth["anomalous"] and claims_normal and not claims_defect) or (
            not truth["anomalous"] and claims_defect and not claims_normal):
        score -= 1
    return score


def oracle_scores(answer: str, truth: dict, label: str, question: str) -> tuple[int, int, int]:
    """(type, location, logic), each 1..5, for a free-text answer (rules: module docstring)."""
    if not isinstance(truth, dict) or "anomalous" not in truth:
        raise KeyError(f"oracle needs a SynthAD 'truth' with 'anomalous'; got {truth!r}")
    if label not in ("yes", "no"):
        raise ValueError(f"oracle needs label 'yes' or 'no'; got {label!r}")
    text = (answer or "").lower()
    decision = extract_decision(text)
    return _type_score(text, truth), _loc_score(text, truth), _logic_score(text, decision,
                                                                            label, truth)
