import math

import torch

from pirl import losses


def test_info_nce_matches_hand_computation():
    scores = torch.tensor([[0.5, 0.1, -0.2]])
    t = 0.1
    e = [math.exp(s / t) for s in (0.5, 0.1, -0.2)]
    assert math.isclose(losses.info_nce(scores, t).item(), -math.log(e[0] / sum(e)), rel_tol=1e-5)


def test_paper_nce_matches_eq_3_and_4():
    scores = torch.tensor([[0.3, 0.2, -0.1, 0.05]])
    t = 0.5
    e = [math.exp(s / t) for s in scores[0].tolist()]
    s_neg = sum(e[1:])
    expected = -math.log(e[0] / (e[0] + s_neg)) - sum(math.log(1 - ek / (ek + s_neg)) for ek in e[1:])
    assert math.isclose(losses.paper_nce(scores, t).item(), expected, rel_tol=1e-5)


def test_npid_nce_matches_vissl_formula():
    scores = torch.tensor([[0.4, 0.0, 0.3], [0.1, -0.2, 0.2]])
    t, n, eps = 0.07, 1000, 1e-7
    z = 2.5 * n
    k = 2
    total = 0.0
    for row in scores.tolist():
        u = [math.exp(s / t) / z for s in row]
        pn = k / n
        total += -(math.log(u[0] / (u[0] + pn + eps)) + sum(math.log(pn / (uk + pn + eps)) for uk in u[1:]))
    got = losses.npid_nce(scores, t, torch.tensor(math.log(z)), n, eps)
    assert math.isclose(got.item(), total / 2, rel_tol=1e-5)


def test_log_z_is_n_times_mean_exp():
    scores = torch.tensor([[0.1, 0.2], [0.3, -0.4]])
    t, n = 0.07, 500
    z = n * sum(math.exp(s / t) for s in scores.flatten().tolist()) / 4
    assert math.isclose(losses.estimate_log_z(scores, t, n).exp().item(), z, rel_tol=1e-5)


def test_losses_are_fp32_even_for_half_inputs():
    scores = torch.tensor([[0.99, 0.1, 0.2]], dtype=torch.bfloat16)
    assert losses.info_nce(scores, 0.07).dtype == torch.float32
    assert torch.isfinite(losses.paper_nce(scores, 0.07))


def test_losses_decrease_as_the_positive_wins():
    weak, strong = torch.tensor([[0.1, 0.1, 0.1]]), torch.tensor([[0.9, 0.1, 0.1]])
    for fn in (
        lambda s: losses.info_nce(s, 0.1),
        lambda s: losses.paper_nce(s, 0.1),
        lambda s: losses.npid_nce(s, 0.1, torch.tensor(math.log(100.0)), 100),
    ):
        assert fn(strong) < fn(weak)
