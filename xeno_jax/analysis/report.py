"""Tables (markdown and CSV) and figures of the spectral analyses, for any dataset.

`write_analyses` runs the chosen analyses on an `OrganSpectra` table and writes
``<name>.csv`` tables and ``<name>*.png`` figures into a folder; it returns the markdown
section, which ``experiments/analyze.py`` writes as ``analysis.md`` and the study report
embeds.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from xeno_jax.analysis import pca, spectra, transfer, variance
from xeno_jax.analysis.extract import STO2_BINS, OrganSpectra
from xeno_jax.io import atomic_write
from xeno_jax.labels import SPECIES_12
from xeno_jax.spectra import tivita_wavelengths

ANALYSES = ("spectra", "transfer", "variance", "pca")
_COLOURS = plt.get_cmap("tab10").colors


def _name(label: int) -> str:
    return SPECIES_12.index_to_name(int(label))


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Rows as CSV; (value, low, high) cells become three columns."""
    flat = []
    for row in rows:
        out = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                out |= {key: value[0], f"{key}_low": value[1], f"{key}_high": value[2]}
            else:
                out[key] = value
        flat.append(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(dict.fromkeys(k for row in flat for k in row)))
    writer.writeheader()
    writer.writerows(flat)
    with atomic_write(path, text=True) as f:
        f.write(buffer.getvalue())


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _panels(count: int, width: float = 3.6, height: float = 2.8):
    columns = min(count, 4)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                             squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.axis("off")
    return fig, axes.ravel()


def _pathology_organs(table: OrganSpectra) -> dict[str, list[int]]:
    """Per pathological state: the organs imaged in it (in any species)."""
    states = sorted(set(table.perfusion_state) - {transfer.PHYSIOLOGICAL})
    return {s: sorted(set(table.where(perfusion_state=s).label.tolist())) for s in states}


# -- the analyses -----------------------------------------------------------------------------

def _spectra(table, species, folder, link, resamples, seed):
    groups = spectra.group_spectra(table, statistic="median", resamples=resamples, seed=seed)
    means = {(g.species, g.label, g.perfusion_state): g
             for g in spectra.group_spectra(table, statistic="mean", resamples=resamples,
                                            seed=seed)}
    wavelengths = tivita_wavelengths()
    rows = []
    for g in groups:
        for statistic, group in (("median", g), ("mean", means[g.species, g.label,
                                                               g.perfusion_state])):
            rows += [{"species": g.species, "organ": _name(g.label),
                      "perfusion_state": g.perfusion_state, "statistic": statistic,
                      "subjects": g.subjects, "images": g.images, "wavelength_nm": float(w),
                      "value": (float(v), float(lo), float(hi))}
                     for w, v, lo, hi in zip(wavelengths, group.spectrum, group.low, group.high,
                                             strict=True)]
    write_csv(folder / "spectra.csv", rows)
    lines = ["## Organ spectra", "",
             "Median L1 spectra per (species, organ, perfusion state): per-image median of the "
             "organ's pixels, averaged over each subject's images, then over subjects; bands: "
             "95% subject bootstrap. Mean spectra (per-image pixel means) and all values: "
             "`spectra.csv`.", ""]
    for state in sorted({g.perfusion_state for g in groups}):
        subset = [g for g in groups if g.perfusion_state == state]
        labels = sorted({g.label for g in subset})
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels, strict=False):
            for k, sp in enumerate(species):
                for g in subset:
                    if g.species == sp and g.label == label:
                        ax.plot(wavelengths, g.spectrum, color=_COLOURS[k], label=sp)
                        ax.fill_between(wavelengths, g.low, g.high, color=_COLOURS[k],
                                        alpha=0.25)
            ax.set_title(f"{_name(label)} ({state})", fontsize=9)
            ax.set_xlabel("wavelength [nm]", fontsize=8)
        axes[0].legend(fontsize=7)
        _save(fig, folder / f"spectra_{state}.png")
        lines += [f"![spectra, {state}]({link}spectra_{state}.png)", ""]
    lines += [markdown_table([{"species": g.species, "organ": _name(g.label),
                               "perfusion state": g.perfusion_state, "subjects": g.subjects,
                               "images": g.images} for g in groups]), ""]
    return lines


