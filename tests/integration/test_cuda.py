"""The GPU path against the CPU: bank scores (dense, gathered, float16 bank), one AMP training step,
channels-last, batched views made on the device, kNN on the device, and NCCL under torchrun with one process.

Every test here is marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` selects them;
benchmarks/gpu_check.sh runs them first on a GPU machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import TINY, tiny_config
from pirl.bank import MemoryBank
from pirl.config import load_config
from pirl.data import batched as batched_module
from pirl.data.batched import BatchedViews
from pirl.eval.knn import knn_accuracies
from pirl.methods import build_method
from pirl.models.trunk import build_trunk

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Plain float32 matmuls and convolutions (no TF32), so CPU and GPU agree to float32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 5e-4)])
@pytest.mark.parametrize("dense", [True, False])
def test_bank_scores_and_gradients_on_cuda_match_the_cpu(dtype, tol, dense):
    bank = MemoryBank(3000, 128, seed=1, dtype=dtype)
    bank.dense_ratio = 1e9 if dense else 0.0
    emb = F.normalize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    pos = torch.arange(64) * 7
    neg = bank.sample_negatives(pos, 512, step=3, term=0)
    weights = torch.randn(64, 513, generator=torch.Generator().manual_seed(1))

    def run(device):
        bank.to(device)
        e = emb.to(device).requires_grad_()
        scores = bank.score(e, pos.to(device), neg.to(device))
        (grad,) = torch.autograd.grad((scores * weights.to(device)).sum(), e)
        return scores.detach().cpu(), grad.cpu()

    cpu_scores, cpu_grad = run("cpu")
    gpu_scores, gpu_grad = run(CUDA)
    assert gpu_scores.dtype == torch.float32 and gpu_scores.shape == (64, 513)
    torch.testing.assert_close(gpu_scores, cpu_scores, rtol=0, atol=tol)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=tol * 20)


def test_bank_update_on_cuda_matches_the_cpu():
    bank_cpu, bank_gpu = MemoryBank(100, 16, seed=0), MemoryBank(100, 16, seed=0).to(CUDA)
    rows, emb = torch.tensor([3, 50, 99]), torch.randn(3, 16)
    bank_cpu.update(rows, emb)
    bank_gpu.update(rows.to(CUDA), emb.to(CUDA))
    torch.testing.assert_close(bank_gpu.memory.cpu(), bank_cpu.memory, rtol=0, atol=1e-6)


def _batch(cfg, n: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    crop = cfg.data.patch_size
    return {
        "image": torch.randn(n, 3, cfg.data.image_size, cfg.data.image_size, generator=g).to(device),
        "patches": torch.randn(n, 9, 3, crop, crop, generator=g).to(device),
        "index": torch.arange(n).to(device),
    }


def test_one_amp_training_step_on_cuda_matches_the_cpu_loss_and_learns():
    cfg = tiny_config("data.image_size=32", "data.patch_size=8", "data.jigsaw_crop=27")
    torch.manual_seed(0)
    cpu = build_method(cfg, 64)
    gpu = build_method(cfg, 64)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    cpu_loss = cpu.training_step(_batch(cfg, 16, "cpu"), 0).loss.item()
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    opt = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    batch = _batch(cfg, 16, CUDA)
    losses = []
    for step in range(5):
        with torch.autocast("cuda", dtype=amp):
            out = gpu.training_step(batch, step)
        assert out.loss.dtype == torch.float32  # the loss is computed in fp32 under autocast
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        gpu.after_step(out)
        losses.append(out.loss.item())
    assert abs(losses[0] - cpu_loss) < 0.05 * abs(cpu_loss)  # bf16/fp16 activations, about the same loss
    assert losses[-1] < losses[0]  # the same batch again and again: the loss falls


def test_channels_last_on_cuda_gives_the_contiguous_features():
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", "imagenet").to(CUDA).eval()
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    with torch.no_grad():
        plain = trunk(x)
        trunk.to(memory_format=torch.channels_last)
        nhwc = trunk(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-4)


def test_batched_views_on_cuda_match_the_cpu(monkeypatch):
    """The same random draws (from a CPU generator, moved to the device) give the same views on both devices."""

    def uniform(self, *shape):
        u = torch.rand((self.total, *shape), generator=self.gen).to(self.device)
        return u[self.offset : self.offset + self.batch]

    monkeypatch.setattr(batched_module._Draws, "uniform", uniform)
    images = torch.randint(0, 256, (8, 3, 80, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[80, 80], [60, 80], [80, 50], [40, 40]] * 2)
    for augment in ("none", "vissl"):
        cfg = load_config("cpu-quick", [f"data.augment={augment}"]).data
        views = BatchedViews(cfg, "jigsaw")
        cpu = views(images, sizes, torch.Generator().manual_seed(7))
        gpu = views(images.to(CUDA), sizes.to(CUDA), torch.Generator().manual_seed(7))
        assert cpu.keys() == gpu.keys()
        for key in cpu:
            got, want = gpu[key].cpu(), cpu[key]
            assert got.shape == want.shape and got.dtype == want.dtype, key
            if not want.is_floating_point():
                assert torch.equal(got, want), key
            elif augment == "none":
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            else:  # thresholds (solarize, posterize) may flip a rare pixel: nearly all agree closely
                close = (got - want).abs() <= 1e-3
                assert close.float().mean() > 0.999, (key, close.float().mean())


def test_knn_on_cuda_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(2000, 64, generator=g), torch.randn(300, 64, generator=g)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (300,), generator=g)
    cpu = knn_accuracies(train, train_y, test, test_y)
    gpu = knn_accuracies(train.to(CUDA), train_y, test, test_y)
    # the same neighbours up to float32 rounding of the similarities: a near-tie may move one prediction
    assert cpu.keys() == gpu.keys() and all(abs(cpu[k] - gpu[k]) <= 2 / 300 for k in cpu)


def test_nccl_with_one_process_under_torchrun(tmp_path):
    """torchrun --nproc_per_node 1 on CUDA joins an NCCL group; a short run trains, saves and exports."""
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(16):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(data / f"c{c}" / f"{i}.png")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "pirl",
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        *TINY,
        "train.device=cuda",
        "data.batched_views=true",
        "optim.epochs=2",
        "train.knn_every=1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    assert len(epochs) == 2 and all(np.isfinite(r["loss"]) for r in epochs)
    assert any(r.get("kind") == "eval" for r in rows)  # the online kNN monitor ran on the device
