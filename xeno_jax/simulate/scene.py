"""Scene layout: which material lies where, how high it bulges, and where vessels run.

A scene is a fixed set of object slots drawn in painter's order (``docs/tissue_optics.md``
section 6.1): drapes, gauze and gloves at the border; the surgical opening as nested skin,
peritoneum and cavity floor; solid organs as radial-Fourier superellipses; colon and small
bowel as tubes along smooth random centre lines; metal retractors on top. Each slot is present
or not (organ slots with the species' organ-presence probability). The organ named by the
specification's ``focus`` is always present and otherwise drawn from the same distribution as
in any other image (size, position, painter's order), so that pathological images, which all
focus on the imaged organ, show the same scenes as physiological ones. One documented
difference: a focus organ that other objects would hide for the most part (less than
`FOCUS_MIN_VISIBLE` of it visible) is drawn on top, because a recording of an organ shows that
organ (an image of a malperfused kidney without kidney pixels would be no such image).
Geometry is in millimetres over the Tivita field of view (0.45 mm/pixel at 480 x 640), so any
image size shows the same scene, and organs shrink with the species' anatomy scale.

Everything is vectorised over slots and pixels with static shapes; the slot tables are
constants and only their random parameters are drawn per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xeno_jax.labels import SPECIES_12
from xeno_jax.simulate.draws import Draws
from xeno_jax.simulate.materials import MATERIAL_LABEL, material_index
from xeno_jax.simulate.species import Species

FIELD_OF_VIEW_MM = (216.0, 288.0)  # 480 x 640 pixels at 0.45 mm

# Blob slots in painter's order. region: 0 border, 1 organ (inside the opening), 2 upper part
# of the opening, 3 retractor bar from a border, 4 opening rim (radius factor in `radius`).
# columns: material, radius_mm, aspect_min, aspect_max, harmonics, rectangular, height_mm, region,
#          presence (-1: the species' organ presence of the material's label), organ (scales
#          with anatomy)
_BLOBS = [
    ("white_compress", 45, 1.0, 1.6, 0.08, 0, 4, 0, 0.5, 0),
    ("abdominal_linen", 60, 1.0, 1.8, 0.10, 0, 3, 0, 0.4, 0),
    ("glove", 32, 1.5, 2.5, 0.06, 0, 15, 0, 0.25, 0),
    ("skin", 1.22, 1.0, 1.0, 0.05, 0, 8, 4, -1, 0),
    ("peritoneum", 1.10, 1.0, 1.0, 0.06, 0, 6, 4, -1, 0),
    ("muscle", 1.00, 1.0, 1.0, 0.07, 0, 2, 4, 1.0, 0),
    ("fat", 45, 1.0, 1.5, 0.15, 0, 6, 1, 0.6, 1),
    ("dark_gap", 14, 1.0, 2.0, 0.20, 0, -6, 1, 0.4, 1),
    ("lung", 50, 1.2, 1.8, 0.10, 0, 25, 2, -1, 1),
    ("liver", 58, 1.2, 1.9, 0.16, 0, 25, 2, -1, 1),
    ("spleen", 40, 1.8, 2.4, 0.08, 0, 15, 1, -1, 1),
    ("stomach", 55, 1.1, 1.6, 0.10, 0, 25, 1, -1, 1),
    ("kidney", 42, 1.5, 1.9, 0.07, 0, 22, 1, -1, 1),
    ("pancreas", 35, 2.0, 3.0, 0.14, 0, 10, 1, -1, 1),
    ("omentum", 55, 1.0, 1.6, 0.22, 0, 8, 1, -1, 1),
    ("fat", 22, 1.0, 1.8, 0.15, 0, 8, 1, 0.4, 1),
    ("metal", 10, 6.0, 10.0, 0.0, 1, 30, 3, 0.6, 0),
    ("metal", 10, 6.0, 10.0, 0.0, 1, 30, 3, 0.4, 0),
]
# Tube slots, drawn above the solid organs: material, diameter factor of the species' bowel
# diameter, length in diameters, height factor.
_TUBES = [("colon", 1.4, 6.0, 0.5), ("small_bowel", 1.0, 9.0, 0.5), ("small_bowel", 1.0, 9.0, 0.5)]
_TUBE_SEGMENTS = 12
_VESSELS = 3
_VESSEL_MATERIALS = ("omentum", "small_bowel", "colon", "stomach", "peritoneum", "fat")
_NUM_HARMONICS = 4

BLOB_MATERIAL = np.array([material_index(b[0]) for b in _BLOBS], np.int32)
TUBE_MATERIAL = np.array([material_index(t[0]) for t in _TUBES], np.int32)
_BLOB_TABLE = np.array([b[1:] for b in _BLOBS], np.float32)
_TUBE_TABLE = np.array([t[1:] for t in _TUBES], np.float32)
_FOCUS_Z_BOOST = 50.0
_TOP_Z = 100.0
FOCUS_MIN_VISIBLE = 0.1


def pixel_grid(height: int, width: int) -> jnp.ndarray:
    """Pixel centres in millimetres over the field of view, shape (H, W, 2) as (y, x)."""
    fy, fx = FIELD_OF_VIEW_MM
    y = (jnp.arange(height, dtype=jnp.float32) + 0.5) * (fy / height)
    x = (jnp.arange(width, dtype=jnp.float32) + 0.5) * (fx / width)
    return jnp.stack(jnp.meshgrid(y, x, indexing="ij"), axis=-1)


def _cubic_resize_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) weights of cubic-convolution interpolation (Keys, a = -0.5), edges clamped."""
    position = (np.arange(size) + 0.5) * cells / size - 0.5
    base = np.floor(position).astype(int)
    weights = np.zeros((size, cells), np.float32)
    for offset in range(-1, 3):
        t = np.abs(position - (base + offset))
        w = np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                     np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))
        np.add.at(weights, (np.arange(size), np.clip(base + offset, 0, cells - 1)), w)
    return weights


