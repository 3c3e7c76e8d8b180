import copy

import pytest
import torch
import torch.nn.functional as F

from pirl import bank as bank_module
from pirl.bank import INIT_BLOCK, MemoryBank, build_bank, gathered_scores, initial_rows
from pirl.bank_sharded import ShardedMemoryBank
from pirl.config import load_config
from pirl.errors import PirlError
from pirl.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm


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
    s = 2**-0.5
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


@pytest.mark.parametrize("piece", [7, 4096])  # several pieces per sample, and one
def test_gathered_scores_and_their_gradient_match_plain_autograd(monkeypatch, piece):
    monkeypatch.setattr(bank_module, "GATHER_PIECE", piece)
    memory = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=1)
    negatives = torch.randint(0, 300, (5, 23))
    emb = F.normalize(torch.randn(5, 16, dtype=torch.float64), dim=1).requires_grad_()
    weights = torch.randn(5, 23, dtype=torch.float64)  # a loss whose gradient differs per score
    fast = gathered_scores(emb, memory, negatives)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), emb)
    plain = torch.bmm(memory[negatives], emb.unsqueeze(2)).squeeze(2)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), emb)
    assert torch.allclose(fast, plain, atol=1e-12) and torch.allclose(grad_fast, grad_plain, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e: gathered_scores(e, memory, negatives), (emb,))


def test_gathered_scores_refuse_a_backward_after_the_bank_changed():
    bank = MemoryBank(100, 8)
    emb = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    scores = gathered_scores(emb, bank.memory, torch.randint(0, 100, (3, 10)))
    bank.update(torch.tensor([1, 2]), torch.randn(2, 8))  # the trainer updates only after backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


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


# --------------------------------------------------------------------------- sharded bank, one process


def _shards(n: int, dim: int, world: int, seed: int = 0, dtype: str = "float32") -> list[ShardedMemoryBank]:
    return [ShardedMemoryBank(n, dim, seed=seed, rank=r, world=world, dtype=dtype) for r in range(world)]


def test_blocked_init_draws_any_rows_alone():
    n = 3 * INIT_BLOCK // 2
    whole = initial_rows(n, 4, seed=5)
    assert torch.equal(initial_rows(n, 4, 5, INIT_BLOCK - 3, INIT_BLOCK + 2), whole[INIT_BLOCK - 3 : INIT_BLOCK + 2])
    assert initial_rows(n, 4, 5, 7, 7).shape == (0, 4)


def test_shards_own_contiguous_blocks_of_the_replicated_bank():
    bank = MemoryBank(103, 8, seed=2)
    shards = _shards(103, 8, 4, seed=2)
    assert [s.memory.shape[0] for s in shards] == [25, 26, 26, 26]
    assert torch.equal(torch.cat([s.memory for s in shards]), bank.memory)
    owners = shards[0].owner(torch.arange(103))
    assert torch.equal(owners, torch.repeat_interleave(torch.arange(4), torch.tensor([25, 26, 26, 26])))
    for s in shards:
        assert (owners[s.start : s.stop] == s.rank).all()
    tiny = _shards(3, 8, 5)  # fewer rows than processes: some shards are empty
    assert [s.memory.shape[0] for s in tiny] == [0, 1, 0, 1, 1]
    assert tiny[0].owner(torch.arange(3)).tolist() == [1, 3, 4]


def _simulated_scores(shards, emb, positives, negatives):
    """Run the sharded score's three steps for every rank in one process, moving the messages by hand."""
    world, batch = len(shards), emb.shape[0] // len(shards)
    plans = [
        s.plan(positives[r * batch : (r + 1) * batch], negatives[r * batch : (r + 1) * batch])
        for r, s in enumerate(shards)
    ]
    sent = [list(torch.split(req, send.tolist())) for req, _, send in plans]  # sent[asker][owner]
    answers = []
    for owner, s in enumerate(shards):
        asked = torch.cat([sent[asker][owner] for asker in range(world)])
        counts = torch.tensor([len(sent[asker][owner]) for asker in range(world)])
        answers.append(list(torch.split(s.answer(emb, asked, counts, batch, negatives.shape[-1]), counts.tolist())))
    return torch.cat(
        [
            ShardedMemoryBank.unsort(
                torch.cat([answers[owner][asker] for owner in range(world)]), plans[asker][1], batch
            )
            for asker in range(world)
        ]
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dense", [True, False])
def test_simulated_fetch_gives_the_replicated_scores_and_gradients(dense, dtype):
    bank, shards = MemoryBank(61, 8, seed=3, dtype=dtype), _shards(61, 8, 3, seed=3, dtype=dtype)
    for b in [bank, *shards]:
        b.dense_ratio = 100.0 if dense else 0.0
    emb = F.normalize(torch.randn(12, 8), dim=1).requires_grad_()
    pos = torch.randperm(61)[:12]
    neg = bank.sample_negatives(pos, 20, step=4, term=0, exclude_positive=True)
    want = bank.score(emb, pos, neg)
    got = _simulated_scores(shards, emb, pos, neg)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    weights = torch.randn_like(want)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), emb)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), emb)
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-6)


def test_owners_write_exactly_their_rows_of_the_update():
    bank, shards = MemoryBank(50, 4, seed=1), _shards(50, 4, 3, seed=1)
    rows, emb = torch.tensor([0, 16, 17, 33, 49, 5]), F.normalize(torch.randn(6, 4), dim=1)
    bank.update(rows, emb)
    for s in shards:
        s.write_owned(rows, F.normalize(emb, dim=1))  # as update() does before writing
    assert torch.equal(torch.cat([s.memory for s in shards]), bank.memory)


