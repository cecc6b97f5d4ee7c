"""Reliability (issue 16): nothing silently wrong, nothing good lost, at a tiny size.

One or more tests per case of the issue on the training side:

1. a projected run whose bank reaches none of its target labels is refused before training;
   the pixels the projection changed are logged per epoch;
2. a run resumed (or a finished run reused) with a config that changes the result is refused,
   naming the keys that differ, unless ``reuse_stale``; 9: resuming with another model variant
   is one such refusal. The study's reruns (a changed learning rate) are in test_study.py,
   next to the study they rerun;
3. NaN/Inf in banks are rejected where banks enter;
6. one process per work directory, for training and for the study;
7. a damaged newest checkpoint: resume from the newest intact one, saying which was skipped;
8. a torn last line of ``metrics.jsonl`` is dropped with a warning;

and a training process killed with SIGKILL at a random moment resumes to the parameters of an
uninterrupted run.
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import jax
import numpy as np
import pytest
import reliability_worker as worker
from distributed_worker import NUM_CHANNELS, InMemoryIterator, make_dataset

from experiments.configs.run import get_config as run_config
from xeno_jax.augment.spectral import project_spectra_counted
from xeno_jax.io.htc import write_blosc
from xeno_jax.io.lock import WorkdirBusyError, workdir_lock
from xeno_jax.labels import SPECIES_12
from xeno_jax.projections import ProjectionBank
from xeno_jax.study import banks, runs
from xeno_jax.train import MetricsWriter, checkpoint_manager, train
from xeno_jax.train import fingerprint as fp
from xeno_jax.train.checkpoint import CorruptCheckpointError
from xeno_jax.train.fingerprint import StaleWorkError
from xeno_jax.train.loop import restore_final_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "reliability_worker.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
DATA = make_dataset()

# Tests of the finished run share one worker under pytest-xdist, so it is trained once.
SHARES_FINISHED_RUN = pytest.mark.xdist_group("reliability_finished_run")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The uninterrupted projected run: 6 steps on 2 devices, checkpoints at 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, worker.train_projected(workdir)


def copy_of(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    return workdir


def assert_same_params(state, expected_state, message=""):
    actual, expected = worker.flat_params(state), worker.flat_params(expected_state)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=message)


def checkpoint_steps(workdir):
    manager = checkpoint_manager(str(workdir), max_to_keep=None)
    try:
        return manager.all_steps()
    finally:
        manager.close()


def metrics_rows(workdir, name):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row[name] for row in map(json.loads, f) if name in row}


# ---- 1. A bank that reaches no target label; pixels projected per epoch ------------------------


def projected_config(tmp_path, pairs):
    """projected-malperfusion_pig2human (target: kidney) with a bank of the given labels."""
    path = tmp_path / "bank.h5"
    eye = np.eye(NUM_CHANNELS, dtype=np.float32)[None]
    ProjectionBank.from_pairs({label: (eye, np.zeros((1, NUM_CHANNELS))) for label in pairs}
                              ).save(path)
    config = run_config("projected-malperfusion_pig2human,quick")
    with config.unlocked():
        config.augment.bank = str(path)
        config.data.data_dir = str(tmp_path / "no_datasets_needed")
    return config


@pytest.mark.parametrize("label", ["liver", "invalid index"])
def test_a_bank_without_the_target_labels_is_refused_before_training(tmp_path, label):
    index = SPECIES_12.invalid_index if label == "invalid index" else SPECIES_12.name_to_index(
        label)
    config = projected_config(tmp_path, [index])
    with pytest.raises(ValueError, match=r"bank\.h5: the bank has matrices for the labels "
                                         r".*target_labels=\('kidney',\).*would change no pixel"):
        runs.train_run(config, tmp_path / "run")
    assert not (tmp_path / "run" / runs.DONE_FILE).exists()
    assert not (tmp_path / "no_datasets_needed").exists()  # refused before any data was read
    assert SPECIES_12.name_to_index("kidney") == worker.KIDNEY


def test_a_bank_that_reaches_a_target_label_is_accepted(tmp_path):
    config = projected_config(tmp_path, [SPECIES_12.name_to_index("liver"), worker.KIDNEY])
    assert set(banks.ensure_run_bank(config).label_indices) == {
        worker.KIDNEY, SPECIES_12.name_to_index("liver")}


@pytest.mark.parametrize("label_mode, p", [("label_match", 0.5), ("random", 0.5),
                                           ("label_match", 0.0)])
def test_the_projection_counts_the_pixels_it_changes(label_mode, p):
    features = jax.numpy.asarray(DATA["features"][:8])
    labels = jax.numpy.asarray(DATA["labels"][:8])
    projected, count = jax.jit(
        lambda key, f, lab, bank: project_spectra_counted(key, f, lab, bank,
                                                          label_mode=label_mode, p=p))(
        jax.random.key(1), features, labels, worker.bank())
    changed = np.any(np.asarray(projected) != np.asarray(features), axis=-1)
    assert int(count) == int(changed.sum())
    assert (int(count) > 0) == (p > 0)


@SHARES_FINISHED_RUN
def test_the_run_logs_the_pixels_projected_per_epoch(finished):
    # p=1: every kidney pixel of every batch; the 6 batches of 8 cover the 24 images twice.
    expected = 2 * int(np.sum(DATA["labels"] == worker.KIDNEY))
    assert metrics_rows(finished[0], "epoch/projected_pixels") == {6: expected}


# ---- 2 and 9. Work made with another config is refused, naming the keys --------------------


@SHARES_FINISHED_RUN
@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", 16, 'train.batch_size: 8 -> 16'),  # 3 steps: old code took 6 as done
    ("model.variant", "default", 'model.variant: "tiny" -> "default"'),
])
def test_resuming_with_another_config_is_refused_naming_the_key(finished, tmp_path, key, value,
                                                                message):
    workdir = copy_of(finished, tmp_path)
    config = worker.config(**{key: value})
    with pytest.raises(StaleWorkError, match=re.escape(message) + ".*--reuse_stale"):
        worker.train_projected(workdir, config, InMemoryIterator(DATA, config.train.batch_size))
    assert checkpoint_steps(workdir) == [2, 4, 6]


@SHARES_FINISHED_RUN
def test_a_changed_bank_is_refused_and_reuse_stale_overrides(finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    other = worker.bank()
    other = ProjectionBank.from_pairs({worker.KIDNEY: (np.asarray(other.weights) * 1.01,
                                                       other.biases)})
    with pytest.raises(StaleWorkError, match="augment_data"):
        train(worker.config(), str(workdir), train_iter=InMemoryIterator(DATA, 8),
              augment=worker.augment(), augment_data=other)
    with caplog.at_level(logging.WARNING):
        state = worker.train_projected(workdir, worker.config(**{"train.seed": 1}),
                                       reuse_stale=True)
    assert "train.seed: 0 -> 1" in caplog.text and "--reuse_stale" in caplog.text
    assert_same_params(state, finished[1])  # reused as told: the finished state


@SHARES_FINISHED_RUN
def test_keys_that_cannot_change_the_result_do_not_block_a_resume(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    config = worker.config(**{"train.log_every_steps": 3, "train.checkpoint_every_steps": 5,
                              "train.keep_checkpoints": 7, "train.validate_every_epochs": 2})
    state = worker.train_projected(workdir, config)
    assert int(state.step) == 6
    assert_same_params(state, finished[1])


def test_the_fingerprint_is_stable_across_processes_and_names_what_differs():
    here = fp.of_run(worker.config(), worker.bank())
    code = ("import sys; sys.path.insert(0, 'tests'); import reliability_worker as w; "
            "from xeno_jax.train import fingerprint; "
            "print(fingerprint.of_run(w.config(), w.bank()).digest)")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=300,
                           env={**ENV, "PYTHONHASHSEED": "random"})
    assert there.stdout.split()[-1] == here.digest
    other = fp.of_run(worker.config(**{"train.learning_rate": 0.01}), worker.bank())
    assert other.differences(here.values) == ["train.learning_rate: 1e-05 -> 0.01"]
    # Every ignored key exists in a study run's config (the list cannot rot unnoticed).
    assert fp.IGNORED_KEYS <= set(fp.flatten(run_config("baseline_human")))


# ---- 3. Non-finite banks are rejected where they enter --------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_banks_are_rejected_where_they_enter(tmp_path, bad):
    good = worker.bank()
    weights = np.array(good.weights)
    weights[1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"weights hold NaN or Inf \(label 6 \(kidney\): 1 "):
        ProjectionBank.from_pairs({worker.KIDNEY: (weights, good.biases)},
                                  label_names={worker.KIDNEY: "kidney"})
    with pytest.raises(ValueError, match="biases hold NaN or Inf"):
        ProjectionBank(good.weights, np.full_like(good.biases, bad), good.losses,
                       good.label_indices, good.counts, good.label_names, good.pair_names)

    path = tmp_path / "bank.h5"
    good.save(path)
    with h5py.File(path, "r+") as f:
        f[f"labels/{worker.KIDNEY}/weights"][0, 1, 1] = bad
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": the bank's weights hold NaN"):
        ProjectionBank.load(path)

    tensor = np.concatenate([weights, np.asarray(good.biases)[..., None]], axis=-1)
    write_blosc(tmp_path / "bank.blosc", {"kidney": tensor.astype(np.float32)})
    with pytest.raises(ValueError, match=r"bank\.blosc: the bank's weights hold NaN"):
        ProjectionBank.from_htc(tmp_path / "bank.blosc", SPECIES_12)
    # Unknown losses (NaN) are allowed; banks of device arrays pass through jit unchecked.
    assert np.isnan(good.losses).all()
    assert jax.jit(lambda bank: bank.weights.sum())(good) > 0


# ---- 6. One process per work directory ----------------------------------------------------

HOLDER = """
import sys, time
from xeno_jax.io.lock import workdir_lock
with workdir_lock(sys.argv[1], "holding it for a test"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    """A run's work directory has one writer. (A study's work directory is shared by any
    number of study processes, which claim its runs: tests/test_study.py.)"""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = (r"in use by holding it for a test \(pid {} on host "
               + re.escape(socket.gethostname()))
        run = run_config("baseline_human,quick,sim_tiny")
        with run.unlocked():
            run.data.data_dir = str(tmp_path / "tfds")
        with pytest.raises(WorkdirBusyError, match=who.format(holder.pid)):
            runs.train_run(run, run_dir)
        assert not (tmp_path / "tfds").exists()  # refused before doing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock(run_dir, "after the holder was killed"):  # the OS released its lock
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            with workdir_lock(run_dir, "a second writer in this process"):
                pass


# ---- 7. A damaged newest checkpoint ---------------------------------------------------------


def damage_state(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\0" * 10)


def damage_iterator(step_dir):
    (step_dir / "data_iterator" / "process_0-of-1.json").write_text('{"encoding": "js')


@SHARES_FINISHED_RUN
def test_resume_skips_damaged_checkpoints_and_is_exact(finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    damage_state(workdir / "checkpoints" / "6")
    damage_iterator(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        state = worker.train_projected(workdir)
    for step, why in ((6, "ValueError: OUT_OF_RANGE"), (4, "JSONDecodeError: Unterminated")):
        assert re.search(rf"skipping checkpoint: the checkpoint \S+/checkpoints/{step} cannot be "
                         rf"restored: {why}",
                         caplog.text), caplog.text
        assert (workdir / "checkpoints_skipped" / str(step)).is_dir()  # kept for inspection
    assert checkpoint_steps(workdir) == [2, 4, 6]
    assert_same_params(state, finished[1])
    assert metrics_rows(workdir, "loss") == metrics_rows(finished[0], "loss")


@SHARES_FINISHED_RUN
def test_no_intact_checkpoint_is_a_clear_error_that_moves_nothing(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    for step in (2, 4, 6):
        damage_state(workdir / "checkpoints" / str(step))
    with pytest.raises(CorruptCheckpointError, match=r"no checkpoint in \S+ can be restored:\n"
                                                     r"  step 6: .*\n  step 4: .*\n  step 2: "):
        worker.train_projected(workdir)
    assert not (workdir / "checkpoints_skipped").exists()
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/6 cannot be restored"):
        restore_final_variables(worker.config(), str(workdir))


# ---- 8. A torn last line of metrics.jsonl ---------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert "dropping the torn last line 3" in caplog.text
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 0.5, 0.25]

    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a metrics row"):
        MetricsWriter(str(tmp_path), resume_step=3)
    assert path.read_text().count("\n") == 3  # nothing rewritten


# ---- Kill at a random moment ------------------------------------------------------------------


@SHARES_FINISHED_RUN
def test_training_killed_at_a_random_moment_resumes_to_the_same_parameters(finished, tmp_path):
    workdir, output = tmp_path / "run", tmp_path / "params.npz"
    command = [sys.executable, WORKER, f"--workdir={workdir}", f"--output={output}"]
    delay = random.uniform(0.0, 4.0)  # the 5 steps after the first take ~4-8 s on 2 cores
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env=ENV, stdout=log, stderr=log)
        start = time.monotonic()
        metrics = workdir / "metrics.jsonl"
        # From the first logged step on (the step is compiled), then a random delay.
        while process.poll() is None and not (metrics.exists() and metrics.stat().st_size):
            assert time.monotonic() - start < 300, "the worker did not start training"
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    steps = checkpoint_steps(workdir)
    context = f"killed {delay:.2f} s after the first step, with checkpoints {steps}"
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, f"{context}:\n{resumed.stderr[-3000:]}"
    params = np.load(output)
    expected = worker.flat_params(finished[1])
    assert set(params) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value, err_msg=context)
    assert metrics_rows(workdir, "loss") == metrics_rows(finished[0], "loss"), context
