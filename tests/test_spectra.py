"""Spectra: vendored tables against their anchors, optics, Tivita indices, L1 normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from xeno_jax import spectra
from xeno_jax.spectra import optics
from xeno_jax.spectra.chromophores import chromophore_table


# Anchor values from xeno_jax/spectra/data/README.md ("Anchor values for tests").
@pytest.mark.parametrize(
    "column, wavelength, value",
    [
        ("eps_hbo2", 500, 20932.8), ("eps_hb", 500, 20862), ("eps_hbo2", 576, 55540),
        ("eps_hb", 576, 40092), ("eps_hbo2", 600, 3200), ("eps_hb", 600, 14677.2),
        ("eps_hbo2", 650, 368), ("eps_hb", 650, 3750.12), ("eps_hbo2", 700, 290),
        ("eps_hb", 700, 1794.28), ("eps_hbo2", 760, 586), ("eps_hb", 760, 1548.52),
        ("eps_hbo2", 800, 816), ("eps_hb", 800, 761.72), ("eps_hbo2", 850, 1058),
        ("eps_hb", 850, 691.32), ("eps_hbo2", 900, 1198), ("eps_hb", 900, 761.84),
        ("eps_hbo2", 1000, 1024), ("eps_hb", 1000, 206.784), ("eps_hbo2", 1050, 784.659),
        ("eps_hb", 1050, 42.90244), ("mua_water", 500, 0.000238), ("mua_water", 750, 0.027334),
        ("mua_water", 800, 0.022462), ("mua_water", 900, 0.064088),
        ("mua_water", 970, 0.479982), ("mua_water", 1000, 0.40715), ("mua_fat", 930, 0.131),
        ("mua_fat", 500, 0.01906), ("mua_fat", 760, 0.01278), ("mua_fat", 900, 0.04633),
        ("eps_icg", 810, 190720), ("eps_icg", 660, 15280), ("eps_icg", 800, 182180),
        ("eps_icg", 850, 29618), ("eps_icg", 500, 600.1113), ("eps_icg", 890, 5.410744),
    ],
)
def test_chromophore_anchors(column, wavelength, value):
    table = chromophore_table()
    row = np.flatnonzero(table.wavelength_nm == wavelength)
    assert row.size == 1
    np.testing.assert_allclose(getattr(table, column)[row[0]], value, rtol=1e-6)


def test_chromophore_table_structure():
    table = chromophore_table()
    np.testing.assert_array_equal(table.wavelength_nm, np.arange(450, 1051))
    assert np.argmax(table.eps_icg) == 810 - 450
    fat_window = (table.wavelength_nm >= 880) & (table.wavelength_nm <= 1000)
    assert table.wavelength_nm[fat_window][np.argmax(table.mua_fat[fat_window])] == 930


def test_whole_blood_absorption_matches_the_readme_example():
    # 576 nm, 150 g/L, fully oxygenated: 297.4 /cm.
    bands = spectra.BandGrid(start_nm=576, stop_nm=577, num_bands=2)
    mua = spectra.band_spectra(bands).mua_hbo2_per_g_l[0] * 150
    np.testing.assert_allclose(mua, 297.4, rtol=1e-3)


@pytest.mark.parametrize("albedo, reflectance", [
    (0.0, 0.0), (0.5, 0.0334353), (0.8, 0.1337288), (0.9, 0.2370872), (0.95, 0.35131),
    (0.99, 0.6026362), (0.999, 0.8304768), (1.0, 0.9722222),
])
def test_reflectance_table_anchors(albedo, reflectance):
    np.testing.assert_allclose(optics.reflectance_from_albedo(np.array(albedo)), reflectance,
                               atol=2e-5)


def test_reflectance_table_is_monotone_and_resampling_is_faithful():
    albedo, refl = optics.reflectance_table()
    assert np.all(np.diff(albedo) > 0) and np.all(np.diff(refl) > 0)
    ratio = np.geomspace(1e-5, 1e3, 2000)
    fast = np.asarray(optics.reflectance_from_log_ratio(jnp.log(jnp.asarray(ratio))))
    exact = optics.reflectance_from_albedo(1 / (1 + ratio))
    assert np.all(np.diff(fast) <= 0)
    np.testing.assert_allclose(fast, exact, atol=1e-5)


def test_readme_example_spectrum():
    """Blood 3 % at 150 g/L, S 0.7, water 75 %, fat 5 %, mus' = 20 (lambda/500)^-1.2."""
    tissue = spectra.Tissue(0.03, 0.7, 0.75, 0.05, 0.0, 0.0, 20.0, 1.2, 150.0, 0.4)
    tissue = spectra.Tissue(*map(jnp.asarray, tissue))
    reflectance = np.asarray(spectra.tissue_reflectance(tissue, spectra.band_spectra()))
    wl = spectra.tivita_wavelengths()
    at = lambda nm: reflectance[np.argmin(np.abs(wl - nm))]
    np.testing.assert_allclose([at(500), at(576), at(800), at(970)], [0.18, 0.074, 0.57, 0.34],
                               atol=0.01)


