"""Training speed of the reference's network: xeno_jax against PyTorch + smp, side by side.

The same network (smp's ``Unet("efficientnet-b5", in_channels=100, classes=12)`` and its Flax
port `xeno_jax.models.EfficientNetUNet`, started from the same weights), the same loss
((CE + soft Dice) / 2 over valid pixels, `xeno_jax.train.losses`) and Adam, on the same random
batch, in one process with the repetitions interleaved:

- ``xeno_jax``: `xeno_jax.train.step.train_step` launched as `xeno_jax.train.train` launches it
  (shard_map over a one-device mesh, synchronised batch norm, drop-connect, NaN guard), no
  augmentation; float32 on a CPU, bfloat16 compute (float32 parameters) on an accelerator;
- ``pytorch``: the reference's step (``LightningImage.training_step`` without Lightning):
  NCHW forward, the loss, backward, ``Adam.step``; float32 on a CPU, fp16 autocast with a
  GradScaler on a GPU (the reference's ``16-mixed``), ``set_float32_matmul_precision("high")``.

Where the time goes: each framework is also timed for the training-mode forward with the loss
alone and for forward + backward (gradients, no optimiser); the step minus these is the
optimiser's (and, for xeno_jax, the gradient all-reduce and guard's) share. These programs are
compiled separately from the step, so on a CPU their shares need not add up. Then one depthwise
layer of the B5, forward and backward, with XLA's grouped convolution, `depthwise_conv` and
PyTorch (XLA's grouped convolution is what made the step slow on CPUs).

    python experiments/benchmarks/reference_network.py                 # CPU, 8 x 128 x 160 x 100
    python experiments/benchmarks/reference_network.py --batch=2 --height=64 --width=80
    python experiments/benchmarks/reference_network.py --accelerator   # GPU: 8 x 480 x 640 x 100

Needs PyTorch and segmentation-models-pytorch (``pip install 'xeno_jax[torch]'``); the GPU mode
needs a CUDA build of PyTorch next to JAX's CUDA build.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.benchmarks.input_pipeline import load_average
from xeno_jax.models import build_model
from xeno_jax.models.convert import import_smp, variables_from_state_dict
from xeno_jax.models.efficientnet import depthwise_conv
from xeno_jax.train.losses import segmentation_loss
from xeno_jax.train.parallel import (
    DATA_AXIS,
    data_parallel,
    fetch_replicated,
    make_mesh,
    replicated_sharding,
    shard_batch,
)
from xeno_jax.train.state import create_train_state, make_optimizer, variables_dict
from xeno_jax.train.step import train_step

NUM_CLASSES = 12
PHASES = ("forward", "forward+backward", "step")


def random_batch(batch: int, height: int, width: int, channels: int, seed: int = 0) -> dict:
    """L1-normalised random spectra; labels of all classes, 10 % invalid pixels."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.1, 1.0, (batch, height, width, channels)).astype(np.float32)
    features /= features.sum(-1, keepdims=True)
    labels = rng.integers(0, NUM_CLASSES, (batch, height, width)).astype(np.int32)
    valid = rng.uniform(size=labels.shape) > 0.1
    return {"features": features, "labels": np.where(valid, labels, NUM_CLASSES), "valid": valid}


# -- PyTorch: the reference's step ------------------------------------------------------------


def torch_loss(torch, logits, labels, valid):
    """(CE + soft Dice) / 2 over valid pixels (method.md A6, as xeno_jax.train.losses)."""
    logits = logits.permute(0, 2, 3, 1)[valid].float()
    target = torch.nn.functional.one_hot(labels[valid].long(), NUM_CLASSES).float()
    cross_entropy = torch.nn.functional.cross_entropy(logits, target)
    probabilities = logits.softmax(-1)
    intersection = (probabilities * target).sum(0)
    dice = 1 - (2 * intersection + 1e-5) / (target.sum(0) + probabilities.sum(0) + 1e-5)
    present = target.sum(0) > 0
    return (cross_entropy + dice[present].mean()) / 2


