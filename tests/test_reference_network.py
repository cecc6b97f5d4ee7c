"""The reference's network (smp's EfficientNet U-Net) in Flax: parity with smp, conversion,
orbax round trip, training from converted weights under both launchers, safe loading."""

import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed_worker import InMemoryIterator, make_dataset, tiny_config
from ml_collections import ConfigDict

from experiments.configs import baseline
from experiments.configs.run import get_config as run_config
from xeno_jax.models import EfficientNetUNet, build_model, load_pretrained
from xeno_jax.models.convert import (
    StateDictError,
    find_pretrained,
    import_smp,
    pretrained_model_config,
    read_state_dict,
    save_pretrained,
    variables_from_state_dict,
)
from xeno_jax.models.efficientnet import depthwise_conv
from xeno_jax.study import evaluation
from xeno_jax.train import train, validate_config
from xeno_jax.train.parallel import fetch_replicated

ROOT = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch")
smp = import_smp()


def smp_unet(size, in_channels=100, seed=0):
    """A random smp U-Net in eval mode, with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = smp.Unet(f"efficientnet-{size}", encoder_weights=None, in_channels=in_channels,
                     classes=12).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_nhwc(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def test_b5_matches_smp_in_eval_and_training_mode():
    """Logits (eval and training mode) and one training forward's batch statistics."""
    reference = smp_unet("b5")
    flax_model = EfficientNetUNet(size="b5", drop_connect_rate=0.0)
    variables, info = variables_from_state_dict(numpy_state(reference), flax_model)
    assert not info["encoder_only"] and "encoder._conv_head.weight" in info["ignored"]
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 100)).astype(np.float32)

    expected_eval = torch_nhwc(reference, x)
    reference.train()
    reference.encoder._drop_connect_rate = 0.0  # stochastic; tested below on its own
    expected_train = torch_nhwc(reference, x)
    expected_stats, _ = variables_from_state_dict(numpy_state(reference), flax_model)

    @jax.jit
    def forward(variables, x):
        train_logits, updates = flax_model.apply(variables, x, train=True,
                                                 mutable=["batch_stats"])
        return flax_model.apply(variables, x, train=False), train_logits, updates

    logits, train_logits, updates = jax.device_get(forward(variables, x))
    assert logits.shape == (2, 64, 64, 12)
    np.testing.assert_allclose(logits, expected_eval, atol=1e-4 * np.abs(expected_eval).max(),
                               rtol=0)

    def close(got, expected):  # PyTorch moves the running variance to the unbiased variance
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)

    jax.tree.map(close, updates["batch_stats"], expected_stats["batch_stats"])
    # Batch statistics over 2 x 2 x 2 values per channel at stride 32 amplify float rounding.
    np.testing.assert_allclose(train_logits, expected_train,
                               atol=1e-3 * np.abs(expected_train).max(), rtol=0)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, (1, 1)), (5, 2, (1, 2)), (3, 2, (0, 1))])
def test_depthwise_convolution_equals_xla_grouped_convolution(kernel, stride, padding):
    """The CPU program of `depthwise_conv` (shifted products) against XLA's grouped convolution,
    values and gradients."""
    rng = np.random.default_rng(kernel + stride)
    x = jnp.asarray(rng.normal(size=(2, 13, 16, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), (padding, padding),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=6, precision="highest")

    def loss(fn):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)

    ours = functools.partial(depthwise_conv, stride=stride, padding=padding)
    np.testing.assert_allclose(ours(x, w), grouped(x, w), atol=1e-5)
    for got, want in zip(loss(ours), loss(grouped), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_drop_connect_drops_whole_residual_branches_in_training_only(b0_state):
    model = EfficientNetUNet(size="b0", drop_connect_rate=0.9)
    variables, _ = variables_from_state_dict(b0_state, model)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 100)).astype(np.float32)

    @jax.jit
    def train_logits(keys):
        return [model.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": key})[0] for key in keys]

    a, b = train_logits([jax.random.key(1), jax.random.key(2)])
    assert not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])  # needs its PRNG stream
    jax.eval_shape(functools.partial(model.apply, train=False), variables, x)  # needs none
    with pytest.raises(ValueError, match="16 x 16 input is too small for EfficientNet-b0"):
        jax.eval_shape(functools.partial(model.apply, train=False), variables, x[:, :16, :16])


def lightning_checkpoint(path, state, extra=None):
    """A checkpoint as Lightning writes it: the module's weights under "model."."""
    torch.save({"epoch": 99, "state_dict": {f"model.{k}": torch.from_numpy(v)
                                            for k, v in state.items()},
                "hyper_parameters": extra or {}}, path)


