"""From ideal reflectance to what a Tivita-like push-broom camera records.

``R_obs = L (R + r_surf) + s R_spec`` (``docs/tissue_optics.md`` sections 3.6, 6.3, 6.4):
Lambert shading ``L`` from six lamps around the lens over the scene's height map (L1
normalisation removes it), a broadband wet-surface reflection ``r_surf`` and Blinn-Phong
specular highlights (which it does not remove). The sensor then sees ``(W - D) R_obs`` counts
over a dark level ``D`` with a row fixed pattern and line flicker, shot and read noise, 10-bit
quantisation and clipping at 1023, and the cube is the white/dark-calibrated
``(DN - D) / (W - D)``.

Sensor noise is the standardised sum of four random 4-bit values, 16 random bits per value
(Irwin-Hall): close to Gaussian, and several times cheaper than exact normals, which dominated
the simulator's run time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xeno_jax.simulate.draws import Draws
from xeno_jax.simulate.materials import NON_TISSUES
from xeno_jax.spectra.bands import BandGrid

MAX_COUNT = 1023
OVERSATURATION_COUNT = 1000  # htc's threshold on raw counts

IRWIN_HALL_SD = float(np.sqrt(4 * (16**2 - 1) / 12))  # of the sum of four uniform 4-bit values


@dataclasses.dataclass(frozen=True)
class Camera:
    """Static camera settings.

    Attributes:
      bands: band centres and response.
      noise: whether to simulate sensor noise and quantisation (False gives R_obs exactly).
      electrons_per_count: shot-noise gain k.
      read_noise_counts: read noise sigma.
      white_peak_counts: white reference at the spectral peak of lamp x sensor.
      dark_counts: mean dark level.
      row_gain_sd, line_gain_sd: across-track fixed pattern and scan-line flicker.
      lamp_elevation_deg: angle of the six lamps from the optical axis.
    """

    bands: BandGrid = BandGrid()
    noise: bool = True
    electrons_per_count: float = 10.0
    read_noise_counts: float = 1.0
    white_peak_counts: float = 900.0
    dark_counts: float = 50.0
    row_gain_sd: float = 0.003
    line_gain_sd: float = 0.002
    lamp_elevation_deg: float = 20.0


def white_counts(camera: Camera) -> np.ndarray:
    """White-reference counts per band: halogen lamp times silicon response, low at the edges."""
    wl = camera.bands.centers
    shape = np.exp(-(((wl - 730.0) / 260.0) ** 4)) * (1 - 0.45 * np.exp(-((wl - 500) / 60) ** 2))
    return camera.dark_counts + (camera.white_peak_counts - camera.dark_counts) * (
        0.3 + 0.7 * shape)


def background_reflectance(u, wavelength_nm, water_mua) -> jnp.ndarray:
    """Parametric spectra of the non-tissue materials, one row per `NON_TISSUES` entry.

    Blue cloth: dyes absorbing 550-650 nm, NIR-transparent. Linen: bright, slightly wet. White
    compress: bright with water dips scaling with its wetness. Metal: flat grey. Gloves: a light
    blue dye band. Dark gap: a few percent. `u`: 8 uniform draws varying them per image.
    """
    wl = jnp.asarray(wavelength_nm, jnp.float32)
    water = jnp.asarray(water_mua, jnp.float32)
    sigmoid = lambda centre, width: jax.nn.sigmoid((wl - centre) / width)
    gauss = lambda centre, width: jnp.exp(-0.5 * ((wl - centre) / width) ** 2)
    rows = {
        "blue_cloth": (0.05 + 0.08 * gauss(480, 45) + (0.40 + 0.15 * u[0]) * sigmoid(690, 22)),
        "abdominal_linen": (0.55 + 0.2 * u[1]) * jnp.exp(-water * 0.5 * u[2]) * (
            1 - 0.1 * gauss(560, 40)),
        "white_compress": (0.8 + 0.12 * u[3]) * jnp.exp(-water * 3.0 * u[4]),
        "metal": (0.3 + 0.3 * u[5]) * (1 + 0.1 * (wl - 750) / 250),
        "glove": 0.45 - 0.25 * gauss(615, 45) + 0.3 * sigmoid(700, 30) + 0.05 * u[6],
        "dark_gap": jnp.full_like(wl, 0.01 + 0.02 * u[7]),
    }
    return jnp.stack([rows[name] for name in NON_TISSUES])


def shading(height_mm, pixel_mm: tuple[float, float], camera: Camera, exponent):
    """Lambert shading L (H, W) and the specular term s (H, W) from six lamps around the lens.

    Returns shading normalised to 1 for a flat surface, and the Blinn-Phong specular intensity
    with the given exponent (before the material's specular coefficient).
    """
    gy, gx = jnp.gradient(height_mm)
    gy, gx = gy / pixel_mm[0], gx / pixel_mm[1]
    norm = jnp.sqrt(1 + gx**2 + gy**2)
    normal = jnp.stack([-gx / norm, -gy / norm, 1 / norm], axis=-1)  # (x, y, z)
    elevation = np.deg2rad(camera.lamp_elevation_deg)
    azimuth = np.arange(6) * np.pi / 3
    lamps = np.stack([np.sin(elevation) * np.cos(azimuth), np.sin(elevation) * np.sin(azimuth),
                      np.full(6, np.cos(elevation))], axis=-1).astype(np.float32)
    half = lamps + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    lambert = jnp.mean(jnp.maximum(normal @ lamps.T, 0.0), axis=-1) / np.cos(elevation)
    specular = jnp.mean(jnp.maximum(normal @ half.T, 0.0) ** exponent, axis=-1)
    return lambert, specular


def sensor_patterns(key, height: int, width: int, camera: Camera) -> dict:
    """One recording's white and dark references and gain patterns of the push-broom sensor.

    Returns:
      ``white`` and ``dark`` counts (H, C), one value per sensor row and band; ``row_gain``
      (H, C), the across-track fixed pattern; ``line_gain`` (W,), the scan-line flicker.
    """
    c = camera.bands.num_bands
    draws = Draws(key, normals=3 * height * c + width)
    return {
        "white": jnp.asarray(white_counts(camera), jnp.float32) * (
            1 + 0.004 * draws.normal((height, c))),
        "dark": camera.dark_counts + 8.0 * draws.normal((height, c)),
        "row_gain": 1 + camera.row_gain_sd * draws.normal((height, c)),
        "line_gain": 1 + camera.line_gain_sd * draws.normal((width,)),
    }


def _normal_noise(key, shape):
    """Approximately standard normal noise: the sum of four random 4-bit values, standardised.

    An Irwin-Hall approximation (61 levels 0.11 sigma apart, excess kurtosis -0.3, within 3.3
    sigma): 16 random bits per value, two values per 32-bit word, summed with integer masks.
    Several times cheaper than exact normals over the 31 million values of a cube, where the
    random bits are most of the sensor model's cost.
    """
    *rows, last = shape
    words = jax.random.bits(key, (*rows, (last + 1) // 2), dtype=jnp.uint32)
    pairs = (words & 0x0F0F0F0F) + ((words >> 4) & 0x0F0F0F0F)  # bytes: sums of two nibbles
    sums = (pairs & 0x00FF00FF) + ((pairs >> 8) & 0x00FF00FF)  # 16-bit halves: of four
    total = jnp.stack([sums & 0xFFFF, sums >> 16], axis=-1).reshape(*rows, -1)[..., :last]
    return (total.astype(jnp.float32) - 30.0) * (1.0 / IRWIN_HALL_SD)


def expose(key, observed, patterns: dict, camera: Camera):
    """Records rows of the scene: observed reflectance (R, W, C) -> calibrated cube, saturation.

    Args:
      key: PRNG key of the sensor noise.
      observed: what reaches the sensor, as reflectance relative to white.
      patterns: the `sensor_patterns` rows of these image rows (``white``, ``dark``,
        ``row_gain`` (R, C) and ``line_gain`` (W,)).
      camera: the camera.

    Returns:
      ``cube`` (R, W, C) float32 calibrated reflectance and ``oversaturated`` (R, W) bool (any
      band above 1000 counts).
    """
    if not camera.noise:
        return observed, jnp.zeros(observed.shape[:2], bool)
    white, dark = patterns["white"][:, None], patterns["dark"][:, None]
    gain = patterns["row_gain"][:, None] * patterns["line_gain"][None, :, None]
    signal = (white - dark) * observed * gain
    sigma = jnp.sqrt(jnp.maximum(signal, 0.0) / camera.electrons_per_count
                     + camera.read_noise_counts**2)
    counts = jnp.clip(jnp.round(dark + signal + sigma * _normal_noise(key, observed.shape)),
                      0, MAX_COUNT)
    cube = (counts - dark) / (white - dark)
    oversaturated = jnp.any(counts > OVERSATURATION_COUNT, axis=-1)
    return cube.astype(jnp.float32), oversaturated
