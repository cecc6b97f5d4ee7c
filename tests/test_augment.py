"""Augmentations: projection, geometric ops, organ transplantation, L1, pipelines."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs.run import get_config as run_config
from xeno_jax.augment import (
    STEP_NAMES,
    affine_warp,
    build_pipeline,
    l1_renormalize,
    project_spectra,
    random_affine,
    random_horizontal_flip,
    random_vertical_flip,
    revert_invalid_images,
    step_arguments,
    steps_from_config,
    transplant_organs,
)
from xeno_jax.projections import ProjectionBank

B, H, W, C = 6, 8, 12, 5


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    features = rng.uniform(0.1, 1, (B, H, W, C)).astype(np.float32)
    # Blocky label maps with labels 0..6 and a few invalid (12) pixels.
    labels = np.repeat(np.repeat(rng.integers(0, 7, (B, H // 2, W // 3)), 2, 1), 3, 2)
    labels[:, 0, :2] = 12
    return jnp.asarray(features), jnp.asarray(labels.astype(np.int32))


def make_bank(rng, counts):
    return ProjectionBank.from_pairs(
        {label: (np.eye(C) + 0.3 * rng.normal(size=(n, C, C)), 0.1 * rng.normal(size=(n, C)))
         for label, n in counts.items()})


@pytest.fixture(scope="module")
def bank_one_pair():
    return make_bank(np.random.default_rng(1), {1: 1, 3: 1, 4: 1})


def affine(x, bank, pair):
    """x W + b of one pair, in float64."""
    return np.asarray(x, np.float64) @ np.asarray(bank.weights[pair], np.float64) + np.asarray(
        bank.biases[pair], np.float64)


def project_image(x, lab, bank):
    """Each label of the bank mapped with the label's first pair, in float64."""
    expected = x.astype(np.float64)
    for label, first in zip(bank.label_indices, bank.offsets, strict=True):
        expected[lab == label] = affine(x[lab == label], bank, first)
    return expected


def project(key, features, labels, bank, **options):
    """`project_spectra` called eagerly (its heavy part is jitted inside, compiled once)."""
    return project_spectra(key, features, labels, bank, **options)


def project_jit(key, features, labels, bank, **options):
    """`project_spectra` under `jax.jit`."""
    return jax.jit(functools.partial(project_spectra, **options))(key, features, labels, bank)


# --- project_spectra ------------------------------------------------------------------------

@pytest.mark.parametrize("tile_size", [1, 7, 4096])
def test_projection_is_x_w_plus_b_on_target_labels_only(batch, bank_one_pair, tile_size):
    features, labels = batch
    out = np.asarray(project(jax.random.key(0), features, labels, bank_one_pair, p=1.0,
                             interpolate=False, tile_size=tile_size))
    x, lab = np.asarray(features), np.asarray(labels)
    np.testing.assert_allclose(out, project_image(x, lab, bank_one_pair), rtol=1e-6, atol=1e-6)
    untouched = ~np.isin(lab, bank_one_pair.label_indices)
    np.testing.assert_array_equal(out[untouched], x[untouched])  # bit-identical


