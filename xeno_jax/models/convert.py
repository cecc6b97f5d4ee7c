"""PyTorch weights of the reference's network (smp names) as Flax variables, and back on disk.

* `read_state_dict(path)`: a state dict as NumPy arrays from ``.pt``/``.pth``/``.ckpt``
  (``torch.load(weights_only=True)``; a Lightning checkpoint's ``state_dict``) or
  ``.safetensors`` (no PyTorch needed).
* `variables_from_state_dict(state_dict, model)`: the Flax variables of an `EfficientNetUNet`,
  every key and shape checked; a bare (ImageNet) encoder with three input channels is adapted to
  the model's input channels as smp and the reference do (method.md A6).
* `save_pretrained(directory, ...)` / `load_pretrained(directory)`: an orbax checkpoint of the
  variables plus ``network.json`` (the model config and where the weights came from).

Pickles are never trusted: PyTorch's weights-only unpickler builds only tensors and plain
containers. Objects of other classes that a checkpoint holds next to its weights (a Lightning
checkpoint's hyper-parameters, say) are replaced by inert stand-ins that keep their data and
never call into the named class, so no code in a checkpoint runs; only the weights are used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import math
import os
import pickle
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xeno_jax.io import atomic_write

NETWORK_FILE = "network.json"
VARIABLES_DIR = "variables"
STEM_KEY = "_conv_stem.weight"
# Keys of smp's EfficientNet encoder that its U-Net never uses (the classifier's head).
UNUSED = re.compile(r"(^|\.)num_batches_tracked$|^encoder\._(conv_head|bn1|fc)\.")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_MODULE_NAMES = (
    (re.compile(r"^_blocks_(\d+)$"), r"_blocks.\1"),
    (re.compile(r"^decoder_blocks_(\d+)_(conv\d)$"), r"decoder.blocks.\1.\2"),
    (re.compile(r"^segmentation_head$"), "segmentation_head.0"),
)


class StateDictError(ValueError):
    """A state dict that does not fit the network; the message names the keys."""


def smp_key(path: tuple[str, ...]) -> str:
    """The smp state-dict key of a Flax variable path, e.g. ``encoder._blocks.3._bn1.weight``."""
    *modules, leaf = path
    names = []
    for name in modules:
        for pattern, replacement in _MODULE_NAMES:
            name = pattern.sub(replacement, name)
        names.append(name)
    return ".".join([*names, _LEAF_NAMES[leaf]])


def to_flax(key: str, array: np.ndarray) -> np.ndarray:
    """A PyTorch tensor as the Flax leaf: convolution kernels OIHW -> HWIO, others as they are."""
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def adapt_first_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """smp's input adaptation of a pretrained RGB stem (OIHW): ``w[:, i % 3] * 3 / in_channels``."""
    rgb = weight.shape[1]
    return weight[:, np.arange(in_channels) % rgb] * (rgb / in_channels)


def _abstract_variables(model: nn.Module, in_channels: int) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, 64, 64, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def network_prefix(state_dict: Mapping[str, Any]) -> str:
    """What precedes smp's names in the keys ("" for smp's own, "model." from Lightning, ...).

    Raises:
      StateDictError: if no key ends with the EfficientNet stem's ``_conv_stem.weight``.
    """
    stems = sorted(k[: -len(STEM_KEY)] for k in state_dict if k.endswith(STEM_KEY))
    if not stems:
        raise StateDictError(
            f"no EfficientNet stem ('{STEM_KEY}') among the {len(state_dict)} keys "
            f"({_listing(state_dict, 6)}): not smp's EfficientNet U-Net or encoder")
    if len(stems) > 1:
        raise StateDictError(f"several EfficientNet stems in the state dict: "
                             f"{_listing(s + STEM_KEY for s in stems)}")
    return stems[0]


def variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], model: nn.Module, *, in_channels: int = 100,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flax variables of `model` (an `EfficientNetUNet`) from a PyTorch state dict.

    Args:
      state_dict: smp's U-Net state dict (keys like ``encoder._conv_stem.weight``,
        ``decoder.blocks.0.conv1.0.weight``, ``segmentation_head.0.weight``) under any common
        prefix (Lightning's ``model.``), or an encoder alone (``_conv_stem.weight``, ...; its
        ``_fc`` classifier ignored) such as ImageNet weights. Keys outside the network's prefix
        (losses, metrics of a Lightning module) are ignored.
      model: the Flax network whose variables are filled.
      in_channels: input channels of the network; a 3-channel encoder stem is adapted to it.
      seed: initialisation of what an encoder-only state dict lacks (decoder and head, with
        smp's initialisation).

    Returns:
      ``(variables, info)``: float32 NumPy ``{"params", "batch_stats"}`` and a record of the
      conversion (``prefix``, ``encoder_only``, ``adapted_stem``, ``ignored`` keys).

    Raises:
      StateDictError: naming the missing keys, unexpected keys and keys with wrong shapes.
    """
    prefix = network_prefix(state_dict)
    encoder_only = not prefix.endswith("encoder.") or not any(
        k.startswith(prefix[: -len("encoder.")] + "decoder.") for k in state_dict)
    network = prefix if encoder_only else prefix[: -len("encoder.")]
    own = {k[len(network):]: np.asarray(v) for k, v in state_dict.items()
           if k.startswith(network)}
    if encoder_only:
        own = {f"encoder.{k}": v for k, v in own.items()}
    outside = sorted(k for k in state_dict if not k.startswith(network))

    expected = _flat(_abstract_variables(model, in_channels))
    rng = np.random.default_rng(seed)
    stem = own.get("encoder." + STEM_KEY)
    adapted = stem is not None and stem.ndim == 4 and stem.shape[1] != in_channels and (
        stem.shape[1] == 3)
    if adapted:
        own["encoder." + STEM_KEY] = adapt_first_conv(stem, in_channels)

    flat, missing, wrong = {}, [], []
    for path, leaf in expected.items():
        key = smp_key(path[1:])
        if key not in own:
            if encoder_only and not key.startswith("encoder."):
                flat[path] = smp_initial_value(path, leaf.shape, rng)
            else:
                missing.append(key)
            continue
        value = to_flax(key, own[key])
        if value.shape != leaf.shape:
            wrong.append(f"{key} {tuple(own[key].shape)} (expected "
                         f"{tuple(to_flax(key, np.empty(leaf.shape[::-1])).shape[::-1])})"
                         if value.ndim == 4 else f"{key} {value.shape} (expected {leaf.shape})")
            continue
        flat[path] = value.astype(np.float32)
    used = {smp_key(path[1:]) for path in expected}
    unexpected = sorted(k for k in own if k not in used and not UNUSED.search(k))
    if missing or unexpected or wrong:
        problems = [f"{name} ({len(keys)}): {_listing(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("wrong shapes", wrong)) if keys]
        raise StateDictError(
            f"the state dict (network prefix {network!r}) does not fit "
            f"{type(model).__name__}(size={getattr(model, 'size', '?')!r}, "
            f"num_classes={getattr(model, 'num_classes', '?')}) with {in_channels} input "
            f"channels; " + "; ".join(problems))
    info = {"prefix": network, "encoder_only": encoder_only, "adapted_stem": bool(adapted),
            "ignored": outside + sorted(k for k in own if UNUSED.search(k))}
    return _unflatten(flat), info


def smp_initial_value(path: tuple[str, ...], shape: tuple[int, ...], rng: np.random.Generator
                      ) -> np.ndarray:
    """smp's initialisation of a decoder or head variable (``initialize_decoder``/``_head``).

    Decoder kernels: kaiming-uniform (fan in, ReLU gain); head kernel: xavier-uniform; batch
    norm scale and running variance 1; biases and running means 0.
    """
    leaf = path[-1]
    if leaf == "kernel":
        receptive = math.prod(shape[:2])
        fan_in, fan_out = receptive * shape[2], receptive * shape[3]
        if "segmentation_head" in path:
            bound = math.sqrt(6 / (fan_in + fan_out))
        else:
            bound = math.sqrt(6 / fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    return np.full(shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)


# -- reading PyTorch files -------------------------------------------------------------------


def _inert_class(module: str, name: str) -> type:
    """A stand-in for a class a pickle names: holds its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    stand_in = type(name.rsplit(".", 1)[-1], (), {
        "__init__": __init__, "__setstate__": __setstate__,
        "__setitem__": lambda self, k, v: None, "append": lambda self, v: None,
        "extend": lambda self, v: None})
    stand_in.__module__, stand_in.__qualname__ = module, name
    return stand_in


def _torch_load(path: Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs PyTorch: pip install 'xeno_jax[torch]'"
                          ) from error
    with open(path, "rb") as f:
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception:  # not a zip checkpoint: the legacy format, read weights-only as is
            unknown = []
        f.seek(0)
        stand_ins = [_inert_class(*g.rsplit(".", 1)) for g in unknown]
        if stand_ins:
            logging.info("%s: loading %s as inert stand-ins", path, ", ".join(unknown))
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:  # e.g. a call of os.system: never made
            reason = str(error).split("\n\n")[-2:] if "\n\n" in str(error) else [str(error)]
            raise StateDictError(f"{path}: refused by the weights-only unpickler: "
                                 f"{' '.join(r.strip() for r in reason)}") from None


def _tensors_as_numpy(tree: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    import torch

    arrays = {}
    for key, value in tree.items():
        if not isinstance(value, torch.Tensor):
            raise StateDictError(f"{path}: state-dict entry {key!r} is a "
                                 f"{type(value).__name__}, not a tensor")
        value = value.detach()
        arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict as NumPy arrays (floating point as float32).

    ``.safetensors`` files are read with safetensors' NumPy loader; anything else with
    ``torch.load(weights_only=True)`` (module docstring). A dict with a ``state_dict`` entry
    (Lightning checkpoints) yields that entry.

    Raises:
      FileNotFoundError, StateDictError: naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
                for k, v in load_file(str(path)).items()}
    loaded = _torch_load(path)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise StateDictError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return _tensors_as_numpy(loaded, path)


# -- converted networks on disk ----------------------------------------------------------------


def save_pretrained(directory: str | os.PathLike, variables: Mapping[str, Any],
                    model_config: Mapping[str, Any], record: Mapping[str, Any]) -> Path:
    """Writes a converted network: ``variables/`` (orbax) and then ``network.json``.

    ``network.json`` is written last (atomically), so a directory that has it is complete.

    Raises:
      FileExistsError: if `directory` already holds anything.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; converted networks are never "
                              f"overwritten (choose a new --output)")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / VARIABLES_DIR, dict(variables))
    with atomic_write(directory / NETWORK_FILE, text=True) as f:
        json.dump({"model": dict(model_config), **record}, f, indent=2, default=str)
    return directory


def is_pretrained(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a converted network."""
    return (Path(directory) / NETWORK_FILE).is_file()


def find_pretrained(directory: str | os.PathLike) -> list[Path]:
    """`directory` if it holds a converted network, else its subfolders that hold one (sorted):
    the converted folds of a reference run folder."""
    directory = Path(directory)
    if is_pretrained(directory):
        return [directory]
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if is_pretrained(p))


