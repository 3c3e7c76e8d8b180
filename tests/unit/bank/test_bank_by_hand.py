"""The memory bank against hand computations: the EMA update at a momentum where old row and new embedding can
be told apart (0.8, not 0.5), the rules of the negatives' draw, and dense, gathered and shared scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from pirl.bank import MemoryBank, build_bank, dense_scores, gathered_scores
from pirl.bank_sharded import ShardedMemoryBank
from pirl.methods import build_method
from pirl.methods.base import StepOutput
from pirl.seeding import mix_seed

MU = 0.8


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _ema(old: list[float], new: list[float], mu: float) -> list[float]:
    """normalize(mu * old + (1 - mu) * normalize(new)), by hand."""
    return _unit([mu * o + (1 - mu) * n for o, n in zip(old, _unit(new))])


ROWS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]]


def test_update_at_momentum_0_8_is_the_hand_computed_renormalised_average():
    bank = MemoryBank(4, 3, momentum=MU)
    bank.memory.copy_(torch.tensor(ROWS))
    new = [[0.0, 3.0, 4.0], [2.0, 0.0, 0.0]]  # not unit vectors: the update normalises them first
    bank.update(torch.tensor([0, 2]), torch.tensor(new))
    # row 0: 0.8 (1, 0, 0) + 0.2 (0, 0.6, 0.8) = (0.8, 0.12, 0.16), of norm sqrt(0.68): renormalised
    assert _ema(ROWS[0], new[0], MU) == pytest.approx([0.8 / 0.68**0.5, 0.12 / 0.68**0.5, 0.16 / 0.68**0.5])
    expected = [_ema(ROWS[0], new[0], MU), ROWS[1], _ema(ROWS[2], new[1], MU), ROWS[3]]
    torch.testing.assert_close(bank.memory, torch.tensor(expected), rtol=0, atol=1e-6)
    swapped = _unit([MU * n + (1 - MU) * o for o, n in zip(ROWS[0], _unit(new[0]))])
    assert max(abs(a - b) for a, b in zip(swapped, expected[0])) > 0.3  # the swap is a different bank
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.3, MU])
def test_update_weights_the_old_row_by_the_momentum(mu):
    """Rows and embeddings at right angles: the new row's cosine with the old one is mu / sqrt(mu^2 + (1-mu)^2)."""
    bank = MemoryBank(6, 4, momentum=mu)
    old = bank.memory.clone()
    rows = torch.tensor([1, 4])
    new = torch.stack([old[1].roll(1), old[4].roll(1)])
    new = new - (new * old[rows]).sum(1, keepdim=True) * old[rows]  # orthogonal to the old rows
    bank.update(rows, 5.0 * new)
    cos_old = (bank.memory[rows] * old[rows]).sum(1)
    cos_new = (bank.memory[rows] * F.normalize(new, dim=1)).sum(1)
    scale = math.hypot(mu, 1 - mu)
    torch.testing.assert_close(cos_old, torch.full((2,), mu / scale), rtol=0, atol=1e-6)
    torch.testing.assert_close(cos_new, torch.full((2,), (1 - mu) / scale), rtol=0, atol=1e-6)
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank.memory[untouched], old[untouched])


