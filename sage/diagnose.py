"""Diagnostics of a model on SFE records, by teacher forcing (no generation, no judge).

    python -m sage.tools.diagnose --model runs/quickstart/sfe/export --data data/synthad \\
        --split sfe_train --limit 64 [--swap_images]

The command prints
- the decision: mean loss (nats) of the answer's first Yes/No token (SynthAD states it after
  the evidence), against the mean loss of the other answer tokens, and how often the decision
  is the argmax (ln 2 = 0.693 nats is a coin flip between Yes and No). With --swap_images
  each record gets the images of a record of another group: a decision that does not move
  has not used them (with the evidence first it should not: it reads the evidence);
- perception (SynthAD records): how well the log-prob of the normal explanation tells the
  normal pairs from the anomalous ones (AUROC), independent of the question;
- the fusion pathway (facts_mode "fe", `fusion_report`), one-shot and zero-shot: the fusion
  attention's entropy over log K (1 = uniform: neither facts nor comparison choose what is
  read), the fact tokens' cosine across images (near 1: nothing image-specific reaches the
  LLM) and across the N slots of one image, the share of the tokens that varies across
  images, and the one-shot vs zero-shot distance (0: the reference changes nothing);
- what the comparison can tell (records with `truth.anomalous`, `comparison_report`): the
  AUROC of Eq. 1's own anomaly score (the mean of the K lowest nearest-neighbour cosines,
  no training involved), of the fusion output's norm and of cross-validated linear probes on
  it and on the fact tokens, one-shot and zero-shot. The first bounds what the selected
  patches carry; the others say how much of it the fact tokens pass on to the LLM; the
  model's accuracy says whether the LLM uses it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sage.data import Collator, SFEDataset
from sage.losses import IGNORE_INDEX, answer_logprobs
from sage.models.sage import split_by_tiles


@torch.no_grad()
def answer_token_losses(logits: torch.Tensor, labels: torch.Tensor,
                        decision_ids: set[int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) -> decision-token loss (B,), mean loss of the other
    answer tokens (B,), decision token is the argmax (B,) bool. Same shift as Eq. 8.

    The decision token is the first answer token whose id is in `decision_ids` (the Yes/No
    pieces; SynthAD answers state it last), or the first answer token when None."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at t
    first, rest, hit = [], [], []
    for b in range(labels.shape[0]):
        pos = (targets[b] != IGNORE_INDEX).nonzero()[:, 0]  # answer positions
        if len(pos) < 2:
            raise ValueError(f"sage.diagnose: example {b} has {len(pos)} answer token(s); "
                             "need a decision and at least one more")
        k = 0
        if decision_ids is not None:
            found = [i for i, p in enumerate(pos.tolist()) if int(targets[b, p]) in decision_ids]
            if not found:
                raise ValueError(f"sage.diagnose: example {b}'s answer has no Yes/No token")
            k = found[0]
        nll = -logp[b, pos, targets[b, pos]]  # (n,)
        first.append(nll[k])
        rest.append(torch.cat([nll[:k], nll[k + 1:]]).mean())
        hit.append(logp[b, pos[k]].argmax() == targets[b, pos[k]])
    return torch.stack(first), torch.stack(rest), torch.stack(hit)


def decision_token_ids(tokenizer) -> set[int]:
    """Ids of the pieces that spell a decision word ("Yes", " No", "true", ...)."""
    words = {"yes", "no", "true", "false"}
    return {i for i in range(tokenizer.n_pieces)
            if tokenizer.decode([i]).strip().lower() in words}


def swap_images(records: list[dict]) -> list[dict]:
    """Each record with the test/reference images of the next record of another group."""
    out = []
    for i, r in enumerate(records):
        j = next((k % len(records) for k in range(i + 1, i + len(records))
                  if records[k % len(records)]["group"] != r["group"]), None)
        if j is None:
            raise ValueError("sage.diagnose: --swap_images needs records of at least two groups")
        out.append({**r, "test_image": records[j]["test_image"],
                    "reference_image": records[j]["reference_image"]})
    return out


@torch.no_grad()
def decision_report(model, records: list[dict], root: str, setting: str,
                    batch_size: int = 8) -> dict:
    """Mean decision-token loss, mean rest loss and decision-argmax accuracy over `records`."""
    ds = SFEDataset(records, root, model.cfg, setting=setting)
    collate = Collator(model.tokenizer, model.cfg)
    ids = decision_token_ids(model.tokenizer)
    first, rest, hit = [], [], []
    for s in range(0, len(records), batch_size):
        batch = collate([ds[i] for i in range(s, min(s + batch_size, len(records)))])
        logits, _, _ = model(batch)
        f, r, h = answer_token_losses(logits, batch["labels"], ids)
        first.append(f)
        rest.append(r)
        hit.append(h)
    first, rest, hit = torch.cat(first), torch.cat(rest), torch.cat(hit)
    return {"decision_nats": first.mean().item(), "rest_nats": rest.mean().item(),
            "decision_argmax_acc": hit.float().mean().item()}


def attention_entropy(weights: torch.Tensor, key_mask: torch.Tensor | None = None) -> float:
    """Mean entropy of attention rows over log K: weights (B, H, N, K) rows summing to 1,
    key_mask (B, K) True = a real key (K per row counts only those). 1 = uniform, 0 = one key."""
    h = -torch.xlogy(weights, weights).sum(-1)  # (B, H, N)
    k = (torch.full(weights.shape[:1], weights.shape[-1], dtype=weights.dtype)
         if key_mask is None else key_mask.sum(-1).to(weights.dtype))  # (B,)
    return (h / torch.log(k.clamp_min(2))[:, None, None]).mean().item()


def cross_image_cosine(tokens: torch.Tensor, groups: list[str]) -> float:
    """Mean cosine between the same fact slot of two images of different groups:
    tokens (B, N, C). 1 = the tokens carry nothing image-specific."""
    pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))
             if groups[a] != groups[b]]
    if not pairs:
        raise ValueError("sage.diagnose: fact tokens across images need two groups")
    a, b = (torch.tensor(x) for x in zip(*pairs))
    return F.cosine_similarity(tokens[a], tokens[b], dim=-1).mean().item()


def varying_share(tokens: torch.Tensor) -> float:
    """Share of the fact tokens' energy that varies across images: tokens (B, N, C) ->
    sum ||x_bn - mean_b x_bn||^2 / sum ||x_bn||^2 (0: the same token for every image; the
    part shared by all images is what the LLM cannot use to tell them apart)."""
    dev = tokens - tokens.mean(0, keepdim=True)  # (B, N, C)
    return (dev.pow(2).sum() / tokens.pow(2).sum().clamp_min(1e-30)).item()


def slot_cosine(tokens: torch.Tensor) -> float:
    """Mean cosine between two different fact slots of one image (1: the N slots are equal)."""
    n = tokens.shape[1]
    if n < 2:
        return float("nan")
    x = F.normalize(tokens.float(), dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    return ((sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))).mean().item()


def first_of_each_group(records: list[dict]) -> list[dict]:
    """The first record of every group, in order (one per test/reference pair)."""
    seen: set = set()
    return [r for r in records if not (r["group"] in seen or seen.add(r["group"]))]


@torch.no_grad()
def fusion_report(model, records: list[dict], root: str) -> dict:
    """The Fact[FE] pathway (Eq. 1-2, 9) on `records` (one per image is enough), one-shot
    and zero-shot: attention entropy / log K, the fact tokens' cosine across images and
    across slots, the share of them that varies across images, and how far the one-shot
    tokens are from the zero-shot ones (cosine, and ||one - zero|| / ||one||)."""
    if model.cfg.facts_mode != "fe":
        raise ValueError(f"sage.diagnose: the fusion report needs facts_mode 'fe', not "
                         f"{model.cfg.facts_mode!r}")
    collate = Collator(model.tokenizer, model.cfg)
    groups = [r["group"] for r in records]
    out, tokens = {}, {}
    for setting in ("one-shot", "zero-shot"):
        ds = SFEDataset(records, root, model.cfg, setting=setting)
        batch = collate([ds[i] for i in range(len(records))])
        v = model.encode_images(batch["pixel_test"])  # (n_tiles, T, C)
        t_g, keys, values, key_mask = model.fusion_inputs(v, batch)
        weights = model.fusion.attention(t_g, keys, key_mask)  # (B, H, N, K)
        x = model.fact_proj(model.fusion(t_g, keys, values, key_mask=key_mask))  # (B, N, C)
        tokens[setting] = x
        out[setting] = {"entropy_over_log_k": attention_entropy(weights, key_mask),
                        "keys": keys.shape[1],
                        "cos_across_images": cross_image_cosine(x, groups),
                        "cos_across_slots": slot_cosine(x),
                        "varying_share": varying_share(x),
                        "token_norm": x.norm(dim=-1).mean().item()}
    one, zero = tokens["one-shot"], tokens["zero-shot"]
    out["one_vs_zero"] = {"cos": F.cosine_similarity(one, zero, dim=-1).mean().item(),
                          "rel_dist": ((one - zero).norm(dim=-1)
                                       / one.norm(dim=-1).clamp_min(1e-30)).mean().item()}
    return out


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a random `pos` score > a random `neg` score), ties counting half."""
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if not pos.size or not neg.size:
        raise ValueError(f"sage.diagnose: AUROC needs both classes ({pos.size} / {neg.size})")
    # Mann-Whitney U from average ranks (tied scores share their mean rank: ties count half)
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True,
                                   return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based average ranks
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


