"""A U-Net for per-pixel segmentation of spectral images (Flax linen).

The encoder halves the resolution ``depth = len(widths) - 1`` times with 2x2 max pooling, the
decoder doubles it again with nearest-neighbour upsampling and concatenates the encoder features
of the same resolution (skip connections). Every resolution level has two 3x3 convolutions, each
followed by a normalisation layer and a ReLU. An optional 1x1 "stem" convolution (also
normalised, then ReLU) first mixes the ~100 spectral channels down to a few learned bands, which
keeps the first 3x3 convolution cheap.

Inputs whose height or width is not a multiple of ``2**depth`` are zero-padded at the bottom and
right (an all-zero spectrum is what L1 normalisation gives for an empty pixel) and the logits are
cropped back, so the output always has the input's spatial size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("batch", "group", "none")


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and a ReLU.

    Attributes:
      features: output channels of both convolutions.
      norm: ``"batch"``, ``"group"`` or ``"none"``.
      num_groups: groups of the group normalisation.
      bn_momentum: running-average momentum of the batch normalisation.
      axis_name: mapped axis over which batch statistics are averaged (synchronised batch norm),
        or None for per-device statistics.
      dtype: computation dtype; parameters are always float32.
    """

    features: int
    norm: str = "batch"
    num_groups: int = 8
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), use_bias=self.norm == "none", dtype=self.dtype)(x)
            x = nn.relu(normalize(x, norm=self.norm, train=train, num_groups=self.num_groups,
                                  bn_momentum=self.bn_momentum, axis_name=self.axis_name,
                                  dtype=self.dtype))
        return x


def normalize(x: jnp.ndarray, *, norm: str, train: bool, num_groups: int, bn_momentum: float,
              axis_name: str | None, dtype: Any, name: str | None = None) -> jnp.ndarray:
    """Batch norm (synchronised over `axis_name` in training), group norm, or nothing."""
    if norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=bn_momentum,
                            axis_name=axis_name if train else None, dtype=dtype, name=name)(x)
    if norm == "group":
        return nn.GroupNorm(num_groups=num_groups, dtype=dtype, name=name)(x)
    return x


class UNet(nn.Module):
    """U-Net returning float32 logits ``(B, H, W, num_classes)`` at the input resolution.

    Attributes:
      num_classes: output classes per pixel.
      widths: channels per resolution level, from full resolution down; the network
        downsamples ``len(widths) - 1`` times.
      stem_width: channels of a first 1x1 convolution over the spectral channels, or None to
        feed the input straight into the first 3x3 convolution.
      norm: ``"batch"`` (synchronised over `axis_name` in training), ``"group"`` or ``"none"``.
      num_groups: groups of the group normalisation; must divide every width.
      bn_momentum: running-average momentum of batch normalisation (0.9 is PyTorch's 0.1).
      axis_name: mapped axis for synchronised batch normalisation in training, or None.
      dtype: computation dtype (float32 or bfloat16); parameters stay float32.
    """

    num_classes: int = 12
    widths: Sequence[int] = (32, 64, 128, 256, 512, 512)
    stem_width: int | None = 32
    norm: str = "batch"
    num_groups: int = 8
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"UNet norm must be one of {NORMS}, got {self.norm!r}")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"UNet widths must be positive channel counts, got {self.widths!r}")
        if self.norm == "group" and any(w % self.num_groups for w in self.widths):
            raise ValueError(
                f"UNet num_groups={self.num_groups} must divide every width, got {self.widths!r}"
            )
        super().__post_init__()

    @property
    def depth(self) -> int:
        """Number of 2x downsamplings."""
        return len(self.widths) - 1

    def _block(self, features: int) -> ConvBlock:
        return ConvBlock(
            features,
            norm=self.norm,
            num_groups=self.num_groups,
            bn_momentum=self.bn_momentum,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Segments a batch of spectral images.

        Args:
          features: ``(B, H, W, C)`` spectra, any H and W.
          train: use (and update) batch statistics instead of the running averages.

        Returns:
          float32 logits ``(B, H, W, num_classes)``.
        """
        height, width = features.shape[1:3]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = jnp.pad(features, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))).astype(self.dtype)

        if self.stem_width is not None:
            x = nn.Conv(self.stem_width, (1, 1), use_bias=self.norm == "none", dtype=self.dtype,
                        name="spectral_stem")(x)
            # Normalised at once: L1 spectra share one dominant shape, and their differences,
            # tiny in absolute terms, are what separates organs (trains much faster).
            x = nn.relu(normalize(x, norm=self.norm, train=train, num_groups=self.num_groups,
                                  bn_momentum=self.bn_momentum, axis_name=self.axis_name,
                                  dtype=self.dtype, name="stem_norm"))

        skips = []
        for level_width in self.widths[:-1]:
            x = self._block(level_width)(x, train=train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = self._block(self.widths[-1])(x, train=train)

        for level_width, skip in zip(reversed(self.widths[:-1]), reversed(skips), strict=True):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = self._block(level_width)(jnp.concatenate([x, skip], axis=-1), train=train)

        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
        return logits[:, :height, :width].astype(jnp.float32)