def test_one_process_sharded_bank_is_the_replicated_bank():
    bank, sharded = MemoryBank(40, 8, seed=0), build_bank("sharded", 40, 8, seed=0)
    assert isinstance(sharded, ShardedMemoryBank) and sharded.world == 1 and sharded.kind == "sharded"
    emb = F.normalize(torch.randn(5, 8), dim=1)
    pos = torch.tensor([1, 2, 3, 4, 39])
    neg = bank.sample_negatives(pos, 7, step=2, term=1)
    assert torch.equal(neg, sharded.sample_negatives(pos, 7, step=2, term=1))
    assert torch.equal(bank.score(emb, pos, neg), sharded.score(emb, pos, neg))
    bank.update(pos, emb)
    sharded.update(pos, emb)
    assert torch.equal(bank.memory, sharded.memory) and torch.equal(sharded.full_memory(), bank.memory)
    assert sharded.state_dict().keys() == bank.state_dict().keys() == {"memory"}


def test_a_shard_loads_its_rows_of_a_full_checkpoint_bank():
    full = MemoryBank(30, 4, seed=9).memory
    shard = ShardedMemoryBank(30, 4, seed=0, rank=1, world=2)
    shard.load_state_dict({"memory": full})
    assert torch.equal(shard.memory, full[15:])
    with pytest.raises(RuntimeError, match="size mismatch"):
        shard.load_state_dict({"memory": full[:20]})


def test_bank_kind_is_validated():
    assert build_bank("replicated", 10, 4).kind == "replicated"
    with pytest.raises(ValueError, match="unknown bank kind"):
        build_bank("striped", 10, 4)
    assert load_config("cpu-quick", ["loss.bank=sharded", "train.sync_bn=true"]).bank.kind == "sharded"
    with pytest.raises(PirlError, match=r"loss.bank='striped': must be one of replicated, sharded"):
        load_config("cpu-quick", ["loss.bank=striped"])


def test_sync_batchnorm_conversion_keeps_parameters_and_acts_as_batchnorm_alone():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.BatchNorm1d(64, affine=False)
    )
    reference = copy.deepcopy(net)
    params = list(net.parameters())
    net = convert_sync_batchnorm(net, "cpu")
    assert isinstance(net[1], AllReduceBatchNorm) and isinstance(net[3], AllReduceBatchNorm)
    assert all(a is b for a, b in zip(net.parameters(), params))
    assert net.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(6, 3, 6, 6)
    torch.testing.assert_close(net(x), reference(x))  # one process: plain BatchNorm
    torch.testing.assert_close(net[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("path", ["dense", "gathered", "shared"])
def test_float16_bank_scores_train_like_the_float32_bank(path):
    full, half = MemoryBank(500, 128, seed=2), MemoryBank(500, 128, seed=2, dtype="float16")
    assert half.memory.dtype == torch.float16 and half.memory.element_size() * 2 == full.memory.element_size()
    for b in (full, half):
        b.dense_ratio = 100.0 if path == "dense" else 0.0
    pos = torch.arange(0, 480, 40)
    neg = full.sample_negatives(pos, 64, step=0, term=0, shared=path == "shared")
    emb = F.normalize(torch.randn(12, 128), dim=1).requires_grad_()
    want, got = full.score(emb, pos, neg), half.score(emb, pos, neg)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)  # rows rounded to 11 significant bits
    loss = lambda s: F.cross_entropy(s / 0.07, torch.zeros(len(s), dtype=torch.long))  # noqa: E731
    (grad_want,) = torch.autograd.grad(loss(want), emb)
    (grad_got,) = torch.autograd.grad(loss(got), emb)
    assert (grad_got - grad_want).norm() / grad_want.norm() < 5e-3
    # the update is computed in float32 and stored rounded: rows stay unit vectors, close to float32's
    for b in (full, half):
        b.update(pos, emb.detach())
    assert half.memory.dtype == torch.float16
    torch.testing.assert_close(half.memory.float(), full.memory, rtol=0, atol=1e-3)
    assert (half.memory.float().norm(dim=1) - 1).abs().max() < 2e-3


def test_float16_gathered_gradient_keeps_tiny_weights():
    """Per-score gradients near 1 / K would fall into float16's subnormals unscaled."""
    memory = F.normalize(torch.randn(1000, 32), dim=1)
    negatives = torch.randint(0, 1000, (4, 300))
    emb = F.normalize(torch.randn(4, 32), dim=1).requires_grad_()
    weights = torch.full((4, 300), 1e-6) * torch.rand(4, 300)
    (want,) = torch.autograd.grad((gathered_scores(emb, memory, negatives) * weights).sum(), emb)
    (got,) = torch.autograd.grad((gathered_scores(emb, memory.half(), negatives) * weights).sum(), emb)
    assert (got - want).norm() / want.norm() < 2e-3


def test_checkpoints_move_between_bank_dtypes():
    half = MemoryBank(30, 8, seed=1, dtype="float16")
    full = MemoryBank(30, 8, seed=9)
    full.load_state_dict(half.state_dict())
    assert full.memory.dtype == torch.float32 and torch.equal(full.memory, half.memory.float())
    with pytest.raises(ValueError, match="bank dtype"):
        MemoryBank(30, 8, dtype="float64")