def test_projection_target_labels_restrict_the_labels(batch, bank_one_pair):
    features, labels = batch
    out = np.asarray(project(jax.random.key(1), features, labels, bank_one_pair, p=1.0,
                             interpolate=False, target_labels=(3, 5)))
    x, lab = np.asarray(features), np.asarray(labels)
    np.testing.assert_allclose(out[lab == 3], affine(x[lab == 3], bank_one_pair, 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[lab != 3], x[lab != 3])


def test_projection_with_p_zero_changes_nothing(batch, bank_one_pair):
    features, labels = batch
    out = project(jax.random.key(2), features, labels, bank_one_pair, p=0.0)
    np.testing.assert_array_equal(out, features)


def test_projection_selects_whole_images_with_probability_p(batch, bank_one_pair):
    features, labels = batch
    x, lab = np.asarray(features), np.asarray(labels)
    has_target = np.isin(lab, bank_one_pair.label_indices).any(axis=(1, 2))
    changed = []
    for seed in range(8):
        out = np.asarray(project(jax.random.key(seed), features, labels, bank_one_pair, p=0.5,
                                 interpolate=False))
        for b in range(B):
            if np.array_equal(out[b], x[b]):
                continue
            target = np.isin(lab[b], bank_one_pair.label_indices)  # all of them or none
            np.testing.assert_allclose(out[b][target], project_image(x[b], lab[b],
                                                                     bank_one_pair)[target],
                                       rtol=1e-6, atol=1e-6)
            changed.append(b)
    fraction = len(changed) / (8 * has_target.sum())
    assert 0.2 < fraction < 0.8


def test_interpolation_stays_between_input_and_projection(batch, bank_one_pair):
    features, labels = batch
    out = np.asarray(project(jax.random.key(3), features, labels, bank_one_pair, p=1.0),
                     np.float64)
    x, lab = np.asarray(features, np.float64), np.asarray(labels)
    weights = []
    for b in range(B):
        for pair, label in enumerate(bank_one_pair.label_indices):
            mask = lab[b] == label
            if not mask.any():
                continue
            step = affine(x[b][mask], bank_one_pair, pair) - x[b][mask]
            w = np.sum((out[b][mask] - x[b][mask]) * step) / np.sum(step * step)
            assert 0 <= w < 1
            # One weight per (image, label): out = x + w (x W + b - x) on every pixel.
            np.testing.assert_allclose(out[b][mask], x[b][mask] + w * step, atol=2e-6)
            weights.append(w)
    assert len(set(np.round(weights, 6))) == len(weights) > 3


def test_projection_draws_pairs_uniformly_per_label(batch):
    features, labels = batch
    bank = make_bank(np.random.default_rng(4), {1: 3, 4: 2})
    x, lab = np.asarray(features), np.asarray(labels)
    used = set()
    for seed in range(6):
        out = np.asarray(project(jax.random.key(seed), features, labels, bank, p=1.0,
                                 interpolate=False))
        for b in range(B):
            for label, first, count in zip(bank.label_indices, bank.offsets, bank.counts,
                                           strict=True):
                mask = lab[b] == label
                if mask.any():
                    candidates = [k for k in range(first, first + count)
                                  if np.allclose(out[b][mask], affine(x[b][mask], bank, k),
                                                 rtol=1e-5, atol=1e-6)]
                    assert len(candidates) == 1  # one pair of this label, on all its pixels
                    used.add(candidates[0])
    assert used == set(range(5))


def test_label_match_extended_transforms_labels_without_matrices(batch, bank_one_pair):
    features, labels = batch
    x, lab = np.asarray(features), np.asarray(labels)
    out = np.asarray(project(jax.random.key(5), features, labels, bank_one_pair, p=1.0,
                             interpolate=False, label_mode="label_match_extended"))
    sources = set()
    for b in range(B):
        for label in np.unique(lab[b]):  # every label, invalid (12) included
            mask = lab[b] == label
            matches = [k for k in range(3) if np.allclose(
                out[b][mask], affine(x[b][mask], bank_one_pair, k), rtol=1e-5, atol=1e-6)]
            if label in bank_one_pair.label_indices:
                assert matches == [bank_one_pair.label_indices.index(label)]
            else:
                assert len(matches) == 1
                sources.add(matches[0])
    assert len(sources) > 1  # the source label is drawn
    out = np.asarray(project(jax.random.key(5), features, labels, bank_one_pair, p=1.0,
                             label_mode="label_match_extended", target_labels=(0, 1)))
    np.testing.assert_array_equal(out[lab > 1], x[lab > 1])
    assert not np.allclose(out[lab == 0], x[lab == 0])


def test_random_mode_applies_one_pair_to_every_pixel_of_an_image(batch):
    features, labels = batch
    bank = make_bank(np.random.default_rng(6), {1: 2, 6: 2})
    x = np.asarray(features)
    out = np.asarray(project(jax.random.key(7), features, labels, bank, p=1.0,
                             interpolate=False, label_mode="random"))
    used = set()
    for b in range(B):
        matches = [k for k in range(4) if np.allclose(out[b], affine(x[b], bank, k), rtol=1e-5,
                                                      atol=1e-6)]
        assert len(matches) == 1
        used.add(matches[0])
    assert len(used) > 1
    out = np.asarray(project(jax.random.key(7), features, labels, bank, p=1.0,
                             label_mode="random"))
    for b in range(B):  # one weight per image
        step = np.stack([affine(x[b], bank, k) - x[b] for k in range(4)])
        w = np.sum((out[b] - x[b]) * step, axis=(1, 2, 3)) / np.sum(step * step, axis=(1, 2, 3))
        assert any(np.allclose(out[b], x[b] + wk * s, atol=2e-6) for wk, s in zip(w, step,
                                                                                 strict=True))


def test_projection_is_the_same_eagerly_under_jit_and_under_vmap(batch):
    features, labels = (x[:2] for x in batch)
    bank = make_bank(np.random.default_rng(8), {1: 2, 3: 3})
    key = jax.random.key(9)
    eager = project(key, features, labels, bank, tile_size=16)
    np.testing.assert_array_equal(eager, project_jit(key, features, labels, bank, tile_size=16))
    assert not np.array_equal(eager, project(jax.random.key(10), features, labels, bank,
                                             tile_size=16))
    keys = jax.random.split(key, 2)
    stacked = jax.jit(jax.vmap(functools.partial(project_spectra, tile_size=16),
                               (0, 0, 0, None)))(keys, jnp.stack([features, features[::-1]]),
                                                 jnp.stack([labels, labels[::-1]]), bank)
    np.testing.assert_allclose(stacked[1], project(keys[1], features[::-1], labels[::-1], bank,
                                                   tile_size=16), rtol=1e-6, atol=1e-7)


def test_projection_rejects_bad_input(batch, bank_one_pair):
    features, labels = batch
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="channels"):
        project_spectra(key, features[..., :3], labels, bank_one_pair)
    with pytest.raises(ValueError, match="label_mode"):
        project_spectra(key, features, labels, bank_one_pair, label_mode="all")
    with pytest.raises(ValueError, match="labels must be integer"):
        project_spectra(key, features, labels[:, :, :3], bank_one_pair)


