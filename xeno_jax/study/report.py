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

from data_builders import SPECIES
from xeno_jax import analysis
from xeno_jax.analysis.report import markdown_table
from xeno_jax.evaluate import ScoreTable, bootstrap_class_level, relative_drop
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
    network: str = ""  # "": the fold ensembles; else one network, "outer_<i>/fold_<k>"


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


def _role(name: str) -> str:
    return parse_configuration(name).role


# The key table's columns: (title, test set, organs, metric).
KEY_COLUMNS = (
    ("kidney DSC, physiological", "physiological", ("kidney",), "dice"),
    ("kidney DSC, malperfused", "malperfusion", ("kidney",), "dice"),
    ("kidney DSC, malperfused, full labels", "malperfusion", ("kidney",), "full_dice"),
    ("kidney precision, malperfused, full labels", "malperfusion", ("kidney",),
     "full_precision"),
    ("other tissue called kidney, physiological", "physiological", ("kidney",),
     "full_false_share"),
    ("ICG-organ DSC, ICG", "icg", ICG_LABELS, "dice"),
)


def _key_value(table: ScoreTable, organs: Sequence[str], metric: str
               ) -> tuple[float, float, float] | None:
    if metric not in table.scores or not len(table) or np.isnan(table.scores[metric]).all():
        return None
    return label_summary(table, [SPECIES_12.name_to_index(n) for n in organs], metric)


def key_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """Per configuration (and its role): kidney DSC on physiological and malperfused images
    (inside the annotations and against the full labels), kidney precision, the share of
    other tissue called kidney, the class-mean DSC and the ICG organs' DSC, with subject-
    bootstrap intervals (columns without scores are left out)."""
    rows = []
    for name in dict.fromkeys(e.configuration for e in evaluations):
        tables = {e.test_set: e.table for e in evaluations if e.configuration == name}
        row = {"configuration": name, "role": _role(name)}
        for title, test_set, organs, metric in KEY_COLUMNS:
            value = _key_value(tables[test_set], organs, metric) if test_set in tables else None
            if value is not None:
                row[title] = _fmt(*value)
        if "physiological" in tables:
            scores = bootstrap_class_level(tables["physiological"], "dice")
            row["class-mean DSC, physiological"] = _fmt(
                scores.class_mean, scores.class_mean_ci_low, scores.class_mean_ci_high)
        rows.append(row)
    return _fill(rows)


def _fill(rows: list[dict[str, str]], columns: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows with `columns` (default: every column of any row, in first-seen order), n/a where
    a row lacks one."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k, "n/a") for k in columns} for row in rows]


def network_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """The key columns of each configuration over its networks scored alone: mean [min,
    max] over networks of each network's class-level score."""
    rows = []
    for name in dict.fromkeys(e.configuration for e in evaluations if e.network):
        mine = [e for e in evaluations if e.configuration == name and e.network]
        networks = list(dict.fromkeys(e.network for e in mine))
        row = {"configuration": name, "role": _role(name), "networks": str(len(networks))}
        for title, test_set, organs, metric in (
                *KEY_COLUMNS, ("class-mean DSC, physiological", "physiological", None, "dice")):
            values = []
            for network in networks:
                table = next((e.table for e in mine
                              if e.network == network and e.test_set == test_set), None)
                if table is None:
                    continue
                if organs is None:
                    values.append(bootstrap_class_level(table, metric).class_mean)
                else:
                    value = _key_value(table, organs, metric)
                    if value is not None:
                        values.append(value[0])
            values = np.asarray(values, float)
            if values.size and np.isfinite(values).any():
                row[title] = _fmt(np.nanmean(values), np.nanmin(values), np.nanmax(values))
        rows.append(row)
    return _fill(rows)


def control_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, str]]:
    """Each xeno-learning transfer minus each control of the same target and pathology in the
    study (the baseline, random maps, the rule, the oracle), on the key columns."""
    names = list(dict.fromkeys(e.configuration for e in evaluations))
    tables = {(e.configuration, e.test_set): e.table for e in evaluations}
    rows = []
    for name in names:
        parsed = parse_configuration(name)
        if parsed.role != "xeno-learning":
            continue
        pathology, source, target = parsed.pathology, parsed.source, parsed.target
        controls = [f"baseline_{target}",
                    f"projected-random-{pathology}_{source}2{target}",
                    f"rule-{pathology}_{source}2{target}",
                    f"projected-{pathology}_{target}2{target}"]
        for control in controls:
            if control not in names:
                continue
            row = {"configuration": name, "minus": control, "role": _role(control)}
            for title, test_set, organs, metric in KEY_COLUMNS:
                a, b = tables.get((name, test_set)), tables.get((control, test_set))
                if a is None or b is None:
                    continue
                va, vb = _key_value(a, organs, metric), _key_value(b, organs, metric)
                if va is not None and vb is not None and np.isfinite(va[0] - vb[0]):
                    row[title] = f"{va[0] - vb[0]:+.3f}"
            rows.append(row)
    return _fill(rows)