@torch.no_grad()
def perception_auroc(model, records: list[dict], root: str, setting: str,
                     batch_size: int = 16) -> float:
    """Does the model see the defect? One record per group (test/reference pair): the
    teacher-forced log-prob of SynthAD's normal explanation ("The inspection shows that the
    <category> matches the normal reference"), as a score for "normal", -> its AUROC against
    the records' truth (0.5: blind; 1: sees every defect). Needs SynthAD's `truth`."""
    pairs, seen = [], set()
    for r in records:
        if r["group"] not in seen:
            if "anomalous" not in (r.get("truth") or {}):
                raise KeyError(f"sage.diagnose: record {r.get('id')!r} has no truth.anomalous "
                               "(the perception check needs SynthAD records)")
            seen.add(r["group"])
            pairs.append(r)
    ds = SFEDataset(pairs, root, model.cfg, setting=setting)
    collate = Collator(model.tokenizer, model.cfg)
    scores = []
    for s in range(0, len(pairs), batch_size):
        chunk = range(s, min(s + batch_size, len(pairs)))
        batch = collate.build([ds[i] for i in chunk], [
            f"The inspection shows that the {pairs[i]['category']} matches the normal reference"
            for i in chunk])
        logits, _, _ = model(batch)
        scores += answer_logprobs(logits, batch["labels"]).tolist()
    normal = [x for x, r in zip(scores, pairs) if not r["truth"]["anomalous"]]
    anomalous = [x for x, r in zip(scores, pairs) if r["truth"]["anomalous"]]
    return auroc(normal, anomalous)


