"""Guarding a run directory: one run per folder, one process per run, a resumed run keeps its recipe.

* :func:`check_reuse` refuses a folder that holds another run's checkpoints or ``config.json`` unless the run
  is resumed, or ``overwrite`` moves the old files aside into ``RUN/previous-<timestamp>/``.
* :class:`RunLock` is ``RUN/.lock``: created atomically (a complete file hard-linked into place), holding the
  process id and host; a lock left by a dead process on this host is taken over.
* :func:`resume_changes` compares a resumed run's config with the checkpoint's: keys that change the model or
  the data stop the run; the others (epochs, logging, workers, ...) are allowed and returned for the record.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from pirl.config.legacy import OLD_NAMES, translate_tree
from pirl.errors import PirlError

LOCK_NAME = ".lock"
PREVIOUS_PREFIX = "previous-"
RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", "bad_images.txt")

#: Config keys that may differ on resume: they change neither the model nor the data it is trained on.
RESUMABLE_KEYS = frozenset(
    {
        "optim.epochs",
        "bank.kind",
        "data.workers",
        "data.max_bad_fraction",
        "data.batched_views",
        "train.device",
        "train.amp",
        "train.channels_last",
        "train.compile",
        "train.threads",
        "train.log_every",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "train.nonfinite",
        "train.dist_timeout_s",
        "train.knn_every",
        "train.knn_max_images",
    }
)


def _holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists() or any(run_dir.glob("checkpoint-*.pt"))


def check_reuse(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse, keep (``resume``) or move aside (``overwrite``) an earlier run in ``run_dir``.

    Returns the ``previous-<timestamp>`` folder the old files went to, or None.
    """
    if resume and overwrite:
        raise PirlError("--resume and --overwrite contradict each other; give one")
    if resume or not run_dir.is_dir() or not _holds_a_run(run_dir):
        return None
    if not overwrite:
        raise PirlError(
            f"{run_dir} already holds a run (checkpoints or config.json); give --resume to continue "
            "it, --overwrite to move its files into previous-<timestamp>/, or another --out"
        )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        aside, n = run_dir / f"{PREVIOUS_PREFIX}{stamp}-{n}", n + 1
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name == LOCK_NAME or entry.name.startswith(PREVIOUS_PREFIX):
            continue
        if entry.name in RUN_FILES or entry.name.startswith(("checkpoint-", ".checkpoint-")) or entry.name == "eval":
            os.replace(entry, aside / entry.name)
    return aside


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``RUN/.lock`` for the lifetime of a training process; use as a context manager or acquire/release."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        tmp = self.path.with_name(f"{LOCK_NAME}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, fails if the lock exists; the lock is never half-written
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))):
                    # stale: rename it away (only one taker wins the rename), then try again
                    try:
                        os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale.{me['pid']}"))
                        self.path.with_name(f"{LOCK_NAME}.stale.{me['pid']}").unlink(missing_ok=True)
                    except FileNotFoundError:
                        pass
                    continue
                raise PirlError(
                    f"{self.path.parent} is in use by pirl train (process {owner.get('pid')} on "
                    f"{owner.get('host')}); wait for it, or delete {self.path} if that process is gone"
                )
            raise PirlError(f"could not take the lock {self.path}")
        finally:
            tmp.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and "pid" in owner else None
        except FileNotFoundError:
            return {"pid": -1, "host": None}  # gone meanwhile: not stale, just retry
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def resume_changes(
    saved: dict[str, Any], current: dict[str, Any], saved_samples: int | None = None, current_samples: int | None = None
) -> dict[str, list[Any]]:
    """``{key: [saved, now]}`` for the allowed changes; a change to any other key raises one :class:`PirlError`.

    A config saved in the earlier layout (``loss.method``, ``loss.bank``, ...) is compared in the current one.
    """
    old, new = _flatten(translate_tree(saved)), _flatten(translate_tree(current))
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    fixed = [k for k in changed if k not in RESUMABLE_KEYS]
    if saved_samples is not None and current_samples is not None and saved_samples != current_samples:
        fixed.append("dataset size")
        changed["dataset size"] = [saved_samples, current_samples]
    if fixed:
        what = ", ".join(
            f"{k} ({changed[k][0]} -> {changed[k][1]}"
            + (f"; {OLD_NAMES[k]} in older configs)" if k in OLD_NAMES else ")")
            for k in fixed
        )
        raise PirlError(
            f"--resume: the config differs from the checkpoint's in {what}; these change the model "
            "or the data, so resume with the saved values or start a new run"
        )
    return changed
