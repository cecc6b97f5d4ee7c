"""Tests of xeno_jax.evaluate: hand-computed cases and independent (brute-force) formulations."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xeno_jax import evaluate
from xeno_jax.labels import SPECIES_12

# A 3x4 case with two invalid pixels (whose labels, 5 and 7, are even out of range).
REF = np.array([[0, 0, 1, 1],
                [0, 2, 1, 1],
                [2, 2, 2, 5]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 2, 1],
                 [0, 2, 1, 7]])
VALID = np.array([[True, True, True, True],
                  [True, True, True, True],
                  [False, True, True, False]])
# Rows: reference class, columns: predicted class, counted by hand over the 10 valid pixels.
CONFUSION = np.array([[2, 1, 0],
                      [0, 3, 1],
                      [0, 1, 2]])
DICE = np.array([2 * 2 / (3 + 2), 2 * 3 / (4 + 5), 2 * 2 / (3 + 3)])


def random_label_maps(rng, shape=(3, 12, 15), num_classes=4, block=3):
    """Blocky random reference, a prediction that disagrees on some pixels, a ragged mask."""
    batch, height, width = shape
    coarse = rng.integers(0, num_classes, (batch, -(-height // block), -(-width // block)))
    ref = np.kron(coarse, np.ones((1, block, block), int))[:, :height, :width]
    flip = rng.random(shape) < 0.15
    pred = np.where(flip, rng.integers(0, num_classes, shape), ref)
    pred = np.roll(pred, rng.integers(-1, 2), axis=-1)
    valid = rng.random(shape) > 0.1
    valid[:, :, :2] = False
    return pred, ref, valid


# ----------------------------------------------------------------------------------------------
# Confusion matrix and DSC.


def test_confusion_matrix_and_dice_match_hand_computed_case():
    np.testing.assert_array_equal(evaluate.confusion_matrix(PRED, REF, VALID, 3), CONFUSION)
    np.testing.assert_allclose(evaluate.dice(PRED, REF, VALID, 3), DICE, rtol=1e-6)


def test_full_label_scores_by_hand_and_against_numpy():
    # Full labels: REF with its two invalid pixels given a class (one out of range: not counted),
    # so that predicted and true pixel counts differ for classes 1 and 2.
    full = np.where(VALID, REF, np.array([[0, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 12]]))
    scores = evaluate.full_label_scores(PRED[None], full[None], 3)
    counted = full < 3  # 11 pixels
    for k in range(3):
        truth, called = (full == k) & counted, (PRED == k) & counted
        hits = np.sum(truth & called)
        np.testing.assert_allclose(scores["full_precision"][0, k], hits / called.sum())
        np.testing.assert_allclose(scores["full_recall"][0, k], hits / truth.sum())
        np.testing.assert_allclose(scores["full_dice"][0, k],
                                   2 * hits / (truth.sum() + called.sum()))
        np.testing.assert_allclose(scores["full_false_share"][0, k],
                                   np.sum(called & ~truth) / np.sum(counted & ~truth))
    # By hand for class 1: truth (0,2),(0,3),(1,2),(1,3); called (0,1),(0,2),(0,3),(1,3),(2,2):
    # 3 hits; other pixels 11 - 4 = 7, of which (0,1) and (2,2) are called 1.
    np.testing.assert_allclose([scores[m][0, 1] for m in evaluate.FULL_LABEL_METRICS],
                               [6 / 9, 3 / 5, 3 / 4, 2 / 7])
    # Class 2: truth (1,1),(2,0),(2,1),(2,2); called (1,1),(1,2),(2,1): 2 hits.
    np.testing.assert_allclose([scores[m][0, 2] for m in evaluate.FULL_LABEL_METRICS],
                               [4 / 7, 2 / 3, 2 / 4, 1 / 7])


def test_an_organ_predicted_everywhere_has_low_full_label_precision():
    full = np.zeros((1, 10, 10), int)
    full[0, 4:6, 4:6] = 2  # a 4-pixel organ in other tissue
    everywhere = np.full_like(full, 2)
    scores = evaluate.full_label_scores(everywhere, full, 3)
    polygon = evaluate.dice(everywhere, full, full == 2, 3)  # only the organ is annotated
    assert float(polygon[0, 2]) == 1.0
    np.testing.assert_allclose([scores[m][0, 2] for m in evaluate.FULL_LABEL_METRICS],
                               [8 / 104, 4 / 100, 1.0, 1.0])
    assert np.isnan(scores["full_precision"][0, 0])  # class 0 never predicted


def test_invalid_pixels_never_count():
    rng = np.random.default_rng(0)
    pred, ref, valid = random_label_maps(rng)
    other_pred = np.where(valid, pred, rng.integers(0, 4, pred.shape))
    other_ref = np.where(valid, ref, rng.integers(0, 4, ref.shape))
    np.testing.assert_array_equal(evaluate.confusion_matrix(pred, ref, valid, 4),
                                  evaluate.confusion_matrix(other_pred, other_ref, valid, 4))
    np.testing.assert_array_equal(evaluate.confusion_matrix(pred, ref, valid, 4).sum((-2, -1)),
                                  valid.sum((-2, -1)))


def test_confusion_matrix_matches_numpy_bincount():
    rng = np.random.default_rng(1)
    pred, ref, valid = random_label_maps(rng, shape=(4, 10, 13), num_classes=5)
    expected = np.stack([
        np.bincount((r * 5 + p)[v], minlength=25).reshape(5, 5)
        for p, r, v in zip(pred, ref, valid, strict=True)
    ])
    np.testing.assert_array_equal(evaluate.confusion_matrix(pred, ref, valid, 5), expected)


def test_dice_is_nan_only_for_classes_absent_from_both():
    ref = np.zeros((2, 3), int)
    pred = np.array([[0, 0, 1], [0, 0, 0]])
    scores = np.asarray(evaluate.dice(pred, ref, np.ones((2, 3), bool), 3))
    np.testing.assert_allclose(scores[:2], [2 * 5 / (6 + 5), 0.0], rtol=1e-6)
    assert np.isnan(scores[2])


def test_dice_batched_jit_and_vmap_agree_with_per_image():
    rng = np.random.default_rng(2)
    pred, ref, valid = random_label_maps(rng)
    per_image = np.stack([evaluate.dice(*maps, 4) for maps in zip(pred, ref, valid, strict=True)])
    dice_4 = functools.partial(evaluate.dice, num_classes=4)
    for scores in (evaluate.dice(pred, ref, valid, 4), jax.jit(dice_4)(pred, ref, valid),
                   jax.vmap(dice_4)(pred, ref, valid)):
        np.testing.assert_allclose(scores, per_image, rtol=1e-6)


@pytest.mark.parametrize(("pred", "ref", "valid", "match"), [
    (PRED[:2], REF, VALID, "same shape"),
    (PRED.astype(float), REF, VALID, "integer labels"),
    (PRED, REF, VALID.astype(int), "boolean mask"),
    (PRED, np.where(VALID, 3, REF), VALID, r"ref holds the labels \[3\]"),
    (np.full(4, 0), np.full(4, 0), np.full(4, True), r"\(\.\.\., H, W\)"),
])
def test_bad_label_maps_raise(pred, ref, valid, match):
    with pytest.raises(ValueError, match=match):
        evaluate.dice(pred, ref, valid, 3)


# ----------------------------------------------------------------------------------------------
# Per-image scores on the used labels.


def test_used_labels_and_nan_to_zero_rule():
    used = evaluate.used_labels(REF, VALID, 4)
    np.testing.assert_array_equal(used, [True, True, True, False])
    with pytest.raises(ValueError, match=r"ref holds the labels \[2\]"):
        evaluate.used_labels(REF, VALID, 2)
    scores = np.array([0.5, np.nan, 0.9, np.nan])  # label 1 is used but has no score
    per_label, image = evaluate.used_label_scores(scores, np.asarray(used))
    np.testing.assert_array_equal(per_label[:3], [0.5, 0.0, 0.9])
    assert np.isnan(per_label[3])
    assert image == pytest.approx((0.5 + 0.0 + 0.9) / 3)


def test_evaluate_images_scores_a_never_predicted_used_label_zero():
    ref = np.array([[[0, 0, 2, 2]]])
    pred = np.array([[[0, 1, 1, 0]]])
    results = evaluate.evaluate_images(pred, ref, np.ones_like(ref, bool), 3, metrics=("dice",))
    np.testing.assert_array_equal(results["used_labels"], [[True, False, True]])
    dice_0 = 2 * 1 / (2 + 2)
    np.testing.assert_allclose(results["dice"][0, [0, 2]], [dice_0, 0.0])
    assert np.isnan(results["dice"][0, 1])  # predicted only: not a used label
    np.testing.assert_allclose(results["dice_image"], [dice_0 / 2])
    np.testing.assert_array_equal(results["confusion_matrix"][0], [[1, 1, 0], [0, 0, 0], [1, 1, 0]])


def test_image_without_valid_pixels_has_nan_image_score():
    _, image = evaluate.used_label_scores(np.full((1, 3), 0.5), np.zeros((1, 3), bool))
    assert np.isnan(image[0])


# ----------------------------------------------------------------------------------------------
# NSD and ASD.


def brute_force_boundary(mask):
    """Mask pixels with a 4-neighbour outside the mask or outside the image."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def brute_force_surface_scores(pred, ref, valid, k, tolerance):
    """(NSD, ASD) of class k of one image from all pairwise boundary-pixel distances."""
    pred_points = np.argwhere(brute_force_boundary((pred == k) & valid))
    ref_points = np.argwhere(brute_force_boundary((ref == k) & valid))
    if len(pred_points) == 0 and len(ref_points) == 0:
        return np.nan, np.nan
    if len(pred_points) == 0 or len(ref_points) == 0:
        return 0.0, np.inf
    distances = np.sqrt(((pred_points[:, None] - ref_points[None]) ** 2).sum(-1))
    both = np.concatenate([distances.min(axis=1), distances.min(axis=0)])
    return np.mean(both <= tolerance), both.mean()


