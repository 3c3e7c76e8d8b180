"""The evaluations ``pirl eval KIND`` runs and the options each one takes, declared once.

The command line builds one subcommand per kind from these declarations (the options every kind shares in one
parent parser, then the kind's own), and :func:`pirl.eval.commands.evaluate` takes the same options as keywords,
with the same defaults. Nothing here imports torch: ``pirl --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pirl.errors import PirlError

__all__ = ["COMMON", "KINDS", "Kind", "Option", "STAGES", "add_eval_parsers"]

#: Feature layers an evaluation on frozen features reads (pirl.eval.features.FEATURE_STAGES).
STAGES = ("conv1", "res2", "res3", "res4", "res5", "pool")


@dataclass(frozen=True)
class Option:
    """One keyword of :func:`~pirl.eval.commands.evaluate` and, unless ``cli`` is False, its ``--flag``."""

    name: str
    default: Any
    help: str = ""
    type: Any = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False  # a store_true flag
    cli: bool = True  # False: Python only

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.switch:
            parser.add_argument(self.flag, action="store_true", help=self.help)
            return
        kwargs: dict[str, Any] = {"default": self.default, "help": self.help}
        for key in ("type", "nargs", "choices", "metavar"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        parser.add_argument(self.flag, **kwargs)


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    options: tuple[Option, ...] = ()
    several_models: bool = False  # takes --model more than once

    def all_options(self) -> tuple[Option, ...]:
        return (*COMMON, *self.options)

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every option of this kind: ``given`` over the defaults; an option of another kind is a one-line error."""
        known = {o.name: o for o in self.all_options()}
        unknown = [name for name in given if name not in known]
        if unknown:
            raise PirlError(f"'pirl eval {self.name}' takes no option {unknown[0]!r}; its options: {', '.join(known)}")
        return {name: given.get(name, o.default) for name, o in known.items()}


#: Options every kind takes (besides --model, --data and --val-data).
COMMON = (
    Option("out", None, "directory for the result JSON (and the invariance / retrieval PNG)"),
    Option(
        "random_init",
        False,
        "evaluate the same architecture at random init (invariance: add it to the plot)",
        switch=True,
    ),
    Option("batch_size", 256, "images per batch (finetune: per SGD step)", type=int),
    Option("workers", 2, "DataLoader worker processes (default: 2)", type=int),
    Option("data_root", None, "where torchvision datasets live"),
    Option("seed", 0, "seed of random init, subsets, queries and transforms", type=int),
    Option("device", "auto", "where the model runs: auto (the GPU when present) | cpu | cuda | cuda:N"),
)

_STAGE_METAVAR = "{" + ",".join(STAGES) + "}"
# "all" passes the parser so that it meets the one-line "--stage all is for 'pirl eval linear'" error
_STAGE = Option(
    "stage",
    "pool",
    "feature layer (default: pool, the pooled res5 vector)",
    choices=(*STAGES, "all"),
    metavar=_STAGE_METAVAR,
)

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "knn",
            "weighted kNN (NPID protocol) on frozen features",
            (
                _STAGE,
                Option("ks", (20, 200), cli=False),
                Option("temperature", 0.07, cli=False),
            ),
        ),
        Kind(
            "linear",
            "linear probe (L-BFGS logistic regression) on frozen features",
            (
                Option(
                    "stage",
                    "pool",
                    "feature layer; 'all': one probe per layer, best reported",
                    choices=(*STAGES, "all"),
                ),
            ),
        ),
        Kind(
            "lowshot",
            "low-shot linear SVMs on frozen features",
            (
                _STAGE,
                Option(
                    "shots", (1, 2, 4, 8, 16, 32, 64, 96), "labelled training images per class", type=int, nargs="+"
                ),
                Option("seeds", 5, "samples per shot count", type=int),
            ),
        ),
        Kind(
            "finetune",
            "fine-tune the whole trunk on a labelled fraction",
            (
                Option("fraction", 0.1, "labelled fraction of the training split", type=float),
                Option("epochs", 70, "epochs (lr x0.1 at 3/7 of them)", type=int),
                Option("lr", None, "learning rate (default 0.01 x batch / 256)", type=float),
            ),
        ),
        Kind(
            "invariance",
            "invariance to the pretext transform (paper Fig. 4), of one or several models",
            (
                Option("images", 1000, "test images to measure", type=int),
                Option(
                    "space",
                    "auto",
                    "f/g heads (runs with a g head) or pooled trunk features",
                    choices=("auto", "heads", "trunk"),
                ),
                Option(
                    "bn_stats",
                    "running",
                    "BatchNorm statistics: the running ones (eval mode, as the model is used) or each pass's own "
                    "batch statistics (as in training, where the image and its patches are separate passes)",
                    choices=("running", "batch"),
                ),
            ),
            several_models=True,
        ),
        Kind(
            "retrieval",
            "nearest training images of test queries, on frozen features",
            (
                _STAGE,
                Option("queries", 8, "test images to query", type=int),
                Option("k", 8, "neighbours per query", type=int),
            ),
        ),
    )
}


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        required=True,
        action="append",
        help="export directory, run directory, checkpoint or torchvision:<weights enum> "
        "(invariance: repeat to compare models)",
    )
    common.add_argument("--data", required=True, help="labelled training images (folder, archive or dataset name)")
    common.add_argument("--val-data", help="labelled test images (default: the test/val split of --data)")
    for option in COMMON:
        option.add_to(common)
    return common


def add_eval_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """``pirl eval``, with one subcommand per kind, added to the subcommands ``sub`` of ``pirl``."""
    v = sub.add_parser(
        "eval",
        help=f"evaluate a trunk: {', '.join(KINDS)}",
        description="Evaluate a trunk on labelled images. The last line of output is a one-line JSON "
        "summary (accuracies as fractions); --out also writes the full JSON (and PNGs). "
        "'pirl eval KIND --help' lists the options of one kind.",
    )
    kinds = v.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=parser_class)
    common = _common_parser()
    owners: dict[str, list[str]] = {}
    for kind in KINDS.values():
        for option in kind.options:
            if option.cli:
                owners.setdefault(option.flag, []).append(kind.name)
    for kind in KINDS.values():
        k = kinds.add_parser(
            kind.name, help=kind.help, description=f"{kind.help[0].upper()}{kind.help[1:]}.", parents=[common]
        )
        own = k.add_argument_group(f"options of {kind.name}")
        for option in kind.options:
            if option.cli:
                option.add_to(own)
        # an option of other kinds only: the usage error says which kinds take it
        k.foreign_options = {
            flag: names
            for flag, names in owners.items()  # type: ignore[attr-defined]
            if flag not in k._option_string_actions
        }
    return v


def cli_options(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`~pirl.eval.commands.evaluate` from a parsed ``pirl eval KIND`` command line."""
    return {o.name: getattr(args, o.name) for o in KINDS[kind].all_options() if o.cli}
