"""Batching: examples (sage.data.datasets) -> the batch dict SageModel consumes.

    input_ids       LongTensor (B, T)   right padded with pad_id (LEFT padded for generation)
    attention_mask  LongTensor (B, T)   1 real, 0 pad
    labels          LongTensor (B, T)   -100 except answer tokens + closing <|im_end|> (Eq. 8)
    pixel_test      FloatTensor (n_tiles_total, 3, S, S)   all test tiles, example order
    tiles_test      LongTensor (B,)     tiles per test image
    pixel_ref       FloatTensor (n_ref_tiles_total, 3, S, S) or None (zero-shot)
    tiles_ref       LongTensor (B,) or None
    fact_ids        LongTensor (B, N, Lf)  first N fact sentences, <= max_fact_tokens each,
                                           pad_id padded ("fe" mode; None otherwise)
    fact_mask       LongTensor (B, N, Lf)  1 real token
    ids             list[str]           record ids

The user turn is sage.data.prompts.build_user_message (test image placeholders: n_image_tokens
x tiles; then N <FACT_CONTEXT> or the facts as text; then the question); the Hermes-2 chat
template and label masking are the tokenizer's `encode_chat`.

EDPOCollator packs each instance into ONE row: its prompt once, then every answer the pairs of
Eq. 5 need, each as its own segment (`pack`). A segment starts with a copy of the prompt's last
token at the same position, sees the prompt (without that last token) and itself causally, and
nothing of the other answers, so each answer's log-prob is exactly the one of the plain
sequence prompt + answer, while the images and the prompt go through the model once, not once
per answer (4 times per instance with both pairs; the prompt is most of the tokens). Extra keys:
`attention_mask` (B, 1, T, T) bool, `position_ids` (B, T), `segments` (B, T) (the sequence each
token belongs to, -1 for prompt and pad), `n_segments`, `seq_ranks` (S,) (the answer rank of
each sequence) and per pair `pair_w` / `pair_l` (M,) (its chosen / rejected sequence),
`pair_delta_h` (M,), `pair_index` (M,), `pair_kind` ("extreme" | "adjacent"), `pair_ranks`
(M, 2) (0-based ranks of a_w, a_l).

    batch = Collator(tok, cfg)(examples); logits, loss_sum, n_tok = model(batch)
"""

from __future__ import annotations

import dataclasses

import torch

from sage.config import SageConfig
from sage.data.prompts import build_user_message
from sage.losses import IGNORE_INDEX, answer_entropy, mle_score, select_edpo_pairs


