"""``pirl report``: one self-contained HTML page comparing runs (config, training curves, evaluations, figures).

The page works offline: inline CSS, no scripts, and every image (plots made here with matplotlib's Agg renderer,
PNGs found under ``RUN/eval``) is a base64 ``data:`` URI. All text from the runs is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

from pirl.errors import PirlError
from pirl.safe_io import atomic_write_text, read_regular

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_EMBED_BYTES = 20 << 20  # a bigger PNG would make the page unwieldy; it is listed instead
MAX_JSON_BYTES = 64 << 20  # config.json and each evaluation result
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl: about 5 M log records
# Bookkeeping keys of an evaluation result that are not scores.
_NOT_SCORES = {"top1", "k", "seed", "input_size", "train_images", "test_images", "epochs", "batch_size", "workers"}
_SCORE_WORDS = ("top", "acc", "map", "precision", "recall", "f1", "err", "dist")
MAX_SCORES = 12  # per table cell

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:78rem;
padding:0 1rem;color:#222;line-height:1.4}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .55rem;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.best{font-weight:700}.small{font-size:.8rem;color:#555}.meta{color:#666;font-size:.85rem}
img{max-width:100%;height:auto}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.8rem}.note{color:#a15c00}
"""


@dataclass
class Run:
    """What a run directory holds, as read from its files."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # the training config (sections)
    meta: dict[str, Any] = field(default_factory=dict)  # config.json's other keys (data, num_samples, ...)
    train: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    evals_online: list[dict[str, Any]] = field(default_factory=list)  # kind "eval" records of metrics.jsonl
    results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (file, eval result JSON)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file, PNG bytes)
    notes: list[str] = field(default_factory=list)


def _read(path: Path, root: Path, cap: int, notes: list[str]) -> bytes | None:
    """A regular file inside the run (links resolved) of at most ``cap`` bytes; otherwise a note and None."""
    try:
        return read_regular(path, cap, root=root)
    except PirlError as err:
        notes.append(f"{path.relative_to(root).as_posix()}: {str(err).removeprefix(f'{path}: ')}")
        return None


def _read_json(path: Path, root: Path | None = None, notes: list[str] | None = None) -> Any:
    data = _read(path, root if root is not None else path.parent, MAX_JSON_BYTES, notes if notes is not None else [])
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read config.json, metrics.jsonl, eval result JSONs (``RUN/eval/*.json`` and ``RUN/*.json``) and PNGs."""
    root = Path(path)
    if not root.is_dir():
        raise PirlError(f"run directory not found: {path}")
    run = Run(root, name or root.name)
    blob = _read_json(root / "config.json", root, run.notes) if (root / "config.json").exists() else None
    if isinstance(blob, dict):
        # a run's config.json keeps the config under "config"; an export's under "training_config"
        run.config = blob.get("config") or blob.get("training_config") or {}
        run.meta = {k: v for k, v in blob.items() if k not in ("config", "training_config")}
    metrics = root / "metrics.jsonl"
    data = _read(metrics, root, MAX_METRICS_BYTES, run.notes) if metrics.exists() or metrics.is_symlink() else None
    if data is not None:
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash
            if isinstance(rec, dict):
                {"train": run.train, "epoch": run.epochs, "eval": run.evals_online}.get(rec.get("kind"), []).append(rec)
    eval_dir = root / "eval"
    candidates = sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []
    candidates += sorted(p for p in root.glob("*.json") if p.name != "config.json")
    for file in candidates:
        result = _read_json(file, root, run.notes)
        if isinstance(result, dict) and ("eval" in result or "top1" in result):
            run.results.append((file.relative_to(root).as_posix(), result))
        elif result is None:
            run.notes.append(f"{file.relative_to(root).as_posix()}: not readable JSON, skipped")
    for file in sorted(eval_dir.rglob("*.png")) if eval_dir.is_dir() else []:
        rel = file.relative_to(root).as_posix()
        try:
            data = read_regular(file, MAX_EMBED_BYTES, root=root)
        except PirlError as err:
            run.notes.append(f"{rel}: {str(err).removeprefix(f'{file}: ')}, not embedded")
            continue
        if data.startswith(PNG_SIGNATURE):
            run.images.append((rel, data))
        else:
            run.notes.append(f"{rel}: not a PNG file, skipped")
    if not (run.config or run.train or run.epochs or run.results or run.images):
        raise PirlError(f"{path} holds no config.json, metrics.jsonl, evaluation results or PNGs; "
                        "is it a run directory?")
    return run


# --------------------------------------------------------------------------- formatting


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _method(cfg: dict[str, Any]) -> str | None:
    method = _get(cfg, "loss.method")
    if method is None:
        return None
    extras = [f"pretext {_get(cfg, 'loss.pretext')}"] if method == "pirl" and _get(cfg, "loss.pretext") else []
    if _get(cfg, "loss.form"):
        extras.append(str(_get(cfg, "loss.form")))
    return f"{method} ({', '.join(extras)})" if extras else str(method)


