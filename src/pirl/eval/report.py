"""``pirl report``: one self-contained HTML page comparing runs (config, training curves, evaluations, figures).

Evaluations are shown as one chart per probe (evaluation kind and feature stage): per-layer and low-shot curves
for every run, bar charts otherwise, random init as a dashed reference line in each, and the spread over seeds
where runs share a config but differ in ``train.seed``; the only table holds the headline top-1 figures.

The page works offline: inline CSS, no scripts, and every image (plots made here with matplotlib's Agg renderer,
PNGs found under ``RUN/eval``) is a base64 ``data:`` URI. All text from the runs is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pirl.config.legacy import translate_tree
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
.probes{display:flex;flex-wrap:wrap;gap:1rem}.probe{flex:0 1 36rem;margin:0}
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
        raise PirlError(
            f"{path} holds no config.json, metrics.jsonl, evaluation results or PNGs; is it a run directory?"
        )
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
    cfg = translate_tree(cfg)  # a run of the earlier layout too
    method = _get(cfg, "method.name")
    if method is None:
        return None
    extras = [f"pretext {_get(cfg, 'method.pretext')}"] if method == "pirl" and _get(cfg, "method.pretext") else []
    if _get(cfg, "loss.form"):
        extras.append(str(_get(cfg, "loss.form")))
    return f"{method} ({', '.join(extras)})" if extras else str(method)


def summary_rows(run: Run) -> dict[str, str]:
    """The config summary and how far the run got, as display strings ("" when unknown)."""
    cfg = translate_tree(run.config)  # a run of the earlier layout too
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
        "negatives": _get(cfg, "bank.negatives"),
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
                ax.plot(xs, ys, marker="o" if markers and len(xs) < 30 else None, markersize=3, label=_plain(label))
        ax.set_title(_plain(title))
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def comparison_png(runs: list[Run]) -> str | None:
    """Mean loss per logged step and online kNN (k=20) of every run on shared axes, when there are several runs."""
    panels = [
        (
            "loss (mean over logged steps)",
            "global step",
            [(r.name, *_series(r.train, "global_step", "loss_mean")) for r in runs],
        ),
        (
            "online kNN top-1, k=20",
            "epoch",
            [(r.name, *_series(r.evals_online, "epoch", "knn_top1_k20")) for r in runs],
        ),
    ]
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


STAGE_ORDER = ("conv1", "res2", "res3", "res4", "res5", "pool")
RANDOM = "random init"


@dataclass
class Probe:
    """One evaluation protocol across all runs: its scores per run group, and the random-init figures."""

    kind: str  # knn, linear, lowshot, finetune, retrieval, ...
    variant: str  # the feature stage ("pool", "all") or the finetune fraction
    protocol: str = ""
    # group label -> the results of its runs (one per seed), and random-init results from any run
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    random: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.kind == "linear" and self.variant == "all":
            return "linear probe per layer"
        return f"{self.kind} ({self.variant})" if self.variant not in ("", "pool") else self.kind

    @property
    def shape(self) -> str:
        """``layers`` (top-1 per feature stage), ``shots`` (top-1 per labelled images per class) or ``bar``."""
        sample = next((r for rs in self.results.values() for r in rs), self.random[0] if self.random else {})
        if isinstance(sample.get("top1_by_stage"), dict):
            return "layers"
        if isinstance(sample.get("top1_by_shot"), dict):
            return "shots"
        return "bar"


def seed_groups(runs: list[Run]) -> list[tuple[str, list[int]]]:
    """Runs that share a config except ``train.seed`` form one group (label, run indices), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        if run.config:
            cfg = json.loads(json.dumps(run.config))
            cfg.get("train", {}).pop("seed", None)
            key = json.dumps(cfg, sort_keys=True, default=str)
        else:
            key = f"#{i}"  # no config (an export from elsewhere): a group of its own
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append((runs[members[0]].name, members))
        else:
            seeds = ", ".join(_fmt(_get(runs[i].config, "train.seed")) for i in members)
            out.append((f"{runs[members[0]].name} (seeds {seeds})", members))
    return out


