"""Figures of the simulator: organ spectra per species, pathological changes, example scenes.

`render(folder)` writes three PNG files (computed from freshly simulated images):

- ``simulator_spectra.png``: mean L1 spectrum of every organ, one panel per species;
- ``simulator_changes.png``: malperfused minus physiological mean L1 spectrum of kidney, liver
  and colon per species (the same scenes simulated in both states);
- ``simulator_scenes.png``: false-colour renderings next to their label maps.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from xeno_jax.labels import SPECIES_12
from xeno_jax.simulate.generate import generate_batch, make_spec, stack_specs
from xeno_jax.simulate.species import species_names
from xeno_jax.spectra import l1_normalize, tivita_wavelengths

SPECIES = tuple(species_names())  # the simulator's built-in species
ORGANS = tuple(SPECIES_12.index_to_name(i) for i in range(1, SPECIES_12.num_classes))
CHANGED_ORGANS = ("kidney", "liver", "colon")
SIZE = dict(height=96, width=128)
BATCH = 8  # every call simulates batches of this size: one compilation


def _simulate(species: str, state: str, foci, seed: int, affected=("kidney",)):
    """Images focused on each of `foci` (padded to whole batches, then cut back)."""
    count = -(-len(foci) // BATCH) * BATCH
    specs = [make_spec(species, subject=i, state=state, severity=0.8,
                       focus=foci[i % len(foci)], affected=affected) for i in range(count)]
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(count)]
    cubes, labels = [], []
    for start in range(0, count, BATCH):
        out = generate_batch(jnp.stack(keys[start:start + BATCH]),
                             stack_specs(specs[start:start + BATCH]), **SIZE)
        cubes.append(np.asarray(out["cube"]))
        labels.append(np.asarray(out["labels"]))
    return np.concatenate(cubes)[:len(foci)], np.concatenate(labels)[:len(foci)]


def false_colour(cube: np.ndarray) -> np.ndarray:
    """RGB from the bands nearest 650, 560 and 500 nm, scaled to the 99th percentile."""
    wavelengths = tivita_wavelengths()
    rgb = cube[..., [int(np.argmin(np.abs(wavelengths - nm))) for nm in (650, 560, 500)]]
    return np.clip(rgb / np.percentile(rgb, 99), 0, 1) ** 0.7


def render(folder: str | Path) -> list[Path]:
    """Writes the simulator figures into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wavelengths = tivita_wavelengths()
    paths = []

    fig, axes = plt.subplots(1, len(SPECIES), figsize=(15, 4), sharey=True)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(ORGANS)))
    for ax, species in zip(axes, SPECIES, strict=True):
        cubes, labels = _simulate(species, "physiological", ORGANS, seed=1)
        spectra = l1_normalize(cubes)
        for colour, organ in zip(colours, ORGANS, strict=True):
            mask = labels == SPECIES_12.name_to_index(organ)
            if mask.any():
                ax.plot(wavelengths, spectra[mask].mean(0), color=colour, label=organ)
        ax.set(title=f"{species}: mean L1 spectra (physiological)", xlabel="wavelength [nm]")
    axes[0].set_ylabel("L1-normalised reflectance")
    axes[-1].legend(fontsize=7, ncol=2)
    paths.append(folder / "simulator_spectra.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(CHANGED_ORGANS), figsize=(15, 4), sharey=True)
    for ax, organ in zip(axes, CHANGED_ORGANS, strict=True):
        index = SPECIES_12.name_to_index(organ)
        for species in SPECIES:
            foci = (organ,) * 8
            sick, labels = _simulate(species, "malperfusion", foci, seed=2, affected=(organ,))
            healthy, _ = _simulate(species, "physiological", foci, seed=2, affected=(organ,))
            mask = labels == index
            change = l1_normalize(sick)[mask].mean(0) - l1_normalize(healthy)[mask].mean(0)
            ax.plot(wavelengths, change, label=species)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(title=f"{organ}: malperfused - physiological", xlabel="wavelength [nm]")
        ax.legend()
    axes[0].set_ylabel("change of the mean L1 spectrum")
    paths.append(folder / "simulator_changes.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(SPECIES), figsize=(12, 6.5))
    cmap = plt.get_cmap("tab20", SPECIES_12.invalid_index + 1)
    for k, species in enumerate(SPECIES):
        cubes, labels = _simulate(species, "physiological", ("kidney",), seed=3 + k)
        axes[0, k].imshow(false_colour(cubes[0]))
        axes[0, k].set_title(f"{species} (false colour)")
        axes[1, k].imshow(labels[0], cmap=cmap, vmin=0, vmax=SPECIES_12.invalid_index,
                          interpolation="nearest")
        axes[1, k].set_title("labels (12 = invalid)")
    for ax in axes.ravel():
        ax.axis("off")
    paths.append(folder / "simulator_scenes.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