def summary_rows(run: Run) -> dict[str, str]:
    """The config summary and how far the run got, as display strings ("" when unknown)."""
    cfg = run.config
    arch, stem = _get(cfg, "model.arch"), _get(cfg, "model.stem")
    done = max((r.get("epoch", 0) for r in run.epochs), default=None)
    last_knn = run.evals_online[-1] if run.evals_online else None
    speeds = [r["images_per_s"] for r in run.train if isinstance(r.get("images_per_s"), (int, float))]
    rows = {
        "method": _method(cfg),
        "arch": f"{arch} ({stem} stem)" if arch and stem else arch,
        "epochs": _get(cfg, "optim.epochs"),
        "batch": _get(cfg, "optim.batch_size"),
        "image size": _get(cfg, "data.image_size"),
        "base lr": _get(cfg, "optim.base_lr"),
        "negatives": _get(cfg, "loss.negatives"),
        "temperature": _get(cfg, "loss.temperature"),
        "seed": _get(cfg, "train.seed"),
        "data": run.meta.get("data"),
        "images": run.meta.get("num_samples"),
        "epochs done": done,
        "final epoch loss": run.epochs[-1].get("loss") if run.epochs else None,
        "median images/s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "last online kNN k=20": last_knn.get("knn_top1_k20") if last_knn else None,
        "last online kNN k=200": last_knn.get("knn_top1_k200") if last_knn else None,
    }
    return {k: "" if v is None else _fmt(v) for k, v in rows.items()}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(cols: int, rows: int = 1) -> Any:
    try:
        from matplotlib.figure import Figure  # Agg through Figure.savefig: no display, no global backend switch
    except ImportError:
        raise PirlError("pirl report needs matplotlib; pip install matplotlib") from None
    return Figure(figsize=(4.2 * cols, 3.0 * rows))


def curves_png(run: Run) -> str | None:
    """Loss, learning rate, images/s (per logged step) and the online kNN accuracy (per epoch), as a data URI."""
    panels = []
    for ys, title in ((("loss", "loss_mean"), "loss"), (("lr",), "learning rate"), (("images_per_s",), "images/s")):
        lines = [(y, *_series(run.train, "global_step", y)) for y in ys]
        if any(xs for _, xs, _ in lines):
            panels.append((title, "global step", lines))
    knn = [(y, *_series(run.evals_online, "epoch", y)) for y in ("knn_top1_k20", "knn_top1_k200")]
    if any(xs for _, xs, _ in knn):
        panels.append(("online kNN top-1", "epoch", knn))
    if not panels:
        return None
    return _panels_png(panels, markers=True)


def _plain(text: str) -> str:
    """Text that matplotlib draws as written: a ``$`` would otherwise start mathtext (and may not parse)."""
    return str(text).replace("$", r"\$")


