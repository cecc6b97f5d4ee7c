"""The reference's network: smp's U-Net on an EfficientNet encoder (method.md A6), in Flax.

`EfficientNetUNet` is ``segmentation_models_pytorch.Unet(encoder_name="efficientnet-bX",
in_channels=100, classes=12)`` with smp's defaults, layer for layer, in NHWC:

* encoder: smp's own EfficientNet (the lukemelas implementation, not timm's): a 3x3 stride-2
  stem, then MBConv blocks (1x1 expansion, depthwise convolution, squeeze-and-excitation, 1x1
  projection, identity skip with drop-connect), swish activations, batch norm with momentum 0.01
  and epsilon 1e-3. Its convolutions pad statically, like TensorFlow's 'SAME' for the network's
  nominal image size (456 for b5) whatever the input size, so ``pad`` is a fixed per-layer
  constant (`same_padding`), exactly as smp's ``Conv2dStaticSamePadding``;
* decoder: five blocks, each a nearest-neighbour resize to the next skip's size, concatenation
  with that skip (the stride-16, 8, 4 and 2 encoder features; none for the last block), then two
  3x3 convolution + batch norm + ReLU; channels 256, 128, 64, 32, 16;
* head: a 3x3 convolution to the classes, logits at the input resolution.

Batch norm (`BatchNorm`) follows PyTorch: normalisation with the biased batch variance, running
variance updated with the unbiased one, statistics synchronised over `axis_name` in training.
Parameter and statistic names map one-to-one onto smp's state-dict keys
(`xeno_jax.models.convert`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Base blocks of EfficientNet-B0: (repeats, kernel, stride, expand ratio, in, out), SE 0.25.
BASE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
SE_RATIO = 0.25
DROP_CONNECT_RATE = 0.2
ENCODER_BN = {"momentum": 0.99, "epsilon": 1e-3}  # PyTorch momentum 0.01
DECODER_BN = {"momentum": 0.9, "epsilon": 1e-5}  # PyTorch defaults
DECODER_CHANNELS = (256, 128, 64, 32, 16)


@dataclasses.dataclass(frozen=True)
class EfficientNetSize:
    """Compound scaling of one EfficientNet, and where smp taps its features.

    Attributes:
      width, depth: channel and repeat multipliers.
      image_size: nominal input size; it sets the static 'same' padding of every layer.
      taps: indices of the blocks whose outputs are the stride-4, 8, 16 and 32 features (smp's
        ``out_indexes``).
    """

    width: float
    depth: float
    image_size: int
    taps: tuple[int, int, int, int]


SIZES = {
    "b0": EfficientNetSize(1.0, 1.0, 224, (2, 4, 8, 15)),
    "b1": EfficientNetSize(1.0, 1.1, 240, (4, 7, 15, 22)),
    "b2": EfficientNetSize(1.1, 1.2, 260, (4, 7, 15, 22)),
    "b3": EfficientNetSize(1.2, 1.4, 300, (4, 7, 17, 25)),
    "b4": EfficientNetSize(1.4, 1.8, 380, (5, 9, 21, 31)),
    "b5": EfficientNetSize(1.6, 2.2, 456, (7, 12, 26, 38)),
    "b6": EfficientNetSize(1.8, 2.6, 528, (8, 14, 30, 44)),
    "b7": EfficientNetSize(2.0, 3.1, 600, (10, 17, 37, 54)),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 (never down by more than 10 %)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow-style 'SAME' padding (before, after) for an input of `size` pixels."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: kernel, stride, channels, static padding and drop-connect rate."""

    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    padding: tuple[int, int]
    drop_rate: float

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs(size: EfficientNetSize, drop_connect_rate: float = DROP_CONNECT_RATE
                ) -> tuple[int, tuple[int, int], list[BlockSpec]]:
    """Stem channels, stem padding and the MBConv blocks of an EfficientNet size.

    Block i of n drops its residual branch with probability ``drop_connect_rate * i / n``.
    """
    image = size.image_size
    stem_padding = same_padding(image, 3, 2)
    image = math.ceil(image / 2)
    blocks = []
    for repeats, kernel, stride, expand, cin, cout in BASE_BLOCKS:
        cin, cout = round_filters(cin, size.width), round_filters(cout, size.width)
        for r in range(math.ceil(size.depth * repeats)):
            s = stride if r == 0 else 1
            blocks.append((kernel, s, expand, cin if r == 0 else cout, cout,
                           same_padding(image, kernel, s)))
            image = math.ceil(image / s)
    specs = [BlockSpec(*b, drop_rate=drop_connect_rate * i / len(blocks))
             for i, b in enumerate(blocks)]
    return round_filters(32, size.width), stem_padding, specs


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over the last axis, synchronised over `axis_name` in training.

    Training normalises with the biased variance of the (global) batch and moves the running
    variance towards the unbiased one, as PyTorch does; statistics are computed in float32 in
    two passes (mean, then mean squared deviation).

    Attributes:
      momentum: running-average momentum, flax convention (``new = m * old + (1 - m) * batch``;
        PyTorch's momentum is ``1 - m``).
      epsilon: added to the variance.
      axis_name: mapped axis whose devices share the batch, or None.
      dtype: computation dtype of the output.
    """

    momentum: float
    epsilon: float
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axes)
            if self.axis_name is not None:
                mean = lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if self.axis_name is not None:
                var = lax.pmean(var, self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                unbiased = var * count / jnp.maximum(count - 1, 1)
                running_var.value = m * running_var.value + (1 - m) * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * lax.rsqrt(var + self.epsilon)
        shift = bias - mean * multiplier
        return x.astype(self.dtype) * multiplier.astype(self.dtype) + shift.astype(self.dtype)


# PyTorch's default Conv2d initialisation: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)),
# and U(+-1/sqrt(fan_in)) for biases; smp re-initialises its decoder (kaiming_uniform, fan_in,
# ReLU gain) and head (xavier_uniform, zero bias).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
DECODER_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
HEAD_INIT = nn.initializers.xavier_uniform()


def _torch_bias_init(fan_in: int):
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                     -bound, bound)


def _conv(features: int, kernel: int, *, in_features: int, dtype: Any, name: str,
          stride: int = 1, padding: tuple[int, int] = (0, 0),
          bias: bool = False, kernel_init: Any = TORCH_CONV_INIT,
          bias_init: Any = None) -> nn.Conv:
    """A square convolution with explicit (before, after) padding on both spatial axes."""
    fan_in = in_features * kernel * kernel
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=(padding, padding),
                   use_bias=bias, dtype=dtype, name=name,
                   kernel_init=kernel_init, bias_init=bias_init or _torch_bias_init(fan_in))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
                   ) -> jax.Array:
    """Depthwise convolution of NHWC `x` with a (k, k, 1, C) kernel, one program per platform.

    XLA's grouped convolution is slow on CPUs (forward and backward, ~7x slower than a sum of
    k^2 shifted products of the same values: experiments/benchmarks/reference_network.py); on
    CPUs the convolution is that sum, elsewhere XLA's convolution. Both compute the same
    function.
    """
    pad = ((0, 0), padding, padding, (0, 0))

    def convolution(x, kernel):
        return lax.conv_general_dilated(x, kernel, (stride, stride), pad[1:3],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])

    def shifted_products(x, kernel):
        k = kernel.shape[0]
        padded = jnp.pad(x, pad).astype(jnp.float32)
        height = max((padded.shape[1] - k) // stride + 1, 0)
        width = max((padded.shape[2] - k) // stride + 1, 0)
        total = jnp.zeros((x.shape[0], height, width, x.shape[-1]), jnp.float32)
        if not height or not width:  # an input smaller than the kernel: empty, as XLA's
            return total.astype(x.dtype)
        for i in range(k):
            for j in range(k):
                window = lax.slice(padded, (0, i, j, 0),
                                   (x.shape[0], i + stride * (height - 1) + 1,
                                    j + stride * (width - 1) + 1, x.shape[-1]),
                                   (1, stride, stride, 1))
                total = total + window * kernel[i, j, 0].astype(jnp.float32)
        return total.astype(x.dtype)

    return lax.platform_dependent(x, kernel, cpu=shifted_products, default=convolution)


class DepthwiseConv(nn.Module):
    """``nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)`` (same parameter) computed
    with `depthwise_conv`."""

    features: int
    kernel_size: int
    stride: int
    padding: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", TORCH_CONV_INIT,
                            (self.kernel_size, self.kernel_size, 1, self.features), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                              self.padding)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (smp's ``MBConvBlock``)."""

    spec: BlockSpec
    bn_momentum: float
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def _bn(self, name: str) -> BatchNorm:
        return BatchNorm(self.bn_momentum, ENCODER_BN["epsilon"], self.axis_name, self.dtype,
                         name=name)

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool, draw: jax.Array | None = None
                 ) -> jax.Array:
        """``draw``: one uniform number per image; in training the residual branch of an image
        is dropped when its number is below the block's drop rate (drop-connect)."""
        spec = self.spec
        expanded = spec.in_channels * spec.expand_ratio
        x = inputs
        if spec.expand_ratio != 1:
            x = _conv(expanded, 1, in_features=spec.in_channels, dtype=self.dtype,
                      name="_expand_conv")(x)
            x = nn.swish(self._bn("_bn0")(x, train=train))
        x = DepthwiseConv(expanded, spec.kernel, spec.stride, spec.padding, self.dtype,
                          name="_depthwise_conv")(x)
        x = nn.swish(self._bn("_bn1")(x, train=train))

        squeezed = max(1, int(spec.in_channels * SE_RATIO))
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = _conv(squeezed, 1, in_features=expanded, bias=True, dtype=self.dtype,
                  name="_se_reduce")(s)
        s = _conv(expanded, 1, in_features=squeezed, bias=True, dtype=self.dtype,
                  name="_se_expand")(nn.swish(s))
        x = nn.sigmoid(s) * x

        x = _conv(spec.out_channels, 1, in_features=expanded, dtype=self.dtype,
                  name="_project_conv")(x)
        x = self._bn("_bn2")(x, train=train)
        if not spec.has_skip:
            return x
        if train and spec.drop_rate > 0:  # drop-connect: drop the whole residual per image
            keep = (draw >= spec.drop_rate).astype(x.dtype)[:, None, None, None]
            x = x * keep / jnp.asarray(1.0 - spec.drop_rate, x.dtype)
        return x + inputs


