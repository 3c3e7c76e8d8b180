"""The losses and PIRL's mix of its two terms, against hand computations on rows that differ from one another.

Every loss is a batch mean: with rows whose losses differ, a sum (or a mean over the wrong axis) gives another
number. PIRL's loss is lam * L(transformed) + (1 - lam) * L(image) (paper Eq. 5), checked at lam = 0.3, where
any other weighting of the two terms gives another number too.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import random_source, tiny_config
from pirl import losses
from pirl.methods import build_method
from pirl.methods.base import BankLoss
from pirl.methods.rotation import rotate_all

# three rows of (positive, 3 negatives): a confident row, a confused one and one in between
SCORES = [[0.9, 0.1, -0.3, 0.2], [0.05, 0.6, 0.4, -0.1], [0.3, 0.25, 0.0, 0.35]]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _info_nce_row(row: list[float], t: float) -> float:
    e = [math.exp(s / t) for s in row]
    return -math.log(e[0] / sum(e))


def _paper_nce_row(row: list[float], t: float) -> float:
    """Eq. 3-4: h(pos) = e_0 / (e_0 + S), S the negatives' sum; loss = -log h(pos) - sum_k log(1 - h(neg_k))."""
    e = [math.exp(s / t) for s in row]
    s_neg = sum(e[1:])
    return -math.log(e[0] / (e[0] + s_neg)) - sum(math.log(1 - ek / (ek + s_neg)) for ek in e[1:])


def _npid_nce_row(row: list[float], t: float, z: float, n: int, eps: float = 1e-7) -> float:
    k = len(row) - 1
    u = [math.exp(s / t) / z for s in row]
    pn = k / n
    return -(math.log(u[0] / (u[0] + pn + eps)) + sum(math.log(pn / (uk + pn + eps)) for uk in u[1:]))


def _z(rows: list[list[float]], t: float, n: int) -> float:
    flat = [s for row in rows for s in row]
    return n * sum(math.exp(s / t) for s in flat) / len(flat)


def _rows_differ(values: list[float]) -> None:
    assert max(values) - min(values) > 0.1 * abs(sum(values) / len(values)), values  # else a sum hides nowhere


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_every_loss_is_the_mean_of_hand_computed_rows(t):
    scores = torch.tensor(SCORES)
    n, z = 50, 3.0 * 50
    forms = {
        "info_nce": (losses.info_nce(scores, t), [_info_nce_row(r, t) for r in SCORES]),
        "paper_nce": (losses.paper_nce(scores, t), [_paper_nce_row(r, t) for r in SCORES]),
        "npid_nce": (
            losses.npid_nce(scores, t, torch.tensor(math.log(z)), n),
            [_npid_nce_row(r, t, z, n) for r in SCORES],
        ),
    }
    for name, (got, rows) in forms.items():
        _rows_differ(rows)
        assert got.shape == () and got.dtype == torch.float32, name
        assert math.isclose(got.item(), sum(rows) / len(rows), rel_tol=1e-5), (name, got.item(), rows)
        # one row alone is that row's loss: the mean does not depend on where a row sits in the batch
        for i, row in enumerate(rows):
            alone = {
                "info_nce": lambda s: losses.info_nce(s, t),
                "paper_nce": lambda s: losses.paper_nce(s, t),
                "npid_nce": lambda s: losses.npid_nce(s, t, torch.tensor(math.log(z)), n),
            }[name]
            assert math.isclose(alone(scores[i : i + 1]).item(), row, rel_tol=1e-5), (name, i)


def test_log_z_of_asymmetric_rows_is_n_times_the_mean_over_every_entry():
    t, n = 0.2, 700
    got = losses.estimate_log_z(torch.tensor(SCORES), t, n).exp().item()
    assert math.isclose(got, _z(SCORES, t, n), rel_tol=1e-5)


@pytest.mark.parametrize("form", ["infonce", "paper_nce", "npid_nce"])
def test_bank_loss_dispatches_each_form_and_keeps_z_from_the_first_batch(form):
    scores, t, n = torch.tensor(SCORES), 0.2, 40
    criterion = BankLoss(form, t, n)
    got = criterion(scores).item()
    if form == "infonce":
        rows = [_info_nce_row(r, t) for r in SCORES]
    elif form == "paper_nce":
        rows = [_paper_nce_row(r, t) for r in SCORES]
    else:
        z = _z(SCORES, t, n)
        rows = [_npid_nce_row(r, t, z, n) for r in SCORES]
        assert math.isclose(criterion.log_z.exp().item(), z, rel_tol=1e-5)
        later = [[0.0, 0.0, 0.0, 0.0]] * 2  # Z is frozen: a later batch is scored with the first batch's Z
        assert math.isclose(criterion(torch.tensor(later)).item(), _npid_nce_row(later[0], t, z, n), rel_tol=1e-5)
    assert math.isclose(got, sum(rows) / len(rows), rel_tol=1e-5)