def smooth_field(coarse, height: int, width: int):
    """A smooth, roughly unit-variance field (H, W, C) from coarse noise (h, w, C), upsampled."""
    cells = coarse.shape
    field = jnp.einsum("hi,ijc,wj->hwc", _cubic_resize_matrix(height, cells[0]), coarse,
                       _cubic_resize_matrix(width, cells[1]))
    return field / jnp.maximum(jnp.std(field, axis=(0, 1), keepdims=True), 1e-3)


def _blob(grid, center, radius, aspect, angle, rectangular, harm_cos, harm_sin):
    """One radial-Fourier ellipse (or rectangle): (inside mask, depth in [0, 1])."""
    d = grid - center
    c, s = jnp.cos(angle), jnp.sin(angle)
    u = (c * d[..., 1] + s * d[..., 0]) / (radius * jnp.sqrt(aspect))
    v = (-s * d[..., 1] + c * d[..., 0]) * jnp.sqrt(aspect) / radius
    euclidean = jnp.sqrt(u * u + v * v + 1e-12)
    rho = jnp.where(rectangular, jnp.maximum(jnp.abs(u), jnp.abs(v)), euclidean)
    cos1, sin1 = u / euclidean, v / euclidean
    boundary = jnp.ones_like(rho)
    cos_n, sin_n = jnp.ones_like(rho), jnp.zeros_like(rho)
    for n in range(_NUM_HARMONICS):  # angle harmonics by recurrence (trace-time, 4 terms)
        cos_n, sin_n = cos_n * cos1 - sin_n * sin1, sin_n * cos1 + cos_n * sin1
        boundary = boundary + harm_cos[n] * cos_n + harm_sin[n] * sin_n
    ratio = rho / jnp.maximum(boundary, 0.2)
    return ratio < 1.0, jnp.clip(1.0 - ratio**2, 0.0, 1.0)


def _polyline_distance(grid, points):
    """Distance (H, W) from each pixel to a polyline through points (N, 2).

    A running minimum over the segments (`lax.scan`), on separate row and column planes.
    """
    gy, gx = grid[..., 0], grid[..., 1]

    def nearer(best, segment):
        (ay, ax), (by, bx) = segment
        dy, dx = by - ay, bx - ax
        t = jnp.clip(((gy - ay) * dy + (gx - ax) * dx) / jnp.maximum(dy * dy + dx * dx, 1e-6),
                     0.0, 1.0)
        oy, ox = gy - ay - t * dy, gx - ax - t * dx
        return jnp.minimum(best, oy * oy + ox * ox), None

    best, _ = jax.lax.scan(nearer, jnp.full(gy.shape, jnp.inf), (points[:-1], points[1:]))
    return jnp.sqrt(best)


def _random_paths(draws: Draws, n, start, length, curvature):
    """n smooth random centre lines of `_TUBE_SEGMENTS` segments: (n, segments + 1, 2)."""
    heading0 = draws.uniform((n, 1), maxval=2 * jnp.pi)
    turns = curvature * draws.normal((n, _TUBE_SEGMENTS))
    heading = heading0 + jnp.cumsum(turns, axis=1)
    step = (length / _TUBE_SEGMENTS)[:, None, None] * jnp.stack(
        [jnp.sin(heading), jnp.cos(heading)], axis=-1)
    return jnp.concatenate([start[:, None], start[:, None] + jnp.cumsum(step, axis=1)], axis=1)


def _organ_presence(species: Species, material: np.ndarray) -> jnp.ndarray:
    labels = MATERIAL_LABEL[material]
    return species.organ_presence[np.minimum(labels, SPECIES_12.num_classes - 1)]


