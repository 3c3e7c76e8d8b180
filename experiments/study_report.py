"""The reproduction study's offline HTML page: one chart per claim, drawn from docs/results/reproduction.json.

Charts (matplotlib, embedded as PNG data URIs, so the page opens without a network): a bar chart per probe
with the seed spread and random init as a reference line, the lambda curve, the negatives curve, per-layer
curves, the testbed comparison, the invariance histograms (from each run's own measurement), and a table of
every run.
:func:`update_markdown` writes the main-run tables of docs/reproduction.md between its ``main-table`` markers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROBES = (
    ("knn_k20", "kNN k=20"),
    ("knn_k200", "kNN k=200"),
    ("linear", "linear, pooled res5"),
    ("linear_best", "linear, best layer"),
)
ORDER = ("pirl", "pirl_jigsaw_rotation", "pirl_rotation", "npid", "jigsaw", "rotation", "supervised")
STAGES = ("conv1", "res2", "res3", "res4", "res5", "pool")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _group(runs: list[dict], key) -> dict:
    out: dict = defaultdict(list)
    for r in runs:
        out[key(r)].append(r)
    return out


def _random(runs: list[dict], study: str) -> dict | None:
    rows = [r for r in runs if r["method"] == "random" and r["study"] == study]
    return rows[0] if rows else None


def main_bars(runs: list[dict]) -> str:
    main = [r for r in runs if r["study"] == "main" and r["method"] != "random"]
    if not main:
        return ""
    by_method = _group(main, lambda r: r["method"])
    methods = [m for m in ORDER if m in by_method]
    rand = _random(runs, "main")
    fig, axes = plt.subplots(1, len(PROBES), figsize=(4.2 * len(PROBES), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], PROBES):
        vals = [[r[key] for r in by_method[m]] for m in methods]
        means = [mean(v) for v in vals]
        lo = [mu - min(v) for mu, v in zip(means, vals)]
        hi = [max(v) - mu for mu, v in zip(means, vals)]
        ax.bar(
            range(len(methods)),
            means,
            yerr=[lo, hi],
            capsize=3,
            color=["#d62728" if m.startswith("pirl") else "#1f77b4" for m in methods],
        )
        if rand:
            ax.axhline(rand[key], color="k", ls="--", lw=1, label="random init")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(min([*means, rand[key] if rand else 1.0]) - 0.05, max(means) + 0.05)
    fig.suptitle("Equal epochs: mean over seeds, bars show min-max", fontsize=10, y=1.06)
    return _png(fig)


def _curve(points: dict[float, list[dict]], xlabel: str, title: str, log: bool = False) -> str:
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label in PROBES[1:3]:
        ax.plot(xs, [mean(r[key] for r in points[x]) for x in xs], marker="o", label=label)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def lambda_points(runs: list[dict]) -> dict[float, list[dict]]:
    """The runs of each lambda: the lambda study, with the main PIRL (0.5) and NPID++ (0) runs."""
    points: dict[float, list[dict]] = defaultdict(list)
    for r in runs:
        if (r["study"] == "lambda" or (r["study"] == "main" and r["method"] in ("pirl", "npid"))) and r.get(
            "lam"
        ) is not None:
            points[r["lam"]].append(r)
    return points


def negatives_points(runs: list[dict]) -> dict[float, list[dict]]:
    """The runs of each number of negatives: the negatives study, with the main PIRL runs."""
    points: dict[float, list[dict]] = defaultdict(list)
    for r in runs:
        if (r["study"] == "negatives" or (r["study"] == "main" and r["method"] == "pirl")) and r.get("negatives"):
            points[r["negatives"]].append(r)
    return points


def lambda_curve(runs: list[dict]) -> str:
    points = lambda_points(runs)
    return _curve(points, "lambda (weight of the transformed term)", "Fig. 6: lambda") if len(points) > 1 else ""


def negatives_curve(runs: list[dict]) -> str:
    points = negatives_points(runs)
    return (
        _curve(points, "negatives (the bank holds 10,000 rows)", "Fig. 8: negatives", log=True)
        if len(points) > 1
        else ""
    )


def layer_curves(runs: list[dict]) -> str:
    main = [r for r in runs if r["study"] == "main" and r.get("linear_by_stage")]
    if not main:
        return ""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method, rows in sorted(
        _group(main, lambda r: r["method"]).items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99
    ):
        stages = [s for s in STAGES if all(s in r["linear_by_stage"] for r in rows)]
        ax.plot(
            stages,
            [mean(r["linear_by_stage"][s] for r in rows) for s in stages],
            marker="o",
            label=method,
            ls="--" if method == "random" else "-",
            color="k" if method == "random" else None,
        )
    ax.set_ylabel("linear top-1")
    ax.set_title("Fig. 5: linear probe per layer", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


# Fig. 4 compares these methods, each by its main run of the lowest seed that has its invariance measured
INVARIANCE_METHODS = ("pirl", "npid", "jigsaw")
SPACES = ("trunk", "heads", "heads_batch")  # the heads twice: eval mode, and each pass's own batch statistics


def invariance_figure(results: dict) -> dict[str, dict[str, dict]]:
    """``{space: {run: stats}}`` for Fig. 4 (the spaces of SPACES that were measured), from the rows' own
    measurements: the main run of the lowest seed of each of INVARIANCE_METHODS, and random init."""
    main = [r for r in results.get("runs", []) if r["study"] == "main" and r.get("invariance")]
    chosen = [
        min(rows, key=lambda r: r["seed"])
        for m in INVARIANCE_METHODS
        if (rows := [r for r in main if r["method"] == m])
    ]
    chosen += [r for r in main if r["method"] == "random"][:1]
    figure: dict[str, dict[str, dict]] = {space: {} for space in SPACES}
    for r in chosen:
        for space, stats in r["invariance"].items():
            figure[space]["random" if r["method"] == "random" else r["name"]] = stats
    return {space: by_run for space, by_run in figure.items() if by_run}


def invariance_histograms(results: dict) -> str:
    """Fig. 4: one panel per representation space, one histogram per model."""
    figure = invariance_figure(results)
    spaces = [s for s in SPACES if s in figure]
    if not spaces:
        return ""
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 3.6), squeeze=False)
    titles = {
        "trunk": "pooled trunk: image vs jigsaw-shuffled image",
        "heads": "heads: f(I) vs g(I^t), eval mode",
        "heads_batch": "heads: f(I) vs g(I^t), each pass's batch statistics",
    }
    for ax, space in zip(axes[0], spaces):
        for name, s in figure[space].items():
            counts, edges = s["histogram"]["counts"], s["histogram"]["bin_edges"]
            total = max(sum(counts), 1)
            ax.stairs([c / total for c in counts], edges, lw=1.6, label=f"{name}: {s['mean']:.3f}")
        ax.set_xlim(0, 2)
        ax.set_xlabel("l2 distance between unit-norm representations")
        ax.set_ylabel("fraction of images")
        ax.set_title(titles[space], fontsize=10)
        ax.legend(fontsize=7)
    return _png(fig)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else html.escape(str(v if v is not None else "-"))

    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def testbed_table(runs: list[dict]) -> str:
    """Supervised against random init on each candidate testbed: the gain each leaves for methods to show."""
    rows = []
    for tb in sorted({r["testbed"] for r in runs if r["study"] == "testbed"}):
        sup = [r for r in runs if r["study"] == "testbed" and r["testbed"] == tb and r["method"] == "supervised"]
        rnd = [r for r in runs if r["study"] == "testbed" and r["testbed"] == tb and r["method"] == "random"]
        if sup and rnd:
            rows.append(
                {
                    "testbed": tb,
                    "supervised": sup[0]["linear"],
                    "random": rnd[0]["linear"],
                    "gain": f"{100 * (sup[0]['linear'] - rnd[0]['linear']):+.1f} points",
                    "knn": sup[0]["knn_k200"],
                    "knn_random": rnd[0]["knn_k200"],
                }
            )
    cols = [
        ("testbed", "testbed"),
        ("supervised", "supervised linear res5"),
        ("random", "random init"),
        ("gain", "gain"),
        ("knn", "supervised kNN k=200"),
        ("knn_random", "random kNN k=200"),
    ]
    return _table(rows, cols) if rows else ""


def write_html(results: dict, path: Path) -> None:
    runs = results.get("runs", [])
    cols = [
        ("name", "run"),
        ("method", "method"),
        ("seed", "seed"),
        ("epochs", "epochs"),
        ("train_s", "train s"),
        ("images_per_s", "images/s"),
        ("knn_k20", "kNN k=20"),
        ("knn_k200", "kNN k=200"),
        ("linear", "linear res5"),
        ("linear_best", "linear best"),
        ("best_stage", "best layer"),
    ]
    sections = [
        ("Testbed candidates: supervised against random init, same schedule", testbed_table(runs)),
        ("Equal-epoch comparison (Table 2 / 5)", main_bars(runs)),
        ("lambda (Fig. 6)", lambda_curve(runs)),
        ("Negatives (Fig. 8)", negatives_curve(runs)),
        ("Per-layer probes (Fig. 5 / Table 7)", layer_curves(runs)),
        ("Invariance to the jigsaw transform (Fig. 4)", invariance_histograms(results)),
    ]
    figures = "".join(f"<h2>{html.escape(t)}</h2>{chart}" for t, chart in sections if chart)
    for fig in results.get("figures", []):
        png = Path(fig["png"])
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            figures += f'<h2>{html.escape(fig["title"])}</h2><img alt="figure" src="data:image/png;base64,{data}">'
    testbed = results.get("testbed", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pirl: reproduction on CIFAR-10</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style>
</head><body><h1>pirl: a small-scale reproduction of PIRL on CIFAR-10</h1>
<p>Testbed: {html.escape(str(testbed.get("candidates", {}).get(testbed.get("chosen"), "")))};
overrides of the cpu-quick preset: {html.escape(" ".join(testbed.get("overrides", [])))}.</p>
<p>Evaluation: {html.escape(str(testbed.get("eval", "")))}.</p>
{figures}<h2>Every run</h2>{_table(runs, cols)}</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)


MARKDOWN_START = "<!-- main-table: written by experiments/study_report.py from docs/results/reproduction.json -->"
MARKDOWN_END = "<!-- /main-table -->"


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _spread(values: list[float]) -> str:
    """Mean, and the sample standard deviation when there are several seeds."""
    if not values:
        return ""
    return f"{mean(values):.3f}" + (f" ± {stdev(values):.3f}" if len(values) > 1 else "")


def markdown_tables(results: dict) -> str:
    """The main and ``why`` runs one by one, the main methods averaged over seeds, and the per-layer probes."""
    runs = [r for r in results.get("runs", []) if r["study"] in ("main", "why")]
    lines = [
        "| run | kNN k=20 | kNN k=200 | linear pool | best layer | images/s (load) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ips = ""
        if r.get("images_per_s"):
            ips = f"{r['images_per_s']:.0f}" + (f" ({r['load_avg']:.1f})" if r.get("load_avg") else "")
        best = f"{_f(r.get('linear_best'))} ({r.get('best_stage')})" if r.get("linear_best") is not None else ""
        lines.append(
            f"| `{r['name']}` | {_f(r.get('knn_k20'))} | {_f(r.get('knn_k200'))} | {_f(r.get('linear'))} "
            f"| {best} | {ips} |"
        )
    by_method = _group([r for r in runs if r["study"] == "main"], lambda r: r["method"])
    methods = [m for m in (*ORDER, "random") if m in by_method]
    lines += [
        "",
        "Averaged over seeds (mean ± standard deviation of the seeds):",
        "",
        "| method | seeds | kNN k=20 | kNN k=200 | linear pool | best layer |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        rows = by_method[m]
        cells = [_spread([r[k] for r in rows if r.get(k) is not None]) for k in ("knn_k20", "knn_k200", "linear")]
        best = _spread([r["linear_best"] for r in rows if r.get("linear_best") is not None])
        lines.append(f"| {m} | {len(rows)} | " + " | ".join(cells) + f" | {best} |")
    lines += [
        "",
        "Linear probe per layer (the Fig. 5 view):",
        "",
        "| run | " + " | ".join(STAGES) + " |",
        "|---" * (len(STAGES) + 1) + "|",
    ]
    for r in runs:
        by = r.get("linear_by_stage") or {}
        lines.append(f"| `{r['name']}` | " + " | ".join(_f(by.get(k)) for k in STAGES) + " |")
    for title, column, points in (
        ("The lambda ablation (the Fig. 6 view; 0 is NPID++, 0.5 the main PIRL runs):", "lambda", lambda_points),
        ("The negatives ablation (the Fig. 8 view; 8192 is the main PIRL runs):", "negatives", negatives_points),
    ):
        curve = points(results.get("runs", []))
        if len(curve) > 1:
            lines += ["", title, "", _ablation_table(curve, column)]
    ablations = [r for r in results.get("runs", []) if r["study"] in ("lambda", "negatives")]
    measured = [r for r in runs + ablations if r.get("invariance")]
    if measured:
        lines += [
            "",
            "Invariance to the jigsaw transform (the Fig. 4 view): l2 distance between unit-norm representations of "
            "an image and its transformed copy, mean ± standard deviation over the same test images "
            "(lower is more invariant):",
            "",
            "| run | pooled trunk | f(I) vs g(I^t), eval mode | f(I) vs g(I^t), batch statistics |",
            "|---|---|---|---|",
        ]
        for r in measured:
            cells = [r["invariance"].get(space) for space in SPACES]
            text = [f"{c['mean']:.3f} ± {c['std']:.3f}" if c else "" for c in cells]
            lines.append(f"| `{r['name']}` | " + " | ".join(text) + " |")
    if quick := quick_table(results):
        title = "The cpu-quick candidates (gain over the random-init trunk of the same testbed, in points):"
        lines += ["", title, "", quick]
    return "\n".join(lines)


def quick_table(results: dict) -> str:
    """The cpu-quick candidates, each beside the random-init trunk of its testbed under the same evaluation."""
    runs = results.get("runs", [])
    quick = [r for r in runs if r["study"] == "quick"]
    if not quick:
        return ""
    random_of = {"t32": "testbed-t32-random", "t64": "main-random"}
    rows = {r["name"]: r for r in runs}
    lines = [
        "| run | train s | kNN k=20 | kNN k=200 | linear pool | best layer | random init (kNN k=20 / k=200 / linear) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in quick:
        ref = rows.get(random_of.get(r.get("testbed", ""), ""))

        def gain(key: str, r=r, ref=ref) -> str:
            return f"{_f(r.get(key))} ({100 * (r[key] - ref[key]):+.1f})" if ref and r.get(key) is not None else ""

        base = " / ".join(_f(ref.get(k)) for k in ("knn_k20", "knn_k200", "linear")) if ref else ""
        best = f"{_f(r.get('linear_best'))} ({r.get('best_stage')})" if r.get("linear_best") is not None else ""
        lines.append(
            f"| `{r['name']}` | {r.get('train_s', '')} | {gain('knn_k20')} | {gain('knn_k200')} | {gain('linear')} "
            f"| {best} | {base} |"
        )
    return "\n".join(lines)


HEADLINE_KEYS = ("knn_k200", "knn_k20", "linear", "linear_best")


def headline(results: dict) -> dict:
    """The study's headline table for ``docs/results/cifar10.json``: each main method averaged over its seeds.

    ``knn`` is kNN k=200 (the key the earlier table used); every accuracy has its seed spread under ``*_std``.
    """
    main = [r for r in results.get("runs", []) if r["study"] == "main"]
    by_method = _group(main, lambda r: r["method"])
    out = []
    for m in [m for m in (*ORDER, "random") if m in by_method]:
        rows = by_method[m]
        row: dict = {"method": m, "seeds": sorted(r["seed"] for r in rows), "runs": [r["name"] for r in rows]}
        for key in HEADLINE_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            row[key] = mean(values) if values else None
            row[f"{key}_std"] = stdev(values) if len(values) > 1 else None
        row["knn"] = row["knn_k200"]
        stages = [r.get("best_stage") for r in rows if r.get("best_stage")]
        row["best_stage"] = max(stages, key=stages.count) if stages else None  # ties: the first seed's
        row["epochs"] = rows[0].get("epochs")
        speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
        row["images_per_s"] = max(speeds) if speeds else None  # the least disturbed run on a shared machine
        out.append(row)
    bed = results.get("testbed", {})
    return {
        "protocol": {
            "source": "the main study of docs/results/reproduction.json, averaged over seeds",
            "testbed": bed.get("candidates", {}).get(bed.get("chosen", ""), bed.get("chosen")),
            "pretraining": f"{bed.get('subset')} CIFAR-10 training images, {bed.get('epochs')} epochs for every "
            "method (equal epochs), the cpu-quick preset plus the testbed overrides",
            "overrides": bed.get("overrides", []),
            "eval": bed.get("eval"),
            "knn": "weighted kNN, k=200 (knn, knn_k200) and k=20 (knn_k20), on pooled res5",
            "linear": "L-BFGS logistic regression on pooled res5 (linear) and the best of conv1, res2-res5 and "
            "pooled res5 (linear_best, best_stage)",
            "images_per_s": "training throughput, the fastest of the method's runs (the machine was shared)",
            "command": "python experiments/reproduce.py --data CIFAR10_FOLDER_OR_ARCHIVE --out runs/repro --study main",
        },
        "runs": out,
    }


def headline_markdown(table: dict) -> str:
    """The headline table as markdown, for the README and docs/results.md."""
    lines = [
        "| method | seeds | kNN k=200 | kNN k=20 | linear res5 | linear best layer | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table["runs"]:
        cells = [_f(r.get(k)) + (f" ± {r[k + '_std']:.3f}" if r.get(k + "_std") else "") for k in HEADLINE_KEYS]
        cells[3] += f" ({r['best_stage']})" if r.get("best_stage") else ""
        speed = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
        name = "random init" if r["method"] == "random" else r["method"]
        lines.append(f"| {name} | {len(r['seeds'])} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


HEADLINE_START = "<!-- headline-table: written by experiments/study_report.py from docs/results/reproduction.json -->"
HEADLINE_END = "<!-- /headline-table -->"


def _replace_block(path: Path, start: str, end: str, body: str) -> bool:
    if not path.is_file():
        return False
    text = path.read_text()
    block = re.compile(re.escape(start) + ".*?" + re.escape(end), flags=re.S)
    if not block.search(text):
        return False
    path.write_text(block.sub(lambda _: f"{start}\n{body}\n{end}", text))
    return True


def update_headline(results: dict, json_path: Path, markdown_paths: list[Path]) -> None:
    """Write the headline table to ``json_path`` and between the headline markers of each markdown file."""
    table = headline(results)
    json_path.write_text(json.dumps(table, indent=1) + "\n")
    for path in markdown_paths:
        _replace_block(path, HEADLINE_START, HEADLINE_END, headline_markdown(table))


def _ablation_table(points: dict[float, list[dict]], column: str) -> str:
    """One line per value: its runs, and each probe's mean ± seed spread over them."""
    lines = [f"| {column} | runs | kNN k=20 | kNN k=200 | linear pool | best layer |", "|---|---|---|---|---|---|"]
    for x in sorted(points):
        rows = points[x]
        cells = [
            _spread([r[k] for r in rows if r.get(k) is not None])
            for k in ("knn_k20", "knn_k200", "linear", "linear_best")
        ]
        names = ", ".join(f"`{r['name']}`" for r in rows)
        lines.append(f"| {x:g} | {names} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown(results: dict, path: Path) -> bool:
    """Replace the tables between the markers of ``path`` (False, changing nothing, where it has no markers)."""
    return _replace_block(path, MARKDOWN_START, MARKDOWN_END, markdown_tables(results))