# --------------------------------------------------------------------------- PIRL's loss, by hand


LAM = 0.3
BATCH = 6  # rows of a batch: fewer than the config's 8, to keep the steps cheap


def _method(form: str, lam: float = LAM, name: str = "pirl"):
    torch.manual_seed(0)
    return build_method(
        tiny_config(
            f"method.name={name}", f"method.lam={lam}", f"loss.form={form}", "loss.temperature=0.2", "bank.negatives=16"
        ),
        40,
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(BATCH, 3, 16, 16, generator=gen),
        "patches": torch.randn(BATCH, 9, 3, 4, 4, generator=gen),
        "index": torch.tensor([3, 0, 17, 39, 8, 22, 5, 31])[:BATCH],
    }


def _hand_term(
    method, emb: torch.Tensor, idx: torch.Tensor, step: int, term: int, form: str, log_z: float | None
) -> tuple[list[float], list[list[float]]]:
    """Per-row losses of one term: unit embeddings against the bank, in float64 Python arithmetic."""
    t, n = method.cfg.loss.temperature, method.num_samples
    neg = method.bank.sample_negatives(idx, 16, step, term, global_batch=len(idx))
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    memory = method.bank.memory.double()
    rows = [[float(e[b] @ memory[idx[b]])] + [float(e[b] @ memory[j]) for j in neg[b]] for b in range(len(idx))]
    if form == "infonce":
        return [_info_nce_row(r, t) for r in rows], rows
    if form == "paper_nce":
        return [_paper_nce_row(r, t) for r in rows], rows
    z = math.exp(log_z) if log_z is not None else _z(rows, t, n)
    return [_npid_nce_row(r, t, z, n) for r in rows], rows


@pytest.mark.parametrize("form", ["paper_nce", "infonce", "npid_nce"])
def test_pirl_loss_is_lam_transformed_plus_one_minus_lam_image_by_hand(form):
    method = _method(form)
    batch, step = _batch(), 5
    out = method.training_step(batch, step=step)
    with torch.no_grad():  # the same forward (BatchNorm in training mode normalises with the batch's statistics)
        emb = method.encoder({"g": batch["patches"].flatten(0, 1), "f": batch["image"]})
    idx = batch["index"]
    image_rows, image_scores = _hand_term(method, emb["f"], idx, step, 1, form, None)
    z = math.log(_z(image_scores, method.cfg.loss.temperature, 40)) if form == "npid_nce" else None
    transformed_rows, _ = _hand_term(method, emb["g"], idx, step, 0, form, z)  # Z: from the first (image) term
    _rows_differ(image_rows)
    _rows_differ(transformed_rows)
    image, transformed = sum(image_rows) / BATCH, sum(transformed_rows) / BATCH
    assert math.isclose(out.logs["loss_image"].item(), image, rel_tol=1e-4)
    assert math.isclose(out.logs["loss_transformed"].item(), transformed, rel_tol=1e-4)
    assert abs(image - transformed) > 0.01 * image  # the two terms differ, so their weights can be told apart
    assert math.isclose(out.loss.item(), LAM * transformed + (1 - LAM) * image, rel_tol=1e-5)
    # the bank update carries the image embedding of each sample, at its own index
    assert torch.equal(out.bank_update[0], idx)
    torch.testing.assert_close(out.bank_update[1], torch.nn.functional.normalize(emb["f"], dim=1), rtol=0, atol=1e-6)


def test_npid_loss_is_the_image_term_alone_by_hand():
    method = _method("paper_nce", lam=0.0, name="npid")
    batch = _batch(1)
    out = method.training_step(batch, step=2)
    with torch.no_grad():
        emb = method.encoder({"f": batch["image"]})["f"]
    rows, _ = _hand_term(method, emb, batch["index"], 2, 1, "paper_nce", None)
    _rows_differ(rows)
    assert math.isclose(out.loss.item(), sum(rows) / BATCH, rel_tol=1e-5)


# --------------------------------------------------------------------------- gradients


def _nonzero_grads(module: torch.nn.Module, what: str) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{what}.{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}.{name}"


