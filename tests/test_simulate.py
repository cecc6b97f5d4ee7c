"""The simulator: outputs, determinism, and the scientific premise of xeno-learning."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_builders.species_builder import CLAMPED
from xeno_jax import simulate
from xeno_jax.analysis import variance
from xeno_jax.analysis.extract import OrganSpectra, image_rows
from xeno_jax.labels import ICG_LABELS, SPECIES_12
from xeno_jax.simulate.materials import MATERIAL_LABEL
from xeno_jax.simulate.scene import layout
from xeno_jax.spectra import l1_normalize, sto2

HEIGHT, WIDTH = 96, 128  # the statistical tests (one compiled batch shape)
SMALL = dict(height=40, width=48)  # every other test (one compiled image shape)
BATCH = 8
ORGANS = np.arange(1, 12)
ORGAN_NAMES = [SPECIES_12.index_to_name(i) for i in ORGANS]
KIDNEY = SPECIES_12.name_to_index("kidney")
SPECIES = ("human", "pig", "rat")


@functools.cache
def simulate_set(species, state, seed, foci, n, severity=(0.5, 1.0)):
    """n images (L1 spectra, labels); image i has focus foci[i % len(foci)] and is the same
    scene for every state given the same seed (the state is the only difference)."""
    rng = np.random.default_rng(seed)
    specs = [simulate.make_spec(species, subject=int(rng.integers(0, 20)), state=state,
                                severity=float(rng.uniform(*severity)),
                                minutes=float(rng.uniform(0.5, 8.0)), icg_dose_mg_kg=0.35,
                                focus=foci[i % len(foci)]) for i in range(n)]
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(n)]
    features, labels = [], []
    for start in range(0, n, BATCH):  # fixed batch size: one compilation
        chunk = list(range(start, start + BATCH))
        out = simulate.generate_batch(
            jnp.stack([keys[i % n] for i in chunk]),
            simulate.stack_specs([specs[i % n] for i in chunk]), height=HEIGHT, width=WIDTH)
        features.append(np.asarray(l1_normalize(out["cube"])))
        labels.append(np.asarray(out["labels"]))
    return np.concatenate(features)[:n], np.concatenate(labels)[:n]


def centroids(features, labels):
    return np.stack([features[labels == o].mean(0) for o in ORGANS])


def classify(centres, spectra):
    distances = ((spectra[:, None, :] - centres[None]) ** 2).sum(-1)
    return ORGANS[np.argmin(distances, axis=1)]


def balanced_accuracy(centres, features, labels):
    """Mean per-organ recall of a nearest-centroid classifier over organ pixels."""
    mask = np.isin(labels, ORGANS)
    truth = labels[mask]
    predicted = classify(centres, features[mask])
    return np.mean([np.mean(predicted[truth == o] == o) for o in ORGANS if np.any(truth == o)])


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_outputs_have_the_documented_shapes_and_ranges():
    out = simulate.generate(jax.random.key(0), simulate.make_spec("human", focus="kidney"),
                            **SMALL)
    assert out["cube"].shape == (40, 48, 100) and out["cube"].dtype == jnp.float32
    assert out["labels"].shape == (40, 48) and out["labels"].dtype == jnp.int32
    labels = np.asarray(out["labels"])
    assert labels.min() >= 0 and labels.max() <= SPECIES_12.invalid_index
    np.testing.assert_array_equal(out["valid"], labels != SPECIES_12.invalid_index)
    assert np.isfinite(np.asarray(out["cube"])).all()
    for name in ("saturation", "blood_volume", "water", "fat", "icg_molar"):
        assert out[name].shape == (40, 48)
    saturation = np.asarray(out["saturation"])
    assert ((saturation >= 0) & (saturation <= 1)).all()
    assert np.any(labels == KIDNEY), "the focus organ is always present"
    assert {"species_id", "subject", "state", "severity", "minutes"} <= set(out["metadata"])


def test_same_key_same_output_and_subjects_differ():
    spec0 = simulate.make_spec("pig", subject=0, focus="liver")
    spec1 = simulate.make_spec("pig", subject=1, focus="liver")
    a = simulate.generate(jax.random.key(3), spec0, **SMALL)
    b = simulate.generate(jax.random.key(3), spec0, **SMALL)
    c = simulate.generate(jax.random.key(3), spec1, **SMALL)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(a["labels"], c["labels"])  # the scene comes from the key
    assert not np.allclose(a["cube"], c["cube"])  # the physiology from the subject
    assert a["metadata"]["hemoglobin_g_l"] != c["metadata"]["hemoglobin_g_l"]


def test_images_of_one_subject_share_subject_effects():
    spec = simulate.make_spec("rat", subject=4)
    hb = [float(simulate.generate(jax.random.key(k), spec, **SMALL)
                ["metadata"]["hemoglobin_g_l"]) for k in range(2)]
    assert hb[0] == hb[1]


def test_batched_generation_equals_single():
    specs = [simulate.make_spec(s, subject=i) for i, s in enumerate(SPECIES)]
    keys = jnp.stack([jax.random.key(i) for i in range(3)])
    batch = simulate.generate_batch(keys, simulate.stack_specs(specs), **SMALL)
    for i, spec in enumerate(specs):
        single = simulate.generate(keys[i], spec, **SMALL)
        # Float differences of the batched matmul may round to a neighbouring sensor count.
        np.testing.assert_allclose(batch["cube"][i], single["cube"], atol=3e-3)
        np.testing.assert_array_equal(batch["labels"][i], single["labels"])


def test_states_act_where_and_how_they_should():
    key = jax.random.key(5)
    kw = dict(**SMALL)
    phys = simulate.generate(key, simulate.make_spec("pig", focus="kidney"), **kw)
    ischemic = simulate.generate(
        key, simulate.make_spec("pig", state="malperfusion", severity=1.0, focus="kidney"), **kw)
    icg = simulate.generate(key, simulate.make_spec("pig", state="icg", minutes=1.0,
                                                    focus="kidney"), **kw)
    kidney = np.asarray(phys["labels"]) == KIDNEY
    other_tissue = np.isin(np.asarray(phys["labels"]), ORGANS) & ~kidney
    sat_phys, sat_isch = np.asarray(phys["saturation"]), np.asarray(ischemic["saturation"])
    assert sat_isch[kidney].mean() < sat_phys[kidney].mean() - 0.3
    np.testing.assert_array_equal(sat_isch[other_tissue], sat_phys[other_tissue])
    assert np.all(np.asarray(icg["icg_molar"])[kidney | other_tissue] > 0)
    assert np.all(np.asarray(phys["icg_molar"]) == 0)


def test_make_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown species"):
        simulate.make_spec("dog")
    with pytest.raises(ValueError, match="unknown perfusion state"):
        simulate.make_spec("pig", state="ischemic")
    with pytest.raises(ValueError, match="focus"):
        simulate.make_spec("pig", focus="heart")
    with pytest.raises(ValueError, match="severity"):
        simulate.make_spec("pig", severity=1.5)


@pytest.mark.parametrize("train, test", list(itertools.permutations(SPECIES, 2)))
def test_species_differ(train, test):
    """An organ classifier trained on one species loses >= 15 points on another."""
    foci = tuple(ORGAN_NAMES)
    centres = centroids(*simulate_set(train, "physiological", 1, foci, 22))
    same = balanced_accuracy(centres, *simulate_set(train, "physiological", 2, foci, 22))
    other = balanced_accuracy(centres, *simulate_set(test, "physiological", 2, foci, 22))
    assert same - other >= 0.15, (same, other)


@pytest.mark.parametrize("species", SPECIES)
def test_pathology_matters(species):
    """The physiological classifier misclassifies >= 30% of malperfused kidney pixels."""
    foci = tuple(ORGAN_NAMES)
    centres = centroids(*simulate_set(species, "physiological", 1, foci, 22))
    features, labels = simulate_set(species, "malperfusion", 3, ("kidney",), 8)
    predicted = classify(centres, features[labels == KIDNEY])
    assert np.mean(predicted != KIDNEY) >= 0.30


def _mean_change(species, state, organ, foci, n):
    """Mean L1 change of an organ's pixels between a state and the same scenes physiological."""
    sick, labels = simulate_set(species, state, 7, foci, n)
    healthy, same_labels = simulate_set(species, "physiological", 7, foci, n)
    np.testing.assert_array_equal(labels, same_labels)
    mask = labels == SPECIES_12.name_to_index(organ)
    return (sick[mask] - healthy[mask]).mean(0)


