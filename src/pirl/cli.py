"""Command line: a thin layer over the library. Every error the user can cause is one line, no traceback."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import warnings

from pirl.errors import PirlError


def _one_line_warnings() -> None:
    from pirl.safe_io import printable

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {printable(str(message))}\n"


def _train_config(args: argparse.Namespace):
    from pirl.checkpoint import load_latest
    from pirl.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("epochs", "optim.epochs"), ("batch_size", "optim.batch_size"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.resume and args.out and (found := load_latest(args.out)) is not None:
        # The run's own config wins over a preset; explicit overrides (e.g. more epochs) still apply.
        return load_config(None, overrides, base=found[1]["config"])
    return load_config(args.preset or "cpu-quick", overrides)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from pirl.config import config_to_dict

    cfg = _train_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if not args.data or not args.out:
        raise PirlError("pirl train needs --data PATH and --out DIR")
    from pirl.training import train

    summary = train(
        cfg,
        args.data,
        args.out,
        resume=args.resume,
        data_root=args.data_root,
        download=args.download,
        val_data=args.val_data,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary))
    if summary.get("stopped"):
        if summary.get("checkpoint"):  # the main process; the others have nothing to add
            print(
                f"stopped by {summary['stopped']}: checkpoint saved to {summary['checkpoint']}; run the same "
                "command with --resume to continue",
                file=sys.stderr,
            )
        if not summary.get("complete", True):
            # 128 + signal number, the shell's convention: `pirl train ... && pirl export ...` stops here, and
            # a scheduler can requeue on 143.
            return 130 if summary["stopped"] == "SIGINT" else 143
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from pirl.cache import cache_info, clear_cache

    if args.action == "clear":
        freed = clear_cache()
        print(
            f"removed {freed['entries']} cache entr{'y' if freed['entries'] == 1 else 'ies'}, "
            f"{freed['bytes'] / 1e6:.1f} MB, from {freed['root']}"
        )
    else:
        print(json.dumps(cache_info()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pirl.checkpoint import export

    out = export(args.run, args.out, format=args.format)
    files = ["model.pkl"] if args.format == "detectron2" else ["model.safetensors", "config.json"]
    print(f"exported trunk ({args.format}) to {' and '.join(str(out / f) for f in files)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pirl.interop import import_vissl

    out = import_vissl(args.checkpoint, args.out, arch=args.arch)
    print(f"imported {args.checkpoint} to {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pirl.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pirl.eval import commands
    from pirl.eval.kinds import cli_options

    result = commands.evaluate(args.kind, args.model, args.data, args.val_data, **cli_options(args.kind, args))
    print(json.dumps(commands.summary(result)))  # the last line of output: one JSON object
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pirl.eval.report import write_report

    summary = write_report(args.runs, args.out, args.title)
    print(
        f"wrote {summary['report']}: {summary['runs']} run(s), {summary['evaluations']} evaluation(s), "
        f"{summary['images']} image(s)"
    )
    return 0


# A config override as it may appear anywhere on a ``pirl train`` command line: section.key=value.
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")


class _Parser(argparse.ArgumentParser):
    """argparse with whole option names only (``--epoch`` is not ``--epochs``) and usage errors as one line
    ``error: ...`` with a "did you mean" where a close match exists (exit status 2, as argparse)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def suggestion(self, word: str) -> str:
        """``; did you mean X?`` for the closest option or subcommand name, or nothing; for an option of another
        ``pirl eval`` kind, which kinds take it."""
        owners = getattr(self, "foreign_options", {}).get(word.split("=", 1)[0])
        if owners:
            return f"; {word.split('=', 1)[0]} is an option of pirl eval {', '.join(owners)}"
        names = (
            [o for o in self._option_string_actions if o.startswith("--")]
            if word.startswith("-")
            else [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
        )
        close = difflib.get_close_matches(word.split("=", 1)[0], names, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""

    def error(self, message: str) -> None:  # type: ignore[override]
        if found := re.search(r"invalid choice: '([^']*)'", message):
            message += self.suggestion(found.group(1))
        elif found := re.search(r"unrecognized arguments: (\S+)", message):
            message += self.suggestion(found.group(1))
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pirl import __version__

    parser = _Parser(prog="pirl", description="Pretext-Invariant Representation Learning (PIRL).")
    parser.add_argument("--version", action="version", version=f"pirl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="pretrain a trunk with PIRL (or NPID++) on a folder, archive or dataset name",
        description="Pretrain a ResNet trunk. Config: a preset, then key=value overrides such as "
        "method.lam=0.5 optim.epochs=100 data.workers=8 (anywhere on the line).",
    )
    t.add_argument(
        "--data",
        help="image folder (class subfolders optional), .tar/.tar.gz/.zip of one, "
        "or cifar10 | cifar100 | stl10 | stl10-unlabeled | imagenet",
    )
    t.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, tensorboard/")
    t.add_argument(
        "--val-data",
        help="labelled images for the online kNN monitor (default: the test split of "
        "--data, or a held-out slice of it, when --data has labels)",
    )
    t.add_argument("--preset", help="imagenet-r50 | cifar10-r18 | cpu-quick (default) | path/to/config.yaml")
    t.add_argument("--epochs", type=int, help="shortcut for optim.epochs")
    t.add_argument("--batch-size", type=int, help="global batch size; shortcut for optim.batch_size")
    t.add_argument("--seed", type=int, help="shortcut for train.seed")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds an earlier run: move its files into --out/previous-<timestamp>/ first",
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--data-root", help="where torchvision datasets live (for --data cifar10 etc.)")
    t.add_argument("--download", action="store_true", help="download a torchvision dataset if missing")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. bank.negatives=4096")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write the trunk as model.safetensors + config.json (torchvision keys)")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--out", required=True, help="export directory")
    e.set_defaults(func=cmd_export)

    from pirl.eval.kinds import add_eval_parsers  # declarations only: no torch

    add_eval_parsers(sub, _Parser).set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "report",
        help="one offline HTML page comparing runs: config, curves, evaluations",
        description="Collect config.json, metrics.jsonl, RUN/eval/*.json (and *.json in RUN) and "
        "RUN/eval/**/*.png of each run into one self-contained HTML file.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    r.add_argument("--title", help="page title (default: the run names)")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser(
        "cache",
        help="size of the caches (extracted archives, features), or clear them",
        description="Caches live in $PIRL_CACHE_DIR or ~/.cache/pirl; PIRL_CACHE_MAX_GB bounds "
        "them (least recently used first). Downloaded datasets/ are not touched.",
    )
    c.add_argument("action", choices=["info", "clear"])
    c.set_defaults(func=cmd_cache)

    d = sub.add_parser("demo", help="offline demo on scikit-learn's digits: kNN accuracy before vs after PIRL")
    d.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    d.set_defaults(func=cmd_demo)

    # Weights in and out of other ecosystems.
    e.add_argument(
        "--format",
        default="torchvision",
        choices=["torchvision", "detectron2", "timm"],
        help="torchvision (default): safetensors + config.json; timm: the same with timm's "
        "pretrained_cfg; detectron2: model.pkl for a Detectron2 R-50/R-18 backbone",
    )
    i = sub.add_parser(
        "import",
        help="convert another library's checkpoint into a pirl export",
        description="Convert a VISSL PIRL or NPID checkpoint (its trunk) into a pirl export, which "
        "every 'pirl eval' command then accepts as --model.",
    )
    i.add_argument("source", choices=["vissl"])
    i.add_argument("checkpoint", metavar="CHECKPOINT")
    i.add_argument("--out", required=True, help="export directory")
    i.add_argument("--arch", default="resnet50", help="the trunk's architecture (default: resnet50)")
    i.set_defaults(func=cmd_import)
    return parser


