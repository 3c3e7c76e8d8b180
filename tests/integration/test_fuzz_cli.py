"""Property: whatever the command line or the overrides, the CLI and the config loader fail only with a
one-line PirlError (or argparse's usage error), never with another exception."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pirl.demo
import pirl.eval.commands
import pirl.train
from pirl.cli import main
from pirl.config import PRESETS, Config, load_config, validate
from pirl.errors import PirlError

KEYS = [
    f"{s.name}.{f.name}" for s in dataclasses.fields(Config()) for f in dataclasses.fields(getattr(Config(), s.name))
]

# argv strings: no NUL (a real command line cannot hold one)
_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
_tricky = st.sampled_from(
    [
        "",
        "null",
        "None",
        "???",
        "${x}",
        "${oc.env:HOME}",
        "${loss.lam}",
        "[",
        "]",
        "{",
        "}",
        "[1,",
        "{a: 1}",
        "'",
        '"',
        "\\",
        ",",
        "=",
        "1e999",
        "-1e999",
        "nan",
        "-0",
        "0x10",
        "1_000",
        "true",
        "yes",
        "cuda:x",
        "cuda:-1",
        "cuda:0",
        "cpu",
        "auto",
        "vissl",
        "resnet18",
        "jigsaw",
        "skip",
        "[0.5, 1.0]",
        "[1, 2, 3]",
        "[]",
        "[null, 1]",
        "[a, b, c]",
        "[[1]]",
        "9" * 30,
        "-" + "9" * 30,
        "~",
        "/",
        ".",
    ]
)
# long names: past NAME_MAX (255 bytes) and PATH_MAX (4096) the file system itself refuses them
_long = st.builds(lambda piece, n: piece * n, st.sampled_from(["a", "é", "a/", "../"]), st.integers(100, 2000))
_scalar = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.booleans().map(lambda b: str(b).lower()),
    _text,
    _tricky,
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"))
_key = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(
        [
            "loss",
            "loss.",
            ".lam",
            "loss.lam.x",
            "LOSS.LAM",
            "loss.Lam",
            "bogus.key",
            "data.mean.0",
            "train.seed.",
            "optim..epochs",
            "",
            " loss.lam",
        ]
    ),
    _text,
)
override = st.one_of(st.builds("{}={}".format, _key, _value), _text, _tricky)

_flag = st.sampled_from(["--resume", "--print-config", "--download", "--random-init", "--", "-x", "--bogus", "-h"])
_with_value = st.tuples(
    st.sampled_from(
        [
            "--data",
            "--out",
            "--preset",
            "--epochs",
            "--batch-size",
            "--seed",
            "--data-root",
            "--model",
            "--val-data",
            "--stage",
            "--workers",
        ]
    ),
    st.one_of(_text, _tricky, _long, st.sampled_from([*PRESETS, "cpu-quick.yaml", "x.yml", "0", "-3", "7", "pool"])),
)
_tokens = st.one_of(_flag.map(lambda f: [f]), _with_value.map(list), st.one_of(override, _long).map(lambda o: [o]))
argv = st.tuples(
    st.sampled_from(["train", "train", "train", "export", "eval", "demo", "bogus", ""]),
    st.sampled_from([[], ["knn"], ["linear"], ["pool"]]),
    st.lists(_tokens, max_size=8),
).map(lambda t: [t[0], *t[1], *(x for group in t[2] for x in group)])


def _one_line(err: PirlError) -> None:
    text = str(err)
    assert text.strip() and "\n" not in text and "Traceback" not in text, text


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*PRESETS, None]), st.lists(override, max_size=5))
def test_load_config_raises_only_one_line_pirl_errors(preset, overrides):
    try:
        cfg = load_config(preset, overrides)
    except PirlError as err:
        _one_line(err)
    else:
        validate(cfg)


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Never train, evaluate or run the demo: the commands' argument handling is what is under test."""
    calls = []

    real_resolve_device = pirl.train.resolve_device

    def fake_train(cfg, data, out, **kwargs):
        validate(cfg)
        real_resolve_device(cfg.train.device, 0)  # what train() does first with the values
        torch.Generator().manual_seed(cfg.train.seed)
        calls.append(cfg)
        return {"epochs": cfg.optim.epochs, "stopped": None, "checkpoint": None}

    monkeypatch.setattr(pirl.train, "train", fake_train)
    monkeypatch.setattr(pirl.eval.commands, "evaluate", lambda *a, **k: {"eval": "stub"})
    monkeypatch.setattr(pirl.demo, "run_demo", lambda **k: {})
    monkeypatch.chdir(tmp_path)  # relative paths on the fuzzed command line land in an empty folder
    return calls


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv)
@example(["train", "--resume", "--out", "a" * 300, "--print-config"])  # found: a path too long for the OS
@example(["export", "a" * 300, "--out", "x"])
@example(["train", "--data", "d", "--out", "o", "train.device=cuda:x"])  # found: torch.device("cuda:x")
@example(["train", "--data", "d", "--out", "o", "train.seed=99999999999999999999"])  # found: torch's seed overflow
def test_cli_fails_only_with_one_line_errors_or_usage(no_work, capsys, args):
    capsys.readouterr()  # one example's output at a time
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        assert exit_.code in (0, 2), args
        return
    assert code in (0, 1, 2), args
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