def collect_probes(runs: list[Run]) -> list[Probe]:
    """Every evaluation protocol found in the runs, with its results grouped by seed group."""
    label_of = {i: label for label, members in seed_groups(runs) for i in members}
    probes: dict[tuple[str, str], Probe] = {}
    for i, run in enumerate(runs):
        for file, result in run.results:
            kind = str(result.get("eval") or Path(file).stem)
            variant = (
                f"fraction {_fmt(result['fraction'])}"
                if kind == "finetune" and "fraction" in result
                else str(result.get("stage") or "")
            )
            probe = probes.setdefault((kind, variant), Probe(kind, variant))
            probe.protocol = probe.protocol or str(result.get("protocol", ""))
            probe.files.append(f"{run.name}/{file}")
            if result.get("random_init"):
                probe.random.append(result)
            else:
                probe.results.setdefault(label_of[i], []).append(result)
    order = {"knn": 0, "linear": 1, "lowshot": 2, "finetune": 3, "retrieval": 4}
    return sorted(probes.values(), key=lambda p: (order.get(p.kind, 9), p.kind, p.variant != "pool", p.variant))


def _top1s(results: list[dict[str, Any]]) -> list[float]:
    return [float(r["top1"]) for r in results if _is_number(r.get("top1"))]


def _curve(results: list[dict[str, Any]], field_name: str, xs: list[str]) -> list[list[float]]:
    """Per result, its value at each x (NaN where missing)."""
    return [
        [float(r[field_name][x]) if _is_number(r.get(field_name, {}).get(x)) else math.nan for x in xs] for r in results
    ]


def _spread(values: list[float]) -> str:
    """``mean`` for one value; ``mean ± d (n seeds)`` with d the largest distance of a seed from the mean."""
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return _fmt(mean)
    return f"{_fmt(mean)} ± {_fmt(max(abs(v - mean) for v in values))} ({len(values)} seeds)"