def pad_sequences(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Lists of ints -> LongTensor (B, T_max), padded on the right (or left) with `value`."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            if left:
                out[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Collator:
    """Examples -> batch dict (module docstring). facts_mode defaults to cfg.facts_mode;
    max_len (default cfg.llm.max_seq_len) truncates the answer, never the prompt."""

    def __init__(self, tokenizer, cfg: SageConfig, facts_mode: str | None = None,
                 for_generation: bool = False, max_len: int | None = None):
        if facts_mode is not None and facts_mode != cfg.facts_mode:
            cfg = dataclasses.replace(cfg, facts_mode=facts_mode)  # __post_init__ validates it
        self.tok, self.cfg, self.facts_mode = tokenizer, cfg, cfg.facts_mode
        self.for_generation = for_generation
        self.max_len = max_len or cfg.llm.max_seq_len

    # ------------------------------------------------------------------ text

    def user_message(self, ex: dict) -> str:
        n_tiles = ex["pixel_test"].shape[0]
        facts = ex.get("facts") or []
        need = self.cfg.facts_needed  # the scripts check it for every record at load
        if len(facts) < need:
            raise ValueError(f"record {ex.get('id')!r}: facts_mode {self.facts_mode!r} needs "
                             f"{need} fact sentence(s) in field 'facts', got {len(facts)} "
                             "(fill them with `python -m sage.tools.facts ... --fill`)")
        return build_user_message(ex["question"], self.cfg.n_image_tokens * n_tiles,
                                  facts_mode=self.facts_mode, n_facts=self.cfg.n_facts,
                                  facts=facts[:self.cfg.n_facts])

    def encode(self, ex: dict, answer: str | None) -> tuple[list[int], list[int]]:
        """One example -> (ids, labels), truncated to max_len inside the answer only."""
        ids, labels = self.tok.encode_chat(self.user_message(ex), answer,
                                           system=self.cfg.system_message)
        if len(ids) > self.max_len:
            n_prompt = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
            if n_prompt >= self.max_len:
                raise ValueError(f"record {ex.get('id')!r}: the prompt alone has {n_prompt} "
                                 f"tokens, more than max_len={self.max_len} (image tokens "
                                 f"{self.cfg.n_image_tokens} x {ex['pixel_test'].shape[0]} "
                                 "tiles); lower max_dynamic_patch or raise max_len")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        return ids, labels

    def fact_tensors(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """First N fact sentences, each cut to max_fact_tokens -> ids, mask (B, N, Lf)."""
        N, cap = self.cfg.n_facts, self.cfg.max_fact_tokens
        sents = [[self.tok.encode(s)[:cap] for s in ex["facts"][:N]] for ex in examples]
        Lf = max(1, max(len(s) for row in sents for s in row))
        ids = torch.full((len(examples), N, Lf), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), N, Lf), dtype=torch.long)
        for b, row in enumerate(sents):
            for n, s in enumerate(row):
                ids[b, n, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[b, n, :len(s)] = 1
        return ids, mask

    # ------------------------------------------------------------------ batch

    def build(self, examples: list[dict], answers: list[str | None]) -> dict:
        """Examples with their target answers (None = prompt only) -> batch dict."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        enc = [self.encode(ex, a) for ex, a in zip(examples, answers)]
        left = self.for_generation
        return {
            "input_ids": pad_sequences([e[0] for e in enc], self.tok.pad_id, left=left),  # (B, T)
            "attention_mask": pad_sequences([[1] * len(e[0]) for e in enc], 0, left=left),
            "labels": pad_sequences([e[1] for e in enc], IGNORE_INDEX, left=left),
            **self.images_and_facts(examples),
        }

    def images_and_facts(self, examples: list[dict]) -> dict:
        """The non-text part of a batch: tiles, fact tensors ("fe"), record ids."""
        refs = [ex.get("pixel_ref") is not None for ex in examples]
        if any(refs) and not all(refs):
            raise ValueError("batch mixes one-shot and zero-shot examples (pixel_ref None for "
                             f"ids {[ex.get('id') for ex, r in zip(examples, refs) if not r]})")
        out = {
            "pixel_test": torch.cat([ex["pixel_test"] for ex in examples]),
            "tiles_test": torch.tensor([ex["pixel_test"].shape[0] for ex in examples]),
            "pixel_ref": torch.cat([ex["pixel_ref"] for ex in examples]) if all(refs) else None,
            "tiles_ref": (torch.tensor([ex["pixel_ref"].shape[0] for ex in examples])
                          if all(refs) else None),
            "fact_ids": None,
            "fact_mask": None,
            "ids": [ex.get("id") for ex in examples],
        }
        if self.facts_mode == "fe":
            out["fact_ids"], out["fact_mask"] = self.fact_tensors(examples)
        return out

    def __call__(self, examples: list[dict]) -> dict:
        if self.for_generation:
            answers = [None] * len(examples)
        else:
            answers = [ex["answer"] if "answer" in ex else ex["answers"][0] for ex in examples]
        return self.build(examples, answers)


class EDPOCollator(Collator):
    """E-DPO batches (Eq. 3-7): per instance the extreme pair (a_1, a_L) and, with
    pairs="both", the adjacent pair (a_i_hat, a_i_hat+1) of Eq. 5; pairs="extreme" is the
    plain-DPO ablation. Chosen sequences first, then rejected, in the same pair order."""

    def __init__(self, tokenizer, cfg: SageConfig, facts_mode: str | None = None,
                 pairs: str = "both", temperature: float = 1.0, max_len: int | None = None):
        super().__init__(tokenizer, cfg, facts_mode=facts_mode, for_generation=False,
                         max_len=max_len)
        if pairs not in ("both", "extreme"):
            raise ValueError(f"pairs={pairs!r}: expected 'both' or 'extreme'")
        self.pairs, self.temperature = pairs, temperature

    def select_pairs(self, examples: list[dict]) -> list[tuple[int, int, int, float, str]]:
        """-> [(instance, rank_w, rank_l, delta_h, kind)] in instance order (Eq. 3-5)."""
        for ex in examples:
            if ex.get("mle") is None:
                raise ValueError(f"record {ex.get('id')!r} has no 'mle' judge scores: run "
                                 "python -m sage.mle score")
        mle = torch.stack([torch.as_tensor(ex["mle"], dtype=torch.float32)
                           for ex in examples])  # (B, L, 3)
        h = answer_entropy(mle_score(mle), self.temperature)  # Eq. 3-4: (B, L)
        i_hat, dh_min, dh_max = select_edpo_pairs(h)  # Eq. 5: (B,) each
        L = mle.shape[1]
        out = []
        for b in range(len(examples)):
            out.append((b, 0, L - 1, float(dh_max[b]), "extreme"))
            if self.pairs == "both":
                i = int(i_hat[b])
                out.append((b, i, i + 1, float(dh_min[b]), "adjacent"))
        return out

    def pack(self, examples: list[dict], ranks: list[list[int]]) -> dict:
        """One row per example: the prompt, then answer a_r as a segment for each r in
        ranks[b] (module docstring) -> batch dict; sequences in (example, rank) order."""
        rows, labels, positions, segments, seq_ranks, spans = [], [], [], [], [], []
        for ex, want in zip(examples, ranks):
            row_ids, row_lab, row_pos, row_seg, row_spans = None, None, None, None, []
            for r in want:
                ids, lab = self.encode(ex, ex["answers"][r])
                n = next((i for i, x in enumerate(lab) if x != IGNORE_INDEX), len(ids))
                if row_ids is None:  # the prompt, once
                    row_ids, row_lab = ids[:n], [IGNORE_INDEX] * n
                    row_pos, row_seg = list(range(n)), [-1] * n
                elif ids[:n] != row_ids[:n]:
                    raise ValueError(f"record {ex.get('id')!r}: the prompt tokenizes "
                                     f"differently before answer {r}; cannot pack its answers")
                start = len(row_ids)  # the segment: last prompt token again, then the answer
                row_ids += [ids[n - 1]] + ids[n:]
                row_lab += [IGNORE_INDEX] + lab[n:]
                row_pos += list(range(n - 1, n - 1 + len(ids) - n + 1))
                row_seg += [len(seq_ranks)] * (len(ids) - n + 1)
                row_spans.append((start, len(row_ids)))
                seq_ranks.append(r)
            rows.append(row_ids)
            labels.append(row_lab)
            positions.append(row_pos)
            segments.append(row_seg)
            spans.append((n, row_spans))
        batch = self.images_and_facts(examples)
        T = max(len(x) for x in rows)
        batch["input_ids"] = pad_sequences(rows, self.tok.pad_id)  # (B, T)
        batch["labels"] = pad_sequences(labels, IGNORE_INDEX)  # (B, T)
        batch["position_ids"] = pad_sequences(positions, 0)  # (B, T)
        batch["segments"] = pad_sequences(segments, -1)  # (B, T)
        mask = torch.zeros(len(rows), 1, T, T, dtype=torch.bool)  # (B, 1, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        for b, (n, row_spans) in enumerate(spans):
            mask[b, 0, :n, :n] = causal[:n, :n]  # the prompt: causal
            for a, e in row_spans:  # a segment: the prompt but its last token, then itself
                mask[b, 0, a:e, :n - 1] = True
                mask[b, 0, a:e, a:e] = causal[:e - a, :e - a]
            pad = torch.arange(len(rows[b]), T)
            mask[b, 0, pad, pad] = True  # pad rows see themselves (SDPA needs one key)
        batch["attention_mask"] = mask
        batch["n_segments"] = len(seq_ranks)
        batch["seq_ranks"] = torch.tensor(seq_ranks, dtype=torch.long)  # (S,)
        return batch

    def __call__(self, examples: list[dict]) -> dict:
        pairs = self.select_pairs(examples)
        need = [sorted({r for p in pairs if p[0] == b for r in p[1:3]})
                for b in range(len(examples))]
        batch = self.pack(examples, need)
        seq = {}  # (instance, rank) -> sequence index, in pack's order
        for b, want in enumerate(need):
            for r in want:
                seq[(b, r)] = len(seq)
        batch["pair_w"] = torch.tensor([seq[(p[0], p[1])] for p in pairs], dtype=torch.long)
        batch["pair_l"] = torch.tensor([seq[(p[0], p[2])] for p in pairs], dtype=torch.long)
        batch["pair_delta_h"] = torch.tensor([p[3] for p in pairs], dtype=torch.float32)  # (M,)
        batch["pair_index"] = torch.tensor([p[0] for p in pairs], dtype=torch.long)  # (M,)
        batch["pair_kind"] = [p[4] for p in pairs]
        batch["pair_ranks"] = torch.tensor([[p[1], p[2]] for p in pairs], dtype=torch.long)
        batch["n_pairs"] = len(pairs)
        return batch
