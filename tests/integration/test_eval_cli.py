"""``pirl eval KIND``: one subcommand per kind, each with the shared options and only its own."""

from __future__ import annotations

import re

import pytest

import pirl.eval.commands as commands
from pirl.cli import build_parser, main
from pirl.errors import PirlError
from pirl.eval import kinds
from pirl.eval.features import FEATURE_STAGES
from pirl.eval.lowshot import DEFAULT_SHOTS

OWN = {
    "knn": {"--stage"},
    "linear": {"--stage"},
    "lowshot": {"--stage", "--shots", "--seeds"},
    "finetune": {"--fraction", "--epochs", "--lr"},
    "invariance": {"--images", "--space", "--bn-stats"},
    "retrieval": {"--stage", "--queries", "--k"},
}
SHARED = {
    "--model",
    "--data",
    "--val-data",
    "--out",
    "--random-init",
    "--batch-size",
    "--workers",
    "--data-root",
    "--seed",
    "--device",
}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", sorted(OWN))
def test_each_kind_shows_the_shared_options_and_only_its_own(capsys, kind):
    text = _help(capsys, "eval", kind)
    shown = set(re.findall(r"--[a-z][a-z-]*", text))
    assert shown == SHARED | OWN[kind] | {"--help"}, shown ^ (SHARED | OWN[kind])


def test_eval_help_lists_every_kind(capsys):
    text = _help(capsys, "eval")
    assert all(kind in text for kind in OWN) and "--shots" not in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["knn", "--shots", "1"], "unrecognized arguments: --shots 1; --shots is an option of pirl eval lowshot"),
        (["finetune", "--stage", "pool"], "--stage is an option of pirl eval knn, linear, lowshot, retrieval"),
        (["invariance", "--fraction=0.5"], "--fraction is an option of pirl eval finetune"),
        (["linear", "--queries", "3"], "--queries is an option of pirl eval retrieval"),
        (["knn", "--ks", "5"], "unrecognized arguments: --ks 5"),  # Python-only keyword
    ],
)
def test_an_option_of_another_kind_is_a_one_line_usage_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", argv[0], "--model", "m", "--data", "d", *argv[1:]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize(
    "argv, want",
    [
        (
            ["knn", "--model", "m", "--data", "d", "--val-data", "v"],
            {
                "stage": "pool",
                "batch_size": 256,
                "workers": 2,
                "seed": 0,
                "device": "auto",
                "random_init": False,
                "out": None,
                "data_root": None,
            },
        ),
        (
            ["linear", "--model", "m", "--data", "d", "--val-data", "v", "--stage", "all", "--workers", "0"],
            {"stage": "all", "workers": 0},
        ),
        (
            ["lowshot", "--model", "m", "--data", "d", "--shots", "1", "4", "--seeds", "2"],
            {"shots": [1, 4], "seeds": 2, "stage": "pool"},
        ),
        (
            ["finetune", "--model", "m", "--data", "d", "--fraction", "0.25", "--epochs", "3", "--lr", "0.5"],
            {"fraction": 0.25, "epochs": 3, "lr": 0.5},
        ),
        (
            ["invariance", "--model", "m", "--model", "n", "--data", "d", "--random-init", "--images", "4"],
            {"images": 4, "space": "auto", "random_init": True, "bn_stats": "running"},
        ),
        (
            ["invariance", "--model", "m", "--data", "d", "--space", "heads", "--bn-stats", "batch"],
            {"space": "heads", "bn_stats": "batch"},
        ),
        (["retrieval", "--model", "m", "--data", "d", "--queries", "3", "--k", "4"], {"queries": 3, "k": 4}),
    ],
)
def test_the_command_line_reaches_evaluate_with_the_kinds_options(monkeypatch, capsys, argv, want):
    calls = []
    monkeypatch.setattr(commands, "evaluate", lambda *a, **k: calls.append((a, k)) or {"eval": a[0]})
    assert main(["eval", *argv]) == 0
    ((args, options),) = calls
    models = [argv[i + 1] for i, a in enumerate(argv) if a == "--model"]
    assert args == (argv[0], models, "d", "v" if "--val-data" in argv else None)
    assert set(options) == {o.name for o in kinds.KINDS[argv[0]].all_options() if o.cli}
    assert {k: options[k] for k in want} == want


def test_declared_defaults_match_the_evaluators():
    assert kinds.STAGES == FEATURE_STAGES
    lowshot = {o.name: o.default for o in kinds.KINDS["lowshot"].options}
    assert tuple(lowshot["shots"]) == DEFAULT_SHOTS
    assert (
        tuple(commands.KINDS)
        == tuple(kinds.KINDS)
        == ("knn", "linear", "lowshot", "finetune", "invariance", "retrieval")
    )
    parser = build_parser()
    args = parser.parse_args(["eval", "lowshot", "--model", "m", "--data", "d"])
    assert tuple(args.shots) == DEFAULT_SHOTS and args.stage == "pool" and args.batch_size == 256


def test_python_api_refuses_an_option_of_another_kind_before_loading_anything():
    with pytest.raises(PirlError, match="'pirl eval knn' takes no option 'fraction'"):
        commands.evaluate("knn", "no/such/model", "no/such/data", fraction=0.5)
    with pytest.raises(PirlError, match="unknown evaluation 'knnn'"):
        commands.evaluate("knnn", "m", "d")
    with pytest.raises(PirlError, match="--seeds must be at least 1"):
        commands.evaluate("lowshot", "no/such/model", "d", seeds=0)