def probe_auroc(features: torch.Tensor, labels: list[bool], folds: int = 5,
                ridge: float = 1.0) -> float:
    """Cross-validated linear probe: features (B, D), labels (B,) -> AUROC of the held-out
    scores. Each fold is scored by a ridge regression (targets +-1, features standardised
    with the training folds' mean and std) fitted on the other folds; folds interleave the
    samples (b % folds), so the figure is deterministic."""
    x = features.double()
    y = torch.tensor([1.0 if a else -1.0 for a in labels], dtype=torch.float64)
    if len(set(labels)) < 2 or len(labels) < 2 * folds:
        raise ValueError(f"sage.diagnose: the probe needs both classes and >= {2 * folds} "
                         f"samples ({len(labels)} given)")
    scores = torch.empty(len(labels), dtype=torch.float64)
    fold = torch.arange(len(labels)) % folds
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
        a = (x[tr] - mu) / sd
        w = torch.linalg.solve(a.T @ a + ridge * torch.eye(x.shape[1], dtype=x.dtype),
                               a.T @ (y[tr] - y[tr].mean()))
        scores[te] = ((x[te] - mu) / sd) @ w
    return auroc([float(v) for v, a in zip(scores, labels) if a],
                 [float(v) for v, a in zip(scores, labels) if not a])


