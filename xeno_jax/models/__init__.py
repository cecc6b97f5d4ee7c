"""Flax segmentation networks: a U-Net with a `tiny` (CPU) and a `default` (one GPU) variant.

`build_model(config.model)` turns the ``model`` section of `xeno_jax.train.config` into a module.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from xeno_jax.models.unet import NORMS, ConvBlock, UNet

# Per variant: the UNet attributes that set its size. `tiny` trains on batches of eight 64x80
# images at ~4 steps/s on two CPU cores; `default` is sized for 480x640 batches of 8 on one GPU
# (five downsamplings, a receptive field like the reference's EfficientNet-B5 encoder).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (16, 32, 64, 128), "stem_width": 16, "num_groups": 4},
    "default": {"widths": (32, 64, 128, 256, 512, 512), "stem_width": 32, "num_groups": 8},
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_config: Any, *, axis_name: str | None = None) -> UNet:
    """Builds the network described by a ``model`` config section.

    Args:
      model_config: a ConfigDict (or mapping with attribute access) with ``name`` ("unet"),
        ``variant``, ``widths`` (empty: the variant's), ``stem_width`` (0 or absent: the
        variant's), ``norm``, ``dtype`` and ``num_classes``.
      axis_name: mapped axis for synchronised batch normalisation; the training step runs the
        model under the ``"data"`` axis, so training code passes ``"data"``.

    Returns:
      The Flax module.

    Raises:
      ValueError: naming the key for an unknown name, variant, norm or dtype.
    """
    if model_config.name != "unet":
        raise ValueError(f"model.name must be 'unet', got {model_config.name!r}")
    if model_config.variant not in VARIANTS:
        raise ValueError(
            f"model.variant must be one of {sorted(VARIANTS)}, got {model_config.variant!r}"
        )
    if model_config.norm not in NORMS:
        raise ValueError(f"model.norm must be one of {NORMS}, got {model_config.norm!r}")
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}")
    attributes = dict(VARIANTS[model_config.variant])
    if model_config.widths:
        attributes["widths"] = tuple(int(w) for w in model_config.widths)
    if model_config.get("stem_width"):
        attributes["stem_width"] = int(model_config.stem_width)
    return UNet(
        num_classes=model_config.num_classes,
        norm=model_config.norm,
        axis_name=axis_name,
        dtype=DTYPES[model_config.dtype],
        **attributes,
    )


__all__ = ["DTYPES", "NORMS", "VARIANTS", "ConvBlock", "UNet", "build_model"]