def test_nsd_and_asd_match_brute_force_on_random_masks():
    rng = np.random.default_rng(3)
    pred, ref, valid = random_label_maps(rng, shape=(4, 12, 15))
    tolerances = [0.0, 1.0, 1.5, 2.0]
    nsd = evaluate.normalized_surface_dice(pred, ref, valid, tolerances)
    asd = evaluate.average_surface_distance(pred, ref, valid, 4)
    expected = np.array([[brute_force_surface_scores(p, r, v, k, tolerances[k]) for k in range(4)]
                         for p, r, v in zip(pred, ref, valid, strict=True)])
    np.testing.assert_allclose(nsd, expected[..., 0])
    finite = np.isfinite(expected[..., 1])
    assert finite.sum() > 8
    np.testing.assert_allclose(asd[finite], expected[..., 1][finite])


def test_nsd_and_asd_of_shifted_squares_by_hand():
    ref = np.zeros((8, 9), int)
    ref[2:6, 2:6] = 1
    pred = np.roll(ref, 1, axis=1)
    valid = np.ones_like(ref, bool)
    # Each 12-pixel ring has 6 pixels on the other ring and 6 at distance 1.
    assert evaluate.normalized_surface_dice(pred, ref, valid, [0.0, 0.0])[1] == 0.5
    assert evaluate.normalized_surface_dice(pred, ref, valid, [0.0, 1.0])[1] == 1.0
    assert evaluate.average_surface_distance(pred, ref, valid, 2)[1] == 0.5


