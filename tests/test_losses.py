"""Checks sage/losses.py (Eq. 3-8) against hand-worked numbers and naive loops.
Run: python -m pytest -q tests/test_losses.py"""

import math

import pytest
import torch
import torch.nn.functional as F

from sage.losses import (IGNORE_INDEX, answer_cross_entropy, answer_entropy, answer_logprobs,
                         dpo_rewards, edpo_loss, mle_score, select_edpo_pairs)


# ----------------------------------------------------------------------------- Eq. 3

def test_mle_score_mean_of_three():
    # (5 + 4 + 3) / 3 = 4;  (2 + 2 + 3) / 3 = 2.333333;  (1 + 1 + 1) / 3 = 1
    s = mle_score(torch.tensor([[5, 4, 3], [2, 2, 3], [1, 1, 1]]))
    torch.testing.assert_close(s, torch.tensor([4.0, 2.333333, 1.0]), atol=1e-6, rtol=0)
    assert s.dtype == torch.float32  # integer judge scores come back as float


def test_mle_score_rejects_wrong_last_dim():
    with pytest.raises(ValueError, match="last dim must be 3"):
        mle_score(torch.ones(4, 2))


# ----------------------------------------------------------------------------- Eq. 4

def test_answer_entropy_hand_worked_tau1():
    # S = (5, 4, 2, 1), tau = 1: exp(S - 5) = (1, e^-1, e^-3, e^-4), Z = 1.435982
    # p = (0.696387, 0.256187, 0.034671, 0.012755)
    # H_i = -p_i ln p_i = (0.251987, 0.348888, 0.116559, 0.055634)
    h = answer_entropy(torch.tensor([5.0, 4.0, 2.0, 1.0]))
    torch.testing.assert_close(h, torch.tensor([0.251987, 0.348888, 0.116559, 0.055634]),
                               atol=1e-6, rtol=0)


def test_answer_entropy_temperature():
    # tau = 2: S / tau = (2.5, 2, 1, 0.5) -> p = (0.508907, 0.308668, 0.113552, 0.068873)
    # H = (0.343762, 0.362836, 0.247032, 0.184269)
    h = answer_entropy(torch.tensor([5.0, 4.0, 2.0, 1.0]), temperature=2.0)
    torch.testing.assert_close(h, torch.tensor([0.343762, 0.362836, 0.247032, 0.184269]),
                               atol=1e-6, rtol=0)


def test_answer_entropy_equal_scores():
    # p = (0.5, 0.5)  ->  H_i = -0.5 * ln 0.5 = 0.346574
    h = answer_entropy(torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(h, torch.full((2,), 0.346574), atol=1e-6, rtol=0)


def test_answer_entropy_underflow_is_zero_not_nan():
    # p_2 = e^-200 underflows to 0 in fp32; xlogy gives 0 * log 0 = 0 instead of NaN
    h = answer_entropy(torch.tensor([200.0, 0.0]))
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.zeros(2), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- Eq. 5

def test_select_edpo_pairs_hand_worked():
    # H = (0.251987, 0.348888, 0.116559, 0.055634) (S = (5, 4, 2, 1) above)
    # gaps |H_i - H_i+1| = (0.096900, 0.232329, 0.060925) -> i_hat = 2 (0-based), dh_min = 0.060925
    # dh_max = |H_1 - H_4| = |0.251987 - 0.055634| = 0.196353
    i_hat, dh_min, dh_max = select_edpo_pairs(answer_entropy(torch.tensor([5.0, 4.0, 2.0, 1.0])))
    assert i_hat.item() == 2 and i_hat.dtype == torch.int64
    assert abs(dh_min.item() - 0.060925) < 1e-6
    assert abs(dh_max.item() - 0.196353) < 1e-6


def test_select_edpo_pairs_tie_takes_lowest_index():
    # S = (5, 4, 4, 4): p = (0.475367, 0.174878 x 3), H = (0.353515, 0.304929 x 3)
    # gaps = (0.048587, 0, 0): tie between i = 1 and i = 2 -> lowest, i_hat = 1, dh_min = 0
    i_hat, dh_min, dh_max = select_edpo_pairs(answer_entropy(torch.tensor([5.0, 4.0, 4.0, 4.0])))
    assert i_hat.item() == 1
    assert dh_min.item() == 0.0
    assert abs(dh_max.item() - 0.048587) < 1e-6
    # exact three-way tie (all gaps 0.25, representable exactly) -> i_hat = 0
    i_hat, dh_min, _ = select_edpo_pairs(torch.tensor([0.0, 0.25, 0.5, 0.75]))
    assert i_hat.item() == 0 and dh_min.item() == 0.25


def test_select_edpo_pairs_batch_equals_per_example():
    g = torch.Generator().manual_seed(0)
    mle = torch.randint(1, 6, (5, 3, 4, 3), generator=g)  # (batch dims 5 x 3, L = 4, 3 sub-scores)
    h = answer_entropy(mle_score(mle))  # (5, 3, 4)
    i_hat, dh_min, dh_max = select_edpo_pairs(h)
    assert i_hat.shape == dh_min.shape == dh_max.shape == (5, 3)
    for a in range(5):
        for b in range(3):
            hs = h[a, b].tolist()
            gaps = [abs(hs[i] - hs[i + 1]) for i in range(3)]
            want = min(range(3), key=lambda i: (gaps[i], i))  # naive: smallest gap, lowest i
            assert i_hat[a, b].item() == want
            assert abs(dh_min[a, b].item() - gaps[want]) < 1e-6
            assert abs(dh_max[a, b].item() - abs(hs[0] - hs[3])) < 1e-6


# ----------------------------------------------------------------------------- Eq. 6-7

def test_edpo_loss_hand_worked():
    # beta = 0.1; rewards r_w = 0.1 * (-10 - (-12)) = 0.2, r_l = 0.1 * (-15 - (-14)) = -0.1
    # eta = 0: d = 0.3 -> L = -ln sigmoid(0.3) = ln(1 + e^-0.3) = 0.554355
    # eta = 0.5, dH = 0.2: d = 0.3 - 0.1 = 0.2 -> L = ln(1 + e^-0.2) = 0.598139
    args = (torch.tensor(-10.0), torch.tensor(-15.0), torch.tensor(-12.0), torch.tensor(-14.0))
    assert abs(dpo_rewards(args[0], args[2], 0.1).item() - 0.2) < 1e-6
    assert abs(dpo_rewards(args[1], args[3], 0.1).item() + 0.1) < 1e-6
    assert abs(edpo_loss(*args, delta_h=0.0, beta=0.1, eta=0.0).item() - 0.554355) < 1e-6
    assert abs(edpo_loss(*args, delta_h=torch.tensor(0.2), beta=0.1, eta=0.5).item()
               - 0.598139) < 1e-6


def test_edpo_loss_eta_zero_is_plain_dpo():
    g = torch.Generator().manual_seed(1)
    pol_w, pol_l, ref_w, ref_l = (-50 * torch.rand(8, generator=g) for _ in range(4))
    dh = torch.rand(8, generator=g)
    beta = 0.1
    margin = (pol_w - ref_w) - (pol_l - ref_l)
    dpo = -F.logsigmoid(beta * margin)  # Rafailov et al. DPO loss
    torch.testing.assert_close(edpo_loss(pol_w, pol_l, ref_w, ref_l, dh, beta, eta=0.0), dpo)
    # eta > 0 lowers d by eta * dH, so the loss grows (strictly, as dH > 0)
    assert (edpo_loss(pol_w, pol_l, ref_w, ref_l, dh, beta, eta=1.0) > dpo).all()


def test_edpo_loss_vectorised_equals_per_example_and_is_stable():
    g = torch.Generator().manual_seed(2)
    x = [-100 * torch.rand(3, 4, generator=g) for _ in range(4)]
    dh = torch.rand(3, 4, generator=g)
    batch = edpo_loss(*x, dh, beta=0.5, eta=2.0)  # (3, 4)
    for i in range(3):
        for j in range(4):
            d = 0.5 * ((x[0][i, j] - x[2][i, j]) - (x[1][i, j] - x[3][i, j])) - 2.0 * dh[i, j]
            d = d.item()  # softplus(-d), written stably for either sign
            want = math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))
            assert abs(batch[i, j].item() - want) < 1e-4 * max(1.0, want)
    # d = -1000 would overflow exp in a naive log(1 / (1 + e^-d)); logsigmoid returns 1000
    big = edpo_loss(torch.tensor(-1000.0), torch.tensor(0.0), torch.tensor(0.0),
                    torch.tensor(0.0), 0.0, beta=1.0, eta=0.0)
    assert abs(big.item() - 1000.0) < 1e-3