def test_float16_and_sharded_banks_update_as_the_hand_computation():
    rows, new = torch.tensor([0, 2, 3]), torch.tensor([[0.0, 3.0, 4.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    expected = torch.tensor(
        [
            _ema(ROWS[0], new[0].tolist(), MU),
            ROWS[1],
            _ema(ROWS[2], new[1].tolist(), MU),
            _ema(ROWS[3], new[2].tolist(), MU),
        ]
    )
    half = MemoryBank(4, 3, momentum=MU, dtype="float16")
    half.memory.copy_(torch.tensor(ROWS))
    half.update(rows, new)
    assert half.memory.dtype == torch.float16
    torch.testing.assert_close(half.memory.float(), expected, rtol=0, atol=1e-3)
    shards = [ShardedMemoryBank(4, 3, momentum=MU, rank=r, world=2) for r in range(2)]
    for s in shards:
        s.memory.copy_(torch.tensor(ROWS[s.start : s.stop]))
        s.write_owned(rows, F.normalize(new, dim=1))
    torch.testing.assert_close(torch.cat([s.memory for s in shards]), expected, rtol=0, atol=1e-6)


def test_the_configured_momentum_reaches_the_bank_and_after_step_writes_the_image_embeddings():
    method = build_method(tiny_config(f"bank.momentum={MU}", "bank.negatives=8"), 12)
    assert method.bank.momentum == MU and build_bank("sharded", 12, 4, momentum=MU).momentum == MU
    before = method.bank.memory.clone()
    idx, emb = torch.tensor([7, 2, 11]), torch.randn(3, 16)
    method.after_step(StepOutput(torch.tensor(0.0), {}, (idx, emb)))
    want = F.normalize(MU * before[idx] + (1 - MU) * F.normalize(emb, dim=1), dim=1)
    torch.testing.assert_close(method.bank.memory[idx], want, rtol=0, atol=1e-6)
    rest = [i for i in range(12) if i not in idx.tolist()]
    assert torch.equal(method.bank.memory[rest], before[rest])


# --------------------------------------------------------------------------- negatives


def test_negatives_are_the_seeded_draw_and_may_include_the_positive_unless_excluded():
    n, k, step, term, seed = 7, 40, 3, 1, 5
    bank = MemoryBank(n, 4, seed=seed)
    pos = torch.tensor([0, 3, 6, 3, 2, 5])
    gen = lambda: torch.Generator().manual_seed(mix_seed(seed, step, term))  # noqa: E731
    # with the positive: uniform over all N rows
    drawn = bank.sample_negatives(pos, k, step, term)
    assert torch.equal(drawn, torch.randint(0, n, (6, k), generator=gen()))
    assert (drawn == pos.unsqueeze(1)).any()  # the positive is one of the N rows (VISSL)
    # without it: N - 1 rows, the ones at or above the positive shifted up by one
    raw = torch.randint(0, n - 1, (6, k), generator=gen())
    excluded = bank.sample_negatives(pos, k, step, term, exclude_positive=True)
    assert torch.equal(excluded, raw + (raw >= pos.unsqueeze(1)).long())
    assert not (excluded == pos.unsqueeze(1)).any() and excluded.min() >= 0 and excluded.max() < n
    # shared: one set of K for the batch, from all N rows (the positives are not excluded)
    shared = bank.sample_negatives(pos, k, step, term, shared=True, exclude_positive=True)
    assert shared.shape == (k,) and torch.equal(shared, torch.randint(0, n, (k,), generator=gen()))
    # a rank's slice of the global draw
    part = bank.sample_negatives(pos[2:4], k, step, term, global_batch=6, offset=2)
    assert torch.equal(part, drawn[2:4])


def test_negatives_cover_every_allowed_row_uniformly():
    bank = MemoryBank(6, 4)
    pos = torch.tensor([0, 5, 2]).repeat(200)
    for exclude in (False, True):
        neg = bank.sample_negatives(pos, 30, step=9, term=0, exclude_positive=exclude)
        for p in (0, 5, 2):
            counts = torch.bincount(neg[pos == p].flatten(), minlength=6).float()
            share = counts / counts.sum()
            allowed = [r for r in range(6) if not (exclude and r == p)]
            assert (share[allowed] - 1 / len(allowed)).abs().max() < 0.02, (exclude, p, share)
            if exclude:
                assert counts[p] == 0


@pytest.mark.parametrize("exclude", [False, True])
def test_a_method_draws_as_many_negatives_as_the_rows_allow(exclude):
    method = build_method(
        tiny_config("bank.negatives=100", f"bank.exclude_positive={str(exclude).lower()}", "method.lam=0"), 10
    )
    seen = {}
    real = method.bank.sample_negatives

    def spy(positives, k, *args, **kwargs):
        seen["k"], seen["exclude"] = k, kwargs["exclude_positive"]
        seen["drawn"] = real(positives, k, *args, **kwargs)
        return seen["drawn"]

    method.bank.sample_negatives = spy
    pos = torch.arange(4)
    with torch.no_grad():
        loss = method.bank_loss(F.normalize(torch.randn(4, 16), dim=1), pos, step=0, term=1)
    assert torch.isfinite(loss) and seen["k"] == (9 if exclude else 10) and seen["exclude"] is exclude
    assert seen["drawn"].shape == (4, seen["k"])
    assert bool((seen["drawn"] == pos.unsqueeze(1)).any()) is not exclude  # seeded: the draw is fixed


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dense_gathered_and_shared_scores_are_the_hand_dot_products(dtype):
    bank = MemoryBank(60, 8, seed=4, dtype=dtype)
    emb = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    pos = torch.tensor([0, 13, 59, 13, 40])
    neg = bank.sample_negatives(pos, 9, step=2, term=0, exclude_positive=True)
    rows = bank.memory.float()
    hand = torch.tensor([[float(emb[b] @ rows[pos[b]])] + [float(emb[b] @ rows[j]) for j in neg[b]] for b in range(5)])
    bank.dense_ratio = 100.0  # N = 60 <= 100 K: dense
    dense = bank.score(emb, pos, neg)
    bank.dense_ratio = 0.0  # gathered
    gathered = bank.score(emb, pos, neg)
    for got in (dense, gathered):
        assert got.dtype == torch.float32 and got.shape == (5, 10)
        torch.testing.assert_close(got, hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(dense, gathered, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        dense_scores(emb, bank.memory).gather(1, neg), gathered_scores(emb, bank.memory, neg), rtol=0, atol=1e-6
    )
    shared = bank.sample_negatives(pos, 9, step=2, term=0, shared=True)
    torch.testing.assert_close(bank.score(emb, pos, shared)[:, 1:], emb @ rows[shared].T, rtol=0, atol=1e-6)


def test_dense_and_gathered_scores_have_the_same_gradient():
    bank = MemoryBank(50, 8, seed=6)
    pos = torch.tensor([1, 2, 30, 49])
    neg = bank.sample_negatives(pos, 12, step=0, term=1)
    weights = torch.randn(4, 13, generator=torch.Generator().manual_seed(2))
    grads = []
    for ratio in (100.0, 0.0):
        bank.dense_ratio = ratio
        emb = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=1).requires_grad_()
        (bank.score(emb, pos, neg) * weights).sum().backward()
        grads.append(emb.grad)
    want = weights[:, :1] * bank.memory[pos] + torch.einsum("bk,bkd->bd", weights[:, 1:], bank.memory[neg])
    torch.testing.assert_close(grads[0], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], want, rtol=0, atol=1e-6)


def test_initial_rows_are_seeded_blocks_and_any_range_is_a_slice_of_them(monkeypatch):
    import pirl.bank.replicated as replicated

    monkeypatch.setattr(replicated, "INIT_BLOCK", 4)  # 10 rows: blocks of 4, 4 and 2
    n, dim, seed = 10, 6, 3
    bound = 1.0 / (dim / 3) ** 0.5
    drawn = []
    for block in range(3):  # each block its own seeded uniform draw in [-a, a]; the rows then normalised
        gen = torch.Generator().manual_seed(mix_seed(seed, 0x8A4C, block))
        drawn.append(torch.rand(min(4, n - 4 * block), dim, generator=gen) * (2 * bound) - bound)
    full = replicated.initial_rows(n, dim, seed)
    torch.testing.assert_close(full, F.normalize(torch.cat(drawn), dim=1), rtol=0, atol=0)
    assert not torch.allclose(full[:2], full[4:6])  # the blocks are different draws
    # what a rank draws for the rows it owns: ranges inside a block, across blocks, ending on a block edge or
    # one row before it, and empty ones
    for start, stop in [(1, 3), (3, 9), (4, 8), (5, 7), (0, 7), (7, 10), (0, 4), (8, 10), (2, 2), (8, 7)]:
        got = replicated.initial_rows(n, dim, seed, start, stop)
        want = full[start:stop] if stop > start else torch.empty(0, dim)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"rows {start}:{stop}")


# an out= of the wrong size is resized with a warning (deprecated): the scores must land in their own columns
@pytest.mark.filterwarnings("error:An output with one or more elements was resized")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gathered_scores_in_several_pieces_are_the_dense_ones_with_their_gradient(monkeypatch, dtype):
    import pirl.bank.scoring as scoring

    monkeypatch.setattr(scoring, "GATHER_PIECE", 3)  # K = 7 negatives: pieces of 3, 3 and 1 per sample
    gen = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(20, 8, generator=gen), dim=1).to(dtype)
    emb = F.normalize(torch.randn(3, 8, generator=gen), dim=1).requires_grad_()
    negatives = torch.randint(0, 20, (3, 7), generator=gen)
    got = scoring.gathered_scores(emb, memory, negatives)
    ref = emb.detach().clone().requires_grad_()
    want = torch.gather(ref @ memory.float().T, 1, negatives)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    weights = torch.randn(3, 7, generator=gen)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(emb.grad, ref.grad, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the GPU path, on the CPU


def test_the_fused_path_is_every_device_but_the_cpu():
    from pirl.bank.scoring import fused_path

    assert fused_path(torch.device("cpu")) is False
    assert fused_path(torch.device("cuda")) is True and fused_path(torch.device("mps")) is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_both_scoring_paths_give_the_dense_scores_and_gradient(monkeypatch, fused, dtype):
    """The GPU path (one gather and a batched product, a fused ``embedding_bag`` backward, half-precision dense
    products) and the CPU path, each against float64 by hand; float16 products are good to about 1e-3."""
    import pirl.bank.scoring as scoring

    monkeypatch.setattr(scoring, "GATHER_PIECE", 3)
    gen = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(20, 8, generator=gen), dim=1).to(dtype)
    emb = F.normalize(torch.randn(3, 8, generator=gen), dim=1).requires_grad_()
    negatives = torch.randint(0, 20, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen)
    rows = memory.double()
    want = torch.einsum("bd,bkd->bk", emb.detach().double(), rows[negatives])
    grad_want = torch.einsum("bk,bkd->bd", weights.double(), rows[negatives])
    tol = 2e-3 if (fused and dtype == torch.float16) else 1e-5
    got = scoring.gathered_scores(emb, memory, negatives, fused=fused)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)  # widened rows: exact products
    (grad,) = torch.autograd.grad((got * weights).sum(), emb)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), grad_want, rtol=0, atol=tol)
    dense = scoring.dense_scores(emb.detach(), memory, fused=fused)
    assert dense.dtype == torch.float32 and dense.shape == (3, 20)
    torch.testing.assert_close(dense.double(), emb.detach().double() @ rows.T, rtol=0, atol=tol)
    if fused and dtype == torch.float16:  # the product was taken in half precision, not on widened rows
        assert not torch.equal(dense, emb.detach() @ memory.float().T)


