"""Training: loss, schedule, config, SWA, data-parallel exactness, resume, NaN guard, logging."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from distributed_worker import (
    VALIDATION_IMAGES,
    InMemoryIterator,
    SimulatedCrash,
    make_dataset,
    tiny_config,
    validation_recorder,
    xeno_augmentation,
)
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from experiments.configs.run import get_config as run_config
from xeno_jax.augment import build_pipeline, steps_from_config
from xeno_jax.models import UNet
from xeno_jax.train import (
    MetricsWriter,
    NonFiniteLossError,
    checkpoint_manager,
    default_config,
    make_mesh,
    segmentation_loss,
    shard_batch,
    steps_per_epoch,
    train,
    validate_config,
)
from xeno_jax.train.checkpoint import restore_checkpoint, save_checkpoint
from xeno_jax.train.config import swa_start_epoch
from xeno_jax.train.parallel import (
    data_parallel,
    fetch_global_rows,
    fetch_replicated,
    on_global_batch,
    put_replicated,
    replicated_sharding,
)
from xeno_jax.train.predict import predictor
from xeno_jax.train.state import (
    SWASchedule,
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from xeno_jax.train.step import augment_batch, train_step

DATA = make_dataset()
NUM_CLASSES = 12


# ---- Loss ---------------------------------------------------------------------------------


def numpy_loss(logits, labels, valid):
    """(CE + Dice) / 2 written pixel by pixel in float64, as method.md A6 states it."""
    logits = np.asarray(logits, np.float64).reshape(-1, NUM_CLASSES)
    labels, valid = np.asarray(labels).reshape(-1), np.asarray(valid).reshape(-1)
    keep = [i for i in range(len(labels)) if valid[i] and labels[i] < NUM_CLASSES]
    ce_terms, probs = [], []
    for i in keep:
        shifted = logits[i] - logits[i].max()
        log_softmax = shifted - np.log(np.exp(shifted).sum())
        ce_terms.append(-log_softmax[labels[i]])
        probs.append(np.exp(log_softmax))
    dice_terms = []
    for c in range(NUM_CLASSES):
        target = np.array([labels[i] == c for i in keep], np.float64)
        if target.sum() == 0:
            continue  # only classes present among the valid labels
        p = np.array([q[c] for q in probs])
        dice_terms.append(1 - (2 * (p * target).sum() + 1e-5) / (target.sum() + p.sum() + 1e-5))
    return (np.mean(ce_terms) + np.mean(dice_terms)) / 2


def _loss_inputs(seed, batch=4, size=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, size, size, NUM_CLASSES)).astype(np.float32) * 3
    labels = rng.choice([0, 2, 5, 12], size=(batch, size, size)).astype(np.int32)  # few classes
    valid = rng.uniform(size=labels.shape) > 0.3
    valid[0, 0, 0], labels[0, 0, 0] = True, 12  # "valid" but invalid index: ignored
    return logits, labels, valid


def test_loss_matches_independent_numpy_formulation():
    logits, labels, valid = _loss_inputs(0)
    loss, terms = segmentation_loss(logits, labels, valid)
    np.testing.assert_allclose(loss, numpy_loss(logits, labels, valid), rtol=1e-5)
    assert 0 < terms["dice"] < 1 and terms["cross_entropy"] > 0


def test_loss_ignores_invalid_pixels_whatever_their_logits():
    logits, labels, valid = _loss_inputs(1)
    changed = np.where(valid[..., None], logits, 1e4)
    np.testing.assert_allclose(segmentation_loss(changed, labels, valid)[0],
                               segmentation_loss(logits, labels, valid)[0], rtol=1e-6)


def test_loss_of_perfect_prediction_is_zero_and_of_empty_batch_is_zero():
    _, labels, valid = _loss_inputs(2)
    perfect = 100.0 * jax.nn.one_hot(np.minimum(labels, NUM_CLASSES - 1), NUM_CLASSES)
    np.testing.assert_allclose(segmentation_loss(perfect, labels, valid)[0], 0.0, atol=1e-6)
    loss, grads = jax.value_and_grad(lambda x: segmentation_loss(x, labels, valid & False)[0])(
        perfect
    )
    assert loss == 0.0 and np.all(grads == 0.0)


def test_data_parallel_loss_and_gradient_equal_the_global_batch():
    """psum of pixel sums: 4 devices x 1 image give the loss and gradient of all 4 images."""
    logits, labels, valid = _loss_inputs(3)

    def loss_and_grad(logits, labels, valid, axis_name=None):
        return jax.value_and_grad(
            lambda x: segmentation_loss(x, labels, valid, axis_name=axis_name)[0]
        )(logits)

    expected_loss, expected_grad = loss_and_grad(logits, labels, valid)
    mesh = make_mesh(4)
    sharded = [jax.device_put(x, jax.NamedSharding(mesh, P("data")))
               for x in (logits, labels, valid)]
    loss, grad = jax.jit(jax.shard_map(
        functools.partial(loss_and_grad, axis_name="data"), mesh=mesh,
        in_specs=P("data"), out_specs=(P(), P("data")),
    ))(*sharded)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-8)
    # A mean of per-device losses would differ: Dice is not additive over pixels.
    per_device = np.mean([segmentation_loss(logits[i:i + 1], labels[i:i + 1],
                                            valid[i:i + 1])[0] for i in range(4)])
    assert abs(per_device - expected_loss) > 1e-3


# ---- Schedule and config ------------------------------------------------------------------


def test_learning_rate_decays_per_epoch_and_freezes_at_the_swa_start():
    schedule = learning_rate_schedule(1e-3, 0.99, steps_per_epoch=63, swa_start_epoch=79)
    for step, epoch in [(0, 0), (62, 0), (63, 1), (64, 1), (79 * 63, 79)]:
        np.testing.assert_allclose(schedule(step), 1e-3 * 0.99**epoch, rtol=1e-5)
    np.testing.assert_allclose(schedule(80 * 63), 4.52e-4, rtol=1e-3)  # the reference's swa_lr
    np.testing.assert_allclose(schedule(99 * 63 + 62), 1e-3 * 0.99**79, rtol=1e-5)
    no_swa = learning_rate_schedule(1e-3, 0.99, steps_per_epoch=63, swa_start_epoch=None)
    np.testing.assert_allclose(no_swa(99 * 63), 1e-3 * 0.99**99, rtol=1e-5)


def test_default_config_is_the_reference_setup():
    config = default_config()
    assert steps_per_epoch(config) == 63  # 500 images -> 504
    assert swa_start_epoch(config) == 79  # Lightning: int(0.8 * 100) - 1, 0-based
    assert config.model.num_classes == 12
    validate_config(config)


def _parse_flags(*args):
    argv = ["train.py", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", default_config(), flag_values=flag_values,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_is_locked_and_overridable_from_flags():
    config = _parse_flags("--config.train.batch_size=4", "--config.model.widths=(8,16)")
    assert config.train.batch_size == 4 and config.model.widths == (8, 16)
    with pytest.raises(AttributeError, match="bach_size"):
        _parse_flags("--config.train.bach_size=4")
    with pytest.raises(AttributeError, match="bach_size"):
        default_config().train.bach_size = 4


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "norm", "layer", "model.norm"),
    ("parallel", "backend", "pjit", "parallel.backend"),
    ("model", "dtype", "float16", "model.dtype"),
    ("train", "batch_size", 12, "batch_size=12 must be a multiple of the 8 devices"),
    ("train", "epochs", 0, "train.epochs must be positive"),
    ("parallel", "num_devices", 9, "num_devices=9"),
])
def test_validate_config_names_key_and_value(section, key, value, message):
    config = default_config()
    setattr(config[section], key, value)
    with pytest.raises(ValueError, match=message):
        validate_config(config)


# ---- SWA ----------------------------------------------------------------------------------


def test_swa_average_is_the_mean_of_the_snapshots_at_epoch_starts():
    """2 steps per epoch, 4 epochs, SWA from epoch 1: snapshots after steps 2, 4 and 6."""
    mesh = make_mesh(1)
    model = UNet(widths=(4,), stem_width=None, norm="none")
    schedule = SWASchedule(first_step=2, last_step=6, every=2)
    optimizer = make_optimizer(learning_rate_schedule(1e-2, 0.5, 2, swa_start_epoch=1))
    state = jax.jit(
        functools.partial(create_train_state, model, optimizer, seed=0,
                          input_shape=(1, 16, 16, 4), swa_schedule=schedule),
        out_shardings=replicated_sharding(mesh),
    )()
    assert int(state.swa_count) == 0
    step = data_parallel(
        functools.partial(train_step, model=model, optimizer=optimizer, swa_schedule=schedule),
        mesh,
    )
    data_iter, params_after = InMemoryIterator(DATA, 8), {}
    for number in range(1, 9):
        state, _ = step(state, shard_batch(next(data_iter), mesh))
        params_after[number] = fetch_replicated(state.params)
    expected = jax.tree.map(lambda *p: np.mean(p, axis=0), *(params_after[s] for s in (2, 4, 6)))
    assert int(state.swa_count) == 3
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 fetch_replicated(state.swa_params), expected)


def test_swa_from_epoch_zero_counts_the_initial_parameters():
    model = UNet(widths=(4,), stem_width=None, norm="none")
    state = create_train_state(model, make_optimizer(1e-3), seed=0, input_shape=(1, 4, 4, 4),
                               swa_schedule=SWASchedule(first_step=0, last_step=2, every=1))
    assert int(state.swa_count) == 1


# ---- Augmentation of the global batch -------------------------------------------------------


def augment_on(num_devices, augment, bank, batch, step=5):
    """`augment_batch` of step `step` run as the loop runs it, on the first devices, to host."""
    mesh = make_mesh(num_devices)
    run = on_global_batch(functools.partial(augment_batch, augment=augment), mesh)
    rng = jax.random.key_data(jax.random.key(3))
    out = run(shard_batch(batch, mesh), put_replicated(rng, mesh),
              put_replicated(np.int32(step), mesh), put_replicated(bank, mesh))
    return jax.tree.map(fetch_global_rows, out)


@pytest.mark.parametrize("name", ["baseline", "xeno"])
def test_augmented_batch_is_the_same_on_any_device_count(name):
    augment, bank = xeno_augmentation()
    if name == "baseline":
        augment = build_pipeline(steps_from_config(run_config("baseline_human").augment))
        bank = None
    batch = next(InMemoryIterator(DATA, 8))
    one = augment_on(1, augment, bank, batch)
    assert np.any(one["labels"] != batch["labels"])
    assert np.any(one["features"] != batch["features"])
    for num_devices in (2, 4, 8):
        many = augment_on(num_devices, augment, bank, batch)
        np.testing.assert_array_equal(many["labels"], one["labels"])
        np.testing.assert_array_equal(many["valid"], one["valid"])
        # Features to float rounding: XLA fuses the bilinear warp differently per shard shape.
        np.testing.assert_allclose(many["features"], one["features"], rtol=1e-5, atol=1e-7)
    other_step = augment_on(8, augment, bank, batch, step=6)
    assert np.any(other_step["labels"] != one["labels"])


def test_transplantation_changes_as_many_images_on_any_device_count():
    """p = 0.8 of a batch of 8: int(6.4) = 6 donors, partners across device boundaries."""
    transplant = build_pipeline([{"name": "transplant", "p": 0.8}])
    batch = next(InMemoryIterator(DATA, 8))
    for num_devices in (1, 2, 4, 8):
        labels = augment_on(num_devices, transplant, None, batch)["labels"]
        changed = np.any(labels != batch["labels"], axis=(1, 2))
        np.testing.assert_array_equal(np.flatnonzero(changed), [0, 1, 2, 3, 4, 7])


# ---- Prediction ------------------------------------------------------------------------------


def test_predictor_averages_the_softmax_of_the_models_over_all_devices():
    """A two-model ensemble on 8 devices: the mean of each model's own softmax, rows padded.
    (Both launchers predict in `test_data_parallel_is_exact`.)"""
    models = [UNet(widths=(4,), stem_width=None, norm="batch"),
              UNet(widths=(8, 16), stem_width=None, norm="group")]
    features = DATA["features"][:VALIDATION_IMAGES]
    variables = [jax.jit(functools.partial(m.init, train=False))(jax.random.key(i), features)
                 for i, m in enumerate(models)]
    predict = predictor(models, make_mesh(8))(variables)
    expected = np.mean([jax.jit(lambda v, x, m=m: jax.nn.softmax(m.apply(v, x, train=False)))(
        v, features) for m, v in zip(models, variables, strict=True)], axis=0)
    np.testing.assert_allclose(predict(features), expected, atol=1e-6)


# ---- Training runs: exactness over devices and launchers, resume, NaN -----------------------


def swa_config(**kwargs):
    """5 epochs of 1 step, SWA (snapshots after steps 2, 3, 4) and a batch-norm pass."""
    config = tiny_config(**kwargs)
    config.train.epochs = 5
    config.train.epoch_size = 8
    config.train.swa = True
    config.train.swa_start = 0.6
    config.train.validate_every_epochs = 2
    config.train.checkpoint_every_steps = 3
    return config


@dataclasses.dataclass
class Run:
    state: TrainState  # host copy
    seen: list[int]
    predictions: dict[int, np.ndarray]
    workdir: str

    def logged(self, name):
        """Values of a logged metric, by step."""
        with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return {row["step"]: row[name] for row in rows if name in row}


def run_training(workdir, config, data_iter):
    """Trains with the xeno-learning augmentation, recording validation predictions."""
    predictions = {}
    augment, bank = xeno_augmentation()
    state = train(config, str(workdir), train_iter=data_iter, augment=augment,
                  augment_data=bank, val_fn=validation_recorder(predictions))
    return Run(fetch_replicated(state), data_iter.seen, predictions, str(workdir))


# Tests using `reference_run` share one worker under pytest-xdist, so it is computed once.
SHARES_REFERENCE_RUN = pytest.mark.xdist_group("train_reference_run")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One device, uninterrupted."""
    return run_training(tmp_path_factory.mktemp("reference"), swa_config(num_devices=1),
                        InMemoryIterator(DATA, 8))