# ----------------------------------------------------------------------------- Eq. 8

def _naive_logprobs(logits, labels):
    """Loop over examples and positions: logits[b, t] predicts labels[b, t + 1]."""
    out = []
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1].item()
            if y != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, t].double(), dim=-1)[y].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _batch(seed, B=3, T=9, V=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt of 4 tokens, answer 5
    labels[1, :7] = IGNORE_INDEX  # answer of 1 token (position 7)
    labels[1, 8] = IGNORE_INDEX  # padding after the answer
    labels[2, :] = IGNORE_INDEX  # no answer at all -> 0
    return logits, labels


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_answer_logprobs_matches_naive_loop(chunk_size):
    logits, labels = _batch(0)
    lp = answer_logprobs(logits, labels, chunk_size=chunk_size)
    assert lp.shape == (3,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), _naive_logprobs(logits, labels), atol=1e-5, rtol=1e-6)
    assert lp[2].item() == 0.0


def test_answer_logprobs_bf16_logits_fp32_result():
    logits, labels = _batch(1, dtype=torch.bfloat16)
    lp = answer_logprobs(logits, labels, chunk_size=2)
    assert lp.dtype == torch.float32
    # reference upcasts the same bf16 values, so only fp32 rounding separates them
    torch.testing.assert_close(lp.double(), _naive_logprobs(logits.float(), labels),
                               atol=1e-4, rtol=1e-6)


def test_answer_logprobs_gradient_matches_unchunked():
    logits, labels = _batch(2)
    a = logits.clone().requires_grad_(True)
    answer_logprobs(a, labels, chunk_size=2).sum().backward()  # chunked + recomputed
    b = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(b[:, :-1], dim=-1)  # (B, T-1, V) plain reference
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    (lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    assert a.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    # bf16 logits: the gradient comes back in bf16, equal to the fp32 one up to bf16 rounding
    c = logits.bfloat16().requires_grad_(True)
    answer_logprobs(c, labels, chunk_size=4).sum().backward()
    assert c.grad.dtype == torch.bfloat16
    torch.testing.assert_close(c.grad.float(), b.grad, atol=2e-2, rtol=2e-2)


def test_answer_cross_entropy_matches_F_cross_entropy():
    logits, labels = _batch(3)
    loss_sum, n_tokens = answer_cross_entropy(logits, labels)
    assert n_tokens.tolist() == [5, 1, 0]  # row 0: positions 4..8
    want = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                           ignore_index=IGNORE_INDEX).sum(dim=1)  # (B,)
    torch.testing.assert_close(loss_sum, want, atol=1e-5, rtol=1e-6)


def test_answer_logprobs_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        answer_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