def _responses_differ(a, b):
    """Not the same change: a cosine below 0.999 or magnitudes more than 5 % apart.

    Only that: how similar the changes are is measured and reported (`xeno_jax.analysis`),
    never a target of the simulator.
    """
    ratio = np.linalg.norm(b) / np.linalg.norm(a)
    return cosine(a, b) < 0.999 or abs(ratio - 1) > 0.05


@pytest.mark.parametrize("a, b", list(itertools.combinations(SPECIES, 2)))
def test_malperfusion_responses_differ_between_species(a, b):
    assert _responses_differ(_mean_change(a, "malperfusion", "kidney", ("kidney",), 8),
                             _mean_change(b, "malperfusion", "kidney", ("kidney",), 8))


@pytest.mark.parametrize("a, b", list(itertools.combinations(SPECIES, 2)))
def test_icg_responses_differ_between_species(a, b):
    for organ in ICG_LABELS:
        assert _responses_differ(_mean_change(a, "icg", organ, tuple(ICG_LABELS), 16),
                                 _mean_change(b, "icg", organ, tuple(ICG_LABELS), 16)), organ


def test_new_species_can_be_registered():
    dog = simulate.make_species(7, hemoglobin_g_l=150.0, hematocrit=0.45,
                                blood_scale={"liver": 1.2}, organ_presence={"lung": 0.0})
    simulate.register_species("test_dog", dog)
    out = simulate.generate(jax.random.key(0), simulate.make_spec("test_dog"), **SMALL)
    assert np.isfinite(np.asarray(out["cube"])).all()
    with pytest.raises(ValueError, match="already registered"):
        simulate.register_species("test_dog", dog)
    with pytest.raises(ValueError, match="species_id 1"):
        simulate.register_species("test_pig_clone", simulate.PIG)


