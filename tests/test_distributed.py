"""Two processes (jax.distributed on localhost, 2 CPU devices each) equal one 4-device process:
training with the xeno-learning augmentation, and prediction."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from distributed_worker import (
    InMemoryIterator,
    make_dataset,
    tiny_config,
    validation_recorder,
    xeno_augmentation,
)

from xeno_jax.train import train
from xeno_jax.train.parallel import fetch_replicated

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT_S = 600  # a hang guard; a loaded 2-core machine needs minutes for these workers


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_workers(workdir, output, backend, num_processes=2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, WORKER, f"--process_id={i}", f"--num_processes={num_processes}",
             f"--port={port}", f"--workdir={workdir}", f"--backend={backend}",
             f"--output={output}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(num_processes)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs, strict=False):
        assert worker.returncode == 0, f"worker failed:\n{log[-5000:]}"


def _logged(workdir, name):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row[name] for row in map(json.loads, f) if name in row]


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_two_processes_agree_with_one_process(tmp_path, backend):
    workdir, output = tmp_path / "two_processes", tmp_path / "params.npz"
    _run_workers(workdir, output, backend)

    single_workdir = tmp_path / "one_process"
    config = tiny_config(num_devices=4, backend=backend)
    augment, bank = xeno_augmentation()
    predictions = {}
    state = train(config, str(single_workdir),
                  train_iter=InMemoryIterator(make_dataset(), config.train.batch_size),
                  augment=augment, augment_data=bank, val_fn=validation_recorder(predictions))
    expected = {jax.tree_util.keystr(path): leaf for path, leaf in
                jax.tree_util.tree_flatten_with_path(fetch_replicated(state.params))[0]}
    expected.update({f"prediction_{step}": p for step, p in predictions.items()})
    assert list(predictions) == [5]

    with np.load(output) as got:
        assert sorted(got.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)
    for name, rtol in [("loss", 1e-5), ("grad_norm", 1e-4)]:
        np.testing.assert_allclose(_logged(workdir, name), _logged(single_workdir, name),
                                   rtol=rtol)
    final_checkpoint = workdir / "checkpoints" / "5"
    assert os.listdir(workdir / "checkpoints") == ["5"]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(final_checkpoint / "data_iterator"))
