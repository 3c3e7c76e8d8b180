"""Pretrain, export and evaluate from Python with pirl's API (the same checks as ``pirl train``).

    python examples/pretrain_from_python.py --data FOLDER --out runs/py [section.key=value ...]

FOLDER: an image folder (class subfolders give the kNN its labels) or an archive of one. Extra ``key=value``
arguments override the preset, e.g. optim.epochs=5 data.workers=2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pirl


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--val-data", help="labelled test images (default: the test split of --data)")
    parser.add_argument("--out", required=True, help="directory for the run and its export")
    parser.add_argument("--preset", default="cpu-quick")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)

    cfg = pirl.load_config(args.preset, args.overrides)  # raises pirl.PirlError naming a bad key or value
    print(f"pretraining {cfg.model.arch} for {cfg.optim.epochs} epochs")
    run = pirl.pretrain(cfg, args.data, out / "run", val_data=args.val_data, progress=False)
    print(f"final loss {run.loss:.3f}, checkpoint {run.checkpoint}")

    export_dir = run.export(out / "export")  # model.safetensors + config.json, torchvision keys
    model = pirl.load_model(export_dir)
    print(f"trunk: {model.arch}, {sum(p.numel() for p in model.trunk.parameters()):,} parameters")

    knn = pirl.evaluate.knn(export_dir, args.data, args.val_data, workers=0, batch_size=64)
    baseline = pirl.evaluate.knn(export_dir, args.data, args.val_data, workers=0, batch_size=64, random_init=True)
    result = {"loss": run.loss, "knn_top1": knn["top1"], "random_init_knn_top1": baseline["top1"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
