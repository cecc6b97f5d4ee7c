"""Projection learning (`fit_projections`) and the `ProjectionBank`."""

import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xeno_jax.io.htc import write_blosc
from xeno_jax.labels import SPECIES_12
from xeno_jax.projections import (
    ProjectionBank,
    fit_projections,
    moment_matching_loss,
    spectra_statistics,
)

C = 12


def l1_spectra(rng, n, shift):
    """Realistic-looking L1-normalised spectra: a base shape times a brightness, plus noise."""
    base = rng.uniform(0.5, 1.5, C) + shift
    x = base * rng.lognormal(0, 0.2, (n, 1)) + rng.normal(0, 0.1, (n, C))
    return (x / np.abs(x).sum(1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    source = [l1_spectra(rng, 300, 0.0), l1_spectra(rng, 517, 0.2)]
    target = [l1_spectra(rng, 400, 0.6), l1_spectra(rng, 257, -0.3), l1_spectra(rng, 350, 0.4)]
    return source, target


@jax.jit
def pixel_level_fit(source, target):
    """The reference formulation: Y = X W + b over all pixels, 100 Adam steps from (I, 0)."""
    target_mean, target_std = target.mean(0), target.std(0, ddof=1)

    def loss_fn(params):
        y = source @ params["W"] + params["b"]
        return (jnp.mean((y.mean(0) - target_mean) ** 2)
                + jnp.mean((y.std(0, ddof=1) - target_std) ** 2))

    optimizer = optax.adam(0.01)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(params, updates), state), loss

    params = {"W": jnp.eye(C), "b": jnp.zeros(C)}
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=100)
    return params["W"], params["b"], losses[-1], losses[0]


# --- statistics -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1000, 64, 7])
def test_statistics_match_float64_with_a_large_offset(chunk_size):
    rng = np.random.default_rng(1)
    x = (1000 + rng.normal(0, 0.01, (301, 5))).astype(np.float32)  # mean >> spread
    stats = spectra_statistics(x, chunk_size=chunk_size)
    x64 = x.astype(np.float64)
    assert stats.count == 301
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-7)
    np.testing.assert_allclose(stats.spread, np.cov(x64, rowvar=False), rtol=1e-5, atol=1e-10)
    variance = spectra_statistics(jnp.asarray(x), covariance=False, chunk_size=chunk_size)
    np.testing.assert_allclose(variance.spread, x64.var(0, ddof=1), rtol=1e-5)


def test_statistics_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(n, C\) with n >= 2"):
        spectra_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(n, C\)"):
        spectra_statistics(np.zeros(5))


