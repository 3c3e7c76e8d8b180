"""Evaluations from Python: each returns the dict that ``pirl eval KIND`` writes (accuracies as fractions).

``model`` is an export, a run directory, a checkpoint or ``torchvision:<weights enum>``; ``data`` is labelled
training images (a folder, an archive or a dataset name) and ``val_data`` the test images (default: the
test/val split of ``data``). Further keywords are the options of ``pirl eval KIND`` in Python spelling
(``stage``, ``batch_size``, ``workers``, ``seed``, ``random_init``, ``out``, ...; declared in
:data:`pirl.eval.kinds.KINDS`); an option of another kind raises :class:`~pirl.errors.PirlError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _run(kind: str, model: str | Path, data: str, val_data: str | None, **options: Any) -> dict[str, Any]:
    from pirl.eval.commands import evaluate

    return evaluate(kind, str(model), data, val_data, **options)


def knn(model: str | Path, data: str, val_data: str | None = None, **options: Any) -> dict[str, Any]:
    """Weighted kNN (NPID protocol) on frozen features: ``top1`` (k=200), ``top1_k20``, ``top1_k200``."""
    return _run("knn", model, data, val_data, **options)


def linear(model: str | Path, data: str, val_data: str | None = None, **options: Any) -> dict[str, Any]:
    """Linear probe (multinomial logistic regression) on frozen features: ``top1`` and the chosen weight decay."""
    return _run("linear", model, data, val_data, **options)


def lowshot(model: str | Path, data: str, val_data: str | None = None, **options: Any) -> dict[str, Any]:
    """Low-shot linear SVMs on frozen features (``shots``, ``seeds``)."""
    return _run("lowshot", model, data, val_data, **options)


def finetune(model: str | Path, data: str, val_data: str | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune the whole trunk on a labelled fraction (``fraction``, ``epochs``, ``lr``)."""
    return _run("finetune", model, data, val_data, **options)