def cross_species_rows(evaluations: Sequence[Evaluation], species_of: dict[str, str]
                       ) -> list[dict[str, str]]:
    """The relative class-mean DSC change of each baseline from its own species'
    (physiological) test images to every other species' images (the paper's cross-species
    drop, `relative_drop`; negative for a drop). `species_of` maps subjects to species."""
    tables = {(e.configuration, e.test_set): e.table for e in evaluations}
    rows, seen = [], set()
    for name in dict.fromkeys(e.configuration for e in evaluations):
        parsed = parse_configuration(name)
        own, other = tables.get((name, "physiological")), tables.get((name, "cross_species"))
        if parsed.role != "baseline" or own is None or other is None or not len(other):
            continue
        own_mean = bootstrap_class_level(own, "dice").class_mean
        row = {"configuration": name, f"class-mean DSC, {parsed.target}": f"{own_mean:.3f}"}
        species = np.array([species_of.get(s, "") for s in other.subject])
        seen |= {parsed.target, *species} - {""}
        for sp in sorted(set(species) - {""}):
            mean = bootstrap_class_level(other.select(species == sp), "dice").class_mean
            row[f"class-mean DSC, {sp}"] = f"{mean:.3f}"
            row[f"relative change, {sp}"] = f"{float(relative_drop(own_mean, mean)):+.3f}"
        rows.append(row)
    # Columns species by species (each row's own species has no relative change).
    return _fill(rows, ["configuration", *(f"{what}, {sp}" for sp in sorted(seen)
                                           for what in ("class-mean DSC", "relative change"))])


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
    """Each projected configuration minus the baseline of its target species, per test set."""
    by_key = {(e.configuration, e.test_set): e.table for e in evaluations}
    rows = []
    for (name, test_set), table in by_key.items():
        parsed = parse_configuration(name)
        baseline = by_key.get((f"baseline_{parsed.target}", test_set))
        if not parsed.source or baseline is None:
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


def subject_species(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Every physiological subject's species, from the catalogs of the study's datasets."""
    catalog = datasets.ensure_catalog(
        study_species(config), config.dataset, config.data_dir)
    return {r.subject: r.species for r in catalog.records}


def study_species(config: ml_collections.ConfigDict) -> list[str]:
    return list(SPECIES) if "cross_species" in config.test_sets else sorted(
        {parse_configuration(n).target for n in config.configurations})


def write_report(config: ml_collections.ConfigDict, workdir: Path,
                 evaluations: Sequence[Evaluation]) -> Path:
    """Writes ``<workdir>/report.md`` (and ``figures/``); returns its path.

    `evaluations` of single networks (``network`` set) make the across-networks table; every
    other table is of the fold ensembles."""
    figures = workdir / "figures"
    figures.mkdir(exist_ok=True)
    networks = [e for e in evaluations if e.network]
    evaluations = [e for e in evaluations if not e.network]
    trained_as = dict.fromkeys(parse_configuration(n).trained_as for n in config.configurations)
    trained = sum(runs.is_done(runs.runs_root(workdir, name, o, f))
                  for name in trained_as for o in config.outer_folds for f in config.folds)
    lines = [
        "# Xeno-learning study report", "",
        f"Dataset `{config.dataset}`; configurations {', '.join(config.configurations)}; "
        f"outer folds {list(config.outer_folds)}, inner folds {list(config.folds)} "
        f"({trained} trained networks{', quick settings' if config.quick else ''}). "
        "Scores are class-level (image, then subject, then class) with 95% subject-bootstrap "
        "intervals (1000 resamples) of each outer fold's ensemble; DSC and NSD count only valid "
        "(annotated) pixels, full-label scores every pixel of simulated images. Subjects whose "
        "images a projection bank learns from are in no test set.", "",
        "## Key results", "", markdown_table(key_rows(evaluations)), "",
    ]
    controls = control_rows(evaluations)
    if controls:
        lines += [
            "## Xeno-learning minus its controls", "",
            "Differences of the key results' means (xeno-learning minus the control; positive: "
            "xeno-learning scores higher). Controls: the baseline; random maps of the learnt "
            "maps' sizes; the rule (the baseline's networks, pixels below the source species' "
            "StO2 threshold relabelled as the organ); the oracle (maps learnt in the target "
            "species). For the share of other tissue called kidney, lower is better.", "",
            markdown_table(controls), ""]
    across = network_rows(networks)
    if across:
        lines += [
            "## Across networks", "",
            "Each network of a configuration scored alone: mean [min, max] over the networks "
            "of their class-level scores (the intervals above resample subjects).", "",
            markdown_table(across), ""]
    differences = difference_rows(evaluations)
    if differences:
        lines += ["## Transfers and controls minus baseline", "", markdown_table(differences),
                  ""]
    full_labels = full_label_rows(evaluations)
    if full_labels:
        lines += [
            "## Full labels", "",
            "Simulated images know every pixel's class. Inside a polygon annotation (the "
            "paper's scores) every other pixel is invalid, so predicting the annotated organ "
            "everywhere scores DSC 1; against the full labels it has a low precision and calls "
            "most other tissue that organ. Precision is n/a where no pixel was predicted as "
            "the organ.", "", markdown_table(full_labels), ""]
    drops = cross_species_rows(evaluations, subject_species(config)) if any(
        e.test_set == "cross_species" for e in evaluations) else []
    if drops:
        lines += ["## Cross-species performance", "",
                  "Each baseline's class-mean DSC on its own species' test images and on every "
                  "other species' physiological images, and the relative change (other - own) / "
                  "own.", "", markdown_table(drops), ""]
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
