"""The step body (pirl.training.step.TrainStep), which the trainer and the step benchmarks share."""

from __future__ import annotations

import importlib.util
import sys

import torch

from helpers import REPO_ROOT, tiny_config
from pirl.methods import build_method
from pirl.training.step import TrainStep


def _batch(n: int = 8, size: int = 16, patch: int = 4) -> dict[str, torch.Tensor]:
    return {
        "image": torch.randn(n, 3, size, size),
        "patches": torch.randn(n, 9, 3, patch, patch),
        "index": torch.arange(n),
    }


def test_a_step_updates_the_weights_and_the_bank_and_sets_the_lr():
    torch.manual_seed(0)
    method = build_method(tiny_config(), 32)
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.0, momentum=0.9)
    step = TrainStep(method, optimizer, torch.device("cpu"))
    weights, rows = [p.detach().clone() for p in method.encoder.parameters()], method.bank.memory.clone()
    result = step.run(_batch(), 0, lr=0.1, bad=torch.tensor([-1, 3, -1]))
    assert result.finite and result.signum == 0 and result.bad == [3]
    assert torch.isfinite(result.out.loss) and all(g["lr"] == 0.1 for g in optimizer.param_groups)
    assert any(not torch.equal(a, p) for a, p in zip(weights, method.encoder.parameters()))
    assert not torch.equal(rows[:8], method.bank.memory[:8]) and torch.equal(rows[8:], method.bank.memory[8:])


def test_a_nonfinite_loss_skips_the_step_and_drops_the_gradients(monkeypatch):
    torch.manual_seed(0)
    method = build_method(tiny_config(), 32)
    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.1)
    original = method.training_step

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(method, "training_step", poisoned)
    weights, rows = [p.detach().clone() for p in method.encoder.parameters()], method.bank.memory.clone()
    result = TrainStep(method, optimizer, torch.device("cpu")).run(_batch(), 0)
    assert not result.finite
    assert all(torch.equal(a, p) for a, p in zip(weights, method.encoder.parameters()))
    assert all(p.grad is None for p in method.encoder.parameters()) and torch.equal(rows, method.bank.memory)


def test_the_step_benchmark_runs_the_trainers_step(monkeypatch):
    spec = importlib.util.spec_from_file_location("step_benchmark", REPO_ROOT / "benchmarks" / "step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "step_benchmark", bench)
    spec.loader.exec_module(bench)
    calls = []
    real_run = TrainStep.run
    monkeypatch.setattr(TrainStep, "run", lambda self, *a, **k: calls.append(a[1]) or real_run(self, *a, **k))
    _, full_step, _ = bench.build_steps(bench.Setting(image=16, patch=4, batch=4, negatives=8, num_samples=64))
    full_step()
    full_step()
    assert calls == [0, 1]