def test_moment_loss_equals_the_pixel_loss(images):
    source, target = images[0][1], images[1][0]
    rng = np.random.default_rng(2)
    w = np.eye(C) + 0.1 * rng.normal(size=(C, C))
    b = 0.01 * rng.normal(size=C)
    y = source.astype(np.float64) @ w + b
    t = target.astype(np.float64)
    expected = (np.mean((y.mean(0) - t.mean(0)) ** 2)
                + np.mean((y.std(0, ddof=1) - t.std(0, ddof=1)) ** 2))
    s, ts = spectra_statistics(source), spectra_statistics(target, covariance=False)
    loss = moment_matching_loss(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                                s.mean, s.spread, ts.mean, jnp.sqrt(ts.spread))
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_moment_loss_gradient_equals_autodiff_of_the_plain_formula(images):
    s = spectra_statistics(images[0][0])
    t = spectra_statistics(images[1][0], covariance=False)
    rng = np.random.default_rng(3)
    w = jnp.asarray(np.eye(C) + 0.1 * rng.normal(size=(C, C)), jnp.float32)
    b = jnp.asarray(0.01 * rng.normal(size=C), jnp.float32)

    def plain(w, b):
        std = jnp.sqrt(jnp.diag(w.T @ s.spread @ w))
        return jnp.mean((s.mean @ w + b - t.mean) ** 2) + jnp.mean((std - jnp.sqrt(t.spread)) ** 2)

    grads = jax.grad(moment_matching_loss, (0, 1))(w, b, s.mean, s.spread, t.mean,
                                                   jnp.sqrt(t.spread))
    for got, want in zip(grads, jax.grad(plain, (0, 1))(w, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


# --- fitting --------------------------------------------------------------------------------

def test_fit_matches_the_pixel_level_formulation(images):
    source, target = images
    # chunk_size 4 < 6 pairs: two chunks, the last one padded.
    weights, bias, losses = fit_projections(source, target, chunk_size=4, pixel_chunk_size=100)
    assert weights.shape == (6, C, C) and bias.shape == (6, C) and losses.shape == (6,)
    for i, x in enumerate(source):
        for j, t in enumerate(target):
            w_ref, b_ref, loss_ref, _ = pixel_level_fit(x, t)
            pair = i * len(target) + j  # source-major
            np.testing.assert_allclose(weights[pair], w_ref, atol=2e-6)
            np.testing.assert_allclose(bias[pair], b_ref, atol=2e-7)
            np.testing.assert_allclose(losses[pair], loss_ref, rtol=1e-4)


def test_fit_moves_source_statistics_onto_the_target(images):
    source, target = images
    weights, bias, losses = fit_projections(source[:1], target[:1])
    x, t = source[0], target[0]
    y = x @ np.asarray(weights[0]) + np.asarray(bias[0])
    before = np.abs(x.mean(0) - t.mean(0)).mean() + np.abs(x.std(0) - t.std(0)).mean()
    after = np.abs(y.mean(0) - t.mean(0)).mean() + np.abs(y.std(0) - t.std(0)).mean()
    assert after < 0.1 * before
    _, _, _, initial_loss = pixel_level_fit(x, t)
    assert losses[0] < 0.02 * initial_loss


def test_modes_keep_the_other_parameter_fixed(images):
    source, target = images[0][:1], images[1][:2]
    weights, bias, _ = fit_projections(source, target, mode="weights", steps=10)
    assert np.all(bias == 0) and not np.allclose(weights, np.eye(C))
    weights, bias, _ = fit_projections(source, target, mode="bias", steps=10)
    assert np.all(weights == np.eye(C)) and np.all(bias != 0)


def test_fit_rejects_bad_input(images):
    source, target = images
    with pytest.raises(ValueError, match="mode"):
        fit_projections(source, target, mode="affine")
    with pytest.raises(ValueError, match="channels"):
        fit_projections(source, [np.zeros((5, C + 1), np.float32)])
    with pytest.raises(ValueError, match="at least one"):
        fit_projections([], target)


# --- bank -----------------------------------------------------------------------------------

def make_bank(rng, counts=None, channels=4):
    counts = counts or {6: 3, 1: 2}
    return ProjectionBank.from_pairs(
        {label: (rng.normal(size=(n, channels, channels)), rng.normal(size=(n, channels)))
         for label, n in counts.items()},
        losses={6: [0.1, 0.2, 0.3]},
        pair_names={6: [("p1", "i1"), ("p1", "i2"), ("p2", "i1")]},
        label_names={1: "stomach", 6: "kidney"}, source_species="pig", state="malperfusion")


def test_bank_groups_pairs_by_ascending_label():
    rng = np.random.default_rng(3)
    bank = make_bank(rng)
    assert bank.label_indices == (1, 6) and bank.counts == (2, 3) and bank.offsets == (0, 2)
    assert bank.weights.shape == (5, 4, 4) and bank.num_channels == 4
    w, b = bank.pairs(6)
    np.testing.assert_array_equal(w, bank.weights[2:])
    np.testing.assert_array_equal(b, bank.biases[2:])
    assert np.isnan(bank.losses[:2]).all() and list(bank.losses[2:]) == pytest.approx([.1, .2, .3])
    assert bank.pair_names[:2] == (("", ""),) * 2 and bank.pair_names[2] == ("p1", "i1")
    with pytest.raises(ValueError, match="label index 3 has no matrices"):
        bank.pairs(3)
    with pytest.raises(ValueError, match="W \\(n, C, C\\) and b \\(n, C\\)"):
        ProjectionBank.from_pairs({1: (np.zeros((2, 3, 3)), np.zeros((2, 4)))})


def test_bank_is_a_pytree():
    bank = make_bank(np.random.default_rng(4))
    leaves, treedef = jax.tree.flatten(bank)
    assert len(leaves) == 3 and leaves[0] is bank.weights
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.weights is bank.weights and rebuilt.counts == bank.counts
    assert jax.tree.structure(rebuilt) == treedef
    doubled = jax.tree.map(lambda x: 2 * x, bank)
    np.testing.assert_array_equal(doubled.weights, 2 * bank.weights)
    assert doubled.pair_names == bank.pair_names and doubled.state == "malperfusion"

    @jax.jit
    def first_bias(b):
        return b.biases[b.offsets[1]]

    np.testing.assert_array_equal(first_bias(bank), bank.biases[2])


def test_bank_save_load_round_trip_is_exact(tmp_path):
    bank = make_bank(np.random.default_rng(5))
    path = tmp_path / "bank.h5"
    bank.save(path)
    loaded = ProjectionBank.load(path)
    for name in ("weights", "biases", "losses"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(bank, name))
    for name in ("label_indices", "counts", "label_names", "pair_names", "source_species",
                 "state"):
        assert getattr(loaded, name) == getattr(bank, name)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.h5"]  # no temporary left behind


def test_bank_save_is_atomic_and_load_checks_the_format(tmp_path):
    path = tmp_path / "bank.h5"
    path.write_bytes(b"old")
    bank = make_bank(np.random.default_rng(6))
    broken = dataclasses.replace(bank, weights=None)  # fails after the file was opened
    with pytest.raises(AttributeError):
        broken.save(path)
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="not an HDF5 file"):
        ProjectionBank.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bank.save(tmp_path / "missing" / "bank.h5")


# --- reference banks ------------------------------------------------------------------------

def reference_tensor(rng, n, channels=4):
    return rng.normal(size=(n, channels, channels + 1)).astype(np.float32)


def test_from_htc_reads_reference_banks(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {"kidney": reference_tensor(rng, 3), "meso": reference_tensor(rng, 1),
               "small_bowel": reference_tensor(rng, 2)}
    path = tmp_path / "weights+bias_ICG_rat_subjects=R043,R048.blosc"
    write_blosc(path, tensors)
    sidecar = {name: [{"name_physiological": f"{name}-p{k}", "name_ischemic": f"{name}-i{k}",
                       "loss": 0.5 + k} for k in range(len(t))] for name, t in tensors.items()}
    path.with_suffix(".json").write_text(json.dumps(sidecar))

    bank = ProjectionBank.from_htc(path, SPECIES_12)
    kidney, bowel = SPECIES_12.name_to_index("kidney"), SPECIES_12.name_to_index("small_bowel")
    assert bank.label_indices == (bowel, kidney) and bank.counts == (3, 3)
    assert bank.label_names == ("small_bowel", "kidney")
    assert (bank.source_species, bank.state) == ("rat", "ICG")
    w, b = bank.pairs(kidney)
    np.testing.assert_array_equal(w, tensors["kidney"][:, :, :-1])
    np.testing.assert_array_equal(b, tensors["kidney"][:, :, -1])
    w, b = bank.pairs(bowel)  # names sharing an index: concatenated in file order
    np.testing.assert_array_equal(w, np.concatenate([tensors["meso"], tensors["small_bowel"]])
                                  [:, :, :-1])
    assert bank.pair_names[:2] == (("meso-p0", "meso-i0"), ("small_bowel-p0", "small_bowel-i0"))
    np.testing.assert_allclose(bank.losses[3:], [0.5, 1.5, 2.5])


def test_from_htc_unknown_labels_are_an_error_unless_filtered(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "bank.blosc"
    write_blosc(path, {"kidney": reference_tensor(rng, 2), "gallbladder": reference_tensor(rng, 1)})
    with pytest.raises(ValueError, match="gallbladder"):
        ProjectionBank.from_htc(path, SPECIES_12)
    bank = ProjectionBank.from_htc(path, SPECIES_12, target_labels=["kidney"], state="x")
    assert bank.label_names == ("kidney",) and bank.counts == (2,) and bank.state == "x"
    assert np.isnan(bank.losses).all()  # no sidecar
    write_blosc(path, {"kidney": rng.normal(size=(2, 4, 4)).astype(np.float32)})
    with pytest.raises(ValueError, match=r"\[n, C, C \+ 1\]"):
        ProjectionBank.from_htc(path, SPECIES_12)


class _Payload:
    """Pickles to a call of `pathlib.Path.touch`: running it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_from_htc_refuses_pickled_callables_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.blosc"
    path.write_bytes(pickle.dumps({"kidney": ((1, 4, 5), _Payload(marker), 10)}) + b"\0" * 10)
    with pytest.raises(ValueError, match="refused"):
        ProjectionBank.from_htc(path, SPECIES_12)
    assert not marker.exists()
