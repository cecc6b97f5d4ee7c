"""The divergence sweep: where, if anywhere, xeno-learning beats its controls.

The target species' pathological responses are placed at several ``response_divergence``
values from the source species' (diverged datasets, ``data_builders``; 0: the source's
responses, 1: the target's own). Each value is a point: a study (`run_study`) in
``<workdir>/divergence_<d>`` whose test sets are the diverged dataset's
(``config.test_dataset``). Networks that train on physiological images only (the baseline, the
transfer, the random control; the rule uses the baseline's) do not depend on the divergence:
every point links their run folders to ``<workdir>/runs``, so they train once and each point
reuses them. Only the oracle, whose maps are learnt on the diverged pathological images,
trains per point. A point's summary adds the measured transfer similarity (the cosine of the
source's and the target's pathological change of the organ, `xeno_jax.analysis.transfer`).

Every step is resumable like the study: finished runs, banks, score tables and similarities
are reused; ``<workdir>/report.md`` (table, CSV, figure) is written from them each time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from data_builders.species_builder import diverged_config_name
from xeno_jax import analysis
from xeno_jax.analysis.report import markdown_table, write_csv
from xeno_jax.data import Catalog
from xeno_jax.evaluate import ScoreTable, class_level
from xeno_jax.io import atomic_write
from xeno_jax.labels import PATHOLOGY_LABELS, SPECIES_12
from xeno_jax.study import datasets
from xeno_jax.study.configurations import parse_configuration
from xeno_jax.study.study import run_study

SIMILARITY_FILE = "similarity.json"
# What the sweep reports of each configuration on the target's pathological images.
METRICS = (("full_dice", "DSC, full labels"), ("full_precision", "precision, full labels"),
           ("dice", "DSC, annotation"))
COMPARISONS = (("xeno-learning", "random maps"), ("xeno-learning", "rule"),
               ("xeno-learning", "baseline"), ("oracle", "xeno-learning"))


def point_dataset(config: ml_collections.ConfigDict, divergence: float) -> str:
    """The test dataset of a point: the study's own at divergence 1 (the same images), else
    the diverged one."""
    if divergence == 1:
        return config.study.dataset
    return diverged_config_name(config.study.dataset, divergence, config.source)


def point_folder(workdir: str | os.PathLike, divergence: float) -> Path:
    return Path(workdir) / f"divergence_{np.format_float_positional(divergence, trim='-')}"


def point_config(config: ml_collections.ConfigDict, divergence: float
                 ) -> ml_collections.ConfigDict:
    """The study config of one point."""
    study = copy.deepcopy(config.study)
    with study.unlocked():
        study.test_dataset = point_dataset(config, divergence)
    return study


def shared_configurations(study: ml_collections.ConfigDict) -> list[str]:
    """The trained configurations whose networks do not depend on the point (all but the
    oracle)."""
    trained = dict.fromkeys(parse_configuration(n).trained_as for n in study.configurations)
    return [n for n in trained if parse_configuration(n).role != "oracle"]


def link_shared_runs(study: ml_collections.ConfigDict, workdir: Path, point: Path) -> None:
    """``<point>/runs/<configuration>`` -> ``<workdir>/runs/<configuration>`` for every
    shared configuration (made once; an existing folder that is not the link is an error)."""
    for name in shared_configurations(study):
        target = (workdir / "runs" / name).resolve()
        target.mkdir(parents=True, exist_ok=True)
        link = point / "runs" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() != target:
                raise FileExistsError(f"{link} exists and is not a link to {target}; the "
                                      "sweep shares these runs between its points")
            continue
        link.symlink_to(target, target_is_directory=True)


def transfer_similarity(config: ml_collections.ConfigDict, divergence: float,
                        point: Path) -> dict:
    """The cosine (with its subject-bootstrap interval) of the source's and the diverged
    target's pathological change of the pathology's organ; cached in the point's folder."""
    path = point / SIMILARITY_FILE
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    study, pathology = config.study, config.pathology
    state = "icg" if pathology == "ICG" else "malperfusion"
    refs = [f"{datasets.dataset_name(config.source, study.dataset)}:{s}"
            for s in ("physiological", state)]
    refs += [f"{datasets.dataset_name(config.target, point_dataset(config, divergence))}:{s}"
             for s in ("physiological", state)]
    for species, dataset in ((config.source, study.dataset),
                             (config.target, point_dataset(config, divergence))):
        datasets.ensure_dataset(species, dataset, study.data_dir)
    catalog = Catalog(refs, study.data_dir)
    table = analysis.extract(catalog, catalog.records)
    organ = SPECIES_12.name_to_index(PATHOLOGY_LABELS[pathology][0])
    rows = analysis.transfer.pair_rows(analysis.transfer.changes(
        table, [config.source, config.target]), [config.source, config.target])
    row = next(r for r in rows if r["label"] == organ and r["pathology"] == state)
    record = {"divergence": divergence, "cosine": list(row["cosine"]),
              "magnitude_ratio": list(row["magnitude_ratio"])}
    with atomic_write(path, text=True) as f:
        json.dump(record, f)
    return record


