import torch
import torch.nn.functional as F

from pirl.bank import MemoryBank


def test_init_rows_are_unit_vectors_from_a_uniform_draw_and_seeded():
    bank = MemoryBank(100, 128, seed=3)
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.equal(bank.memory, MemoryBank(100, 128, seed=3).memory)  # identical on every process
    assert not torch.equal(bank.memory, MemoryBank(100, 128, seed=4).memory)
    # uniform in [-a, a] before normalisation: rows are not concentrated on an axis, mean near 0
    assert bank.memory.mean().abs() < 0.01


def test_update_is_normalised_momentum_average():
    bank = MemoryBank(4, 2, momentum=0.5)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    bank.update(torch.tensor([0, 3]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]))  # unnormalised input
    s = 2 ** -0.5
    expected = torch.tensor([[s, s], [0.0, 1.0], [1.0, 0.0], [s, s]])
    assert torch.allclose(bank.memory, expected, atol=1e-6)


def test_score_dense_and_gather_paths_agree():
    bank = MemoryBank(50, 8, seed=0)
    emb = F.normalize(torch.randn(4, 8), dim=1)
    pos = torch.tensor([0, 5, 9, 49])
    neg = bank.sample_negatives(pos, 20, step=0, term=0)
    bank.dense_ratio = 100.0
    dense = bank.score(emb, pos, neg)
    bank.dense_ratio = 0.0
    gathered = bank.score(emb, pos, neg)
    assert torch.allclose(dense, gathered, atol=1e-6)
    assert torch.allclose(dense[:, 0], (emb * bank.memory[pos]).sum(1), atol=1e-6)
    assert torch.allclose(dense[2, 1:], bank.memory[neg[2]] @ emb[2], atol=1e-6)


def test_negatives_exclude_the_positive_when_asked_and_stay_uniform():
    bank = MemoryBank(5, 4)
    pos = torch.arange(5).repeat(400)
    neg = bank.sample_negatives(pos, 50, step=1, term=0, exclude_positive=True)
    assert not (neg == pos.unsqueeze(1)).any()
    counts = torch.bincount(neg[pos == 2].flatten(), minlength=5).float()
    assert counts[2] == 0 and (counts[[0, 1, 3, 4]] / counts.sum() - 0.25).abs().max() < 0.03


def test_negatives_of_a_rank_are_its_rows_of_the_global_draw():
    bank = MemoryBank(1000, 4, seed=1)
    pos = torch.arange(8)
    whole = bank.sample_negatives(pos, 30, step=7, term=1)
    second_half = bank.sample_negatives(pos[4:], 30, step=7, term=1, global_batch=8, offset=4)
    assert torch.equal(whole[4:], second_half)
    assert not torch.equal(whole, bank.sample_negatives(pos, 30, step=8, term=1))  # fresh draw each step
    assert not torch.equal(whole, bank.sample_negatives(pos, 30, step=7, term=0))  # and each loss term
    shared = bank.sample_negatives(pos, 30, step=7, term=1, shared=True)
    assert shared.shape == (30,)