def test_pirl_gradients_reach_trunk_and_both_heads_in_the_proportions_of_lam():
    """g only sees the transformed term and f only the image term: their gradients scale with lam and 1 - lam."""
    grads = {}
    for lam in (LAM, 0.6):
        method = _method("infonce", lam=lam)
        method.training_step(_batch(), step=1).loss.backward()
        _nonzero_grads(method.encoder.trunk, "trunk")
        _nonzero_grads(method.encoder.heads["f"], "f")
        _nonzero_grads(method.encoder.heads["g"], "g")
        grads[lam] = {k: p.grad.clone() for k, p in method.encoder.named_parameters()}
    low, high = grads[LAM], grads[0.6]
    for key in low:
        if key.startswith("heads.g."):
            torch.testing.assert_close(high[key], low[key] * (0.6 / LAM), rtol=1e-4, atol=1e-7, msg=key)
        elif key.startswith("heads.f."):
            torch.testing.assert_close(high[key], low[key] * (0.4 / (1 - LAM)), rtol=1e-4, atol=1e-7, msg=key)
    # the trunk's gradient is lam a + (1 - lam) b, a from the transformed term and b from the image term:
    # solved from the two runs, both terms reach the trunk
    trunk = [k for k in low if k.startswith("trunk.")]
    g_low, g_high = torch.cat([low[k].flatten() for k in trunk]), torch.cat([high[k].flatten() for k in trunk])
    det = 0.6 * (1 - LAM) - LAM * 0.4
    from_transformed = ((1 - LAM) * g_high - 0.4 * g_low) / det
    from_image = (0.6 * g_low - LAM * g_high) / det
    assert from_transformed.norm() > 0.05 * g_low.norm() and from_image.norm() > 0.05 * g_low.norm()


def test_npid_gradients_reach_trunk_and_image_head_and_the_bank_stays_put():
    method = _method("infonce", lam=0.0, name="npid")
    assert set(method.encoder.heads) == {"f"}
    before = method.bank.memory.clone()
    method.training_step(_batch(), step=0).loss.backward()
    _nonzero_grads(method.encoder.trunk, "trunk")
    _nonzero_grads(method.encoder.heads["f"], "f")
    assert not method.bank.memory.requires_grad and torch.equal(method.bank.memory, before)


@pytest.mark.parametrize("pretext, form", [("rotation", "npid_nce"), ("jigsaw_rotation", "paper_nce")])
def test_pirl_gradients_reach_trunk_and_both_heads_for_the_other_pretexts(pretext, form):
    torch.manual_seed(0)
    method = build_method(
        tiny_config(f"method.pretext={pretext}", f"method.lam={LAM}", f"loss.form={form}", "bank.negatives=16"), 40
    )
    batch = _batch()
    batch["rotated"] = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    out = method.training_step(batch, step=0)
    out.loss.backward()
    assert math.isclose(
        out.loss.item(),
        LAM * out.logs["loss_transformed"].item() + (1 - LAM) * out.logs["loss_image"].item(),
        rel_tol=1e-6,
    )
    for name in ("trunk", "f", "g"):
        _nonzero_grads(method.encoder.trunk if name == "trunk" else method.encoder.heads[name], name)


@pytest.mark.parametrize("name", ["jigsaw", "rotation", "supervised"])
def test_baseline_gradients_reach_trunk_and_head_and_acc_is_the_batch_accuracy(name):
    torch.manual_seed(0)
    cfg = tiny_config(f"method.name={name}", "method.permutations=30")
    method = build_method(cfg, 8, random_source(8, classes=3))
    gen = torch.Generator().manual_seed(2)
    batch = {
        "image": torch.randn(4, 3, 16, 16, generator=gen),
        "patches": torch.randn(4, 9, 3, 4, 4, generator=gen),
        "permutation": torch.tensor([0, 29, 3, 3]),
        "label": torch.tensor([0, 2, 1, 2]),
        "index": torch.arange(4),
    }
    out = method.training_step(batch, step=0)
    out.loss.backward()
    (head,) = method.encoder.heads.values()
    _nonzero_grads(method.encoder.trunk, "trunk")
    _nonzero_grads(head, name)
    with torch.no_grad():  # the same forward again: the logits and targets the step classified
        if name == "jigsaw":
            logits, targets = method.encoder({"jigsaw": batch["patches"].flatten(0, 1)})["jigsaw"], batch["permutation"]
        elif name == "rotation":
            images, targets = rotate_all(batch["image"])
            logits = method.encoder({"rotation": images})["rotation"]
        else:
            logits, targets = method.encoder({"classifier": batch["image"]})["classifier"], batch["label"]
    assert math.isclose(out.loss.item(), torch.nn.functional.cross_entropy(logits, targets).item(), rel_tol=1e-5)
    assert float(out.logs["acc"]) == float((logits.argmax(1) == targets).float().mean())