def test_single_pixels_five_apart():
    ref = np.zeros((6, 7), int)
    pred = np.zeros_like(ref)
    ref[1, 1] = pred[4, 5] = 1
    valid = np.ones_like(ref, bool)
    assert evaluate.normalized_surface_dice(pred, ref, valid, [0.0, 4.9])[1] == 0.0
    assert evaluate.normalized_surface_dice(pred, ref, valid, [0.0, 5.0])[1] == 1.0
    assert evaluate.average_surface_distance(pred, ref, valid, 2)[1] == 5.0


def test_boundaries_along_invalid_pixels_count():
    ref = np.ones((5, 5), int)
    valid = np.ones_like(ref, bool)
    valid[:, 2] = False  # splits class 1 into two 5x2 strips; each strip pixel is a boundary
    pred = ref.copy()
    pred[0, 0] = 0
    nsd = evaluate.normalized_surface_dice(pred, ref, valid, [0.0, 0.0])
    # All 20 ref pixels are boundary pixels; the 19 pred pixels (all but (0, 0)) are too, so
    # only the ref pixel (0, 0) is farther than 0 from the other boundary.
    assert nsd[1] == pytest.approx((19 + 19) / (20 + 19))


def test_absent_classes_nan_one_sided_zero_and_asd_filled():
    ref = np.zeros((6, 8), int)
    ref[:, 4:] = 1
    pred = np.zeros_like(ref)
    valid = np.ones_like(ref, bool)
    nsd = evaluate.normalized_surface_dice(pred, ref, valid, [1.0, 1.0, 1.0])
    asd = evaluate.average_surface_distance(pred, ref, valid, 3)
    assert nsd[1] == 0.0 and np.isnan(nsd[2]) and np.isnan(asd[2])
    _, expected_asd_0 = brute_force_surface_scores(pred, ref, valid, 0, 1.0)
    np.testing.assert_allclose(asd[:2], [expected_asd_0, expected_asd_0])  # inf -> largest finite
    no_overlap = evaluate.average_surface_distance(np.ones_like(ref), np.zeros_like(ref), valid, 2)
    np.testing.assert_allclose(no_overlap, [math.hypot(6, 8)] * 2)  # none finite -> diagonal


