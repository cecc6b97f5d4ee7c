"""U-Net: output shapes for any input size, norms, dtypes, synchronised batch norm, config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xeno_jax.models import VARIANTS, UNet, build_model
from xeno_jax.train import default_config, make_mesh

SMALL = {"widths": (4, 8, 8), "stem_width": 4, "num_groups": 4}


def _uniform(seed, shape):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _init(model, x):
    return model.init(jax.random.key(0, impl="rbg"), x, train=False)  # rbg: compiles fast


def _shapes(model, x):
    """Shapes of the variables and the logits, without computing anything."""
    variables = jax.eval_shape(functools.partial(_init, model), x)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    return variables, logits


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("height, width", [(16, 16), (13, 10), (5, 7)])
def test_logits_have_input_resolution_for_any_size(norm, height, width):
    model = UNet(num_classes=12, norm=norm, **SMALL)
    variables, out = _shapes(model, jnp.ones((2, height, width, 6)))
    assert out.shape == (2, height, width, 12)
    assert out.dtype == jnp.float32
    assert ("batch_stats" in variables) == (norm == "batch")


def test_odd_sizes_are_zero_padded_bottom_right_and_cropped_back():
    model = UNet(num_classes=3, norm="group", **SMALL)  # depth 2: multiples of 4
    x = _uniform(1, (1, 9, 11, 5))
    variables = _init(model, x)
    apply = jax.jit(functools.partial(model.apply, train=False))
    logits = apply(variables, x)
    expected = apply(variables, jnp.pad(x, ((0, 0), (0, 3), (0, 1), (0, 0))))[:, :9, :11]
    assert logits.shape == (1, 9, 11, 3)
    np.testing.assert_allclose(logits, expected, atol=1e-6)


def test_bfloat16_computes_in_bfloat16_with_float32_params():
    x = _uniform(2, (2, 8, 8, 6))
    model32 = UNet(num_classes=12, norm="group", **SMALL)
    model16 = model32.clone(dtype=jnp.bfloat16)
    variables = _init(model16, x)
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    out16 = jax.jit(functools.partial(model16.apply, train=False))(variables, x)
    out32 = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out16, out32)  # really computed in bfloat16 ...
    np.testing.assert_allclose(out16, out32, atol=0.1)  # ... and close to float32


def test_spectral_stem_is_a_1x1_convolution_over_the_input_channels():
    x = jnp.ones((1, 8, 8, 100))
    variables, _ = _shapes(UNet(**SMALL), x)
    assert variables["params"]["spectral_stem"]["kernel"].shape == (1, 1, 100, 4)
    no_stem, _ = _shapes(UNet(**{**SMALL, "stem_width": None}), x)
    assert "spectral_stem" not in no_stem["params"]


def test_train_mode_updates_batch_statistics():
    model = UNet(**SMALL)
    x = _uniform(3, (2, 8, 8, 6))
    variables = _init(model, x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_batch_norm_is_synchronised_over_the_data_axis():
    """4 devices with 1 image each give what 1 device gives on all 4 images."""
    x = _uniform(4, (4, 8, 8, 6))
    local = UNet(**SMALL)
    synced = local.clone(axis_name="data")
    variables = _init(local, x)

    def apply(model, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    expected, expected_stats = apply(local, x)
    mesh = make_mesh(4)
    x_sharded = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    got, got_stats = jax.jit(
        jax.shard_map(functools.partial(apply, synced), mesh=mesh, in_specs=P("data"),
                      out_specs=(P("data"), P()))
    )(x_sharded)
    # float32 reductions in a different order: outputs of unit scale agree to ~1e-5.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=5e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), got_stats,
                 expected_stats)


def test_invalid_attributes_are_rejected_with_their_value():
    with pytest.raises(ValueError, match="'layer'"):
        UNet(norm="layer")
    with pytest.raises(ValueError, match="num_groups=8"):
        UNet(norm="group", widths=(4, 8), num_groups=8)
    with pytest.raises(ValueError, match="widths"):
        UNet(widths=())


def test_variants_tiny_and_default():
    config = default_config().model
    assert build_model(config).widths == VARIANTS["default"]["widths"]
    config.variant = "tiny"
    tiny = build_model(config, axis_name="data")
    assert tiny.axis_name == "data" and tiny.widths == VARIANTS["tiny"]["widths"]
    config.widths = (8, 16)
    assert build_model(config).depth == 1
    default = build_model(default_config().model)
    _, out = _shapes(default, jax.ShapeDtypeStruct((1, 480, 640, 100), jnp.float32))
    assert out.shape == (1, 480, 640, 12)


@pytest.mark.parametrize("key, value", [("name", "resnet"), ("variant", "huge"),
                                        ("norm", "layer"), ("dtype", "float16")])
def test_build_model_names_the_bad_key(key, value):
    config = default_config().model
    setattr(config, key, value)
    with pytest.raises(ValueError, match=f"model.{key}.*{value}"):
        build_model(config)