@torch.no_grad()
def comparison_report(model, records: list[dict], root: str, folds: int = 5) -> dict:
    """What the comparison with the reference can tell, one record per image (`truth`
    needed), stage by stage, as AUROC for "anomalous": Eq. 1's anomaly score -mean_k s_k over
    the K selected patches (low nearest-neighbour cosine = unlike every reference patch); and,
    for facts_mode "fe", one-shot and zero-shot, the norm of the fusion output t^s (Eq. 2; the
    Eq. 9 head's LayerNorm removes it), a cross-validated linear probe (`probe_auroc`, at least
    2 x folds images) on t^s and one on the fact tokens after the head."""
    labels = []
    for r in records:
        if "anomalous" not in (r.get("truth") or {}):
            raise KeyError(f"sage.diagnose: record {r.get('id')!r} has no truth.anomalous")
        labels.append(bool(r["truth"]["anomalous"]))
    collate = Collator(model.tokenizer, model.cfg)

    def by_label(scores) -> float:  # AUROC of per-image scores for "anomalous"
        return auroc([v for v, a in zip(scores, labels) if a],
                     [v for v, a in zip(scores, labels) if not a])

    out = {}
    for setting in ("one-shot", "zero-shot"):
        ds = SFEDataset(records, root, model.cfg, setting=setting)
        b = collate([ds[i] for i in range(len(records))])
        v_tiles = model.encode_images(b["pixel_test"])  # once per setting
        if setting == "one-shot":  # Eq. 1 on the same test features
            v_t, t_mask = split_by_tiles(v_tiles, b["tiles_test"])
            v_r, r_mask = split_by_tiles(model.encode_images(b["pixel_ref"]), b["tiles_ref"])
            _, sims, _ = model.select(v_t, v_r, t_mask, r_mask)  # (B, K): the K lowest s_i
            out["eq1_auroc"] = by_label((-sims.mean(-1)).tolist())
        if model.cfg.facts_mode != "fe":
            break
        t_g, keys, values, key_mask = model.fusion_inputs(v_tiles, b)
        t_s = model.fusion(t_g, keys, values, key_mask=key_mask)  # (B, N, C), Eq. 2
        x = model.fact_proj(t_s)  # (B, N, C), Eq. 9: LayerNorm, then the Linear
        out[f"norm_{setting}"] = by_label(t_s.norm(dim=-1).mean(-1).tolist())  # fused size
        if len(records) >= 2 * folds:
            out[f"probe_fusion_{setting}"] = probe_auroc(t_s.flatten(1), labels, folds)
            out[f"probe_{setting}"] = probe_auroc(x.flatten(1), labels, folds)
    return out
    for setting in ("one-shot", "zero-shot"):
        ds = SFEDataset(records, root, model.cfg, setting=setting)
        b = collate([ds[i] for i in range(len(records))])
        t_g, keys, values, key_mask = model.fusion_inputs(model.encode_images(b["pixel_test"]), b)
        t_s = model.fusion(t_g, keys, values, key_mask=key_mask)  # (B, N, C), Eq. 2
        x = model.fact_proj(t_s)  # (B, N, C), Eq. 9: LayerNorm, then the Linear
        norm = t_s.norm(dim=-1).mean(-1).tolist()  # the size of the fused difference
        out[f"norm_{setting}"] = auroc([v for v, a in zip(norm, labels) if a],
                                       [v for v, a in zip(norm, labels) if not a])
        if len(records) >= 2 * folds:
            out[f"probe_fusion_{setting}"] = probe_auroc(t_s.flatten(1), labels, folds)
            out[f"probe_{setting}"] = probe_auroc(x.flatten(1), labels, folds)
    return out


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.diagnose` "
                     "(--help for usage)")