def test_l1_renormalize_handles_negative_and_zero_spectra():
    x = jnp.array([[1.0, -3.0], [0.0, 0.0], [2.0, 2.0]])
    np.testing.assert_allclose(l1_renormalize(x), [[0.25, -0.75], [0, 0], [0.5, 0.5]])
    np.testing.assert_allclose(jax.jit(l1_renormalize)(x), l1_renormalize(x))


# --- geometric ------------------------------------------------------------------------------

def masks_of(labels):
    return labels % 2 == 0


def test_zero_affine_is_exactly_the_identity(batch):
    features, labels = batch
    valid = masks_of(labels)
    out = affine_warp(features[0], labels[0], valid[0], 0.0, jnp.zeros(2), 1.0)  # eagerly
    for got, want in zip(out, (features[0], labels[0], valid[0]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_affine_integer_shift_and_quarter_turn():
    rng = np.random.default_rng(10)
    image = rng.uniform(size=(7, 7, 3)).astype(np.float32)
    labels = rng.integers(0, 12, (7, 7)).astype(np.int32)
    valid = labels > 3
    out, out_labels, out_valid = affine_warp(image, labels, valid, 0.0, jnp.array([0.0, 2.0]), 1.0)
    np.testing.assert_allclose(out[:, 2:], image[:, :-2], atol=1e-6)
    np.testing.assert_allclose(out[:, :2], image[:, 2:0:-1], atol=1e-6)  # reflected
    np.testing.assert_array_equal(out_labels[:, 2:], labels[:, :-2])
    out, out_labels, out_valid = affine_warp(image, labels, valid, np.pi / 2, jnp.zeros(2), 1.0)
    np.testing.assert_allclose(out, np.rot90(image, k=-1), atol=1e-5)
    np.testing.assert_array_equal(out_labels, np.rot90(labels, k=-1))
    np.testing.assert_array_equal(out_valid, np.rot90(valid, k=-1))


def test_random_affine_keeps_labels_and_moves_everything_alike():
    height, width = 9, 11
    cols = np.broadcast_to(np.arange(width), (4, height, width))
    features = jnp.asarray(cols[..., None], jnp.float32)
    labels = jnp.asarray(cols, jnp.int32)
    valid = labels >= 5
    op = jax.jit(functools.partial(random_affine, p=1.0))
    out, out_labels, out_valid = op(jax.random.key(11), features, labels, valid)
    assert set(np.unique(out_labels)) <= set(range(width))  # labels stay labels
    np.testing.assert_array_equal(out_valid, out_labels >= 5)  # same resampling as labels
    # Bilinear of a ramp vs nearest of the same ramp: the same geometry within half a pixel.
    assert np.abs(out[..., 0] - out_labels).max() <= 0.5 + 1e-5
    assert not np.array_equal(out_labels, labels)
    unchanged = jax.jit(functools.partial(random_affine, p=0.0))(jax.random.key(11), features,
                                                                 labels, valid)
    for got, want in zip(unchanged, (features, labels, valid), strict=True):
        np.testing.assert_array_equal(got, want)
    stacked = jax.vmap(op)(jax.random.split(jax.random.key(12), 2), *(
        jnp.stack([x, x]) for x in (features, labels, valid)))
    assert stacked[1].shape == (2, *labels.shape)


@pytest.mark.parametrize("flip, axis", [(random_horizontal_flip, 2), (random_vertical_flip, 1)])
def test_flips_are_exact_and_shared(batch, flip, axis):
    features, labels = batch
    valid = masks_of(labels)
    out = jax.jit(functools.partial(flip, p=0.5))(jax.random.key(13), features, labels, valid)
    flipped = [not np.array_equal(out[1][b], labels[b]) for b in range(B)]
    assert any(flipped) and not all(flipped)
    for b in range(B):
        for got, x in zip(out, (features, labels, valid), strict=True):
            want = np.flip(x[b], axis - 1) if flipped[b] else x[b]
            np.testing.assert_array_equal(got[b], want)
    assert np.array_equal(flip(jax.random.key(13), features, labels, valid, p=1.0)[0],
                          np.flip(features, axis))


# --- transplantation ------------------------------------------------------------------------

transplant = jax.jit(transplant_organs, static_argnames=("p", "num_classes"))


def constant_images(values, height=4, width=5, channels=3):
    labels = np.broadcast_to(np.asarray(values)[:, None, None], (len(values), height, width))
    features = np.broadcast_to(labels[..., None], (*labels.shape, channels))
    return (jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32),
            jnp.ones(labels.shape, bool))


def test_transplant_hand_checkable_case():
    features, labels, valid = constant_images(range(7))
    out_features, out_labels, out_valid = transplant_organs(jax.random.key(0), features, labels,
                                                            valid, p=1.0)  # eagerly
    expected = (np.arange(7) + 1) % 7  # image i receives from image i + 1 (its original)
    np.testing.assert_array_equal(out_labels, np.broadcast_to(expected[:, None, None],
                                                              labels.shape))
    np.testing.assert_array_equal(out_features[..., 0], out_labels)
    assert bool(out_valid.all())


def test_transplant_donors_are_the_first_int_p_b_images():
    features, labels, valid = constant_images(range(8))
    _, out_labels, _ = transplant(jax.random.key(1), features, labels, valid, p=0.8)
    # Donors 0..5 give to 7, 0, 1, 2, 3, 4; images 5 and 6 receive nothing.
    np.testing.assert_array_equal(out_labels[:, 0, 0], [1, 2, 3, 4, 5, 5, 6, 0])


def test_transplant_moves_one_valid_organ_at_the_same_coordinates():
    # B = 2, p = 0.5: image 0 is the only donor, image 1 its acceptor.
    features, labels, valid = (np.array(x) for x in constant_images([0, 9]))
    labels[0, :, :2], labels[0, :, 2:4], labels[0, :, 4] = 3, 4, 5   # donor organs 3, 4, 5
    valid[0, :, 4] = False                                           # organ 5 is invalid
    valid[0, 0, :3] = False                                          # parts of organs 3 and 4
    valid[1, 0, :] = False                                           # acceptor's own invalid row
    features[0] = np.random.default_rng(2).uniform(size=features[0].shape)
    chosen = set()
    for seed in range(12):
        out_features, out_labels, out_valid = transplant(
            jax.random.key(seed), jnp.asarray(features), jnp.asarray(labels), jnp.asarray(valid),
            p=0.5)
        moved = np.asarray(out_labels[1]) != 9
        organs = set(np.unique(labels[0][moved]))
        assert len(organs) == 1 and 5 not in organs                  # one valid organ
        organ = organs.pop()
        np.testing.assert_array_equal(moved, (labels[0] == organ) & valid[0])  # same place
        np.testing.assert_array_equal(out_features[1][moved], features[0][moved])
        np.testing.assert_array_equal(out_features[1][~moved], features[1][~moved])
        np.testing.assert_array_equal(out_valid[1], np.where(moved, valid[0], valid[1]))
        for got, x in zip((out_features, out_labels, out_valid), (features, labels, valid),
                          strict=True):
            np.testing.assert_array_equal(got[0], x[0])               # the donor keeps it
        chosen.add(organ)
    assert chosen == {3, 4}


def test_batch_ops_reject_mismatched_shapes(batch):
    features, labels = batch
    for op in (random_affine, random_horizontal_flip, transplant_organs):
        with pytest.raises(ValueError, match=r"labels and valid \(B, H, W\)"):
            op(jax.random.key(0), features, labels[:, :-1], labels[:, :-1] > 0)


def test_transplant_skips_donors_without_valid_pixels():
    features, labels, valid = constant_images([1, 2, 3])
    valid = valid.at[1].set(False)
    out = transplant(jax.random.key(3), features, labels, valid, p=1.0)
    np.testing.assert_array_equal(out[1][:, 0, 0], [1, 3, 1])  # image 0 receives nothing


# --- pipeline -------------------------------------------------------------------------------

def test_the_run_configs_hold_the_a4_steps_in_order():
    baseline = steps_from_config(run_config("baseline_human").augment)
    assert [(s["name"], s.get("p")) for s in baseline] == [
        ("affine", 0.5), ("hflip", 0.25), ("vflip", 0.25), ("transplant", 0.8)]
    xeno = steps_from_config(run_config("projected-malperfusion_pig2human").augment)
    assert [(s["name"], s.get("p")) for s in xeno] == [
        ("affine", 0.5), ("hflip", 0.25), ("vflip", 0.25), ("projection", 0.8),
        ("transplant", 0.8), ("l1_normalize", None)]
    assert xeno[3]["label_mode"] == "label_match" and xeno[3]["interpolate"] is True
    assert xeno[3]["target_labels"] == ("kidney",)
    build_pipeline(xeno)  # every value is an argument its op takes


def test_every_augmentation_value_is_in_the_config_and_misspellings_name_themselves():
    augment = run_config("projected-ICG_rat2pig").augment
    for name in STEP_NAMES:  # the config is locked: only these keys can be set by flags
        assert set(augment[name]) == set(step_arguments(name)), name
    augment.projection.p = 0.5
    assert steps_from_config(augment)[3]["p"] == 0.5
    with pytest.raises(AttributeError, match='Key "pp" does not exist'):
        augment.projection.pp = 0.5
    augment.steps = ("affine", "afine")
    with pytest.raises(ValueError, match=r"steps\[1\]: unknown step 'afine'"):
        steps_from_config(augment)


def test_pipeline_runs_under_jit_with_the_bank_as_argument(batch, bank_one_pair):
    features, labels = batch
    data = {"features": features, "labels": labels, "valid": labels != 12, "id": jnp.arange(B)}
    config = run_config("projected-ICG_rat2pig").augment
    config.projection.target_labels = ("stomach", 3)
    augment = build_pipeline(steps_from_config(config))
    key = jax.random.key(14)
    out = jax.jit(augment)(key, data, bank_one_pair)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        **{k: (v.shape, v.dtype) for k, v in data.items()}, "projected_pixels": ((), jnp.int32)}
    np.testing.assert_allclose(np.abs(out["features"]).sum(-1), 1, rtol=1e-5)  # L1 last
    closed = build_pipeline([{"name": "projection", "target_labels": [3]}], bank_one_pair)
    expected = project_jit(jax.random.split(key, 1)[0], features, labels, bank_one_pair,
                           target_labels=(3,))
    np.testing.assert_array_equal(jax.jit(closed)(key, data)["features"], expected)
    with pytest.raises(ValueError, match="needs a ProjectionBank"):
        augment(key, data)


