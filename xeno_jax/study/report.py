"""The study report: ``report.md`` with tables and figures, every number computed from scores.

Tables (method.md C2): class-level DSC and NSD (image -> subject -> class) with 95% subject-
bootstrap intervals per configuration and test set; a key table of the pathology labels; and
the xeno-learning-minus-baseline differences. Figures (method.md C3): DSC against median StO2
of kidney per transfer direction, ICG improvement per organ and example predictions next to
labels; then the transfer similarity of the transferred organs between the species involved
(`xeno_jax.analysis`: pathological changes, cosines and magnitude ratios with intervals).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from xeno_jax import analysis
from xeno_jax.analysis.report import markdown_table
from xeno_jax.evaluate import ScoreTable, bootstrap_class_level
from xeno_jax.evaluate.perfusion import parameter_curves
from xeno_jax.io import atomic_write
from xeno_jax.labels import ICG_LABELS, PATHOLOGY_LABELS, SPECIES_12
from xeno_jax.study import datasets, runs
from xeno_jax.study.configurations import parse_configuration

KIDNEY = SPECIES_12.name_to_index("kidney")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One configuration scored on one test set."""

    configuration: str
    test_set: str
    table: ScoreTable


def _fmt(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def label_summary(table: ScoreTable, labels: Sequence[int], metric: str = "dice"
                  ) -> tuple[float, float, float]:
    """Class-level mean over `labels` with its bootstrap interval (NaN if none is present)."""
    scores = bootstrap_class_level(table, metric)
    rows = np.flatnonzero(np.isin(scores.labels, labels))
    if not rows.size:
        return float("nan"), float("nan"), float("nan")
    samples = np.nanmean(scores.bootstrap_means[:, rows], axis=1)
    return (float(np.mean(scores.mean[rows])), float(np.nanpercentile(samples, 2.5)),
            float(np.nanpercentile(samples, 97.5)))


def key_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """Per configuration: kidney DSC on physiological and malperfused images, class mean DSC."""
    rows = []
    for name in dict.fromkeys(e.configuration for e in evaluations):
        tables = {e.test_set: e.table for e in evaluations if e.configuration == name}
        row = {"configuration": name}
        if "physiological" in tables:
            row["kidney DSC, physiological"] = _fmt(*label_summary(tables["physiological"],
                                                                   [KIDNEY]))
        if "malperfusion" in tables:
            row["kidney DSC, malperfused"] = _fmt(*label_summary(tables["malperfusion"],
                                                                 [KIDNEY]))
        if "physiological" in tables:
            scores = bootstrap_class_level(tables["physiological"], "dice")
            row["class-mean DSC, physiological"] = _fmt(
                scores.class_mean, scores.class_mean_ci_low, scores.class_mean_ci_high)
        if "icg" in tables:
            icg = [SPECIES_12.name_to_index(n) for n in ICG_LABELS]
            row["ICG-organ DSC, ICG"] = _fmt(*label_summary(tables["icg"], icg))
        rows.append(row)
    return rows


def class_table(evaluations: Sequence[Evaluation], test_set: str, metric: str) -> str:
    """Rows: configurations; columns: classes and the class mean, with bootstrap intervals."""
    rows = []
    for e in evaluations:
        if e.test_set != test_set or metric not in e.table.scores or not len(e.table):
            continue
        scores = bootstrap_class_level(e.table, metric)
        row = {"configuration": e.configuration,
               "class mean": _fmt(scores.class_mean, scores.class_mean_ci_low,
                                  scores.class_mean_ci_high)}
        for k, label in enumerate(scores.labels):
            row[SPECIES_12.index_to_name(label)] = _fmt(scores.mean[k], scores.ci_low[k],
                                                        scores.ci_high[k])
        rows.append(row)
    return markdown_table(rows) if rows else "_no scores_"


def difference_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """Xeno-learning minus the baseline of the same target species, per test set."""
    by_key = {(e.configuration, e.test_set): e.table for e in evaluations}
    rows = []
    for (name, test_set), table in by_key.items():
        parsed = parse_configuration(name)
        baseline = by_key.get((f"baseline_{parsed.target}", test_set))
        if not parsed.is_projected or baseline is None:
            continue
        targets = [SPECIES_12.name_to_index(n) for n in PATHOLOGY_LABELS.get(
            parsed.pathology, ())]
        xeno_all, base_all = (bootstrap_class_level(t, "dice") for t in (table, baseline))
        row = {"configuration": name, "test set": test_set,
               "delta class-mean DSC": f"{xeno_all.class_mean - base_all.class_mean:+.3f}"}
        if targets:
            delta = label_summary(table, targets)[0] - label_summary(baseline, targets)[0]
            row[f"delta DSC of {parsed.pathology} labels"] = f"{delta:+.3f}"
        rows.append(row)
    return rows


FULL_LABEL_TEST_SETS = {"physiological": ("kidney", ("kidney",)),
                        "malperfusion": ("kidney", ("kidney",)),
                        "icg": ("ICG organs", ICG_LABELS)}
"""Test sets in the full-label table: the name of its organs and their labels."""


def full_label_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """Per configuration and test set (`FULL_LABEL_TEST_SETS`): the organs' DSC inside the
    annotation next to their DSC, precision and recall against every pixel's true class and
    the share of the other tissue predicted as one of them (tables without full labels are
    left out)."""
    rows = []
    for e in evaluations:
        full = e.table.scores.get("full_dice")
        if e.test_set not in FULL_LABEL_TEST_SETS or full is None or np.isnan(full).all():
            continue
        group, organs = FULL_LABEL_TEST_SETS[e.test_set]
        labels = [SPECIES_12.name_to_index(n) for n in organs]
        row = {"configuration": e.configuration, "test set": e.test_set, "organs": group}
        for title, metric in (("DSC, annotation", "dice"), ("DSC, full labels", "full_dice"),
                              ("precision", "full_precision"), ("recall", "full_recall"),
                              ("other tissue called the organ", "full_false_share")):
            row[title] = _fmt(*label_summary(e.table, labels, metric))
        rows.append(row)
    return rows


# -- figures --------------------------------------------------------------------------------

def _columns(table: ScoreTable, names: Sequence[str]) -> ScoreTable:
    return ScoreTable(table.image_name, table.subject, table.label,
                      {n: table.scores[n] for n in names})


def plot_dsc_against_sto2(evaluations: Sequence[Evaluation], path: Path) -> bool:
    """Kidney DSC over median StO2 for every target with a malperfusion test set."""
    groups: dict[str, list[tuple[str, ScoreTable, np.ndarray]]] = {}
    for e in evaluations:
        if e.test_set != "malperfusion":
            continue
        physiological = next((x.table for x in evaluations if x.configuration == e.configuration
                              and x.test_set == "physiological"), None)
        parts = [e.table] if physiological is None else [physiological, e.table]
        table = ScoreTable.concatenate([_columns(t, ("dice", "median_sto2")) for t in parts])
        vendor = np.concatenate([t.scores.get("vendor_sto2", np.zeros(len(t))) for t in parts])
        kidney = table.label == KIDNEY
        groups.setdefault(parse_configuration(e.configuration).target, []).append(
            (e.configuration, table.select(kidney), vendor[kidney]))
    groups = {t: v for t, v in groups.items() if any(len(table) for _, table, _ in v)}
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (target, entries) in zip(axes[0], groups.items(), strict=True):
        vendor = np.concatenate([v for *_, v in entries])
        which = ("the vendor's StO2" if vendor.size and vendor.all() else
                 "StO2: the vendor's where the data has it, else the open index" if vendor.any()
                 else "StO2 index (open re-implementation)")
        for name, table, _ in entries:
            if not len(table):
                continue
            curves = parameter_curves(table, "median_sto2", "dice")
            ax.plot(curves.grid, curves.mean[0], label=name)
            ax.fill_between(curves.grid, curves.ci_low[0], curves.ci_high[0], alpha=0.2)
        ax.set(title=f"kidney, {target}", xlabel=f"median of the kidney, {which}",
               ylabel="DSC", ylim=(0, 1.02), xlim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_icg_improvement(evaluations: Sequence[Evaluation], path: Path) -> bool:
    """Per ICG organ: mean (SD over subjects) of DSC_xeno - DSC_baseline on ICG images."""
    by_key = {(e.configuration, e.test_set): e.table for e in evaluations}
    pairs = []
    for (name, test_set), table in by_key.items():
        parsed = parse_configuration(name)
        baseline = by_key.get((f"baseline_{parsed.target}", "icg"))
        if test_set == "icg" and parsed.pathology == "ICG" and baseline is not None:
            pairs.append((name, table, baseline))
    if not pairs:
        return False
    labels = [SPECIES_12.name_to_index(n) for n in ICG_LABELS]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(pairs)
    for k, (name, xeno, base) in enumerate(pairs):
        means, sds = [], []
        for label in labels:
            deltas = []
            for subject in np.unique(xeno.subject):
                a = xeno.scores["dice"][(xeno.subject == subject) & (xeno.label == label)]
                b = base.scores["dice"][(base.subject == subject) & (base.label == label)]
                if a.size and b.size:
                    deltas.append(np.nanmean(a) - np.nanmean(b))
            means.append(np.mean(deltas) if deltas else np.nan)
            sds.append(np.std(deltas) if deltas else np.nan)
        ax.bar(np.arange(len(labels)) + k * width, means, width, yerr=sds, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, ICG_LABELS, rotation=30)
    ax.set(ylabel="DSC xeno - baseline (ICG images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def spectral_section(config: ml_collections.ConfigDict, folder: Path) -> list[str]:
    """Transfer similarity (`xeno_jax.analysis`) of the species and pathologies transferred.

    Its table (``analysis.md``, ``transfer.csv``) and figures go to `folder` (inside the
    report's ``figures``); returns the report's markdown lines, which link to them.
    """
    species, states = set(), {datasets.PHYSIOLOGICAL_SPLIT}
    for name in config.configurations:
        parsed = parse_configuration(name)
        if parsed.is_projected:
            species |= {parsed.source, parsed.target}
            states.add("icg" if parsed.pathology == "ICG" else "malperfusion")
    if not species:
        return []
    species = sorted(species)
    catalog = datasets.ensure_catalog(species, config.dataset, config.data_dir, sorted(states))
    table = analysis.extract(catalog, catalog.records)
    text = analysis.write_analyses(table, species, folder, analyses=("transfer",))
    with atomic_write(folder / "analysis.md", text=True) as f:
        f.write(text)
    link = f"figures/{folder.name}"
    lines = ["## Transfer similarity", "",
             f"Cosines and magnitude ratios of the pathological changes between "
             f"{', '.join(species)}, with subject-bootstrap intervals: "
             f"[table]({link}/analysis.md) ([CSV]({link}/transfer.csv)).", ""]
    for figure in sorted(folder.glob("transfer_*.png")):
        lines += [f"![{figure.stem}]({link}/{figure.name})", ""]
    return lines


def plot_examples(workdir: Path, evaluations: Sequence[Evaluation], path: Path) -> bool:
    """False-colour images, labels and each configuration's prediction (saved examples)."""
    files = sorted((workdir / "scores").glob("*/examples_*.npz"))
    groups: dict[str, list[tuple[str, Path]]] = {}
    for file in files:
        groups.setdefault(file.stem.removeprefix("examples_"), []).append(
            (file.parent.name, file))
    if not groups:
        return False
    test_set, entries = max(groups.items(), key=lambda kv: len(kv[1]))
    loaded = [(name, np.load(f)) for name, f in entries]
    images = loaded[0][1]["rgb"].shape[0]
    columns = 2 + len(loaded)
    fig, axes = plt.subplots(images, columns, figsize=(2.6 * columns, 2.2 * images),
                             squeeze=False)
    cmap = plt.get_cmap("tab20", SPECIES_12.invalid_index + 1)
    for i in range(images):
        first = loaded[0][1]
        axes[i, 0].imshow(first["rgb"][i])
        labels = np.where(first["valid"][i], first["labels"][i], SPECIES_12.invalid_index)
        axes[i, 1].imshow(labels, cmap=cmap, vmin=0, vmax=SPECIES_12.invalid_index,
                          interpolation="nearest")
        for k, (name, data) in enumerate(loaded):
            prediction = np.where(first["valid"][i], data["prediction"][i],
                                  SPECIES_12.invalid_index)
            axes[i, 2 + k].imshow(prediction, cmap=cmap, vmin=0, vmax=SPECIES_12.invalid_index,
                                  interpolation="nearest")
            if i == 0:
                axes[i, 2 + k].set_title(name, fontsize=7)
        if i == 0:
            axes[i, 0].set_title(f"{test_set} (false colour)", fontsize=7)
            axes[i, 1].set_title("labels (valid pixels)", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(config: ml_collections.ConfigDict, workdir: Path,
                 evaluations: Sequence[Evaluation]) -> Path:
    """Writes ``<workdir>/report.md`` (and ``figures/``); returns its path."""
    figures = workdir / "figures"
    figures.mkdir(exist_ok=True)
    trained = sum(runs.is_done(runs.runs_root(workdir, name, o, f))
                  for name in config.configurations for o in config.outer_folds
                  for f in config.folds)
    lines = [
        "# Xeno-learning study report", "",
        f"Dataset `{config.dataset}`; configurations {', '.join(config.configurations)}; "
        f"outer folds {list(config.outer_folds)}, inner folds {list(config.folds)} "
        f"({trained} trained networks{', quick settings' if config.quick else ''}). "
        "Scores are class-level (image, then subject, then class) with 95% subject-bootstrap "
        "intervals (1000 resamples); DSC and NSD count only valid (annotated) pixels.", "",
        "## Key results", "", markdown_table(key_rows(evaluations)), "",
    ]
    differences = difference_rows(evaluations)
    if differences:
        lines += ["## Xeno-learning minus baseline", "", markdown_table(differences), ""]
    full_labels = full_label_rows(evaluations)
    if full_labels:
        lines += [
            "## Full labels", "",
            "Simulated images know every pixel's class. Inside a polygon annotation (the "
            "paper's scores) every other pixel is invalid, so predicting the annotated organ "
            "everywhere scores DSC 1; against the full labels it has a low precision and calls "
            "most other tissue that organ. Precision is n/a where no pixel was predicted as "
            "the organ.", "", markdown_table(full_labels), ""]
    for test_set in dict.fromkeys(e.test_set for e in evaluations):
        lines += [f"## Test set `{test_set}`", "", "DSC:", "",
                  class_table(evaluations, test_set, "dice"), ""]
        if any(e.test_set == test_set and "nsd" in e.table.scores for e in evaluations):
            lines += ["NSD:", "", class_table(evaluations, test_set, "nsd"), ""]
    plots = [
        ("DSC against StO2 (kidney)", "dsc_vs_sto2.png",
         lambda p: plot_dsc_against_sto2(evaluations, p)),
        ("ICG improvement per organ", "icg_improvement.png",
         lambda p: plot_icg_improvement(evaluations, p)),
        ("Example predictions", "examples.png",
         lambda p: plot_examples(workdir, evaluations, p)),
    ]
    lines += ["## Figures", ""]
    for title, file, plot in plots:
        if plot(figures / file):
            lines += [f"### {title}", "", f"![{title}](figures/{file})", ""]
    lines += spectral_section(config, figures / "analysis")
    path = workdir / "report.md"
    with atomic_write(path, text=True) as f:
        f.write("\n".join(lines))
    return path