@pytest.mark.parametrize("fused", [False, True])
def test_a_float16_banks_gradient_keeps_weights_of_about_one_over_k_on_both_paths(fused):
    """Per-score gradients of 1e-6 are float16 subnormals: unscaled, the fused backward would lose most bits."""
    gen = torch.Generator().manual_seed(8)
    memory = F.normalize(torch.randn(200, 16, generator=gen), dim=1)
    negatives = torch.randint(0, 200, (4, 50), generator=gen)
    emb = F.normalize(torch.randn(4, 16, generator=gen), dim=1).requires_grad_()
    weights = 1e-6 * torch.rand(4, 50, generator=gen)
    (want,) = torch.autograd.grad((torch.gather(emb @ memory.half().float().T, 1, negatives) * weights).sum(), emb)
    (got,) = torch.autograd.grad((gathered_scores(emb, memory.half(), negatives, fused=fused) * weights).sum(), emb)
    assert (got - want).norm() / want.norm() < 5e-3


# --------------------------------------------------------------------------- shards


def test_a_shard_has_the_replicated_banks_defaults_and_exact_bounds():
    whole, shard = MemoryBank(30), ShardedMemoryBank(30, rank=0, world=1)
    assert shard.dim == whole.dim == 128 and shard.momentum == whole.momentum
    assert torch.equal(shard.memory, whole.memory)  # the same default seed
    assert ShardedMemoryBank(10, 4, rank=2, world=3).bounds == [0, 3, 6, 10]
    assert ShardedMemoryBank(10, 4, rank=2, world=3).memory.shape == (4, 4)


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (None, 2)])
def test_a_shard_refuses_a_rank_outside_its_world(rank, world):
    with pytest.raises(ValueError, match="rank"):
        ShardedMemoryBank(10, 4, rank=rank, world=world)