@functools.cache
def kidney_geometry(focus):
    """Kidney area fraction and centroid offset from the image centre in 400 pig scenes
    (scenes where a kidney is visible)."""
    height, width = 48, 64
    draw = jax.jit(jax.vmap(lambda k: layout(k, simulate.PIG, focus, height, width)["material"]))
    labels = MATERIAL_LABEL[np.asarray(draw(jax.random.split(jax.random.key(0), 400)))]
    kidney = labels == KIDNEY
    area = kidney.mean((1, 2))
    yy, xx = np.mgrid[:height, :width]
    pixels = np.maximum(kidney.sum((1, 2)), 1)
    offset = np.hypot((kidney * yy).sum((1, 2)) / pixels / height - 0.5,
                      (kidney * xx).sum((1, 2)) / pixels / width - 0.5)
    return area[area > 0], offset[area > 0]


def test_focus_scenes_are_drawn_like_any_other():
    """Pathological images focus on the imaged organ: its size and place must not change."""
    area, offset = kidney_geometry(KIDNEY)
    natural_area, natural_offset = kidney_geometry(-1)  # kidneys present by chance
    assert len(area) == 400, "the focus organ is always visible"
    assert 0.8 <= np.median(area) / np.median(natural_area) <= 1.25
    assert abs(np.median(offset) - np.median(natural_offset)) <= 0.03


def _image_medians(values, labels, label):
    return np.array([np.median(v[m]) for v, m in zip(values, labels == label, strict=True)
                     if m.any()])