def test_reflectance_falls_with_absorption_and_rises_with_scattering():
    wl = spectra.tivita_wavelengths()
    mua = jnp.asarray(np.geomspace(0.01, 300, 50))[:, None] * jnp.ones(len(wl))
    musp = optics.reduced_scattering(jnp.full(50, 18.0), jnp.full(50, 1.3), wl)
    d_mua, d_musp = jax.vmap(jax.vmap(jax.grad(optics.diffuse_reflectance, argnums=(0, 1))))(
        mua, musp)
    assert np.all(np.asarray(d_mua) < 0)
    assert np.all(np.asarray(d_musp) > 0)


def test_sto2_index_tracks_true_saturation():
    saturation = np.linspace(0.2, 0.95, 16)
    ones = np.ones_like(saturation)
    tissue = spectra.Tissue(*map(jnp.asarray, (
        0.06 * ones, saturation, 0.8 * ones, 0.01 * ones, 0 * ones, 0 * ones, 16 * ones,
        1.3 * ones, 100 * ones, 0.32 * ones)))
    reflectance = spectra.tissue_reflectance(tissue, spectra.band_spectra())
    index = np.asarray(spectra.sto2(reflectance))
    assert spearmanr(index, saturation).statistic > 0.9
    assert np.all((index >= 0) & (index <= 1))


def test_indices_are_clipped_and_respond_to_their_chromophore():
    base = spectra.Tissue(*map(jnp.asarray, (0.03, 0.7, 0.6, 0.1, 0.0, 0.0, 20.0, 1.2, 150.0,
                                            0.4)))
    wetter = base._replace(water=jnp.asarray(0.9))
    bloodier = base._replace(blood=jnp.asarray(0.06))
    r = lambda t: spectra.tissue_reflectance(t, spectra.band_spectra())
    assert spectra.twi(r(wetter)) > spectra.twi(r(base))
    assert spectra.thi(r(bloodier)) >= spectra.thi(r(base))
    for index in (spectra.sto2, spectra.nir_perfusion_index, spectra.thi, spectra.twi):
        value = float(index(r(base)))
        assert 0.0 <= value <= 1.0


def test_band_response_rows_average_to_centre_values():
    grid = spectra.BandGrid(fwhm_nm=8.0)
    table = chromophore_table()
    response = grid.response(table.wavelength_nm)
    np.testing.assert_allclose(response.sum(1), 1.0)
    # A linear spectrum is unchanged by a symmetric band response.
    linear = table.wavelength_nm * 2.0
    np.testing.assert_allclose(response @ linear, grid.centers * 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="exceed the table"):
        spectra.BandGrid(400, 1000, 10).response(table.wavelength_nm)


@pytest.mark.parametrize("backend", [np, jnp])
def test_l1_normalize(backend):
    x = backend.asarray(np.array([[1.0, -3.0, 4.0], [0.0, 0.0, 0.0]], np.float32))
    y = spectra.l1_normalize(x)
    assert isinstance(y, np.ndarray) == (backend is np)
    np.testing.assert_allclose(np.asarray(y), [[0.125, -0.375, 0.5], [0, 0, 0]])
    assert not np.isnan(np.asarray(y)).any()
    np.testing.assert_allclose(np.asarray(spectra.l1_normalize(x, axis=0))[:, 0], [1.0, 0.0])


def test_l1_normalize_jits():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 100)), jnp.float32)
    np.testing.assert_allclose(jax.jit(spectra.l1_normalize)(x), spectra.l1_normalize(x),
                               rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(jnp.abs(spectra.l1_normalize(x)), -1), 1.0, rtol=1e-5)
