"""Prompt assembly (docs/design.md §1 step 6): where image tokens and fact tokens sit in the
user turn.

    <img><IMG_CONTEXT> x (n_image_tokens * tiles)</img>\n
    <FACT_CONTEXT> x N\nAbove is the feature related to the anomaly facts.\n   (facts_mode "fe")
    Facts: s_1 s_2 ... s_N\nAbove is the feature related to the anomaly facts.\n (facts_mode "hard")
    {question}

The chat template around this message lives in `sage.tokenizer` (Hermes-2, docs/design.md §5).

    msg = build_user_message("Is there a scratch?", n_image_tokens=64, facts_mode="fe", n_facts=4)
"""

from __future__ import annotations

from sage.tokenizer import FACT_CONTEXT, IMG_CONTEXT, IMG_END, IMG_START  # the tokenizer's own
# Paper §3.1: the question is augmented with this auxiliary instruction.
AUX_PROMPT = "Above is the feature related to the anomaly facts."

# Fixed fact prompts (paper §3.2; the first is quoted in the paper, the others are the
# project's). The pretrained VLM answers each about the test image, offline (sage.facts).
FACT_PROMPTS = (
    "What kind of anomalies does this type of object tend to exhibit?",
    "What does a normal example of this object look like?",
    "Which components of this object are most important to inspect?",
    "What colour and variant is this object?",
)


def image_placeholder(n_tokens: int) -> str:
    """`<img>` + n_tokens x `<IMG_CONTEXT>` + `</img>` for one image (all its tiles)."""
    return IMG_START + IMG_CONTEXT * n_tokens + IMG_END


def build_user_message(question: str, n_image_tokens: int, facts_mode: str = "fe",
                       n_facts: int = 0, facts: list[str] | None = None) -> str:
    """The user turn: test image, then facts (as `facts_mode` says), then the question.

    n_image_tokens: LLM tokens of the test image (n_image_tokens per tile x tiles).
    facts_mode: "fe" -> n_facts x <FACT_CONTEXT> placeholders filled by t^s (Eq. 2, Eq. 9);
                "hard" -> the fact sentences as plain text (Table 3, Fact[Hard]);
                "none" -> the plain VLM prompt (Table 3 baseline).
    """
    parts = [image_placeholder(n_image_tokens) + "\n"]
    if facts_mode == "fe":
        if n_facts <= 0:
            raise ValueError(f"facts_mode 'fe' needs n_facts > 0, got {n_facts}")
        parts.append(FACT_CONTEXT * n_facts + "\n" + AUX_PROMPT + "\n")
    elif facts_mode == "hard":
        if not facts:
            raise ValueError("facts_mode 'hard' needs the fact sentences (record field 'facts')")
        parts.append("Facts: " + " ".join(f.strip() for f in facts) + "\n" + AUX_PROMPT + "\n")
    else:  # a facts_mode comes from a SageConfig, whose __post_init__ validates it
        assert facts_mode == "none", f"facts_mode={facts_mode!r}"
    parts.append(question.strip())
    return "".join(parts)