def global_row_uniform(key: jax.Array, count: int, rows: int, axis_name: str | None
                       ) -> jax.Array:
    """``(count, rows)`` uniform draws for this device's rows of the global batch.

    Under a mapped `axis_name` the draws are made for every row of the global batch and each
    device takes its own, so a row's draws do not depend on how many devices share the batch.
    """
    if axis_name is None:
        return jax.random.uniform(key, (count, rows))
    every_row = jax.random.uniform(key, (count, rows * lax.axis_size(axis_name)))
    return lax.dynamic_slice_in_dim(every_row, lax.axis_index(axis_name) * rows, rows, axis=1)


class EfficientNetEncoder(nn.Module):
    """smp's EfficientNet encoder: the input's features at strides 2, 4, 8, 16 and 32."""

    size: str = "b5"
    bn_momentum: float = ENCODER_BN["momentum"]
    drop_connect_rate: float = DROP_CONNECT_RATE
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        size = SIZES[self.size]
        stem_channels, stem_padding, specs = block_specs(size, self.drop_connect_rate)
        x = _conv(stem_channels, 3, in_features=x.shape[-1], stride=2, padding=stem_padding,
                  dtype=self.dtype, name="_conv_stem")(x)
        x = nn.swish(BatchNorm(self.bn_momentum, ENCODER_BN["epsilon"], self.axis_name,
                               self.dtype, name="_bn0")(x, train=train))
        features = [x]
        draws = [None] * len(specs)
        if train and self.drop_connect_rate > 0:  # one draw for all blocks: cheap to compile
            draws = global_row_uniform(self.make_rng("dropout"), len(specs), x.shape[0],
                                       self.axis_name)
        for i, spec in enumerate(specs):
            x = MBConvBlock(spec, self.bn_momentum, self.axis_name, self.dtype,
                            name=f"_blocks_{i}")(x, train=train, draw=draws[i])
            if i in size.taps:
                features.append(x)
        return features


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
    """PyTorch's ``interpolate(mode="nearest")`` to a size: source index floor(i * in / out)."""
    def source(size_in: int, size_out: int) -> np.ndarray:
        scale = np.float32(size_in / size_out)  # float32 arithmetic, as PyTorch's kernel
        index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(index, size_in - 1)

    if x.shape[1:3] == (height, width):
        return x
    if (height, width) == (2 * x.shape[1], 2 * x.shape[2]):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, source(x.shape[1], height)][:, :, source(x.shape[2], width)]