def assert_trees_close(actual, expected, atol):
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=atol, rtol=0),
                 actual, expected)


@SHARES_REFERENCE_RUN
def test_reference_run_logs_validates_and_averages(reference_run):
    state = reference_run.state
    assert int(state.step) == 5 and int(state.swa_count) == 3
    assert reference_run.seen == [0, 1, 2, 3, 4, 5]  # 5 steps + 1 batch-norm batch
    assert sorted(reference_run.predictions) == [2, 4, 5]  # epochs 2, 4 and the SWA model
    probabilities = reference_run.predictions[2]
    assert probabilities.shape == (VALIDATION_IMAGES, 16, 16, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    # Batch statistics of the SWA model were recomputed: not the training ones, not zeros.
    for swa, trained in zip(jax.tree.leaves(state.swa_batch_stats),
                            jax.tree.leaves(state.batch_stats), strict=True):
        assert not np.allclose(swa, trained) and np.any(swa != 0)
    assert list(reference_run.logged("loss")) == [1, 2, 3, 4, 5]
    assert list(reference_run.logged("val/max_probability")) == [2, 4]
    assert list(reference_run.logged("val_swa/max_probability")) == [5]
    assert os.listdir(os.path.join(reference_run.workdir, "tensorboard"))


@SHARES_REFERENCE_RUN
@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_data_parallel_is_exact(tmp_path, reference_run, backend):
    """8 devices, 1 image each, give the parameters of 1 device with the whole batch, with the
    xeno-learning augmentation on."""
    run = run_training(tmp_path, swa_config(num_devices=8, backend=backend),
                       InMemoryIterator(DATA, 8))
    for name, rtol in [("loss", 1e-5), ("cross_entropy", 1e-5), ("dice", 1e-5),
                       ("grad_norm", 1e-4)]:
        np.testing.assert_allclose(list(run.logged(name).values()),
                                   list(reference_run.logged(name).values()), rtol=rtol)
    assert_trees_close(run.state.params, reference_run.state.params, atol=1e-5)
    assert_trees_close(run.state.swa_params, reference_run.state.swa_params, atol=1e-5)
    assert_trees_close(run.state.batch_stats, reference_run.state.batch_stats, atol=1e-5)
    assert_trees_close(run.state.swa_batch_stats, reference_run.state.swa_batch_stats, atol=1e-5)
    assert_trees_close(run.predictions, reference_run.predictions, atol=1e-5)


@SHARES_REFERENCE_RUN
def test_resumed_run_equals_uninterrupted_run(tmp_path, reference_run):
    config = swa_config(num_devices=1)  # checkpoints after step 3
    crashing = InMemoryIterator(DATA, 8, crash_at=3)
    with pytest.raises(SimulatedCrash):
        run_training(tmp_path, config, crashing)
    assert checkpoint_manager(str(tmp_path), max_to_keep=None).latest_step() == 3

    resumed = run_training(tmp_path, config, InMemoryIterator(DATA, 8))
    assert crashing.seen + resumed.seen == reference_run.seen
    for field in ("params", "opt_state", "swa_params", "swa_count", "swa_batch_stats", "rng"):
        assert_trees_close(getattr(resumed.state, field), getattr(reference_run.state, field),
                           atol=1e-6)
    assert resumed.logged("loss") == reference_run.logged("loss")  # rows of the crash dropped

    finished = run_training(tmp_path, config, InMemoryIterator(DATA, 8))
    assert finished.seen == [] and int(finished.state.step) == 5  # nothing left to do
    assert_trees_close(finished.state.swa_params, reference_run.state.swa_params, atol=1e-6)


@pytest.mark.parametrize("nan_at", [2, 3])  # step 3: read while step 4 runs; 4: a checkpoint step
def test_nan_loss_stops_training_and_the_last_checkpoint_restores(tmp_path, nan_at):
    config = tiny_config(num_devices=2)
    config.train.checkpoint_every_steps = 2
    config.train.log_every_steps = 1000  # no reads at logging steps: flags are read a step late
    with pytest.raises(NonFiniteLossError,
                       match=rf"step {nan_at + 1}.*latest checkpoint \(step 2\)"):
        train(config, str(tmp_path), train_iter=InMemoryIterator(DATA, 8, nan_at=nan_at))
    manager = checkpoint_manager(str(tmp_path), max_to_keep=None)
    assert manager.all_steps() == [2]  # nothing saved from the failed step

    resumed_iter = InMemoryIterator(DATA, 8)
    state = train(config, str(tmp_path), train_iter=resumed_iter)
    assert resumed_iter.seen == [2, 3, 4]  # restored at step 2
    assert int(fetch_replicated(state.step)) == 5
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(fetch_replicated(state.params)))