def test_pipeline_accepts_config_dicts(batch):
    features, labels = batch
    steps = [ml_collections.ConfigDict({"name": "vflip", "p": 1.0})]
    data = {"features": features, "labels": labels, "valid": labels != 12}
    out = build_pipeline(steps)(jax.random.key(16), data)
    np.testing.assert_array_equal(out["labels"], labels[:, ::-1])


def test_pipeline_rejects_unknown_steps_and_arguments():
    with pytest.raises(ValueError, match="unknown name 'rotate'"):
        build_pipeline([{"name": "rotate"}])
    with pytest.raises(ValueError, match=r"unknown arguments \['angle'\]"):
        build_pipeline([{"name": "affine", "angle": 3}])
    with pytest.raises(ValueError, match="'gallbladder' is not a valid label"):
        build_pipeline([{"name": "projection", "target_labels": ["gallbladder"]}])


def test_images_left_without_valid_pixels_revert_to_their_input(batch):
    features, labels = batch
    valid = jnp.ones(labels.shape, bool).at[0].set(False)
    data = {"features": features, "labels": labels, "valid": valid}
    augment = build_pipeline([{"name": "hflip", "p": 1.0}])
    out = augment(jax.random.key(15), data)
    np.testing.assert_array_equal(out["features"][0], features[0])   # reverted
    np.testing.assert_array_equal(out["features"][1], features[1, :, ::-1])
    emptied = {**data, "valid": jnp.zeros_like(valid).at[2].set(True)}
    reverted = revert_invalid_images(emptied, data)
    np.testing.assert_array_equal(reverted["valid"][1], valid[1])
    np.testing.assert_array_equal(reverted["valid"][3], valid[3])
    np.testing.assert_array_equal(reverted["valid"][2], emptied["valid"][2])


