"""Spectral augmentations: the xeno-learning projection (``method.md`` A3) and L1 renormalisation.

`project_spectra` applies stored affine maps ``x -> x W + b`` of a `ProjectionBank` to the spectra
of matching labels. It multiplies only the pixels it transforms: pixels are bucketed into slots
(one per image and label, each with its own map), each slot's pixels are laid out in tiles of a
fixed size, and a `jax.lax.while_loop` runs over the tiles that exist in this batch, gathering a
tile, multiplying it with its slot's matrix and scattering it back in place. All shapes are static
and nothing syncs with the host. Pixels are handled in groups of a few neighbours along a row, so
that the gathers and scatters copy contiguous memory; a group's pixels of other labels are written
back unchanged, bit for bit. Donate `features` when jitting to update them in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xeno_jax.projections.bank import ProjectionBank
from xeno_jax.spectra.normalize import l1_normalize

LABEL_MODES = ("label_match", "label_match_extended", "random")
_GROUP_SIZES = (8, 4, 2, 1)
_WORD = 32  # groups per bitmask word


def project_spectra(key: jax.Array, features: jax.Array, labels: jax.Array,
                    bank: ProjectionBank, **options) -> jax.Array:
    """`project_spectra_counted` without the count: the projected features only."""
    return project_spectra_counted(key, features, labels, bank, **options)[0]


def project_spectra_counted(key: jax.Array, features: jax.Array, labels: jax.Array,
                            bank: ProjectionBank, *, label_mode: str = "label_match",
                            target_labels: tuple[int, ...] | None = None,
                            interpolate: bool = True, p: float = 0.8, max_label: int = 12,
                            tile_size: int = 2048) -> tuple[jax.Array, jax.Array]:
    """Applies randomly drawn projections of `bank` to the spectra of a batch (``method.md`` A3).

    Each image is selected with probability `p` (``u <= p``, ``u ~ U[0, 1)``). In a selected image:

    - ``"label_match"``: every label in `target_labels` (default: all labels of the bank) that has
      matrices gets one pair drawn uniformly from its pairs and, with `interpolate`, one weight
      ``w ~ U[0, 1)``; its pixels become ``x + w (x W + b - x)`` (``x W + b`` without
      interpolation).
    - ``"label_match_extended"``: as ``label_match``, and every other label value in
      `target_labels` (default: ``0 .. max_label``) is transformed with a pair of a label drawn
      uniformly from the labels that have matrices.
    - ``"random"``: one pair drawn uniformly from all pairs of all labels, and one weight, applied
      to every pixel of the image.

    All other pixels, and unselected images, are returned bit-identical. Only transformed pixels
    are multiplied (see the module docstring); jit with `features` donated to update them in
    place, and pass a large bank as an argument rather than closing over it (a closed-over NumPy
    bank becomes a compile-time constant).

    Args:
      key: PRNG key.
      features: ``(B, H, W, C)`` spectra; computed in float32, returned in their dtype.
      labels: ``(B, H, W)`` integer labels.
      bank: the projections; ``C`` must equal ``bank.num_channels``.
      label_mode: one of `LABEL_MODES`.
      target_labels: static tuple of label indices to transform (None: see the modes).
      interpolate: blend with the input by a random weight instead of replacing it.
      p: probability that an image is transformed.
      max_label: largest label value transformed by ``label_match_extended`` when `target_labels`
        is None (the invalid index 12 of the 12-class mapping by default).
      tile_size: pixels multiplied per loop step (rounded down to a whole number of groups); a
        tuning knob, not a semantic one.

    Returns:
      ``(features, count)``: the transformed features (shape and dtype of `features`) and the
      int32 number of pixels transformed (0 when no selected image has a pixel to transform).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, H, W, C), got the shape {features.shape}")
    if labels.shape != features.shape[:3] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer (B, H, W) = {features.shape[:3]}, got "
                         f"{labels.dtype} {labels.shape}")
    if features.shape[-1] != bank.num_channels:
        raise ValueError(f"features have {features.shape[-1]} channels, the bank maps "
                         f"{bank.num_channels}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if target_labels is not None:
        target_labels = tuple(int(label) for label in target_labels)
    none = jnp.int32(0)
    if p == 0:
        return features, none

    bank = jax.tree.map(jnp.asarray, bank)  # NumPy leaves cannot be indexed by tracers
    batch = features.shape[0]
    key_select, key_pair, key_weight, key_source = jax.random.split(key, 4)
    selected = jax.random.uniform(key_select, (batch,)) <= p

    if label_mode == "random":
        pair = jax.random.randint(key_pair, (batch,), 0, bank.weights.shape[0])
        weight = jax.random.uniform(key_weight, (batch,))
        count = jnp.sum(selected, dtype=jnp.int32) * features.shape[1] * features.shape[2]
        return (_project_images(features, selected, pair, weight, bank, interpolate=interpolate),
                count)

    if label_mode == "label_match":
        slot_labels = tuple(label for label in bank.label_indices
                            if target_labels is None or label in target_labels)
    else:
        slot_labels = target_labels if target_labels is not None else tuple(range(max_label + 1))
        slot_labels = tuple(sorted(set(slot_labels)))
    if not slot_labels:
        return features, none
    # Per (image, slot label): the bank label whose pairs it draws from, a pair, a weight.
    own = np.array([bank.label_indices.index(label) if label in bank.label_indices else -1
                    for label in slot_labels])
    shape = (batch, len(slot_labels))
    drawn = jax.random.randint(key_source, shape, 0, len(bank.label_indices))
    source = jnp.where(own >= 0, own, drawn)
    offsets, counts = jnp.asarray(bank.offsets), jnp.asarray(bank.counts)
    pair = offsets[source] + jax.random.randint(key_pair, shape, 0, counts[source])
    weight = jax.random.uniform(key_weight, shape)
    active = jnp.broadcast_to(selected[:, None], shape)
    pixels = jnp.stack([jnp.sum(labels == label, axis=(1, 2), dtype=jnp.int32)
                        for label in slot_labels], axis=1)
    count = jnp.sum(jnp.where(active, pixels, 0))
    return _project_regions(features, labels, slot_labels, pair, weight, active, bank,
                            interpolate=interpolate, tile_size=tile_size), count


def l1_renormalize(features: jax.Array) -> jax.Array:
    """L1 normalisation of every spectrum (last axis); all-zero spectra stay zero.

    Projected spectra may be negative; the norm is ``sum |x|`` (``method.md`` A4 step 6).
    """
    return l1_normalize(features, axis=-1)


def _affine_map(bank: ProjectionBank, pair: jax.Array, weight: jax.Array, interpolate: bool):
    """``(W, b)`` of one pair, with the interpolation ``x + w (x W + b - x)`` folded in."""
    weights = bank.weights[pair].astype(jnp.float32)
    bias = bank.biases[pair].astype(jnp.float32)
    if interpolate:
        eye = jnp.eye(weights.shape[-1], dtype=jnp.float32)
        weights = weight * weights + (1 - weight) * eye
        bias = weight * bias
    return weights, bias


@functools.partial(jax.jit, static_argnames="interpolate")
def _project_images(features, selected, pair, weight, bank, interpolate):
    """``random`` mode: one map per selected image, on all of its pixels, in place."""
    _, height, width, channels = features.shape
    order = jnp.argsort(~selected, stable=True)  # the selected images first

    def transform(i, features):
        b = order[i]
        image = jax.lax.dynamic_index_in_dim(features, b, keepdims=False)
        weights, bias = _affine_map(bank, pair[b], weight[b], interpolate)
        mapped = jnp.dot(image.reshape(-1, channels).astype(jnp.float32), weights,
                         precision=jax.lax.Precision.HIGHEST) + bias
        mapped = mapped.reshape(height, width, channels).astype(features.dtype)
        return jax.lax.dynamic_update_index_in_dim(features, mapped, b, 0)

    return jax.lax.fori_loop(0, jnp.sum(selected), transform, features)


@functools.partial(jax.jit, static_argnames=("slot_labels", "interpolate", "tile_size"))
def _project_regions(features, labels, slot_labels, pair, weight, active, bank, *,
                     interpolate: bool, tile_size: int):
    """Label modes: slot ``(b, k)`` maps the pixels of image b whose label is ``slot_labels[k]``.

    Pixels are handled in groups of `group` neighbours. A group belongs to every slot whose label
    occurs in it; a slot's groups are numbered in raster order and cut into tiles of
    ``tile_groups`` groups (the last one padded). Each group's membership is one bit per slot
    label, packed 32 groups to a word, so that a tile finds its groups from per-word set-bit counts
    without a pass over the whole batch.

    Args:
      features: ``(B, H, W, C)``.
      labels: ``(B, H, W)``.
      slot_labels: static label values, one per slot column ``k``.
      pair: ``(B, L)`` pair index of every slot.
      weight: ``(B, L)`` interpolation weight of every slot.
      active: ``(B, L)`` whether the slot is transformed.
      bank: the projections.
      interpolate: see `project_spectra`.
      tile_size: pixels per loop step.

    Returns:
      The features with the pixels of every active slot mapped.
    """
    batch, height, width, channels = features.shape
    num_labels = len(slot_labels)
    if num_labels > _WORD - 1:
        raise ValueError(f"at most {_WORD - 1} labels can be projected at once, got "
                         f"{num_labels}: {slot_labels}")
    group = next(g for g in _GROUP_SIZES if (height * width) % g == 0)
    groups_per_image = height * width // group
    num_words = -(-groups_per_image // _WORD)
    tile_groups = max(1, tile_size // group)

    # Bit k of a group's code: the group holds a pixel of slot label k (in an active slot).
    pixel_code = sum(jnp.where(labels == label, jnp.uint32(1 << k), jnp.uint32(0))
                     for k, label in enumerate(slot_labels))
    group_code = jax.lax.reduce(pixel_code.reshape(batch, groups_per_image, group),
                                jnp.uint32(0), jax.lax.bitwise_or, (2,))
    active_code = jnp.sum(jnp.where(active, jnp.uint32(1) << jnp.arange(num_labels,
                                                                         dtype=jnp.uint32), 0),
                          axis=1, dtype=jnp.uint32)
    group_code = jnp.pad(group_code & active_code[:, None],
                         ((0, 0), (0, num_words * _WORD - groups_per_image)))
    # Word w of slot (b, k): bit j set if group 32 w + j of image b belongs to the slot.
    bit = jnp.arange(_WORD, dtype=jnp.uint32)
    members = (group_code.reshape(batch, 1, num_words, _WORD)
               >> jnp.arange(num_labels, dtype=jnp.uint32)[:, None, None]) & 1
    words = jnp.sum(members << bit, axis=-1, dtype=jnp.uint32).reshape(-1, num_words)
    word_counts = jax.lax.population_count(words).astype(jnp.int32)
    word_start = jnp.cumsum(word_counts, axis=-1) - word_counts     # (slots, words)
    slot_groups = word_start[:, -1] + word_counts[:, -1]
    slot_tiles = (slot_groups + tile_groups - 1) // tile_groups
    tile_end = jnp.cumsum(slot_tiles)
    num_groups = batch * groups_per_image

    slot_label = jnp.asarray(slot_labels, labels.dtype)
    pair, weight = pair.reshape(-1), weight.reshape(-1)
    grouped_labels = labels.reshape(num_groups, group)

    def tile_groups_of(t):
        """Slot of tile t and the (tile_groups,) indices of its groups (num_groups: padding)."""
        slot = jnp.sum(tile_end <= t)
        rank = (t - tile_end[slot] + slot_tiles[slot]) * tile_groups + jnp.arange(tile_groups)
        starts = word_start[slot]
        word = jnp.searchsorted(starts, rank, side="right", method="scan_unrolled") - 1
        index = _nth_set_bit(words[slot, word], (rank - starts[word]).astype(jnp.uint32))
        index = (slot // num_labels) * groups_per_image + word * _WORD + index
        return slot, jnp.where(rank < slot_groups[slot], index, num_groups)

    def transform_tile(state):
        # A tile's groups come from the previous step: a loop-carried array is materialised, so
        # XLA cannot fuse (and redo) the index arithmetic into every gathered value.
        t, grouped, slot, index = state
        x = grouped.at[index].get(mode="clip")
        # Padding (index num_groups) reads a real group; the scatter drops it again.
        in_slot = grouped_labels.at[index].get(mode="clip") == slot_label[slot % num_labels]
        weights, bias = _affine_map(bank, pair[slot], weight[slot], interpolate)
        mapped = jnp.dot(x.reshape(-1, channels).astype(jnp.float32), weights,
                         precision=jax.lax.Precision.HIGHEST) + bias
        x = jnp.where(in_slot[..., None], mapped.reshape(x.shape).astype(x.dtype), x)
        return (t + 1, grouped.at[index].set(x, mode="drop"), *tile_groups_of(t + 1))

    grouped = features.reshape(num_groups, group, channels)
    state = (jnp.int32(0), grouped, *tile_groups_of(jnp.int32(0)))
    grouped = jax.lax.while_loop(lambda state: state[0] < tile_end[-1], transform_tile, state)[1]
    return grouped.reshape(features.shape)


def _nth_set_bit(word: jax.Array, n: jax.Array) -> jax.Array:
    """Position of the n-th (0-based) set bit of each uint32 `word` (binary search on counts)."""
    position = jnp.zeros_like(word)
    for step in (16, 8, 4, 2, 1):
        candidate = position + step
        below = jax.lax.population_count(word & ((jnp.uint32(1) << candidate) - 1))
        position = jnp.where(below <= n, candidate, position)
    return position.astype(jnp.int32)