def torch_runner(model, batch: dict, accelerator: bool):
    import torch

    device = "cuda" if accelerator else "cpu"
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=accelerator)
    x = torch.from_numpy(batch["features"]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(batch["labels"]).to(device)
    valid = torch.from_numpy(batch["valid"]).to(device) & (labels < NUM_CLASSES)

    def loss():
        with torch.autocast(device, dtype=torch.float16, enabled=accelerator):
            return torch_loss(torch, model(x), labels, valid)

    def run(phase: str) -> None:
        if phase == "forward":
            with torch.no_grad():
                loss().item()
            return
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss()).backward()
        if phase == "step":
            scaler.step(optimizer)
            scaler.update()
        if accelerator:
            torch.cuda.synchronize()

    return run


# -- xeno_jax: its own step --------------------------------------------------------------------


def jax_runner(model, variables: dict, batch: dict):
    mesh = make_mesh(1)
    optimizer = make_optimizer(1e-3)
    # Laid out as the step returns it (replicated over the mesh), or the first timed step
    # would compile again for a new input sharding.
    state = jax.jit(functools.partial(create_train_state, model, optimizer, seed=0,
                                      input_shape=(1, *batch["features"].shape[1:]),
                                      swa_schedule=None),
                    out_shardings=replicated_sharding(mesh))(variables=variables)
    step = data_parallel(functools.partial(train_step, model=model, optimizer=optimizer),
                         mesh, donate=True)
    device_batch = shard_batch(batch, mesh)

    local = model.clone(axis_name=None)  # the phases run outside the mesh

    def loss(params, batch_stats, key, batch):
        logits, _ = local.apply(variables_dict(params, batch_stats), batch["features"],
                                train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return segmentation_loss(logits, batch["labels"], batch["valid"])[0]

    forward = jax.jit(loss)
    gradients = jax.jit(jax.grad(loss))
    holder = {"state": state}

    def run(phase: str) -> None:
        current = holder["state"]
        key = jax.random.key(0)
        if phase == "forward":
            jax.block_until_ready(forward(current.params, current.batch_stats, key,
                                          device_batch))
        elif phase == "forward+backward":
            jax.block_until_ready(gradients(current.params, current.batch_stats, key,
                                            device_batch))
        else:
            holder["state"], metrics = step(current, device_batch)
            fetch_replicated(metrics["finite"])  # the loop's one scalar read per step

    return run


def depthwise_layer(accelerator: bool, repeats: int, calls: int = 5) -> None:
    """One 5x5 depthwise layer of the B5 (8 x 64 x 80 x 240), forward and backward: XLA's
    grouped convolution, `depthwise_conv` (what the network runs on this platform) and
    PyTorch's, repetitions interleaved."""
    import torch

    rng = np.random.default_rng(0)
    channels, kernel = 240, 5
    x = rng.normal(size=(8, 64, 80, channels)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 1, channels)).astype(np.float32)

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=channels)

    def jax_call(fn):
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
        args = (jnp.asarray(x), jnp.asarray(w))
        return lambda: jax.block_until_ready(grad(*args))

    device = "cuda" if accelerator else "cpu"
    xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), device=device, requires_grad=True)
    wt = torch.tensor(w.transpose(3, 2, 0, 1).copy(), device=device, requires_grad=True)

    def torch_call():
        xt.grad = wt.grad = None
        (torch.nn.functional.conv2d(xt, wt, padding=2, groups=channels) ** 2).sum().backward()
        if accelerator:
            torch.cuda.synchronize()

    calls_of = {"XLA grouped convolution": jax_call(grouped),
                "depthwise_conv": jax_call(functools.partial(depthwise_conv, stride=1,
                                                             padding=(2, 2))),
                "PyTorch": torch_call}
    seconds = {name: [] for name in calls_of}
    for call in calls_of.values():
        call()
    for _ in range(repeats):
        for name, call in calls_of.items():
            start = time.perf_counter()
            for _ in range(calls):
                call()
            seconds[name].append((time.perf_counter() - start) / calls)
    print(f"\nOne depthwise layer (5x5, 8 x 64 x 80 x 240), forward and backward; {load_average()}")
    torch_seconds = seconds["PyTorch"]
    for name, values in seconds.items():
        ratios = [t / v for t, v in zip(torch_seconds, values, strict=True)]
        print(f"  {name:24s} {statistics.median(values):7.3f} s   PyTorch / this = "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")


def measure(runners: dict, steps: int, repeats: int) -> dict:
    """Seconds per call of every (framework, phase), repetitions interleaved, after a warm-up."""
    for run in runners.values():
        for _ in range(2):  # compile / warm up (the second call: state as the step returns it)
            for phase in PHASES:
                run(phase)
    seconds = {(name, phase): [] for name in runners for phase in PHASES}
    for _ in range(repeats):
        for name, run in runners.items():
            for phase in PHASES:
                start = time.perf_counter()
                for _ in range(steps):
                    run(phase)
                seconds[name, phase].append((time.perf_counter() - start) / steps)
    return seconds


def report(seconds: dict, batch: int, label: str) -> None:
    print(f"\n{label}; {load_average()}")
    medians = {key: statistics.median(v) for key, v in seconds.items()}
    for name in ("xeno_jax", "pytorch"):
        step = medians[name, "step"]
        forward, backward = medians[name, "forward"], medians[name, "forward+backward"]
        print(f"  {name:9s} {step:8.3f} s/step  {batch / step:7.2f} images/s   forward "
              f"{forward / step:5.1%}, backward {(backward - forward) / step:5.1%}, optimiser "
              f"and rest {(step - backward) / step:5.1%} of a step")
    ratios = [p / j for p, j in zip(seconds["pytorch", "step"], seconds["xeno_jax", "step"],
                                    strict=True)]
    print(f"  PyTorch s/step / xeno_jax s/step = {statistics.median(ratios):.2f} "
          f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} interleaved repeats "
          f"(> 1: xeno_jax is faster); per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", action="store_true",
                        help="GPU: bfloat16 xeno_jax vs fp16-autocast PyTorch (default sizes "
                             "8 x 480 x 640)")
    parser.add_argument("--encoder", default="b5", help="EfficientNet size (b0..b7)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=0, help="0: 128 (CPU) / 480")
    parser.add_argument("--width", type=int, default=0, help="0: 160 (CPU) / 640")
    parser.add_argument("--steps", type=int, default=0, help="calls per repeat; 0: 2 / 10")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    accelerator = args.accelerator
    height = args.height or (480 if accelerator else 128)
    width = args.width or (640 if accelerator else 160)
    steps = args.steps or (10 if accelerator else 2)

    import torch

    smp = import_smp()
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    reference = smp.Unet(f"efficientnet-{args.encoder}", encoder_weights=None, in_channels=100,
                         classes=NUM_CLASSES)
    state_dict = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = build_model(ml_collections.ConfigDict({
        "name": f"unet_efficientnet_{args.encoder}", "num_classes": NUM_CLASSES,
        "dtype": "bfloat16" if accelerator else "float32"}), axis_name=DATA_AXIS)
    variables, _ = variables_from_state_dict(state_dict, model)
    batch = random_batch(args.batch, height, width, 100)
    runners = {"xeno_jax": jax_runner(model, variables, batch),
               "pytorch": torch_runner(reference, batch, accelerator)}
    seconds = measure(runners, steps, args.repeats)
    device = jax.devices()[0]
    torch_device = (torch.cuda.get_device_name() if accelerator
                    else f"{torch.get_num_threads()} CPU threads [CPU]")
    label = (f"EfficientNet-{args.encoder} U-Net, {args.batch} x {height} x {width} x 100, "
             f"{'bf16 / fp16 autocast' if accelerator else 'float32'}, "
             f"JAX on {device.device_kind}, PyTorch {torch.__version__} on {torch_device}")
    report(seconds, args.batch, label)
    depthwise_layer(accelerator, args.repeats)


if __name__ == "__main__":
    jnp.zeros(())  # initialise JAX's backend before PyTorch's threads
    main()