def test_a_plan_counts_every_rank_and_keeps_row_major_order_within_an_owner():
    shard = ShardedMemoryBank(30, 4, rank=0, world=3)  # ranks own rows 0:10, 10:20, 20:30
    gen = torch.Generator().manual_seed(0)
    positives = torch.randint(0, 10, (40,), generator=gen)
    negatives = torch.randint(0, 20, (40, 100), generator=gen)  # nothing for rank 2
    requests, order, counts = shard.plan(positives, negatives)
    wanted = torch.cat([positives.unsqueeze(1), negatives], dim=1).flatten()
    assert counts.tolist() == [int((wanted < 10).sum()), int((wanted >= 10).sum()), 0]
    for owner, part in zip(range(3), torch.split(order, counts.tolist())):
        assert torch.equal(part, torch.nonzero(shard.owner(wanted) == owner).flatten())  # ascending
    assert torch.equal(requests, (order // 101) * 30 + wanted[order])


def test_a_shard_loads_its_own_rows_and_its_rows_of_a_full_bank_when_rows_equal_the_width():
    shard = ShardedMemoryBank(4, 4, rank=1, world=2)  # N = D: the full bank is 4 x 4, the shard 2 x 4
    full = MemoryBank(4, 4, seed=9).memory
    shard.load_state_dict({"memory": full})
    assert torch.equal(shard.memory, full[2:])
    own = F.normalize(torch.randn(2, 4), dim=1)
    shard.load_state_dict({"memory": own})  # a shard-sized state dict is this shard's rows
    assert torch.equal(shard.memory, own)


def test_dense_scoring_is_taken_while_the_bank_has_at_most_dense_ratio_times_k_rows(monkeypatch):
    """The rule both banks share (a speed choice; the scores are the same either way)."""
    import pirl.bank.replicated as replicated
    import pirl.bank.sharded as sharded

    calls = []

    def counting(module):
        real = module.dense_scores

        def dense(*args, **kwargs):
            calls.append(module.__name__)
            return real(*args, **kwargs)

        return dense

    monkeypatch.setattr(replicated, "dense_scores", counting(replicated))
    monkeypatch.setattr(sharded, "dense_scores", counting(sharded))
    bank = MemoryBank(60, 8, seed=1)
    bank.dense_ratio = 5.0
    emb = F.normalize(torch.randn(2, 8), dim=1)
    pos = torch.tensor([3, 7])
    for k, dense in [(12, True), (11, False)]:  # 60 <= 5 * 12, 60 > 5 * 11
        calls.clear()
        bank.score(emb, pos, bank.sample_negatives(pos, k, step=0, term=0))
        assert calls == (["pirl.bank.replicated"] if dense else []), k
    shard = ShardedMemoryBank(60, 8, seed=1, rank=0, world=2)
    shard.dense_ratio = 5.0
    asked = torch.tensor([0 * 60 + 3, 1 * 60 + 29, 1 * 60 + 0])  # (sample, row) requests for rows it owns
    want = torch.stack([emb[0] @ shard.memory[3], emb[1] @ shard.memory[29], emb[1] @ shard.memory[0]])
    for k, dense in [(12, True), (11, False)]:
        calls.clear()
        got = shard.answer(emb, asked, torch.tensor([3]), 2, k)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert calls == (["pirl.bank.sharded"] if dense else []), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("fused", "gpu"), [(None, False), (None, True), (True, False), (False, True)])
def test_the_scoring_path_is_the_one_named_or_else_the_devices(monkeypatch, fused, gpu, dtype):
    """Which path runs, seen from the CPU pieces it walks: none on the fused path; on the other, the pieces in the
    forward, and in the backward only for a float16 bank (a float32 one takes the one fused embedding_bag)."""
    import pirl.bank.scoring as scoring

    monkeypatch.setattr(scoring, "fused_path", lambda device: gpu)  # as if the embeddings were on a GPU
    pieces = []
    real = scoring._pieces

    def counted(*args):
        pieces.append(args[2])
        yield from real(*args)

    monkeypatch.setattr(scoring, "_pieces", counted)
    gen = torch.Generator().manual_seed(2)
    memory = F.normalize(torch.randn(20, 8, generator=gen), dim=1).to(dtype)
    emb = F.normalize(torch.randn(3, 8, generator=gen), dim=1).requires_grad_()
    negatives = torch.randint(0, 20, (3, 7), generator=gen)
    takes_fused = gpu if fused is None else fused
    scores = scoring.gathered_scores(emb, memory, negatives, fused=fused)
    assert len(pieces) == (0 if takes_fused else 1)
    scores.sum().backward()
    assert len(pieces) == (0 if takes_fused else 1 if dtype == torch.float32 else 2)
    dense = scoring.dense_scores(emb.detach(), memory, fused=fused)
    widened = emb.detach() @ memory.float().T
    assert torch.equal(dense, widened) == (dtype == torch.float32 or not takes_fused)


def test_the_fused_float16_backward_scales_each_sample_by_its_own_largest_weight():
    """A sample whose weights are all about 1e-6 next to one whose are about 1 keeps its gradient."""
    gen = torch.Generator().manual_seed(4)
    memory = F.normalize(torch.randn(200, 16, generator=gen), dim=1)
    negatives = torch.randint(0, 200, (2, 50), generator=gen)
    emb = F.normalize(torch.randn(2, 16, generator=gen), dim=1).requires_grad_()
    weights = torch.rand(2, 50, generator=gen) * torch.tensor([[1.0], [1e-6]])
    want = torch.einsum("bk,bkd->bd", weights, memory.half().float()[negatives])
    (got,) = torch.autograd.grad((gathered_scores(emb, memory.half(), negatives, fused=True) * weights).sum(), emb)
    assert got.dtype == torch.float32
    for b in range(2):
        assert (got[b] - want[b]).norm() / want[b].norm() < 5e-3, b
