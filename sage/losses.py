"""Training losses of SAGE as pure functions of tensors (paper §3.3-3.4, docs/design.md §2).

E-DPO (Stage 2), per instance with L ranked answers a_1 > ... > a_L (L = L_N = 4):

    Eq. 3   S_i = (type_i + loc_i + logic_i) / 3                       mle_score
    Eq. 4   p = softmax(S / tau),  H_i = -p_i log p_i                   answer_entropy
    Eq. 5   i_hat = argmin_i |H_i - H_{i+1}|  -> dh_min;                select_edpo_pairs
            dh_max = |H_1 - H_L|  (pair a_1, a_L)
    Eq. 6-7 d = beta [(log pi(a_w) - log ref(a_w)) - (log pi(a_l) - log ref(a_l))] - eta dH
            L = -log sigmoid(d)                                         edpo_loss, dpo_rewards

Stage 1 (SFE) and the sequence log-probs used by E-DPO:

    Eq. 8   L_ce = -sum over answer tokens of log p(token)              answer_cross_entropy
            log pi(a | x) = sum over answer tokens of log p(token)      answer_logprobs

Every function returns per-example values; the caller reduces (for Eq. 8: divides by the
answer-token count of the global batch).

    h = answer_entropy(mle_score(mle))            # mle (B, L, 3) -> H (B, L)
    i_hat, dh_min, dh_max = select_edpo_pairs(h)  # (B,), (B,), (B,)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of every non-answer token (prompt, image placeholders, padding)


# ----------------------------------------------------------------------------- E-DPO (Eq. 3-7)

def mle_score(sub_scores: torch.Tensor) -> torch.Tensor:
    """Eq. 3: MLE score S = (type + loc + logic) / 3.   sub_scores (..., 3) in 1..5 -> S (...)"""
    if sub_scores.shape[-1] != 3:
        raise ValueError(f"mle_score: last dim must be 3 (type, loc, logic), got "
                         f"shape {tuple(sub_scores.shape)}")
    return sub_scores.float().mean(dim=-1)


def answer_entropy(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 4 (project reading, docs/design.md §2): p = softmax(S / tau) over the L ranked
    answers; per-answer entropy H_i = -p_i log p_i.   scores (..., L) -> H (..., L)"""
    p = torch.softmax(scores.float() / temperature, dim=-1)
    return -torch.special.xlogy(p, p)  # xlogy: 0 * log 0 = 0 if p underflows