def test_nsd_rejects_bad_tolerances_and_labels_beyond_them():
    ones = np.ones((3, 3), int)
    valid = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match="finite and >= 0"):
        evaluate.normalized_surface_dice(ones, ones, valid, [1.0, -1.0])
    with pytest.raises(ValueError, match=r"expected 0\.\.0"):
        evaluate.normalized_surface_dice(ones, ones, valid, [1.0])


def test_default_tolerances_follow_the_label_mapping():
    tolerances = evaluate.nsd_tolerances()
    assert tolerances.shape == (12,)
    assert tolerances[SPECIES_12.name_to_index("kidney")] == 4.0
    assert tolerances[SPECIES_12.name_to_index("omentum")] == 8.0
    with pytest.raises(ValueError, match="kidney"):
        evaluate.nsd_tolerances(table={k: v for k, v in evaluate.NSD_TOLERANCES_SPECIES_12.items()
                                       if k != "kidney"})


def test_evaluate_images_nsd_per_image_matches_direct_call():
    rng = np.random.default_rng(4)
    pred, ref, valid = random_label_maps(rng, shape=(2, 12, 15), num_classes=12)
    results = evaluate.evaluate_images(pred, ref, valid, 12, metrics=("nsd",))
    direct = evaluate.normalized_surface_dice(pred, ref, valid, evaluate.nsd_tolerances())
    used = results["used_labels"]
    np.testing.assert_allclose(results["nsd"][used], direct[used])
    np.testing.assert_allclose(results["nsd_image"], [d[u].mean() for d, u in zip(direct, used,
                                                                                     strict=True)])
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate.evaluate_images(pred, ref, valid, 12, metrics=("hd95",))