class Payload:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Restoring:
    """An object whose unpickling (``__setstate__``) creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()


def test_converted_network_round_trips_and_trains_under_both_launchers(tmp_path):
    data = {k: v.repeat(2, axis=1).repeat(2, axis=2) for k, v in make_dataset().items()}
    channels = data["features"].shape[-1]  # 32 x 32 images with 4 channels
    reference = smp_unet("b0", in_channels=channels)
    state = numpy_state(reference)
    marker = tmp_path / "pwned"
    lightning_checkpoint(tmp_path / "fold.ckpt", state, {"config": Restoring(marker)})
    loaded = read_state_dict(tmp_path / "fold.ckpt")
    assert not marker.exists()  # the pickled call was never made

    model_config = {"name": "unet_efficientnet_b0", "in_channels": channels, "num_classes": 12,
                    "dtype": "float32"}
    flax_model = build_model(ConfigDict(model_config))
    variables, info = variables_from_state_dict(loaded, flax_model, in_channels=channels)
    assert info["prefix"] == "model."
    save_pretrained(tmp_path / "net", variables, model_config, {"source": "fold.ckpt"})
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(tmp_path / "net", variables, model_config, {})
    model, restored = load_pretrained(str(tmp_path / "net"))
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    x = data["features"][:2]
    np.testing.assert_allclose(jax.jit(functools.partial(model.apply, train=False))(restored, x),
                               torch_nhwc(reference, x), atol=1e-5, rtol=0)
    # The study's evaluation takes converted networks as they are.
    probabilities = evaluation.predictor([(model, restored)])(x)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)

    params, losses = {}, {}
    for backend in ("shard_map", "pmap"):
        config = tiny_config(num_devices=2, backend=backend, steps=2)
        config.model.name = "unet_efficientnet_b0"
        config.model.init_from = str(tmp_path / "net")
        state_out = train(config, str(tmp_path / backend),
                          train_iter=InMemoryIterator(data, config.train.batch_size))
        params[backend] = fetch_replicated(state_out.params)
        with open(tmp_path / backend / "metrics.jsonl") as f:
            losses[backend] = [json.loads(line)["loss"] for line in f]
        # Started from the converted weights (lr 1e-5: two Adam steps move a weight <= 2e-5)
        # and trained.
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=3e-5, rtol=0),
                     params[backend], variables["params"])
        assert any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(params[backend]), jax.tree.leaves(variables["params"]), strict=True))
    # The same steps under both launchers (same data, drop-connect draws and statistics).
    assert len(losses["pmap"]) == 2 and np.isfinite(losses["pmap"]).all()
    np.testing.assert_allclose(losses["pmap"], losses["shard_map"], rtol=1e-5)


@pytest.fixture(scope="module")
def b0_state():
    return numpy_state(smp_unet("b0"))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("encoder._blocks.3._bn1.weight"),
     r"missing keys \(1\): encoder\._blocks\.3\._bn1\.weight"),
    (lambda s: s.update({"decoder.blocks.5.conv1.0.weight": np.zeros((1, 1, 3, 3))}),
     r"unexpected keys \(1\): decoder\.blocks\.5\.conv1\.0\.weight"),
    (lambda s: s.update({"segmentation_head.0.weight": np.zeros((12, 8, 3, 3))}),
     r"wrong shapes \(1\): segmentation_head\.0\.weight \(12, 8, 3, 3\) "
     r"\(expected \(12, 16, 3, 3\)\)"),
    (lambda s: [s.pop(k) for k in list(s) if "_blocks.15." in k],
     r"missing keys \(\d+\): encoder\._blocks\.15\._bn0\.bias"),
])
def test_mismatched_state_dict_names_the_keys(b0_state, change, message):
    state = dict(b0_state)
    change(state)
    with pytest.raises(StateDictError, match=message):
        variables_from_state_dict(state, EfficientNetUNet(size="b0"))


def test_another_architecture_is_named(b0_state):
    with pytest.raises(StateDictError, match=r"b1.*missing keys.*encoder\._blocks\.16"):
        variables_from_state_dict(b0_state, EfficientNetUNet(size="b1"))
    resnet = {"encoder.conv1.weight": np.zeros((64, 100, 7, 7)), "decoder.x": np.zeros(1)}
    with pytest.raises(StateDictError, match=r"no EfficientNet stem.*encoder\.conv1\.weight"):
        variables_from_state_dict(resnet, EfficientNetUNet(size="b0"))


def test_imagenet_encoder_is_adapted_to_100_channels(b0_state):
    """An encoder alone (smp's ImageNet files: no prefix, with the classifier) -> U-Net."""
    rgb = smp_unet("b0", in_channels=3)
    encoder = {k.removeprefix("encoder."): v for k, v in numpy_state(rgb).items()
               if k.startswith("encoder.")}
    encoder |= {"_fc.weight": np.zeros((1000, 1280)), "_fc.bias": np.zeros(1000)}
    variables, info = variables_from_state_dict(encoder, EfficientNetUNet(size="b0"))
    assert info["encoder_only"] and info["adapted_stem"]
    stem = variables["params"]["encoder"]["_conv_stem"]["kernel"]  # HWIO
    w = encoder["_conv_stem.weight"]  # OIHW, 3 channels
    for i in (0, 1, 2, 50, 99):
        np.testing.assert_allclose(stem[:, :, i, :], w[:, i % 3].transpose(1, 2, 0) * 3 / 100,
                                   rtol=1e-6)
    np.testing.assert_array_equal(variables["params"]["encoder"]["_blocks_4"]["_bn1"]["scale"],
                                  encoder["_blocks.4._bn1.weight"])
    kernel = variables["params"]["decoder_blocks_0_conv1"]["0"]["kernel"]  # smp's kaiming init
    fan_in = 3 * 3 * (320 + 112)
    assert 0.9 < np.std(kernel) * np.sqrt(fan_in / 2) < 1.1


def test_no_pickle_in_a_checkpoint_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload(marker)}, tmp_path / "a.pt")
    with pytest.raises(StateDictError, match=r"a\.pt: refused.*posix\.system"):
        read_state_dict(tmp_path / "a.pt")
    with open(tmp_path / "plain.pth", "wb") as f:  # a plain pickle, not torch's zip format
        pickle.dump({"state_dict": {"w": Payload(marker)}}, f)
    with pytest.raises(StateDictError, match=r"plain\.pth: refused"):
        read_state_dict(tmp_path / "plain.pth")
    # Objects of unknown classes load as inert stand-ins: their own code never runs.
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": Restoring(marker)},
               tmp_path / "b.ckpt")
    assert list(read_state_dict(tmp_path / "b.ckpt")) == ["w"]
    torch.save({"w": torch.zeros(2), "x": Restoring(marker)}, tmp_path / "c.pt")
    with pytest.raises(StateDictError, match="entry 'x' is a Restoring, not a tensor"):
        read_state_dict(tmp_path / "c.pt")
    assert not marker.exists()