@pytest.mark.parametrize("species", SPECIES)
def test_kidney_sto2_index_as_in_the_papers_histograms(species):
    """Per-image median StO2 index of kidney: physiological mostly >= 0.6, clamped 0.1-0.3."""
    features, labels = simulate_set(species, "physiological", 3, ("kidney",), 8)
    index = _image_medians(np.asarray(sto2(features)), labels, KIDNEY)  # L1 scaling cancels
    assert np.mean(index >= 0.6) >= 0.5, index
    features, labels = simulate_set(species, "malperfusion", 3, ("kidney",), 8, CLAMPED)
    index = _image_medians(np.asarray(sto2(features)), labels, KIDNEY)
    assert np.mean((index >= 0.1) & (index < 0.3)) >= 0.5, index


def test_variance_of_physiological_spectra_as_in_the_papers_mixed_model():
    """Species and subject shares of the variance of physiological organ spectra (the analysis'
    mixed model, median over organs and wavelengths) in the ranges around the paper's
    (species 0.69-0.74 and subject 0.15-0.21 per wavelength): 0.6-0.8 and 0.1-0.3."""
    subjects, images = 6, 2
    columns = {k: [] for k in ("image_name", "subject", "species", "label", "parts")}
    rng = np.random.default_rng(0)
    for species in SPECIES:
        names = [(s, i) for s in range(subjects) for i in range(images)]
        specs = [simulate.make_spec(species, subject=200 + s) for s, _ in names]
        keys = [jax.random.fold_in(jax.random.key(11), 100 * s + i) for s, i in names]
        for start in range(0, len(names), BATCH):
            chunk = [min(j, len(names) - 1) for j in range(start, start + BATCH)]
            out = simulate.generate_batch(jnp.stack([keys[j] for j in chunk]), simulate.stack_specs(
                [specs[j] for j in chunk]), height=HEIGHT, width=WIDTH)
            for row, j in enumerate(chunk[:len(names) - start]):
                labels = np.asarray(out["labels"][row])
                found = image_rows({"cube": out["cube"][row], "labels": labels,
                                    "valid": labels < SPECIES_12.invalid_index}, parts=4, rng=rng)
                count = len(found["label"])
                columns["image_name"] += [f"{species}{names[j]}"] * count
                columns["subject"] += [str(names[j][0])] * count
                columns["species"] += [species] * count
                columns["label"] += found["label"]
                columns["parts"] += found["parts"]
    count = len(columns["label"])
    table = OrganSpectra(
        **{k: np.asarray(columns[k], str) for k in ("image_name", "subject", "species")},
        perfusion_state=np.full(count, "physiological"), experiment=np.full(count, "semantic"),
        label=np.asarray(columns["label"]), pixels=np.ones(count, np.int64),
        mean=np.zeros((count, 1)), median=np.zeros((count, 1)), parts=np.stack(columns["parts"]),
        sto2_median=np.zeros(count), sto2_histogram=np.zeros((count, 1), np.int64))
    fractions = {k: v[0] for k, v in variance.decompose(table, resamples=0).overall().items()}
    assert 0.6 <= fractions["species"] <= 0.8, fractions
    assert 0.1 <= fractions["subject"] <= 0.3, fractions


def test_response_divergence_moves_the_change_away_from_the_source():
    for d in (0.0, 2.0):
        diverged = simulate.with_response_divergence(simulate.HUMAN, simulate.PIG, d)
        simulate.register_species(f"test_human_{d}", simulate.species.replace(
            diverged, species_id=90 + int(d)), overwrite=True)
    same = simulate.get_species("test_human_0.0")
    np.testing.assert_allclose(same.ischemia_blood_drop, simulate.PIG.ischemia_blood_drop)
    np.testing.assert_allclose(same.blood_scale, simulate.HUMAN.blood_scale)  # physiology kept
    pig = _mean_change("pig", "malperfusion", "kidney", ("kidney",), 8)
    similarity = [cosine(pig, _mean_change(name, "malperfusion", "kidney", ("kidney",), 8))
                  for name in ("test_human_0.0", "human", "test_human_2.0")]
    assert similarity[0] > similarity[1] > similarity[2], similarity