# ----------------------------------------------------------------------------------------------
# Aggregation.


def hand_table():
    # Subject A: images a1 (labels 0, 1) and a2 (label 0); subject B: image b1 (labels 0, 1).
    return evaluate.ScoreTable(
        image_name=["a1", "a1", "a2", "b1", "b1"],
        subject=["A", "A", "A", "B", "B"],
        label=[0, 1, 0, 0, 1],
        scores={"dice": [0.8, 0.4, 0.6, 1.0, 0.4]},
    )


def test_class_level_by_hand():
    scores = evaluate.class_level(hand_table())
    np.testing.assert_array_equal(scores.labels, [0, 1])
    np.testing.assert_array_equal(scores.subjects, ["A", "B"])
    np.testing.assert_allclose(scores.subject_scores, [[0.7, 1.0], [0.4, 0.4]])
    np.testing.assert_allclose(scores.mean, [0.85, 0.4])


def test_image_level_by_hand():
    scores = evaluate.image_level(hand_table())
    np.testing.assert_array_equal(scores.subjects, ["A", "B"])
    np.testing.assert_allclose(scores.scores, [(0.6 + 0.6) / 2, 0.7])
    assert scores.mean == pytest.approx(0.65)


def test_aggregation_skips_nan_and_rejects_mixed_subjects():
    table = hand_table().with_scores(dice=[0.8, np.nan, 0.6, 1.0, 0.4])
    np.testing.assert_allclose(evaluate.class_level(table).subject_scores, [[0.7, 1.0],
                                                                            [np.nan, 0.4]])
    mixed = evaluate.ScoreTable(image_name=["x", "x"], subject=["A", "B"], label=[0, 1],
                                scores={"dice": [1.0, 1.0]})
    with pytest.raises(ValueError, match=r"\['x'\]"):
        evaluate.image_level(mixed)


def test_table_from_images_explodes_used_labels():
    used = np.array([[True, False, True], [False, True, False]])
    dice = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    table = evaluate.ScoreTable.from_images(["i", "j"], ["S1", "S2"], used, dice=dice)
    np.testing.assert_array_equal(table.image_name, ["i", "i", "j"])
    np.testing.assert_array_equal(table.subject, ["S1", "S1", "S2"])
    np.testing.assert_array_equal(table.label, [0, 2, 1])
    np.testing.assert_array_equal(table.column("dice"), [0.1, 0.3, 0.5])
    both = evaluate.ScoreTable.concatenate([table, table.select(table.label == 1)])
    assert len(both) == 4
    columns = both.to_dict(SPECIES_12)
    np.testing.assert_array_equal(columns["label_name"], ["background", "small_bowel", "stomach",
                                                          "stomach"])
    with pytest.raises(ValueError, match="no score column 'nsd'"):
        table.column("nsd")
    with pytest.raises(ValueError, match="shape of used"):
        evaluate.ScoreTable.from_images(["i", "j"], ["S1", "S2"], used, dice=dice[:, :2])


