"""Which loss form learns best? Short PIRL runs on real CIFAR-10 that differ only in ``loss.form``.

Each run: the cpu-quick recipe on a seeded subset of the training images; then weighted kNN (k=20 and 200,
NPID protocol) of the trunk's pooled features, fitted on ``--eval-train`` training images and scored on
``--eval-test`` test images. Prints one JSON object per form and a final summary line.

    python benchmarks/compare_loss_forms.py --data ../shared/datasets/cifar10-jpeg.tar.gz --out runs/loss-forms
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pirl.config import load_config
from pirl.data.sources import open_source
from pirl.eval.features import eval_transform, extract_features
from pirl.eval.knn import knn_accuracies
from pirl.eval.models import LabeledImages, load_model
from pirl.train import train, subset_indices


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def knn_of_random(run_dir: Path, data: str, n_train: int, n_test: int) -> dict[int, float]:
    return knn_of(run_dir, data, n_train, n_test, random_init=True)


def knn_of(run_dir: Path, data: str, n_train: int, n_test: int, random_init: bool = False) -> dict[int, float]:
    model = load_model(run_dir, random_init=random_init)
    transform = eval_transform(model.input_size, model.mean, model.std)
    feats = {}
    for split, n in (("train", n_train), ("test", n_test)):
        source = open_source(data, split=split)
        ds = LabeledImages(source, transform)
        feats[split] = extract_features(model.trunk, _Subset(ds, subset_indices(len(ds), n, 123) or range(len(ds))),
                                        num_workers=1, device="cpu")
    return knn_accuracies(*feats["train"], *feats["test"], ks=(20, 200))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/loss-forms")
    parser.add_argument("--forms", default="infonce,npid_nce,paper_nce")
    parser.add_argument("--subset", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-train", type=int, default=10000)
    parser.add_argument("--eval-test", type=int, default=2000)
    args = parser.parse_args()
    results = []
    for form in args.forms.split(","):
        cfg = load_config("cpu-quick", [f"loss.form={form}", f"data.subset={args.subset}",
                                        f"optim.epochs={args.epochs}"])
        run_dir = Path(args.out) / form
        start = time.perf_counter()
        summary = train(cfg, args.data, run_dir, progress=False)
        accs = knn_of(run_dir, args.data, args.eval_train, args.eval_test)
        row = {"form": form, "final_loss": summary["loss"], "knn_k20": accs[20], "knn_k200": accs[200],
               "train_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    baseline = knn_of_random(Path(args.out) / results[0]["form"], args.data, args.eval_train, args.eval_test)
    print(json.dumps({"form": "random_init", "knn_k20": baseline[20], "knn_k200": baseline[200]}), flush=True)
    best = max(results, key=lambda r: r["knn_k200"])
    print(json.dumps({"best": best["form"], "subset": args.subset, "epochs": args.epochs,
                      "random_init_knn_k200": baseline[200], "runs": results}))


if __name__ == "__main__":
    main()