def select_edpo_pairs(entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5: the adjacent ranked pair with the smallest entropy gap, and the extreme pair.

    entropy (..., L) -> i_hat (...) int64, dh_min (...), dh_max (...)
    i_hat is 0-based: the pair is (answers[i_hat], answers[i_hat + 1]), winner first.
    Ties pick the lowest i (torch.argmin returns the first minimum), i.e. the better-ranked pair.
    dh_min = |H_i_hat - H_{i_hat+1}|; dh_max = |H_1 - H_L| for the pair (answers[0], answers[-1]).
    """
    if entropy.shape[-1] < 2:
        raise ValueError(f"select_edpo_pairs: need L >= 2 answers, got shape "
                         f"{tuple(entropy.shape)}")
    gaps = (entropy[..., :-1] - entropy[..., 1:]).abs()  # (..., L-1): |H_i - H_{i+1}|
    i_hat = gaps.argmin(dim=-1)  # (...) first minimum on ties
    dh_min = gaps.gather(-1, i_hat.unsqueeze(-1)).squeeze(-1)  # (...)
    dh_max = (entropy[..., 0] - entropy[..., -1]).abs()  # (...)
    return i_hat, dh_min, dh_max


def dpo_rewards(pol: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward r = beta * (log pi_theta(a|x) - log pi_ref(a|x)), for logging and
    inside Eq. 6.   pol, ref (...) sequence log-probs -> r (...) float32"""
    return beta * (pol.float() - ref.float())


def edpo_loss(pol_w: torch.Tensor, pol_l: torch.Tensor, ref_w: torch.Tensor,
              ref_l: torch.Tensor, delta_h: torch.Tensor | float, beta: float,
              eta: float) -> torch.Tensor:
    """Eq. 6-7 with the reference model (docs/design.md §2), one value per (a_w, a_l) pair.

    d = beta [(log pi(a_w) - log ref(a_w)) - (log pi(a_l) - log ref(a_l))] - eta * delta_h
    L = -log sigmoid(d)
    pol_*, ref_* (...) sequence log-probs (answer_logprobs); delta_h (...) = dh_min or dh_max.
    eta = 0 gives plain DPO. Returns loss (...) float32; reward accuracy etc. via dpo_rewards.
    """
    d = dpo_rewards(pol_w, ref_w, beta) - dpo_rewards(pol_l, ref_l, beta)  # (...)
    d = d - eta * torch.as_tensor(delta_h, dtype=torch.float32, device=d.device)
    return -F.logsigmoid(d)  # logsigmoid is stable for large |d|; Eq. 7's log(1/(1+e^-d))


# ----------------------------------------------------------------- answer tokens (Eq. 8)

class _TokenLogProbs(torch.autograd.Function):
    """log softmax(x)[y] per row in fp32, chunk by chunk, with the gradient written out:
    d/dx_v log softmax(x)[y] = 1[v = y] - softmax(x)_v. Saves only the input rows (already in
    memory, any dtype) and one fp32 log-sum-exp per row, never an fp32 copy of all rows.
    x (N, V), y (N,) -> (N,) float32"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)  # (N,)
        out = torch.empty_like(lse)  # (N,)
        for s in range(0, x.shape[0], chunk_size):
            sl = slice(s, s + chunk_size)
            xc = x[sl].float()  # (n, V) one chunk in fp32 at a time
            lse[sl] = torch.logsumexp(xc, dim=-1)
            out[sl] = xc.gather(-1, y[sl, None])[:, 0] - lse[sl]  # (n,)
        ctx.save_for_backward(x, y, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)  # (N, V) in the input dtype
        for s in range(0, x.shape[0], ctx.chunk_size):
            sl = slice(s, s + ctx.chunk_size)
            g = -torch.exp(x[sl].float() - lse[sl, None])  # (n, V): -softmax
            g.scatter_add_(-1, y[sl, None], torch.ones_like(g[:, :1]))  # + one-hot(y)
            grad_x[sl] = g * grad_out[sl, None]
        return grad_x, None, None


def sequence_logprobs(rows: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor,
                      n_sequences: int, chunk_size: int = 1024) -> torch.Tensor:
    """log pi(a|x) per sequence from the logits at its answer tokens only.

    rows (N, V) the logits that predict the N answer tokens, targets (N,) those tokens,
    sequence (N,) which of the n_sequences each belongs to -> (n_sequences,) float32.
    """
    token_lp = _TokenLogProbs.apply(rows, targets, chunk_size)  # (N,)
    out = torch.zeros(n_sequences, dtype=torch.float32, device=rows.device)
    return out.index_add(0, sequence, token_lp)  # (n_sequences,)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Sequence log-prob log pi(a|x) = sum over answer tokens of log p(token), per example.

    logits (B, T, V) any float dtype; labels (B, T) with IGNORE_INDEX off the answer
    -> (B,) float32. Standard shift: logits at t predict labels at t + 1.
    Only the answer positions are gathered (in the logits dtype), then reduced `chunk_size`
    rows at a time in fp32 (_TokenLogProbs), so no fp32 copy of the logits is made or kept.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"answer_logprobs: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} disagree on (B, T)")
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at t
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = logits[:, :-1][mask]  # (N, V) answer positions only
    example = mask.nonzero()[:, 0]  # (N,) which example each answer token belongs to
    return sequence_logprobs(rows, targets[mask], example, labels.shape[0], chunk_size)


def answer_cross_entropy(logits: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 per example: loss_sum = -sum over answer tokens of log p(token), and the token count.

    logits (B, T, V), labels (B, T) -> loss_sum (B,) float32, n_tokens (B,) int64.
    The caller divides sum(loss_sum) by the answer tokens of the global batch.
    """
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)  # (B,) same shift as the log-probs
    return -answer_logprobs(logits, labels), n_tokens