def test_bootstrap_distribution_by_hand():
    # Label 0: subjects with 0 and 1, so a resample's mean is 0, 0.5 or 1 with p = 1/4, 1/2, 1/4.
    # Label 1: one subject at 0.5, so its interval has zero width.
    table = evaluate.ScoreTable(image_name=["a", "b", "a"], subject=["A", "B", "A"],
                                label=[0, 0, 1], scores={"dice": [0.0, 1.0, 0.5]})
    result = evaluate.bootstrap_class_level(table, n_bootstraps=4000)
    samples = result.bootstrap_means[:, 0]
    for value, probability in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(samples == value) == pytest.approx(probability, abs=0.03)
    np.testing.assert_allclose(result.mean, [0.5, 0.5])
    np.testing.assert_allclose([result.ci_low, result.ci_high], [[0.0, 0.5], [1.0, 0.5]])
    # Class mean per bootstrap: 0.25, 0.5 or 0.75, so its 95% interval is [0.25, 0.75].
    assert result.class_mean == 0.5
    assert (result.class_mean_ci_low, result.class_mean_ci_high) == (0.25, 0.75)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(5)
    subjects = np.repeat([f"S{i}" for i in range(8)], 6)
    table = evaluate.ScoreTable(image_name=np.repeat([f"I{i}" for i in range(24)], 2),
                                subject=subjects, label=np.tile([0, 1, 2], 16),
                                scores={"dice": rng.random(48)})
    first = evaluate.bootstrap_class_level(table)
    np.testing.assert_array_equal(first.bootstrap_means,
                                  evaluate.bootstrap_class_level(table).bootstrap_means)
    assert first.bootstrap_means.shape == (1000, 3)
    assert not np.array_equal(first.bootstrap_means,
                              evaluate.bootstrap_class_level(table, seed=7).bootstrap_means)
    assert np.all((first.ci_low < first.mean) & (first.mean < first.ci_high))
    assert first.class_mean_ci_low < first.class_mean < first.class_mean_ci_high


def test_bootstrap_of_one_subject_has_zero_width():
    table = evaluate.ScoreTable(image_name=["a", "b", "a"], subject=["A", "A", "A"],
                                label=[0, 0, 3], scores={"dice": [0.2, 0.6, 0.9]})
    result = evaluate.bootstrap_class_level(table)
    np.testing.assert_allclose(result.ci_low, [0.4, 0.9])
    np.testing.assert_allclose(result.ci_high, [0.4, 0.9])
    assert result.class_mean_ci_low == result.class_mean_ci_high == pytest.approx(0.65)


def test_relative_drop():
    drop = evaluate.relative_drop([0.8, 0.5, 0.0], [0.4, 0.5, 0.3])
    np.testing.assert_allclose(drop[:2], [-0.5, 0.0])
    assert np.isnan(drop[2])


# ----------------------------------------------------------------------------------------------
# Ensembles.


def test_ensemble_averages_probabilities_not_logits():
    # One very confident vote for class 1 against two moderate votes for class 0.
    logits = jnp.array([[0.0, 20.0], [2.0, 0.0], [2.0, 0.0]])
    probabilities = jax.jit(evaluate.average_probabilities)(logits)
    p0 = 1 / (1 + math.exp(-2))
    expected = np.array([(1 / (1 + math.exp(20)) + 2 * p0) / 3,
                         (1 / (1 + math.exp(-20)) + 2 * (1 - p0)) / 3])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)
    assert int(jnp.argmax(probabilities)) == 0
    assert int(jnp.argmax(logits.mean(axis=0))) == 1  # averaging logits would pick class 1


def test_ensemble_predict_matches_stacked_logits():
    rng = np.random.default_rng(6)
    inputs = jnp.asarray(rng.normal(size=(2, 4, 5, 3)), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=(3, 6)), jnp.float32) for _ in range(3)]
    apply_fn = jax.jit(lambda w, x: x @ w)
    probabilities, labels = evaluate.ensemble_predict(apply_fn, weights, inputs)
    stacked = jnp.stack([inputs @ w for w in weights])
    np.testing.assert_allclose(probabilities, evaluate.average_probabilities(stacked), rtol=1e-5)
    np.testing.assert_array_equal(labels, jnp.argmax(probabilities, axis=-1))
    assert labels.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="2 apply functions for 3"):
        evaluate.ensemble_predict([apply_fn, apply_fn], weights, inputs)


# ----------------------------------------------------------------------------------------------
# DSC against StO2.