def test_configs_select_the_reference_network():
    config = baseline.get_config("human,sim_full,unet_efficientnet_b5")
    assert config.model.name == "unet_efficientnet_b5" and config.data.dataset == "sim_full"
    validate_config(config)
    assert isinstance(build_model(config.model), EfficientNetUNet)
    quick = run_config("baseline_human,quick")
    assert quick.model.name == "unet" and quick.model.variant == "tiny"
    from experiments.configs import study

    assert study.get_config("full,unet_efficientnet_b5").model == "unet_efficientnet_b5"
    assert study.get_config("demo").model == "" and study.get_config("demo").quick
    config.model.name = "unet_efficientnet_b9"
    with pytest.raises(ValueError, match=r"model\.name.*unet_efficientnet_b9"):
        validate_config(config)


def test_a_reference_run_folder_converts_fold_by_fold(tmp_path, b0_state):
    """config.json + one Lightning checkpoint per fold -> one converted network per fold."""
    run = tmp_path / "run"
    for fold in ("fold_P1", "fold_P2"):
        (run / fold).mkdir(parents=True)
        lightning_checkpoint(run / fold / "epoch=99-dice_metric=0.90.ckpt", b0_state)
    (run / "config.json").write_text(json.dumps({
        "model": {"architecture_name": "Unet", "architecture_kwargs": {
            "encoder_name": "efficientnet-b0", "encoder_weights": "imagenet"}},
        "input": {"n_channels": 100}}))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.convert_weights", f"--source={run}",
         f"--output={tmp_path / 'nets'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    folds = find_pretrained(tmp_path / "nets")
    assert [p.name for p in folds] == ["fold_P1", "fold_P2"]
    config = pretrained_model_config(folds[0])
    assert (config.name, config.in_channels, config.num_classes) == (
        "unet_efficientnet_b0", 100, 12)
    record = json.loads((folds[1] / "network.json").read_text())
    assert record["prefix"] == "model." and record["reference_config"]["input"]["n_channels"] == 100