def test_merged_geometric_steps_equal_the_steps_one_by_one():
    """The pipeline composes affine + flips into one gather: labels and masks are identical,
    features equal up to float rounding (jit may contract the bilinear weights differently)."""
    rng = np.random.default_rng(5)
    batch = {"features": jnp.asarray(rng.uniform(0, 1, (6, 9, 11, 4)), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, 13, (6, 9, 11)), jnp.int32),
             "valid": jnp.asarray(rng.uniform(size=(6, 9, 11)) < 0.8)}
    steps = [{"name": "affine", "p": 0.5}, {"name": "hflip", "p": 0.5},
             {"name": "vflip", "p": 0.5}]
    key = jax.random.key(3)
    merged = jax.jit(build_pipeline(steps))(key, batch)
    expected = (batch["features"], batch["labels"], batch["valid"])
    for op, step_key, p in zip((random_affine, random_horizontal_flip, random_vertical_flip),
                               jax.random.split(key, 3), (0.5, 0.5, 0.5), strict=True):
        expected = op(step_key, *expected, p=p)
    np.testing.assert_allclose(merged["features"], expected[0], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(merged["labels"], expected[1])
    np.testing.assert_array_equal(merged["valid"], expected[2])
    assert not np.array_equal(merged["features"], batch["features"])  # something moved
