"""Diverged dataset configs: ``<base>-divergence<d>-from-<source>`` (pathological responses
placed relative to another species', for divergence sweeps)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders
from data_builders.species_builder import diverged_config_name
from xeno_jax.data import Catalog, evaluation_batches
from xeno_jax.labels import SPECIES_12
from xeno_jax.study.datasets import ensure_catalog

BASE = "sim_tiny"  # 32 x 40, one image per subject: 40 physiological, 10 malperfused (human)
SAME = diverged_config_name(BASE, 1, "pig")  # "sim_tiny-divergence1-from-pig"
PIGS = diverged_config_name(BASE, 0, "pig")  # the pig's responses on human physiology
KIDNEY = SPECIES_12.name_to_index("kidney")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The data directory with human sim_tiny, its divergence 0 and 1 from the pig, and pig
    sim_tiny; ``{name: builder}``."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builders = {}
    for species, config in [("human", BASE), ("human", SAME), ("human", PIGS), ("pig", BASE)]:
        builder = data_builders.builder(species, config, data_dir=data_dir)
        builder.download_and_prepare()
        builders[f"{species}/{config}"] = builder
    return data_dir, builders


def examples(builder, split):
    return [(row["image_name"].decode(), row["subject"].decode(), np.asarray(row["cube"]))
            for row in builder.as_data_source(split)]


def same_examples(a, b):
    return len(a) == len(b) and all(
        x[:2] == y[:2] and np.array_equal(x[2], y[2]) for x, y in zip(a, b, strict=True))


def test_names_resolve_to_the_base_sizes_with_the_divergence(built):
    data_dir, _ = built
    assert PIGS == "sim_tiny-divergence0-from-pig"
    assert diverged_config_name("sim_small", 0.5, "rat") == "sim_small-divergence0.5-from-rat"
    with pytest.raises(ValueError, match="response divergence -1: expected a finite number >= 0"):
        diverged_config_name("sim_small", -1, "pig")
    name = "sim_small-divergence0.5-from-pig"
    for builder in (data_builders.builder("human", name, data_dir=data_dir),
                    tfds.builder(f"human/{name}", data_dir=data_dir)):
        config = builder.builder_config
        assert (config.name, config.response_divergence, config.response_source) == (
            name, 0.5, "pig")
        assert (config.height, config.width) == (64, 80)
        assert builder.data_dir.endswith(f"human/{name}/{builder.version}")
    own = data_builders.builder("human", "sim_small", data_dir=data_dir).builder_config
    assert (own.response_source, own.response_divergence) == (None, 1.0)


def test_physiological_images_are_the_base_configs(built):
    _, builders = built
    base = examples(builders[f"human/{BASE}"], "physiological")
    assert len(base) == 40
    for config in (SAME, PIGS):
        assert same_examples(examples(builders[f"human/{config}"], "physiological"), base)


def test_divergence_1_gives_the_base_configs_pathological_images(built):
    _, builders = built
    base = examples(builders[f"human/{BASE}"], "malperfusion")
    assert len(base) == 10
    assert same_examples(examples(builders[f"human/{SAME}"], "malperfusion"), base)
    diverged = examples(builders[f"human/{PIGS}"], "malperfusion")
    assert [x[:2] for x in diverged] == [x[:2] for x in base]  # same names and subjects
    assert not any(np.array_equal(x[2], y[2]) for x, y in zip(diverged, base, strict=True))


def kidney_change(builder):
    """Mean L1-normalised spectrum of malperfused minus physiological kidney pixels."""
    def mean_spectrum(split):
        spectra = []
        for row in builder.as_data_source(split):
            cube = np.asarray(row["cube"], np.float32)[
                (np.asarray(row["labels"]) == KIDNEY) & np.asarray(row["valid"])]
            spectra.append(cube / np.abs(cube).sum(-1, keepdims=True))
        return np.concatenate(spectra).mean(0)
    return mean_spectrum("malperfusion") - mean_spectrum("physiological")


def test_divergence_0_moves_the_kidney_change_towards_the_sources(built):
    _, builders = built
    pig = kidney_change(builders[f"pig/{BASE}"])
    own = np.abs(kidney_change(builders[f"human/{BASE}"]) - pig).sum()
    diverged = np.abs(kidney_change(builders[f"human/{PIGS}"]) - pig).sum()
    assert diverged < 0.85 * own  # measured 0.026 against 0.035


def test_catalog_and_evaluation_batches_read_diverged_datasets(built):
    data_dir, _ = built
    refs = [f"human/{PIGS}:physiological", f"human/{PIGS}:malperfusion"]
    catalog = Catalog(refs, data_dir)
    assert len(catalog) == 50
    malperfused = catalog.filter(perfusion_state="malperfusion")
    records, batch = next(evaluation_batches(catalog, malperfused, batch_size=4))
    assert len(records) == 4 and batch["features"].shape == (4, 32, 40, 100)
    study = ensure_catalog(["human"], PIGS, data_dir, splits=None)
    assert sorted(r.image_name for r in study.records) == sorted(
        r.image_name for r in catalog.records)


@pytest.mark.parametrize("name, expected", [
    ("sim_huge-divergence0.5-from-pig", "base config 'sim_huge' is unknown; expected a "
                                        "simulated config"),
    ("tivita-divergence0.5-from-pig", "base config 'tivita' is real data"),
    ("sim_tiny-divergence-0.5-from-pig", "response divergence -0.5 is negative"),
    ("sim_tiny-divergence0.50-from-pig", "(write it '0.5')"),
    ("sim_tiny-divergence1e-3-from-pig", "written as a plain decimal"),
    ("sim_tiny-divergence0.5-from-dog", "unknown source species 'dog'; expected one of "
                                        "['pig', 'rat'"),  # (and species tests register)
    ("sim_tiny-divergence0.5-from-human", "the source species is the dataset's own species"),
    ("sim_tiny-divergence0.5", "expected '<base>-divergence<d>-from-<source>'"),
])
def test_bad_names_say_what_is_expected(name, expected, tmp_path):
    with pytest.raises(ValueError) as raised:
        data_builders.builder("human", name, data_dir=str(tmp_path))
    assert expected in str(raised.value) and repr(name) in str(raised.value)
