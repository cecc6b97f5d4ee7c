"""Converts PyTorch weights of the reference's network (smp's EfficientNet U-Net) to Flax.

  python -m experiments.convert_weights --source=run_folder/fold_X/epoch=99.ckpt --output=nets/x
  python -m experiments.convert_weights --source=<reference run folder> --output=nets/run
  python -m experiments.convert_weights --source=efficientnet-b5-b6417697.pth \\
      --output=nets/b5_imagenet                 # ImageNet encoder, adapted to 100 channels

--source is a weights file (``.pt``/``.pth``, Lightning ``.ckpt``, ``.safetensors``) or a
reference run folder (its ``config.json`` and one ``.ckpt`` per fold folder); a folder with
several checkpoints gives one converted network per checkpoint in ``<output>/<fold folder>``.
The architecture comes from the run's ``config.json`` (``model.architecture_kwargs.encoder_name``,
``input.n_channels``) where there is one, else from --model and --in_channels; the number of
classes from the segmentation head (an encoder alone: --num_classes, its decoder and head
initialised as smp does).

Use the result with ``xeno_jax.models.load_pretrained(<output>)``, ``python -m
experiments.evaluate --workdir=<output>`` or ``--config.model.init_from=<output>`` in training.
Needs PyTorch for everything but safetensors: ``pip install 'xeno_jax[torch]'``.
"""

import hashlib
import json
import logging
from pathlib import Path

import ml_collections
from absl import app, flags

from experiments import common
from xeno_jax.models import EFFICIENTNET_PREFIX, MODEL_NAMES, build_model, convert

_SOURCE = flags.DEFINE_string("source", None, "Weights file or reference run folder.",
                              required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the converted network(s).",
                              required=True)
_MODEL = flags.DEFINE_enum("model", "unet_efficientnet_b5",
                           [n for n in MODEL_NAMES if n.startswith(EFFICIENTNET_PREFIX)],
                           "Architecture, unless the run's config.json names it.")
_IN_CHANNELS = flags.DEFINE_integer("in_channels", 100, "Input channels, unless config.json "
                                    "gives them.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 12, "Classes of an encoder-only source.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation of the decoder of an encoder-only source.")

WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin")


def reference_config(weights: Path, root: Path) -> tuple[dict, Path | None]:
    """The nearest ``config.json`` from the weights' folder up to `root` (htc run folders)."""
    for folder in [weights.parent, *weights.parent.parents]:
        path = folder / "config.json"
        if path.is_file():
            return json.loads(path.read_text()), path
        if folder == root or folder == folder.parent:
            break
    return {}, None


def architecture(config: dict, path: Path | None) -> tuple[str, int]:
    """Model name and input channels from a reference config (defaults: the flags)."""
    model = config.get("model", {})
    name = model.get("architecture_name", "Unet")
    kwargs = model.get("architecture_kwargs", {})
    if name != "Unet":
        raise ValueError(f"{path}: model.architecture_name={name!r}; only smp's Unet converts")
    unsupported = sorted(set(kwargs) - {"encoder_name", "encoder_weights"})
    if unsupported:
        raise ValueError(f"{path}: model.architecture_kwargs {unsupported} are not smp's "
                         f"defaults, which the Flax network implements")
    model_name = _MODEL.value
    if "encoder_name" in kwargs:
        model_name = EFFICIENTNET_PREFIX + kwargs["encoder_name"].removeprefix("efficientnet-")
        if model_name not in MODEL_NAMES:
            raise ValueError(f"{path}: encoder {kwargs['encoder_name']!r} is not one of "
                             f"efficientnet-b0 ... efficientnet-b7")
    return model_name, int(config.get("input", {}).get("n_channels", _IN_CHANNELS.value))


def convert_file(weights: Path, output: Path, root: Path) -> None:
    config, config_path = reference_config(weights, root)
    model_name, in_channels = architecture(config, config_path)
    state_dict = convert.read_state_dict(weights)
    head = [v for k, v in state_dict.items() if k.endswith("segmentation_head.0.bias")]
    num_classes = head[0].shape[0] if len(head) == 1 else _NUM_CLASSES.value
    model_config = {"name": model_name, "in_channels": in_channels, "num_classes": num_classes,
                    "dtype": "float32"}
    model = build_model(ml_collections.ConfigDict(model_config))
    variables, info = convert.variables_from_state_dict(state_dict, model,
                                                        in_channels=in_channels, seed=_SEED.value)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    record = {"source": str(weights.resolve()), "sha256": digest, **info,
              "reference_config": config}
    convert.save_pretrained(output, variables, model_config, record)
    logging.info("%s -> %s: %s, %d input channels, %d classes, %d parameters%s", weights, output,
                 model_name, in_channels, num_classes, convert.num_parameters(variables),
                 " (ImageNet encoder adapted; decoder initialised)" if info["encoder_only"] else "")


def main(argv):
    del argv
    common.start()
    source, output = Path(_SOURCE.value), Path(_OUTPUT.value)
    if source.is_file():
        convert_file(source, output, source.parent)
        return
    if not source.is_dir():
        raise FileNotFoundError(f"--source={source} does not exist")
    files = sorted(p for p in source.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weights ({', '.join(WEIGHT_SUFFIXES)}) under {source}")
    if len(files) == 1:
        convert_file(files[0], output, source)
        return
    names = ["_".join(p.relative_to(source).with_suffix("").parts[:-1]) or p.stem for p in files]
    if len(set(names)) < len(names):  # several checkpoints in one folder: name them by file
        names = ["_".join(p.relative_to(source).with_suffix("").parts) for p in files]
    for weights, name in zip(files, names, strict=True):
        convert_file(weights, output / name, source)


if __name__ == "__main__":
    app.run(main)
