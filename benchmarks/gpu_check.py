"""The GPU check's stages, each in its own time-limited process; one JSON file of results (see gpu_check.sh).

Stages: ``env`` (GPU, driver, torch), ``cuda_tests`` (pytest -m cuda), ``step`` (ResNet-50 at paper sizes with
AMP: images/s and the ratio to the trunk alone), ``data`` (the batched views on the device), ``train`` (a PIRL run
of about two minutes on synthetic images: does the loss fall?) and ``eval`` (kNN of that run on the device).
A stage that fails or runs out of time is recorded as such and the next one runs. The JSON file is rewritten
after every stage, so what was measured survives a check stopped from outside.

    python benchmarks/gpu_check.py OUT_DIR [--only step data] [--train-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _json_lines(text: str) -> list[Any]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def run_stage(
    name: str,
    cmd: list[str],
    limit_s: float,
    log_dir: Path,
    env: dict[str, str] | None = None,
    term_after_s: float | None = None,
) -> dict:
    """Run one command under a time limit; its JSON output lines become the stage's results.

    ``term_after_s``: send SIGTERM to the command alone (not its DataLoader workers) after this long, as a
    scheduler ends a job, and let it finish within ``limit_s``; a command still running at ``limit_s`` is killed.
    """
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    status, rc = "ok", None
    with open(log_dir / f"{name}.out", "w+") as out_f, open(log_dir / f"{name}.err", "w+") as err_f:
        try:
            proc = subprocess.Popen(
                cmd, stdout=out_f, stderr=err_f, text=True, cwd=REPO, env={**os.environ, **(env or {})}
            )
        except OSError as exc:
            err_f.write(str(exc))
            status = "failed"
        else:
            try:
                if term_after_s is not None:
                    try:
                        proc.wait(timeout=term_after_s)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=max(1.0, limit_s - (time.perf_counter() - start)))
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status = "timeout"
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    for suffix in (".out", ".err"):
        (log_dir / f"{name}{suffix}").unlink()
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return {
        "status": status,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "limit_s": limit_s,
        "command": " ".join(cmd),
        "results": _json_lines(out),
        "tail": (out + err)[-1500:],
    }


def stage_env(log_dir: Path) -> dict:
    code = (
        "import json, torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'cuda_available': torch.cuda.is_available(), 'gpu': p.name if p else None, "
        "'gpu_memory_gib': round(p.total_memory / 2**30, 1) if p else None, "
        "'bf16': torch.cuda.is_bf16_supported() if p else None, "
        "'nccl': torch.distributed.is_nccl_available()}))"
    )
    result = run_stage("env", [PY, "-c", code], 30, log_dir)
    result["results"].append(
        {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    )
    return result


def stage_cuda_tests(log_dir: Path, limit: float) -> dict:
    xml = log_dir / "cuda_tests.xml"
    result = run_stage(
        "cuda_tests",
        [
            PY,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "tests/integration/test_cuda.py",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            "-rA",
        ],
        limit,
        log_dir,
    )
    if xml.is_file():
        import xml.etree.ElementTree as ET

        cases = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    outcome += f": {(node.get('message') or '')[:300]}"
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
        result["results"] = cases
        xml.unlink()
    return result


def synthetic_folder(root: Path, classes: int = 10, per_class: int = 500, size: int = 32, seed: int = 0) -> Path:
    """Labelled 32-px PNGs whose classes differ in colour and stripe frequency, with noise: something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([np.cos(c), np.cos(c + 2.1), np.cos(c + 4.2)]) * 80 + 128
        for i in range(per_class):
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            wave = np.sin((c + 1) * 0.35 * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            img = hue[None, None] * (0.6 + 0.4 * wave[..., None]) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def train_summary(run: Path) -> dict:
    rows = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    speeds = sorted(r["images_per_s"] for r in rows if r.get("kind") == "train" and "images_per_s" in r)
    knn = [r for r in rows if r.get("kind") == "eval"]
    first, last = (epochs[0]["loss"], epochs[-1]["loss"]) if epochs else (None, None)
    logged = [r["loss_mean"] for r in rows if r.get("kind") == "train" and "loss_mean" in r]
    early, late = (sum(logged[:3]) / 3, sum(logged[-3:]) / 3) if len(logged) >= 6 else (None, None)
    falls = last < first if len(epochs) > 1 else (early is not None and late < early)
    return {
        "epochs_done": len(epochs),
        "first_epoch_loss": first,
        "last_epoch_loss": last,
        "loss_falls": falls,
        "first_logged_loss": early,
        "last_logged_loss": late,
        "logged_steps": len(logged),
        "epoch_losses": [round(r["loss"], 4) for r in epochs],
        "median_images_per_s": speeds[len(speeds) // 2] if speeds else None,
        "online_knn_top1_k20": [r.get("knn_top1_k20") for r in knn],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and the stage logs")
    parser.add_argument("--only", nargs="+", help="run these stages only")
    parser.add_argument("--train-seconds", type=float, default=110.0, help="length of the PIRL run")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu to try the stages out")
    parser.add_argument("--train-overrides", nargs="*", default=[], help="extra key=value for the PIRL run")
    args = parser.parse_args()
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "check": "benchmarks/gpu_check.sh",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": {},
    }
    wanted = set(args.only or ["env", "cuda_tests", "step", "data", "train", "eval"])
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"pirl-gpu-check-{os.getpid()}"

    def save(name: str, result: dict) -> None:
        report["stages"][name] = result
        report["seconds"] = round(sum(s["seconds"] for s in report["stages"].values()), 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"[gpu_check] {name}: {result['status']} in {result['seconds']} s", flush=True)

    if "env" in wanted:
        save("env", stage_env(logs))
    if "cuda_tests" in wanted:
        save("cuda_tests", stage_cuda_tests(logs, 120))
    if "step" in wanted:  # the paper's ResNet-50, 224 px images and 9 x 64 px patches, ImageNet-sized bank, AMP
        save(
            "step",
            run_stage(
                "step",
                [
                    PY,
                    "benchmarks/step.py",
                    "--arch",
                    "resnet50",
                    "--image-size",
                    "224",
                    "--patch-size",
                    "64",
                    "--batch",
                    "128",
                    "--device",
                    args.device,
                    "--num-samples",
                    "1281167",
                    "--negatives",
                    "4096",
                    "32000",
                    "--steps",
                    "4",
                    "--rounds",
                    "2",
                ],
                90,
                logs,
            ),
        )
    if "data" in wanted:
        save(
            "data",
            run_stage(
                "data",
                [
                    PY,
                    "benchmarks/data.py",
                    "--settings",
                    "paper",
                    "cpu-quick",
                    "--batched",
                    "--device",
                    args.device,
                    "--batch",
                    "256",
                    "--images",
                    "256",
                    "--repeats",
                    "3",
                ],
                50,
                logs,
            ),
        )
    run = work / "run"
    if "train" in wanted or "eval" in wanted:
        synthetic_folder(work / "images")
        synthetic_folder(work / "test", per_class=100, seed=1)
    if "train" in wanted:
        # SIGTERM after --train-seconds: the run saves a checkpoint and exits 0 (the trainer's preemption path)
        cmd = [
            PY,
            "-m",
            "pirl",
            "train",
            "--data",
            str(work / "images"),
            "--val-data",
            str(work / "test"),
            "--out",
            str(run),
            "--preset",
            "cifar10-r18",
            "optim.epochs=60",
            "optim.warmup_epochs=1",
            "data.workers=6",
            "train.log_every=5",
            f"train.device={args.device}",
            *args.train_overrides,
        ]
        result = run_stage("train", cmd, args.train_seconds + 30, logs, term_after_s=args.train_seconds)
        result["results"] = [*result["results"], {"summary": train_summary(run)}]
        if result["status"] == "ok" and not result["results"][-1]["summary"]["loss_falls"]:
            result["status"] = "failed: the loss did not fall"
        save("train", result)
    if "eval" in wanted:
        save(
            "eval",
            run_stage(
                "eval",
                [
                    PY,
                    "-m",
                    "pirl",
                    "eval",
                    "knn",
                    "--model",
                    str(run),
                    "--data",
                    str(work / "images"),
                    "--val-data",
                    str(work / "test"),
                    "--device",
                    args.device,
                    "--workers",
                    "4",
                ],
                45,
                logs,
                env={"PIRL_CACHE_DIR": str(work / "cache")},
            ),
        )
    shutil.rmtree(work, ignore_errors=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save_final = out / "gpu_check.json"
    save_final.write_text(json.dumps(report, indent=1) + "\n")
    failed = [n for n, s in report["stages"].items() if s["status"] != "ok"]
    print(f"[gpu_check] wrote {save_final}; {'all stages ok' if not failed else 'not ok: ' + ', '.join(failed)}")


if __name__ == "__main__":
    main()