def probe_png(probe: Probe) -> str | None:
    """The probe's chart as a data URI: per-layer or per-shot curves of every run group (seed range shaded),
    or one bar per group (seeds as dots, their range as an error bar); random init as a dashed reference."""
    groups = [(label, rs) for label, rs in probe.results.items() if rs]
    if not groups and not probe.random:
        return None
    fig = _figure(1.3 if probe.shape != "bar" else max(1.0, 0.5 + 0.45 * len(groups)))
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    if probe.shape in ("layers", "shots"):
        field_name = "top1_by_stage" if probe.shape == "layers" else "top1_by_shot"
        keys = {k for r in [*probe.random, *(r for _, rs in groups for r in rs)] for k in r.get(field_name, {})}
        xs = (
            ([s for s in STAGE_ORDER if s in keys] + sorted(keys - set(STAGE_ORDER)))
            if probe.shape == "layers"
            else sorted(keys, key=lambda k: float(k) if k.replace(".", "", 1).isdigit() else math.inf)
        )
        pos = list(range(len(xs)))
        for (label, rs), colour in zip(groups, colours):
            rows = _curve(rs, field_name, xs)
            cols = [[v for v in col if not math.isnan(v)] for col in zip(*rows)]
            mean = [sum(c) / len(c) if c else math.nan for c in cols]
            ax.plot(pos, mean, marker="o", markersize=4, color=colour, label=label)
            if len(rs) > 1:
                ax.fill_between(
                    pos,
                    [min(c) if c else math.nan for c in cols],
                    [max(c) if c else math.nan for c in cols],
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
        if probe.random:
            rows = _curve(probe.random, field_name, xs)
            cols = [[v for v in col if not math.isnan(v)] for col in zip(*rows)]
            ax.plot(
                pos,
                [sum(c) / len(c) if c else math.nan for c in cols],
                linestyle="--",
                color="0.45",
                marker="s",
                markersize=3,
                label=RANDOM,
            )
        ax.set_xticks(pos, xs)
        ax.set_xlabel("feature layer" if probe.shape == "layers" else "labelled images per class")
    else:
        for x, ((_label, rs), colour) in enumerate(zip(groups, colours)):
            values = _top1s(rs)
            if not values:
                continue
            mean = sum(values) / len(values)
            ax.bar(x, mean, color=colour, alpha=0.85, width=0.6)
            if len(values) > 1:
                ax.errorbar(x, mean, yerr=[[mean - min(values)], [max(values) - mean]], color="black", capsize=4)
                ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
            ax.annotate(
                _fmt(round(mean, 4)),
                (x, max(values)),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_xticks(
            range(len(groups)),
            [label for label, _ in groups],
            rotation=20 if len(groups) > 2 else 0,
            ha="right" if len(groups) > 2 else "center",
            fontsize=8,
        )
        ax.set_xlim(-0.6, max(len(groups), 1) - 0.4)
    random = _top1s(probe.random)
    if probe.shape == "bar" and random:
        level = sum(random) / len(random)
        ax.axhline(level, linestyle="--", color="0.35", linewidth=1.2, label=f"{RANDOM} {_fmt(round(level, 4))}")
    ax.set_ylabel("top-1")
    ax.set_ylim(bottom=0)
    ax.set_title(probe.title)
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def headline_table(runs: list[Run], probes: list[Probe]) -> str:
    """One row per run group (and random init), one column per probe: top-1, mean ± spread over seeds."""
    if not probes:
        return (
            '<p class="small">No evaluation results found. Run <code>pirl eval KIND --model RUN --out '
            "RUN/eval</code> to add some.</p>"
        )
    labels = [label for label, _ in seed_groups(runs)]
    rows = []
    for label in [*labels, RANDOM]:
        cells, values_by_probe = [], []
        for probe in probes:
            results = probe.random if label == RANDOM else probe.results.get(label, [])
            values_by_probe.append(_top1s(results))
        if not any(values_by_probe):
            continue
        for probe, values in zip(probes, values_by_probe):
            others = [sum(v) / len(v) for lab, rs in probe.results.items() if (v := _top1s(rs))]
            best = label != RANDOM and len(others) > 1 and values and sum(values) / len(values) == max(others)
            cells.append(f'<td class="num{" best" if best else ""}">{escape(_spread(values))}</td>')
        name = f"<i>{RANDOM}</i>" if label == RANDOM else escape(label)
        rows.append(f"<tr><th>{name}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(p.title)}</th>" for p in probes)
    return (
        f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
        '<p class="small">Top-1 (fractions); bold: the best run of a column; ± the largest distance of a seed '
        "from the mean. Per-layer and low-shot columns give the headline figure (best layer; most shots).</p>"
    )


def _probe_details(probe: Probe) -> str:
    """The numbers behind one chart, folded away: every score of every result."""
    lines = []
    for label, results in [*probe.results.items(), (RANDOM, probe.random)]:
        for r in results:
            scores = "; ".join(f"{k} {_fmt(v)}" for k, v in _scores(r))
            lines.append(f"{label}: top1 {_fmt(r.get('top1'))}{'; ' + scores if scores else ''}")
    return (
        f"<details><summary>numbers and files</summary><pre>{escape(chr(10).join(lines))}\n\n"
        f"{escape(chr(10).join(probe.files))}</pre></details>"
    )


def evaluation_section(runs: list[Run]) -> str:
    """The headline table, then one chart per probe with its protocol and (folded) numbers."""
    probes = collect_probes(runs)
    parts = [headline_table(runs, probes)]
    figures = []
    for probe in probes:
        png = probe_png(probe)
        if png:
            figures.append(
                f'<figure class="probe"><img alt="{escape(probe.title)} chart" src="{png}">'
                f"<figcaption>{escape(probe.protocol)}{_probe_details(probe)}</figcaption></figure>"
            )
    if figures:
        parts.append(f'<div class="probes">{"".join(figures)}</div>')
    return "\n".join(parts)


def _summary_table(runs: list[Run]) -> str:
    summaries = [summary_rows(r) for r in runs]
    keys = [k for k in summaries[0] if any(s[k] for s in summaries)]
    head = "".join(f'<th><a href="#run-{i}">{escape(r.name)}</a></th>' for i, r in enumerate(runs, start=1))
    body = "".join(
        f"<tr><th>{escape(k)}</th>{''.join(f'<td>{escape(s[k])}</td>' for s in summaries)}</tr>" for k in keys
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _run_section(run: Run, index: int) -> str:
    parts = [f'<h2 id="run-{index}">{escape(run.name)}</h2>', f'<p class="meta">{escape(str(run.path))}</p>']
    curves = curves_png(run)
    if curves:
        parts.append(
            f'<figure><img alt="training curves of {escape(run.name)}" src="{curves}">'
            "<figcaption>Training curves from metrics.jsonl</figcaption></figure>"
        )
    else:
        parts.append('<p class="small">No training records in metrics.jsonl.</p>')
    for file, png in run.images:
        parts.append(
            f'<figure><img alt="{escape(file)}" src="{_data_uri(png)}"><figcaption>{escape(file)}</figcaption></figure>'
        )
    for note in run.notes:
        parts.append(f'<p class="note">{escape(note)}</p>')
    if run.config:
        parts.append(
            f"<details><summary>Full config</summary><pre>{escape(json.dumps(run.config, indent=2))}</pre></details>"
        )
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
        "<h2>Runs</h2>",
        _summary_table(runs),
        "<h2>Evaluations</h2>",
        evaluation_section(runs),
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
    return {
        "report": str(out_path),
        "runs": len(runs),
        "evaluations": sum(len(r.results) for r in runs),
        "images": sum(len(r.images) for r in runs),
    }