def test_interpolate_on_grid_matches_np_interp_and_is_nan_outside():
    rng = np.random.default_rng(7)
    x = rng.uniform(0.2, 0.8, 7)
    y = rng.random(7)
    grid = np.linspace(0, 1, 100)
    curve = evaluate.interpolate_on_grid(x, y, grid)
    inside = (grid >= x.min()) & (grid <= x.max())
    order = np.argsort(x)
    np.testing.assert_allclose(curve[inside], np.interp(grid[inside], x[order], y[order]))
    assert np.all(np.isnan(curve[~inside]))


def test_interpolate_on_grid_averages_duplicates_and_places_a_single_point():
    grid = np.linspace(0, 1, 11)
    curve = evaluate.interpolate_on_grid([0.2, 0.2, 0.4], [0.0, 1.0, 0.5], grid)
    np.testing.assert_allclose(curve[2:5], [0.5, 0.5, 0.5])
    single = evaluate.interpolate_on_grid([0.33, 0.33], [0.7, 0.9], grid)
    np.testing.assert_allclose(single[3], 0.8)
    assert np.isnan(np.delete(single, 3)).all()


def test_parameter_curves_mean_and_bootstrap():
    table = evaluate.ScoreTable(
        image_name=["a1", "a2", "b1", "b2", "c1"], subject=["A", "A", "B", "B", "C"],
        label=[6, 6, 6, 6, 4],
        scores={"dice": [0.4, 0.8, 1.0, 0.5, 0.9], "median_sto2": [0.2, 0.6, 0.4, 0.9, 0.3]},
    )
    curves = evaluate.parameter_curves(table, n_bootstraps=200)
    grid = np.linspace(0, 1, 100)
    np.testing.assert_array_equal(curves.labels, [4, 6])
    np.testing.assert_array_equal(curves.present, [[False, False, True], [True, True, False]])
    a = np.where((grid >= 0.2) & (grid <= 0.6), np.interp(grid, [0.2, 0.6], [0.4, 0.8]), np.nan)
    b = np.where((grid >= 0.4) & (grid <= 0.9), np.interp(grid, [0.4, 0.9], [1.0, 0.5]), np.nan)
    np.testing.assert_allclose(curves.subject_curves[1, :2], [a, b])
    expected_mean = np.where(np.isnan(a), b, np.where(np.isnan(b), a, (a + b) / 2))
    np.testing.assert_allclose(curves.mean[1], expected_mean)
    outside = (grid < 0.2) | (grid > 0.9)
    assert np.all(np.isnan(curves.ci_low[1, outside]) & np.isnan(curves.mean[1, outside]))
    both = (grid >= 0.4) & (grid <= 0.6)
    assert np.all(curves.ci_low[1, both] >= np.minimum(a, b)[both] - 1e-12)
    assert np.all(curves.ci_high[1, both] <= np.maximum(a, b)[both] + 1e-12)
    assert np.all(curves.ci_low[1, both] < curves.ci_high[1, both])
    # Label 4 has a single image: only the grid point nearest to 0.3 (30/99) carries its score.
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(curves.mean[0])), [30])
    assert curves.mean[0, 30] == curves.ci_low[0, 30] == curves.ci_high[0, 30] == 0.9
    again = evaluate.parameter_curves(table, n_bootstraps=200)
    np.testing.assert_array_equal(again.ci_low, curves.ci_low)


def test_region_median_and_median_per_label():
    sto2 = np.array([[0.1, 0.5, 0.9],
                     [0.3, np.nan, 0.7]])
    labels = np.array([[0, 0, 1],
                       [0, 0, 1]])
    valid = np.array([[True, True, True],
                      [True, True, False]])
    assert float(evaluate.region_median(sto2, labels == 0)) == pytest.approx(0.3)
    medians = jax.jit(evaluate.median_per_label, static_argnums=3)(sto2, labels, valid, 3)
    np.testing.assert_allclose(medians[:2], [0.3, 0.9])
    assert np.isnan(medians[2])
    with pytest.raises(ValueError, match="bool array"):
        evaluate.region_median(sto2, labels)