def organ_score(table: ScoreTable, organ: int, metric: str) -> float:
    """Class-level mean of one organ (NaN if it has no scores); no bootstrap needed."""
    scores = class_level(table, metric)
    rows = np.flatnonzero(scores.labels == organ)
    return float(scores.mean[rows[0]]) if rows.size else float("nan")


def point_scores(config: ml_collections.ConfigDict, point: Path) -> dict[str, dict]:
    """``{role: {"configuration", metric: (ensemble, [each network])}}`` on the target's
    pathological images."""
    organ = SPECIES_12.name_to_index(PATHOLOGY_LABELS[config.pathology][0])
    test_set = "icg" if config.pathology == "ICG" else "malperfusion"
    found = {}
    for name in config.study.configurations:
        folder = point / "scores" / name
        if not (folder / f"{test_set}.npz").exists():
            continue
        networks = sorted((folder / "networks").glob(f"*/{test_set}.npz"))
        tables = [ScoreTable.load(folder / f"{test_set}.npz")] + [
            ScoreTable.load(p) for p in networks]
        entry = {"configuration": name}
        for metric, _ in METRICS:
            values = [organ_score(t, organ, metric) for t in tables]
            entry[metric] = (values[0], values[1:])
        found[parse_configuration(name).role] = entry
    return found


def _cell(ensemble: float, networks: Sequence[float]) -> str:
    if not np.isfinite(ensemble):
        return "n/a"
    values = np.asarray(networks, float)
    if not values.size or not np.isfinite(values).any():
        return f"{ensemble:.3f}"
    return f"{ensemble:.3f} (networks {np.nanmin(values):.3f} to {np.nanmax(values):.3f})"


def sweep_rows(points: Sequence[tuple[float, dict, dict]]) -> list[dict[str, str]]:
    """One row per point: the divergence, the measured cosine, each role's full-label DSC
    (the ensemble's, and the range of its networks alone) and the differences `COMPARISONS`
    of the ensembles."""
    rows = []
    for divergence, similarity, scores in points:
        row = {"divergence": np.format_float_positional(divergence, trim="-"),
               "cosine": "{:.3f} [{:.3f}, {:.3f}]".format(*similarity["cosine"])}
        for role, entry in scores.items():
            row[f"{role}: DSC, full labels"] = _cell(*entry["full_dice"])
        for metric, title in METRICS:
            for a, b in COMPARISONS:
                if a in scores and b in scores:
                    delta = scores[a][metric][0] - scores[b][metric][0]
                    row[f"{a} - {b}: {title}"] = f"{delta:+.3f}" if np.isfinite(delta) else "n/a"
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k, "n/a") for k in columns} for row in rows]


def plot_sweep(points: Sequence[tuple[float, dict, dict]], path: Path) -> None:
    """The gain of the transfer over each control (full-label DSC) against the cosine."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cosines = np.array([p[1]["cosine"] for p in points])
    for a, b in COMPARISONS[:3]:
        gains = [s[a]["full_dice"][0] - s[b]["full_dice"][0] if a in s and b in s else np.nan
                 for _, _, s in points]
        ax.errorbar(cosines[:, 0], gains, xerr=np.abs(cosines[:, 1:].T - cosines[:, 0]),
                    marker="o", capsize=3, label=f"{a} - {b}")
    for (divergence, _, _), x in zip(points, cosines[:, 0], strict=True):
        ax.annotate(f"d={np.format_float_positional(divergence, trim='-')}", (x, 0),
                    textcoords="offset points", xytext=(0, -14), fontsize=7, ha="center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="cosine of the source's and the target's change (measured)",
           ylabel="kidney DSC on full labels, difference", title="divergence sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              launcher: str = "local", reuse_stale: bool = False) -> Path:
    """Runs (or resumes) every point and writes ``<workdir>/report.md``; returns its path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for divergence in config.divergences:
        point = point_folder(workdir, divergence)
        study = point_config(config, divergence)
        link_shared_runs(study, workdir, point)
        logging.info("divergence %s: study in %s (test dataset %s)", divergence, point,
                     study.test_dataset)
        run_study(study, point, launcher=launcher, reuse_stale=reuse_stale)
        points.append((float(divergence), transfer_similarity(config, divergence, point),
                       point_scores(config, point)))
    rows = sweep_rows(points)
    write_csv(workdir / "sweep.csv", rows)
    plot_sweep(points, workdir / "sweep.png")
    lines = [
        "# Divergence sweep", "",
        f"{config.pathology} of {config.target}, transferred from {config.source}; the "
        f"{config.target}'s pathological responses at response divergences "
        f"{[float(d) for d in config.divergences]} from the {config.source}'s (0: the "
        f"{config.source}'s, 1: the {config.target}'s own). Each point is a study "
        f"(divergence_<d>/report.md) of {', '.join(config.study.configurations)}; the "
        "networks but the oracle's are the same at every point. Scores of the organ on the "
        f"{config.target}'s pathological images: the ensemble's (and the range of the "
        "networks scored alone); differences are of the ensembles. Cosine: measured between the "
        "species' changes, with its subject-bootstrap interval.", "",
        markdown_table(rows), "", "![sweep](sweep.png)", ""]
    path = workdir / "report.md"
    with atomic_write(path, text=True) as f:
        f.write("\n".join(lines))
    return path