def _message(err: PirlError) -> str:
    """One line: errors re-raised from DataLoader workers carry the worker's traceback in their text."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(err):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return lines[0] if lines else type(err).__name__


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand that was run, e.g. that of ``pirl eval knn``: it reports usage errors."""
    while actions := [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        chosen = getattr(args, actions[0].dest, None)
        if chosen not in actions[0].choices:
            break
        parser = actions[0].choices[chosen]
    return parser


def _cuda_oom(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # torch is only imported by the commands that use it
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


def oom_hint(command: str) -> str:
    """What to lower after CUDA ran out of memory, for ``pirl train`` or ``pirl eval``."""
    if command == "train":
        return (
            "lower optim.batch_size (global batch), bank.negatives (loss.negatives in older configs) or "
            "data.image_size, keep train.amp=true, or set bank.dtype=float16 / bank.kind=sharded"
        )
    return "lower --batch-size (or use --device cpu)"


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = _innermost(parser, args)
    for item in extra:  # key=value after an option: argparse leaves it over, it is an override all the same
        if args.command == "train" and OVERRIDE.match(item):
            args.overrides.append(item)
        else:
            command.error(f"unrecognized arguments: {' '.join(extra[extra.index(item) :])}")
    try:
        return args.func(args)
    except PirlError as err:
        from pirl.safe_io import printable  # a file name that is not UTF-8 must not cost the one line

        print(f"error: {printable(_message(err))}", file=sys.stderr)
        return getattr(err, "exit_status", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            "error: out of memory; lower optim.batch_size or bank.negatives (loss.negatives in older configs)",
            file=sys.stderr,
        )
        return 1
    except OSError as err:  # disk full, permission denied, a path too long: the system's words are enough
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except Exception as err:
        if not _cuda_oom(err):
            raise
        print(f"error: CUDA out of memory during pirl {args.command}; {oom_hint(args.command)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