def pretrained_model_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """The ``model`` config section stored with a converted network."""
    path = Path(directory) / NETWORK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {directory} holds no converted network "
                                f"(python -m experiments.convert_weights --output=...)")
    return ml_collections.ConfigDict(json.loads(path.read_text())["model"])


def restore_variables(directory: str | os.PathLike, model: nn.Module, in_channels: int
                      ) -> dict[str, Any]:
    """The variables of a converted network, restored into `model`'s structure (host arrays)."""
    import orbax.checkpoint as ocp

    abstract = _abstract_variables(model, in_channels)
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(directory).absolute() / VARIABLES_DIR, target)
    return jax.tree.map(np.asarray, restored)


def num_parameters(variables: Mapping[str, Any]) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


# -- the reference's PyTorch network -----------------------------------------------------------


class _InertModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves empty modules for `roots`; any attribute of them is a new empty class."""

    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: _empty_class(spec.name, name)
        return module

    def exec_module(self, module):
        pass


def _empty_class(module: str, name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__module__": module, "__init__": lambda self, *a, **k: None})


def import_smp() -> types.ModuleType:
    """``segmentation_models_pytorch`` with inert stand-ins for timm and torchvision.

    smp imports timm (which needs torchvision) at start-up for encoders the reference does not
    use; its own EfficientNet encoder and U-Net need neither. PyPI's torchvision wheels are built
    against CUDA PyTorch and do not load beside a CPU-only PyTorch, so both are replaced by
    empty modules while smp is imported (only if they are not imported already).
    """
    if "segmentation_models_pytorch" in sys.modules:
        return sys.modules["segmentation_models_pytorch"]
    finder = _InertModules(("timm", "torchvision"))
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("segmentation_models_pytorch")
    finally:
        sys.meta_path.remove(finder)