class Conv2dReLU(nn.Module):
    """smp's ``Conv2dReLU``: 3x3 convolution (no bias), batch norm, ReLU."""

    features: int
    bn_momentum: float
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _conv(self.features, 3, in_features=x.shape[-1], padding=(1, 1), dtype=self.dtype,
                  kernel_init=DECODER_CONV_INIT, name="0")(x)
        x = BatchNorm(self.bn_momentum, DECODER_BN["epsilon"], self.axis_name, self.dtype,
                      name="1")(x, train=train)
        return nn.relu(x)


class EfficientNetUNet(nn.Module):
    """smp's ``Unet(encoder_name=f"efficientnet-{size}")`` returning float32 NHWC logits.

    Attributes:
      size: EfficientNet size, "b0" to "b7" (the reference: "b5").
      num_classes: output classes per pixel.
      bn_momentum: None keeps smp's momenta (encoder 0.01, decoder 0.1 in PyTorch's convention);
        a value (flax convention) replaces every layer's, as the SWA batch-norm pass does with 0.
      drop_connect_rate: drop-connect probability of the last block (smp: 0.2), scaled
        linearly from 0 at the first.
      axis_name: mapped axis for synchronised batch normalisation in training, or None.
      dtype: computation dtype (float32 or bfloat16); parameters stay float32.
    """

    size: str = "b5"
    num_classes: int = 12
    bn_momentum: float | None = None
    drop_connect_rate: float = DROP_CONNECT_RATE
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"EfficientNet size must be one of {sorted(SIZES)}, "
                             f"got {self.size!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
        """Segments ``(B, H, W, C)`` spectra; ``train`` uses batch statistics and drop-connect
        (which needs a "dropout" PRNG stream)."""
        height, width = features.shape[1:3]
        encoder_momentum = ENCODER_BN["momentum"] if self.bn_momentum is None else self.bn_momentum
        decoder_momentum = DECODER_BN["momentum"] if self.bn_momentum is None else self.bn_momentum
        encoder = EfficientNetEncoder(self.size, encoder_momentum, self.drop_connect_rate,
                                      self.axis_name, self.dtype, name="encoder")
        skips = encoder(features.astype(self.dtype), train=train)
        if min(skips[-1].shape[1:3]) == 0:
            raise ValueError(f"a {height} x {width} input is too small for EfficientNet-"
                             f"{self.size}: its stride-32 features would be empty")
        x, skips = skips[-1], [*skips[-2::-1], None]
        for i, (channels, skip) in enumerate(zip(DECODER_CHANNELS, skips, strict=True)):
            target = (height, width) if skip is None else skip.shape[1:3]
            x = resize_nearest(x, *target)
            if skip is not None:
                x = jnp.concatenate([x, skip], axis=-1)
            for conv in ("conv1", "conv2"):
                x = Conv2dReLU(channels, decoder_momentum, self.axis_name, self.dtype,
                               name=f"decoder_blocks_{i}_{conv}")(x, train=train)
        logits = _conv(self.num_classes, 3, in_features=x.shape[-1], padding=(1, 1), bias=True,
                       dtype=self.dtype, kernel_init=HEAD_INIT,
                       bias_init=nn.initializers.zeros, name="segmentation_head")(x)
        return logits.astype(jnp.float32)
