"""Flax segmentation networks.

* ``unet``: our U-Net, with a `tiny` (CPU) and a `default` (one GPU) variant;
* ``unet_efficientnet_b0`` ... ``unet_efficientnet_b7``: the reference's smp U-Net on an
  EfficientNet encoder (``unet_efficientnet_b5`` is the paper's network), whose PyTorch weights
  `xeno_jax.models.convert` reads (``python -m experiments.convert_weights``).

`build_model(config.model)` turns the ``model`` section of `xeno_jax.train.config` into a module;
`load_pretrained(directory)` returns a converted network and its variables.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from xeno_jax.models import convert
from xeno_jax.models.efficientnet import SIZES, EfficientNetUNet
from xeno_jax.models.unet import NORMS, ConvBlock, UNet

# Per variant: the UNet attributes that set its size. `tiny` trains on batches of eight 64x80
# images at ~4 steps/s on two CPU cores; `default` is sized for 480x640 batches of 8 on one GPU
# (five downsamplings, a receptive field like the reference's EfficientNet-B5 encoder).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (16, 32, 64, 128), "stem_width": 16, "num_groups": 4},
    "default": {"widths": (32, 64, 128, 256, 512, 512), "stem_width": 32, "num_groups": 8},
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EFFICIENTNET_PREFIX = "unet_efficientnet_"
MODEL_NAMES = ("unet", *(EFFICIENTNET_PREFIX + size for size in SIZES))


def build_model(model_config: Any, *, axis_name: str | None = None) -> UNet | EfficientNetUNet:
    """Builds the network described by a ``model`` config section.

    Args:
      model_config: a ConfigDict (or mapping with attribute access) with ``name`` (one of
        `MODEL_NAMES`), ``dtype`` and ``num_classes``; for "unet" also ``variant``, ``widths``
        (empty: the variant's), ``stem_width`` (0 or absent: the variant's) and ``norm``.
      axis_name: mapped axis for synchronised batch normalisation; the training step runs the
        model under the ``"data"`` axis, so training code passes ``"data"``.

    Returns:
      The Flax module.

    Raises:
      ValueError: naming the key for an unknown name, variant, norm or dtype.
    """
    if model_config.name not in MODEL_NAMES:
        raise ValueError(f"model.name must be one of {MODEL_NAMES}, got {model_config.name!r}")
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}")
    if model_config.name.startswith(EFFICIENTNET_PREFIX):
        return EfficientNetUNet(size=model_config.name[len(EFFICIENTNET_PREFIX):],
                                num_classes=model_config.num_classes, axis_name=axis_name,
                                dtype=DTYPES[model_config.dtype])
    if model_config.variant not in VARIANTS:
        raise ValueError(
            f"model.variant must be one of {sorted(VARIANTS)}, got {model_config.variant!r}"
        )
    if model_config.norm not in NORMS:
        raise ValueError(f"model.norm must be one of {NORMS}, got {model_config.norm!r}")
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


def load_pretrained(directory: str, *, like: Any = None, axis_name: str | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """A converted network (``python -m experiments.convert_weights``) and its variables.

    Args:
      directory: the converter's ``--output``.
      like: a ``model`` config section the network must match (name, input channels,
        classes), whose computation dtype it then uses; None: the stored config (float32).
      axis_name: as for `build_model` (None for inference).

    Returns:
      ``(model, variables)``, ready for ``model.apply(variables, x, train=False)`` on NHWC
      input ``x`` with the network's input channels; variables are host NumPy arrays.

    Raises:
      FileNotFoundError: if `directory` holds no converted network.
      ValueError: naming the keys where the network differs from `like`.
    """
    model_config = convert.pretrained_model_config(directory)
    if like is not None:
        differ = [f"model.{k}={like[k]!r} but {directory} holds {model_config[k]!r}"
                  for k in ("name", "in_channels", "num_classes") if like[k] != model_config[k]]
        if differ:
            raise ValueError("converted network does not match the config: " + "; ".join(differ))
        model_config.dtype = like.dtype
    model = build_model(model_config, axis_name=axis_name)
    return model, convert.restore_variables(directory, model, model_config.in_channels)


__all__ = ["DTYPES", "MODEL_NAMES", "NORMS", "VARIANTS", "ConvBlock", "EfficientNetUNet", "UNet",
           "build_model", "load_pretrained"]