def _transfer(table, species, folder, link, resamples, seed):
    found = transfer.changes(table, species, resamples=resamples, seed=seed)
    rows = [{"organ": _name(r["label"]), **{k: v for k, v in r.items() if k != "label"}}
            for r in transfer.pair_rows(found, species)]
    lines = ["## Transfer similarity", "",
             "Pathological change = group median spectrum in the pathological state minus the "
             "physiological one (image -> subject -> group). Per species pair (a, b): cosine "
             "of the changes, magnitude ratio |change b| / |change a|, L2 distance of the "
             "physiological spectra, each with a 95% subject-bootstrap interval; change "
             "magnitudes and the RMS distance of a species' physiological subject spectra to "
             "their mean (subject spread), all L2 norms of L1 spectra.", ""]
    if not rows:
        return [*lines, "_no organ has a pathological state in two species_", ""]
    write_csv(folder / "transfer.csv", rows)
    lines += [markdown_table(rows), ""]
    wavelengths = tivita_wavelengths()
    for pathology in sorted({c.pathology for c in found}):
        labels = sorted({c.label for c in found if c.pathology == pathology})
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels, strict=False):
            for k, sp in enumerate(species):
                for c in found:
                    if (c.species, c.label, c.pathology) == (sp, label, pathology):
                        low, high = spectra.interval(c.change_samples)
                        ax.plot(wavelengths, c.change, color=_COLOURS[k], label=sp)
                        ax.fill_between(wavelengths, low, high, color=_COLOURS[k], alpha=0.25)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(f"{_name(label)}: {pathology} - physiological", fontsize=9)
            ax.set_xlabel("wavelength [nm]", fontsize=8)
        axes[0].legend(fontsize=7)
        _save(fig, folder / f"transfer_{pathology}.png")
        lines += [f"![changes, {pathology}]({link}transfer_{pathology}.png)", ""]
    return lines


def _variance(table, species, folder, link, resamples, seed):
    result = variance.decompose(table, resamples=resamples, seed=seed)
    overall = {"organ": "all (median over organs and wavelengths)", **result.overall()}
    per_organ = [{"organ": _name(r["label"]), **{k: v for k, v in r.items() if k != "label"}}
                 for r in result.organ_summary()]
    write_csv(folder / "variance.csv", [overall, *per_organ])
    wavelengths = tivita_wavelengths()
    write_csv(folder / "variance_per_wavelength.csv", [
        {"organ": _name(label), "wavelength_nm": float(w),
         **{c: float(result.fractions[o, i, k]) for k, c in enumerate(variance.COMPONENTS)}}
        for o, label in enumerate(result.labels) for i, w in enumerate(wavelengths)])
    fig, axes = _panels(len(variance.COMPONENTS))
    for k, (ax, component) in enumerate(zip(axes, variance.COMPONENTS, strict=True)):
        for o, label in enumerate(result.labels):
            ax.plot(wavelengths, result.fractions[o, :, k], linewidth=0.8, label=_name(label))
        ax.plot(wavelengths, np.median(result.fractions[:, :, k], axis=0), color="black",
                linewidth=2, label="median")
        ax.set(title=f"{component} fraction", ylim=(0, 1), xlabel="wavelength [nm]")
    axes[0].legend(fontsize=6, ncol=2)
    _save(fig, folder / "variance.png")
    return ["## Variance decomposition", "",
            "Physiological organ spectra per organ and wavelength: REML fit of a linear mixed "
            "model with random species, subject (in species) and image (in subject) effects on "
            f"the medians of {table.parts.shape[1]} disjoint pixel subsets per image (the "
            "residual: variation within an image). Fractions of the total variance: median "
            "over wavelengths (per organ) or over organs and wavelengths; 95% intervals from "
            f"{resamples} resamples of the subjects within each species.", "",
            markdown_table([overall, *per_organ]), "",
            f"![variance fractions]({link}variance.png)", ""]