# ---- Checkpoint, logging and batch placement pieces ---------------------------------------


class BytesStateIterator:
    def __init__(self):
        self.state = b"\x00position=7\xff"

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_checkpoint_round_trips_state_and_bytes_iterator_state(tmp_path):
    mesh = make_mesh(2)
    state = jax.device_put(
        TrainState(step=jnp.int32(7), params={"w": jnp.arange(3.0)}, batch_stats={},
                   opt_state=(), rng=jnp.zeros(2, jnp.uint32)),
        replicated_sharding(mesh),
    )
    manager = checkpoint_manager(str(tmp_path), max_to_keep=2)
    save_checkpoint(manager, state, BytesStateIterator(), default_config())
    manager.wait_until_finished()
    fresh = BytesStateIterator()
    fresh.state = b""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = restore_checkpoint(manager, abstract, fresh)
    assert fresh.state == b"\x00position=7\xff"
    np.testing.assert_array_equal(fetch_replicated(restored.params["w"]), [0.0, 1.0, 2.0])
    assert restored.params["w"].sharding.is_equivalent_to(replicated_sharding(mesh), 1)
    with open(os.path.join(tmp_path, "checkpoints", "7", "config", "metadata")) as f:
        assert json.load(f)["train"]["batch_size"] == 8


def test_metrics_writer_drops_rows_after_the_resume_step(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]


def test_shard_batch_builds_global_arrays_from_host_rows():
    mesh = make_mesh(4)
    batch = shard_batch({"labels": np.arange(8).reshape(8, 1)}, mesh)
    labels = batch["labels"]
    assert labels.shape == (8, 1)
    assert labels.sharding.is_equivalent_to(jax.NamedSharding(mesh, P("data")), 2)
    assert [int(s.data[0, 0]) for s in labels.addressable_shards] == [0, 2, 4, 6]
    assert shard_batch(batch, mesh)["labels"] is labels  # global arrays pass through
    with pytest.raises(ValueError, match="multiple of the 4 local devices"):
        shard_batch({"labels": np.zeros((6, 1))}, mesh)
