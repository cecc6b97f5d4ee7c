"""The spectral analyses, each against an independent formulation on hand-made data."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders
from data_builders.species_builder import TIVITA
from xeno_jax.analysis import pca, spectra, transfer, variance, write_analyses
from xeno_jax.analysis.extract import STO2_BINS, OrganSpectra, extract, image_rows
from xeno_jax.data import Catalog
from xeno_jax.io import tivita

C = 6  # bands of the hand-made spectra


def table(rows):
    """An OrganSpectra from (image, subject, species, state, label, spectrum) tuples."""
    image, subject, species, state, label, values = map(list, zip(*rows, strict=True))
    values = np.asarray(values, np.float32)
    n = len(values)
    return OrganSpectra(
        image_name=np.asarray(image), subject=np.asarray(subject), species=np.asarray(species),
        perfusion_state=np.asarray(state), experiment=np.full(n, "semantic"),
        label=np.asarray(label, np.int32), pixels=np.full(n, 10), mean=values, median=values,
        parts=np.repeat(values[:, None], 2, axis=1), sto2_median=np.full(n, 0.5, np.float32),
        sto2_histogram=np.zeros((n, len(STO2_BINS) - 1), np.int64))


def test_group_spectra_average_images_then_subjects():
    # Subject a: three images (1, 1, 4) -> 2; subject b: one image 4 -> group 3, not 2.5.
    rows = [(f"i{k}", "a", "pig", "physiological", 6, np.full(C, v)) for k, v in
            enumerate((1.0, 1.0, 4.0))] + [("i9", "b", "pig", "physiological", 6, np.full(C, 4.0))]
    (group,) = spectra.group_spectra(table(rows), resamples=200)
    np.testing.assert_allclose(group.spectrum, 3.0)
    assert (group.subjects, group.images) == (2, 4)
    # Resamples of two subjects: both a (2), a and b (3) or both b (4).
    np.testing.assert_allclose([group.low[0], group.high[0]], [2.0, 4.0])


def test_subject_bootstrap_matches_the_plain_bootstrap_distribution():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(12, 1))
    samples = spectra.weighted_group_mean(means, spectra.subject_weights(12, 20000, rng))[:, 0]
    # The bootstrap mean of n values has variance (population variance) / n.
    np.testing.assert_allclose(samples.std(), means.std() / np.sqrt(12), rtol=0.03)
    plain = np.array([rng.choice(means[:, 0], 12).mean() for _ in range(20000)])
    np.testing.assert_allclose(spectra.interval(samples), spectra.interval(plain), atol=0.02)


def test_transfer_similarity_against_numpy_on_a_hand_case():
    rng = np.random.default_rng(1)
    base = {"pig": rng.uniform(size=C), "human": rng.uniform(size=C)}
    delta = {"pig": rng.normal(size=C), "human": rng.normal(size=C)}
    rows = []
    for sp in base:
        for s in range(4):  # identical subjects: every resample gives the same change
            rows.append((f"{sp}{s}h", f"{sp}{s}", sp, "physiological", 6, base[sp]))
            rows.append((f"{sp}{s}m", f"{sp}{s}", sp, "malperfusion", 6,
                         base[sp] + delta[sp]))
    found = transfer.changes(table(rows), ["pig", "human"], resamples=50)
    (row,) = transfer.pair_rows(found, ["pig", "human"])
    a, b = delta["pig"], delta["human"]
    expected_cosine = np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))
    np.testing.assert_allclose(row["cosine"], [expected_cosine] * 3, rtol=1e-5)
    np.testing.assert_allclose(row["magnitude_ratio"],
                               [np.sqrt(np.dot(b, b) / np.dot(a, a))] * 3, rtol=1e-5)
    np.testing.assert_allclose(row["physiological_distance"][0],
                               np.sqrt(np.sum((base["pig"] - base["human"]) ** 2)), rtol=1e-5)
    assert row["subject_spread_a"] == pytest.approx(0.0, abs=1e-6)


def test_transfer_bootstrap_pairs_the_states_of_each_subject():
    # The change is the same in every subject, the level is not: paired resampling keeps the
    # change exact, independent resampling of the two states would not.
    rows = []
    for s, level in enumerate((0.0, 1.0, 5.0)):
        rows.append((f"h{s}", f"s{s}", "rat", "physiological", 6, np.full(C, level)))
        rows.append((f"m{s}", f"s{s}", "rat", "malperfusion", 6, np.full(C, level + 0.5)))
    (change,) = transfer.changes(table(rows), ["rat"], resamples=100)
    np.testing.assert_allclose(change.change_samples, 0.5, rtol=1e-6)


def _nested_data(rng, sd, species=30, subjects=5, images=3, parts=3, responses=1):
    rows, values = [], []
    effects = lambda n: rng.normal(size=(n, responses))
    for p in range(species):
        a = sd[0] * effects(1)
        for s in range(subjects):
            b = sd[1] * effects(1)
            for i in range(int(rng.integers(1, images + 1))):
                c = sd[2] * effects(1)
                for _ in range(int(rng.integers(1, parts + 1))):
                    rows.append((f"p{p}", f"p{p}s{s}", f"p{p}s{s}i{i}"))
                    values.append((2.0 + a + b + c + sd[3] * effects(1))[0])
    species_, subject, image = map(np.asarray, zip(*rows, strict=True))
    return np.asarray(values), image, subject, species_


def test_variance_decomposition_recovers_known_components():
    rng = np.random.default_rng(2)
    truths = np.array([[1.0, 0.6, 0.4, 0.3], [0.2, 1.0, 0.1, 0.5]])
    designs = [variance.design(*_nested_data(rng, sd, species=30 - 10 * k, responses=40))
               for k, sd in enumerate(truths)]
    fitted = variance.fit_reml(designs)[0]  # two designs padded to one shape, one call
    # REML is nearly unbiased: the mean over 40 independent responses is close to the truth.
    np.testing.assert_allclose(fitted[0].mean(0), truths[0] ** 2, rtol=0.15)
    np.testing.assert_allclose(fitted[1].mean(0), truths[1] ** 2, rtol=0.2, atol=0.01)


def test_variance_decomposition_equals_statsmodels_mixedlm():
    rng = np.random.default_rng(3)
    values, image, subject, species = _nested_data(rng, [1.0, 0.6, 0.4, 0.3], species=6)
    reference = variance.fit_statsmodels(values[:, 0], image, subject, species)
    scale = values.std()
    ours = variance.fit_reml([variance.design((values - values.mean()) / scale, image, subject,
                                              species)])[0, 0, 0] * scale**2
    np.testing.assert_allclose(ours, reference, rtol=2e-3, atol=1e-4)


def test_subject_weights_count_duplicated_subjects():
    # Weight 2 on a subject is the same likelihood as a copy of that subject under a new name.
    rng = np.random.default_rng(4)
    values, image, subject, species = _nested_data(rng, [1.0, 0.6, 0.4, 0.3], species=5)
    d = variance.design(values, image, subject, species)
    first = np.unique(subject)[0]
    copy = subject == first
    doubled = variance.design(np.concatenate([values, values[copy]]),
                              np.concatenate([image, np.char.add(image[copy], "'")]),
                              np.concatenate([subject, np.char.add(subject[copy], "'")]),
                              np.concatenate([species, species[copy]]))
    weights = np.ones((1, 2, len(doubled.species)))
    weights[0, 0, 0] = 2.0
    fitted = variance.fit_reml([d, doubled], weights)[0]
    np.testing.assert_allclose(fitted[0], fitted[1], rtol=1e-3, atol=1e-5)


def test_pca_against_the_covariance_eigendecomposition():
    rng = np.random.default_rng(5)
    rows = [(f"i{k}", f"s{k % 5}", ("pig", "rat")[k % 2], ("physiological", "malperfusion")[
        k % 3 == 0], 6, rng.normal(size=C) * np.arange(1, C + 1)) for k in range(40)]
    projection = pca.principal_components(table(rows), 6)
    x = np.asarray([r[5] for r in rows], np.float32)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x.T))
    order = np.argsort(eigenvalues)[::-1][:2]
    np.testing.assert_allclose(projection.explained, eigenvalues[order] / eigenvalues.sum(),
                               rtol=1e-4)
    expected = (x - x.mean(0)) @ eigenvectors[:, order]
    np.testing.assert_allclose(np.abs(projection.scores), np.abs(expected), rtol=1e-3,
                               atol=1e-3)
    (pig_malperfused,) = [t for t in pca.trajectories(projection)
                          if (t["species"], t["state"]) == ("pig", "malperfusion")]
    assert pig_malperfused["subjects"].shape[1] == 2


def test_image_rows_and_sto2_shares():
    rng = np.random.default_rng(6)
    cube = rng.uniform(0.2, 0.8, (8, 10, 100)).astype(np.float32)
    labels = np.zeros((8, 10), np.uint8)
    labels[:4] = 6
    labels[4:, :5] = 12
    example = {"cube": cube, "labels": labels, "valid": labels != 12}
    rows = image_rows(example, parts=4, rng=rng)
    assert rows["label"] == [6]  # background (0) and invalid pixels are not organs
    spectra_ = cube[:4].reshape(-1, 100)
    spectra_ = spectra_ / spectra_.sum(1, keepdims=True)
    np.testing.assert_allclose(rows["median"][0], np.median(spectra_, axis=0), rtol=1e-5)
    np.testing.assert_allclose(rows["mean"][0], spectra_.mean(0), rtol=1e-5)
    assert rows["sto2_histogram"][0].sum() == 40 and rows["parts"][0].shape == (4, 100)
    # Two subjects: one all low StO2, one all high: shares are averaged over subjects.
    hist = np.zeros((3, len(STO2_BINS) - 1), np.int64)
    hist[0, 4] = 100  # 0.20-0.25
    hist[1, 4] = 10
    hist[2, 15] = 7  # 0.75-0.80
    base = table([(f"i{k}", ("a", "a", "b")[k], "human", "malperfusion", 6, np.ones(C))
                  for k in range(3)])
    base = OrganSpectra(**{**base.__dict__, "sto2_histogram": hist})
    (row,) = pca.sto2_distribution(base)
    assert row["share_low"] == pytest.approx(0.5) and row["share_high"] == pytest.approx(0.5)


def test_analyses_run_on_a_tivita_layout_dataset(tmp_path):
    """Two species of real-layout data (reference folders, meta files): every analysis runs
    through the dataset and catalog API alone."""
    rng = np.random.default_rng(7)
    refs = []
    for species in ("pig", "rat"):
        root = tmp_path / species
        tivita.write_dataset_settings(root, {
            "dataset_name": species, "label_mapping": {"background": 0, "kidney": 3, "liver": 7},
            "last_valid_label_index": 9, "annotation_name_default": "semantic#primary"})
        for i in range(6):
            subject, timestamp = f"{species}{i // 2}", f"2021_04_{10 + i:02d}_09_22_02"
            mask = rng.choice([0, 3, 7], size=(12, 16)).astype(np.uint8)
            cube = rng.uniform(0.1, 1.0, (12, 16, 100)).astype(np.float32)
            tivita.write_image(root, subject, timestamp, cube, {"semantic#primary": mask})
            if i % 2:
                meta = root / "data" / "subjects" / subject / timestamp / "annotations"
                meta.mkdir(parents=True, exist_ok=True)
                (meta / f"{timestamp}_meta.json").write_text('{"phase_type": "ischemia"}')
        config = dataclasses.replace(TIVITA, name="tivita_small", height=12, width=16)
        builder = data_builders.builder_class(species)(
            config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
        refs += [f"{species}/tivita_small:{s}" for s in ("physiological", "malperfusion")]
    catalog = Catalog(refs, tmp_path / "tfds")
    table = extract(catalog, catalog.records, parts=2)
    assert set(table.perfusion_state) == {"physiological", "malperfusion"}
    text = write_analyses(table, ["pig", "rat"], tmp_path / "out", resamples=20,
                          variance_resamples=2)
    for heading in ("## Organ spectra", "## Transfer similarity", "## Variance decomposition",
                    "## PCA and StO2"):
        assert heading in text
    for name in ("spectra.csv", "transfer.csv", "variance.csv", "sto2.csv",
                 "transfer_malperfusion.png", "pca_malperfusion.png", "variance.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| kidney | malperfusion | pig | rat |" in text
