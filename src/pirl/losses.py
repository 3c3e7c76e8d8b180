"""Contrastive losses against a memory bank, as pure functions of cosine scores (always computed in fp32).

``scores`` has shape (B, 1 + K): column 0 is s(v, m_I) for the positive bank row, columns 1..K are
s(v, m_I') for the K negatives. All three return the batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE / softmax cross-entropy with the positive as class 0 (PyContrast, VISSL "cross_entropy")."""
    logits = scores.float() / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def paper_nce(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's Eq. 3-4: h(a, b) = e(a, b) / (e(a, b) + sum over negatives of e), e = exp(s / tau).

    loss = -log h(positive) - sum_k log(1 - h(negative_k)), evaluated in log space for stability.
    """
    logits = scores.float() / temperature
    pos, neg = logits[:, 0], logits[:, 1:]
    neg_lse = torch.logsumexp(neg, dim=1)  # log sum_{I' in D_N} e(v, m_I')
    log_h_pos = pos - torch.logaddexp(pos, neg_lse)
    # 1 - h_k = S / (e_k + S) with S the negatives' sum
    log_one_minus_h_neg = neg_lse.unsqueeze(1) - torch.logaddexp(neg, neg_lse.unsqueeze(1))
    return -(log_h_pos + log_one_minus_h_neg.sum(dim=1)).mean()


def estimate_log_z(scores: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """log Z with Z = N_data * mean(exp(s / tau)) over all entries of one batch (NPID, VISSL)."""
    logits = scores.detach().float() / temperature
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(logits.numel()) + math.log(num_samples)


def npid_nce(
    scores: torch.Tensor, temperature: float, log_z: torch.Tensor, num_samples: int, eps: float = 1e-7
) -> torch.Tensor:
    """NPID-style binary NCE (VISSL's "nce" loss) with a noise prior K / N_data and a frozen normaliser Z.

    u = exp(s / tau) / Z;  P(pos is data) = u_0 / (u_0 + K/N + eps);  P(neg is noise) = (K/N) / (u_k + K/N + eps);
    loss = -(log P_pos + sum_k log P_neg_k). Negative terms are summed, as in VISSL.
    """
    logits = scores.float() / temperature
    k = scores.shape[1] - 1
    log_denominator_noise = math.log(k / num_samples + eps)  # log(u + K/N + eps) = logaddexp(log u, this)
    log_u = logits - log_z
    noise = torch.full_like(log_u, log_denominator_noise)
    log_p_pos = log_u[:, 0] - torch.logaddexp(log_u[:, 0], noise[:, 0])
    log_p_neg = math.log(k / num_samples) - torch.logaddexp(log_u[:, 1:], noise[:, 1:])
    return -(log_p_pos + log_p_neg.sum(dim=1)).mean()