def layout(key, species: Species, focus, height: int, width: int) -> dict:
    """Draws a scene.

    Args:
      key: PRNG key.
      species: gives organ presence probabilities and anatomy scale.
      focus: label index always present (traced int; -1 for none).
      height, width: image size in pixels (static).

    Returns:
      ``material`` (H, W) int32 material indices, ``height_mm`` (H, W) surface height,
      ``vessel`` (H, W) float in [0, 1] vessel coverage, ``opening`` (H, W) bool.
    """
    draws = Draws(key, uniforms=256, normals=512)
    grid = pixel_grid(height, width)
    fov = jnp.asarray(FIELD_OF_VIEW_MM)
    scale = species.anatomy_scale
    n_blobs, n_tubes = len(_BLOBS), len(_TUBES)

    # Elastic deformation of the organ geometry (a few millimetres).
    warp = 6.0 * smooth_field(draws.normal((4, 5, 2)), height, width)
    organ_grid = grid + warp

    # The surgical opening.
    center = fov / 2 + 10.0 * draws.normal((2,))
    opening_radius = 0.46 * jnp.min(fov) * (0.55 + 0.45 * scale) * draws.uniform((), 0.85, 1.1)

    table = jnp.asarray(_BLOB_TABLE)
    radius_mm, aspect_lo, aspect_hi, harmonics, rectangular, height_mm, region, presence, organ = (
        table[:, i] for i in range(9))
    blob_labels = MATERIAL_LABEL[BLOB_MATERIAL]
    is_focus = (jnp.asarray(blob_labels) == focus) & (organ > 0)
    # Only the first slot of the focus label gets the focus role.
    is_focus = is_focus & (jnp.cumsum(is_focus) == 1)

    u = draws.uniform((n_blobs, 6))
    size = jnp.where(organ > 0, scale, 1.0) * (0.8 + 0.45 * u[:, 0])
    radius = jnp.where(region == 4, radius_mm * opening_radius, radius_mm * size)
    aspect = aspect_lo + (aspect_hi - aspect_lo) * u[:, 1]
    angle = 2 * jnp.pi * u[:, 2]

    # Centres: border (a random side), inside the opening, its upper part, retractor bars.
    side = jnp.floor(4 * u[:, 3]).astype(jnp.int32)
    along = u[:, 4]
    border_y = jnp.select([side == 0, side == 1], [0.0, fov[0]], along * fov[0])
    border_x = jnp.select([side == 2, side == 3], [0.0, fov[1]], along * fov[1])
    border = jnp.stack([border_y, border_x], -1)
    phi = 2 * jnp.pi * draws.uniform((n_blobs,))
    rad = 0.62 * opening_radius * jnp.sqrt(u[:, 5])
    inside = center + rad[:, None] * jnp.stack([jnp.sin(phi), jnp.cos(phi)], -1)
    upper = inside.at[:, 0].set(center[0] - 0.5 * opening_radius + 0.3 * rad * jnp.sin(phi))
    inward = jnp.where(side[:, None] < 2, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    inward = inward * jnp.where((side == 0) | (side == 2), 1.0, -1.0)[:, None]
    bar_length = radius * jnp.sqrt(aspect)
    bar = border + inward * bar_length[:, None]
    bar_angle = jnp.where(side < 2, jnp.pi / 2, 0.0) + 0.3 * (u[:, 2] - 0.5)
    centers = jnp.select(
        [region[:, None] == 0, region[:, None] == 2, region[:, None] == 3, region[:, None] == 4],
        [border, upper, bar, jnp.broadcast_to(center, (n_blobs, 2))], inside)
    angle = jnp.select([region == 3, region == 4], [bar_angle, 0.0], angle)
    aspect = jnp.where(region == 4, fov[1] / fov[0], aspect)

    falloff = 1.0 / jnp.arange(1, _NUM_HARMONICS + 1)
    harm_cos = harmonics[:, None] * falloff * draws.normal((n_blobs, _NUM_HARMONICS))
    harm_sin = harmonics[:, None] * falloff * draws.normal((n_blobs, _NUM_HARMONICS))

    probability = jnp.where(presence < 0, _organ_presence(species, BLOB_MATERIAL), presence)
    present = (draws.uniform((n_blobs,)) < probability) | is_focus

    slot_grid = jnp.where((organ > 0)[:, None, None, None], organ_grid[None], grid[None])
    blob_inside, blob_depth = jax.vmap(_blob)(
        slot_grid, centers, radius, aspect, angle, rectangular > 0, harm_cos, harm_sin)
    opening = blob_inside[3]  # the skin incision (drawn or not): organs stay inside it
    blob_inside = blob_inside & present[:, None, None]
    blob_inside = blob_inside & jnp.where((organ > 0)[:, None, None], opening[None], True)
    blob_height = height_mm[:, None, None] * blob_depth * jnp.where(
        organ > 0, scale, 1.0)[:, None, None]

    # Bowel tubes inside the opening.
    tubes = jnp.asarray(_TUBE_TABLE)
    tube_labels = MATERIAL_LABEL[TUBE_MATERIAL]
    tube_focus = (jnp.asarray(tube_labels) == focus) & (jnp.cumsum(
        jnp.asarray(tube_labels) == focus) == 1)
    diameter = species.bowel_diameter_mm * tubes[:, 0] * draws.uniform((n_tubes,), 0.8, 1.2)
    length = diameter * tubes[:, 1] * draws.uniform((n_tubes,), 0.7, 1.3)
    phi = 2 * jnp.pi * draws.uniform((n_tubes,))
    rad = 0.5 * opening_radius * jnp.sqrt(draws.uniform((n_tubes,)))
    start = center + rad[:, None] * jnp.stack([jnp.sin(phi), jnp.cos(phi)], -1)
    paths = _random_paths(draws, n_tubes, start, length, curvature=0.45)
    tube_dist = jax.vmap(_polyline_distance, in_axes=(None, 0))(organ_grid, paths)
    tube_ratio = tube_dist / (diameter / 2)[:, None, None]
    tube_present = (draws.uniform((n_tubes,)) < _organ_presence(species, TUBE_MATERIAL)
                    ) | tube_focus
    tube_inside = (tube_ratio < 1) & tube_present[:, None, None] & opening[None]
    tube_height = (tubes[:, 2] * diameter)[:, None, None] * jnp.clip(1 - tube_ratio**2, 0, 1)

    # Painter's order: the highest z among the objects covering a pixel wins.
    blob_z = jnp.arange(n_blobs, dtype=jnp.float32)
    blob_z = jnp.where(region == 3, _TOP_Z + blob_z, blob_z)
    tube_z = n_blobs + jnp.arange(n_tubes, dtype=jnp.float32) - 2.5  # above organs, below bars
    inside_all = jnp.concatenate([blob_inside, tube_inside])
    z_all = jnp.concatenate([blob_z, tube_z])
    # A mostly hidden focus organ is lifted on top of the other organs (see the docstring).
    focus_slot = jnp.concatenate([is_focus, tube_focus])
    order = jnp.argmax(jnp.where(inside_all, z_all[:, None, None], -jnp.inf), axis=0)
    focus_area = jnp.sum(inside_all & focus_slot[:, None, None], axis=(0, 1, 2))
    focus_visible = jnp.sum(focus_slot[order] & jnp.any(inside_all, axis=0))
    hidden = focus_visible < FOCUS_MIN_VISIBLE * focus_area
    z_all = jnp.where(focus_slot & hidden, z_all + _FOCUS_Z_BOOST, z_all)
    height_all = jnp.concatenate([blob_height, tube_height])
    material_all = jnp.concatenate([jnp.asarray(BLOB_MATERIAL), jnp.asarray(TUBE_MATERIAL)])
    z = jnp.where(inside_all, z_all[:, None, None], -jnp.inf)
    top = jnp.argmax(z, axis=0)
    covered = jnp.isfinite(jnp.max(z, axis=0))
    drape = jnp.where(draws.uniform() < 0.7, material_index("blue_cloth"),
                      material_index("abdominal_linen"))
    material = jnp.where(covered, material_all[top], drape)
    surface = jnp.where(covered, jnp.take_along_axis(height_all, top[None], 0)[0], 0.0)
    surface = surface + 1.5 * smooth_field(draws.normal((12, 16, 1)), height, width)[..., 0]

    # Vessels: thin tubes that raise blood volume where they cross vessel-bearing tissue.
    vessel_start = center + 0.5 * opening_radius * (draws.uniform((_VESSELS, 2)) - 0.5)
    vessel_paths = _random_paths(draws, _VESSELS, vessel_start,
                                 jnp.full((_VESSELS,), 1.2 * opening_radius), curvature=0.3)
    vessel_width = scale * jnp.linspace(1.0, 2.5, _VESSELS)
    vessel_dist = jax.vmap(_polyline_distance, in_axes=(None, 0))(organ_grid, vessel_paths)
    vessel = jnp.max(jnp.clip(1 - vessel_dist / vessel_width[:, None, None], 0, 1), axis=0)
    bearing = jnp.isin(material, jnp.asarray([material_index(m) for m in _VESSEL_MATERIALS]))
    return {
        "material": material.astype(jnp.int32),
        "height_mm": surface,
        "vessel": jnp.where(bearing, vessel, 0.0),
        "opening": opening,
    }