def _pca(table, species, folder, link):
    lines = ["## PCA and StO2", "",
             "First two principal components of the per-image median spectra of each organ "
             "(all species and states); small dots: images, circles: subject centroids, "
             "arrows: physiological -> pathological centroid per species. StO2: Tivita index "
             "of the organ's pixels, histograms averaged over subjects.", ""]
    markers = {}
    for pathology, labels in _pathology_organs(table).items():
        fig, axes = _panels(len(labels), 3.6, 3.2)
        for ax, label in zip(axes, labels, strict=False):
            rows = table.where(label=label,
                               perfusion_state=[transfer.PHYSIOLOGICAL, pathology])
            if len(rows) <= 2:
                continue
            projection = pca.principal_components(rows, label)
            for k, sp in enumerate(species):
                mask = projection.rows.species == sp
                for state, marker in ((transfer.PHYSIOLOGICAL, "o"), (pathology, "x")):
                    markers[state] = marker
                    m = mask & (projection.rows.perfusion_state == state)
                    ax.scatter(*projection.scores[m].T, s=4, color=_COLOURS[k], marker=marker,
                               alpha=0.3)
            centres = {(t["species"], t["state"]): t for t in pca.trajectories(projection)}
            for k, sp in enumerate(species):
                for state in (transfer.PHYSIOLOGICAL, pathology):
                    if (sp, state) in centres:
                        ax.scatter(*centres[sp, state]["subjects"].T, s=18,
                                   facecolors="none", edgecolors=_COLOURS[k])
                if (sp, transfer.PHYSIOLOGICAL) in centres and (sp, pathology) in centres:
                    start = centres[sp, transfer.PHYSIOLOGICAL]["centroid"]
                    end = centres[sp, pathology]["centroid"]
                    ax.annotate("", end, start, arrowprops={"arrowstyle": "->", "lw": 2,
                                                             "color": _COLOURS[k]})
                    ax.plot([], [], color=_COLOURS[k], label=sp)
            ax.set_title(f"{_name(label)}: {pathology}", fontsize=9)
            ax.set_xlabel(f"PC1 ({projection.explained[0]:.0%})", fontsize=8)
            ax.set_ylabel(f"PC2 ({projection.explained[1]:.0%})", fontsize=8)
        axes[0].legend(fontsize=7)
        _save(fig, folder / f"pca_{pathology}.png")
        lines += [f"![PCA, {pathology}]({link}pca_{pathology}.png)", ""]

    distribution = pca.sto2_distribution(table)
    rows = [{"species": d["species"], "organ": _name(d["label"]),
             "perfusion_state": d["perfusion_state"], "subjects": d["subjects"],
             "median StO2": d["median"],
             f"share in [{pca.LOW_STO2[0]}, {pca.LOW_STO2[1]})": d["share_low"],
             f"share >= {pca.HIGH_STO2}": d["share_high"]} for d in distribution]
    write_csv(folder / "sto2.csv", rows)
    organs = _pathology_organs(table)
    shown = {label for labels in organs.values() for label in labels}
    centres = (STO2_BINS[:-1] + STO2_BINS[1:]) / 2
    for pathology, labels in organs.items():
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels, strict=False):
            for d in distribution:
                if d["label"] != label or d["perfusion_state"] not in (
                        transfer.PHYSIOLOGICAL, pathology):
                    continue
                k = species.index(d["species"]) if d["species"] in species else 0
                style = "-" if d["perfusion_state"] == transfer.PHYSIOLOGICAL else "--"
                ax.plot(centres, d["histogram"], style, color=_COLOURS[k],
                        label=f"{d['species']}, {d['perfusion_state']}")
            ax.set_title(f"{_name(label)}: StO2 index", fontsize=9)
            ax.set_xlabel("StO2 index", fontsize=8)
        axes[0].legend(fontsize=6)
        _save(fig, folder / f"sto2_{pathology}.png")
        lines += [f"![StO2, {pathology}]({link}sto2_{pathology}.png)", ""]
    lines += [markdown_table([r for r, d in zip(rows, distribution, strict=True)
                              if d["label"] in shown]), ""]
    return lines


def write_analyses(table: OrganSpectra, species: Sequence[str], folder: str | Path, *,
                   analyses: Sequence[str] = ANALYSES, resamples: int = 1000,
                   variance_resamples: int = 20, seed: int = 0, link: str = "") -> str:
    """Runs `analyses` on `table`, writes their tables and figures into `folder`.

    Args:
      table: per-image organ spectra (`extract`).
      species: species in the order of tables and colours.
      folder: output folder (created).
      analyses: any of `ANALYSES`.
      resamples: subject-bootstrap resamples of spectra and transfer similarity.
      variance_resamples: resamples (refits) of the variance decomposition.
      seed: seeds every resampling.
      link: prefix of the figure links in the returned markdown.

    Returns:
      The markdown section.
    """
    unknown = set(analyses) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; known: {ANALYSES}")
    missing = set(species) - set(table.species)
    if missing:
        raise ValueError(f"species {sorted(missing)} have no annotated organ in the table")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    if "spectra" in analyses:
        lines += _spectra(table, species, folder, link, resamples, seed)
    if "transfer" in analyses:
        lines += _transfer(table, species, folder, link, resamples, seed)
    if "variance" in analyses:
        lines += _variance(table, species, folder, link, variance_resamples, seed)
    if "pca" in analyses:
        lines += _pca(table, species, folder, link)
    return "\n".join(lines)
