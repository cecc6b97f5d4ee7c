"""The one prediction path: softmax probabilities of a model or a fold ensemble, data-parallel.

Validation inside the training loop, the study's evaluation and ``experiments.evaluate`` all
predict through `predictor`: the per-device `xeno_jax.train.step.predict_step` (mean softmax
over the models) launched over every device of every process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from xeno_jax.train.parallel import (
    data_parallel,
    fetch_global_rows,
    put_global_rows,
    put_replicated,
)
from xeno_jax.train.step import predict_step

PredictFn = Callable[[np.ndarray], np.ndarray]


def predictor(models: Sequence[nn.Module], mesh: jax.sharding.Mesh, *,
              backend: str = "shard_map") -> Callable[[Sequence[Any]], PredictFn]:
    """``bind(variables) -> predict``: the launched prediction of one model or an ensemble.

    Compiled once per `predictor` (and input shape): bind new variables, such as those of
    every validation, to the same one.

    Args:
      models: the networks (one for a single model; one per fold for an ensemble).
      mesh: the data mesh (`xeno_jax.train.parallel.make_mesh`).
      backend: the `xeno_jax.train.parallel.data_parallel` launcher.

    Returns:
      ``bind(variables)``, `variables` one per model (host arrays or arrays replicated over
      `mesh`, placed on the devices once), returning ``predict(features)``: `features` ``(n,
      H, W, C)`` NumPy, any n, the same on every process; it returns the float32 (mean)
      probabilities ``(n, H, W, num_classes)`` of every row on every process. The rows are
      split over all devices of all processes (padded to a multiple of their number).
    """
    models = tuple(models)
    run = data_parallel(functools.partial(predict_step, models=models), mesh, backend=backend,
                        sharded_output=True)
    num_devices = mesh.devices.size

    def bind(variables: Sequence[Mapping[str, Any]]) -> PredictFn:
        if len(variables) != len(models):
            raise ValueError(f"got {len(variables)} sets of variables for {len(models)} models")
        variables = put_replicated(list(variables), mesh)

        def predict(features: np.ndarray) -> np.ndarray:
            features = np.asarray(features)
            rows = len(features)
            padding = [(0, -rows % num_devices)] + [(0, 0)] * (features.ndim - 1)
            probabilities = run(variables, put_global_rows(np.pad(features, padding), mesh))
            return fetch_global_rows(probabilities)[:rows]

        return predict

    return bind