def _panels_png(panels: list, *, markers: bool) -> str:
    """One row of line plots, one per (title, x label, [(label, xs, ys), ...]) panel, as a data URI."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(len(panels))
    for i, (title, xlabel, lines) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for label, xs, ys in lines:
            if xs:
                ax.plot(xs, ys, marker="o" if markers and len(xs) < 30 else None, markersize=3,
                        label=_plain(label))
        ax.set_title(_plain(title))
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def comparison_png(runs: list[Run]) -> str | None:
    """Mean loss per logged step and online kNN (k=20) of every run on shared axes, when there are several runs."""
    panels = [("loss (mean over logged steps)", "global step", [(r.name, *_series(r.train, "global_step", "loss_mean"))
                                                               for r in runs]),
              ("online kNN top-1, k=20", "epoch", [(r.name, *_series(r.evals_online, "epoch", "knn_top1_k20"))
                                                   for r in runs])]
    panels = [p for p in panels if sum(bool(xs) for _, xs, _ in p[2]) >= 2]
    if len(runs) < 2 or not panels:
        return None
    return _panels_png(panels, markers=False)


# --------------------------------------------------------------------------- the page


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scores(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """Secondary scores of a result (top1_k20, precision_at_k, top1_by_shot[8], ...), at most MAX_SCORES."""
    flat, nested = [], []
    for key, value in result.items():
        if key in _NOT_SCORES or not any(word in key.lower() for word in _SCORE_WORDS):
            continue
        if _is_number(value):
            flat.append((key, value))
        elif isinstance(value, dict):  # one level: scores per shot count, per model, ...
            nested += [(f"{key}[{sub}]", v) for sub, v in value.items() if _is_number(v)]
    return (flat + nested)[:MAX_SCORES]


def evaluation_table(runs: list[Run]) -> str:
    """One row per evaluation (result file, kind, protocol), one column per run."""
    rows: dict[tuple[str, str, str], dict[int, tuple[str, dict[str, Any]]]] = {}
    for i, run in enumerate(runs):
        for file, result in run.results:
            key = (Path(file).name, str(result.get("eval", "")), str(result.get("protocol", "")))
            rows.setdefault(key, {})[i] = (file, result)
    if not rows:
        return ('<p class="small">No evaluation results found. Run <code>pirl eval KIND --model RUN --out '
                'RUN/eval</code> to add some.</p>')
    head = "".join(f"<th>{escape(r.name)}</th>" for r in runs)
    body = []
    for (name, kind, protocol), cells in sorted(rows.items()):
        top = [c[1].get("top1") for c in cells.values() if isinstance(c[1].get("top1"), (int, float))]
        best = max(top) if len(top) > 1 else None
        tds = []
        for i in range(len(runs)):
            if i not in cells:
                tds.append('<td class="num">–</td>')
                continue
            file, result = cells[i]
            top1 = result.get("top1")
            mark = ' best' if best is not None and top1 == best else ""
            extra = "<br>".join(f"{escape(k)} {escape(_fmt(v))}" for k, v in _scores(result))
            details = ", ".join(f"{k} {_fmt(result[k])}" for k in ("stage", "random_init", "train_images",
                                                                     "test_images") if k in result)
            tds.append(f'<td class="num{mark}" title="{escape(file + (": " + details if details else ""))}">'
                       f'{escape(_fmt(top1)) if top1 is not None else ""}'
                       f'{"<br><span class=small>" + extra + "</span>" if extra else ""}</td>')
        variant = []
        sample = next(iter(cells.values()))[1]
        if sample.get("random_init"):
            variant.append("random init")
        if sample.get("stage") not in (None, "pool"):
            variant.append(f"stage {sample['stage']}")
        label = escape(kind or name)
        if variant:
            label += f' <span class="small">({escape(", ".join(variant))})</span>'
        body.append(f"<tr><td>{label}<br><span class=small>{escape(name)}</span></td>"
                    f"<td class=small>{escape(protocol)}</td>{''.join(tds)}</tr>")
    return (f"<table><tr><th>evaluation</th><th>protocol</th>{head}</tr>{''.join(body)}</table>"
            '<p class="small">Cells: top-1 (bold: best of the row), then other scores; hover for the file.</p>')


def _summary_table(runs: list[Run]) -> str:
    summaries = [summary_rows(r) for r in runs]
    keys = [k for k in summaries[0] if any(s[k] for s in summaries)]
    head = "".join(f'<th><a href="#run-{i}">{escape(r.name)}</a></th>' for i, r in enumerate(runs, start=1))
    body = "".join(f"<tr><th>{escape(k)}</th>{''.join(f'<td>{escape(s[k])}</td>' for s in summaries)}</tr>"
                   for k in keys)
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _run_section(run: Run, index: int) -> str:
    parts = [f'<h2 id="run-{index}">{escape(run.name)}</h2>', f'<p class="meta">{escape(str(run.path))}</p>']
    curves = curves_png(run)
    if curves:
        parts.append(f'<figure><img alt="training curves of {escape(run.name)}" src="{curves}">'
                     "<figcaption>Training curves from metrics.jsonl</figcaption></figure>")
    else:
        parts.append('<p class="small">No training records in metrics.jsonl.</p>')
    for file, png in run.images:
        parts.append(f'<figure><img alt="{escape(file)}" src="{_data_uri(png)}">'
                     f"<figcaption>{escape(file)}</figcaption></figure>")
    for note in run.notes:
        parts.append(f'<p class="note">{escape(note)}</p>')
    if run.config:
        parts.append(f"<details><summary>Full config</summary><pre>{escape(json.dumps(run.config, indent=2))}"
                     "</pre></details>")
    return "\n".join(parts)


def render(runs: list[Run], title: str | None = None) -> str:
    """The whole page as a string."""
    title = title or "PIRL runs: " + ", ".join(r.name for r in runs)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s), made by pirl report on {escape(when)}</p>',
        "<h2>Runs</h2>", _summary_table(runs),
        "<h2>Evaluations</h2>", evaluation_table(runs),
    ]
    comparison = comparison_png(runs)
    if comparison:
        parts += ["<h2>Comparison</h2>", f'<figure><img alt="runs compared" src="{comparison}"></figure>']
    parts += [_run_section(run, i) for i, run in enumerate(runs, start=1)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _names(paths: Sequence[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(p).resolve().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def write_report(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None) -> dict[str, Any]:
    """Read every run, write the page to ``out``; returns counts for the command's summary line."""
    if not run_dirs:
        raise PirlError("pirl report needs at least one RUN_DIR")
    runs = [load_run(p, n) for p, n in zip(run_dirs, _names(run_dirs))]
    page = render(runs, title)
    out_path = Path(out)
    if out_path.is_dir():
        raise PirlError(f"--out {out} is a folder; give a file name such as report.html")
    atomic_write_text(out_path, page)
    return {"report": str(out_path), "runs": len(runs), "evaluations": sum(len(r.results) for r in runs),
            "images": sum(len(r.images) for r in runs)}
