"""Feature maps: deterministic ones as before, random ones checked statistically.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from transformer_core.attention import AttentionLayer, FullAttention, LinearAttention
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.feature_maps import (
    ActivationFunctionFeatureMap,
    Favor,
    FeatureMap,
    GeneralizedRandomFeatures,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
    elu_feature_map,
    orthogonal_gaussian,
)
from transformer_core.masking import FullMask

E = 16


def pairs(scale: float = 0.3, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return scale * torch.randn(n, E), scale * torch.randn(n, E)


def gaussian_kernel(x, y, t=1.0):
    return torch.exp(-t * torch.cdist(x, y).square() / 2)  # (n, n)


def mse(f: FeatureMap, x, y, kernel) -> float:
    f.new_feature_map("cpu")
    return (f(x) @ f(y).T - kernel).square().mean().item()


def test_elu_feature_map_is_kept_and_positive():
    phi = elu_feature_map(E)
    assert isinstance(phi, ActivationFunctionFeatureMap)
    x = torch.randn(100, E) * 5
    assert (phi(x) > 0).all()
    phi.new_feature_map("cpu")  # deterministic: nothing to draw
    torch.testing.assert_close(phi.forward_queries(x), phi.forward_keys(x))


@pytest.mark.parametrize("orthogonal", [False, True])
def test_random_fourier_features_approach_the_gaussian_kernel(orthogonal):
    x, y = pairs()
    kernel = gaussian_kernel(x, y)
    few = mse(RandomFourierFeatures(E, n_dims=64, softmax_temp=1, orthogonal=orthogonal),
              x, y, kernel)
    many = mse(RandomFourierFeatures(E, n_dims=16384, softmax_temp=1, orthogonal=orthogonal),
               x, y, kernel)
    assert many < 1e-3 and many < few / 20  # the error falls roughly as 1 / n_dims


def test_random_fourier_features_temperature_scales_the_kernel():
    x, y = pairs(0.5)
    f = RandomFourierFeatures(E, n_dims=16384, softmax_temp=0.25)
    assert mse(f, x, y, gaussian_kernel(x, y, t=0.25)) < 1e-3


def test_smoothed_random_fourier_features_add_the_smoothing_constant():
    x, y = pairs()
    f = SmoothedRandomFourierFeatures(E, n_dims=16385, softmax_temp=1, smoothing=2.0)
    assert f(x).shape[-1] == 16385
    assert mse(f, x, y, gaussian_kernel(x, y) + 2.0) < 1e-3


@pytest.mark.parametrize("orthogonal", [False, True])
def test_favor_approaches_the_softmax_kernel_and_is_positive(orthogonal):
    x, y = pairs(0.15)
    kernel = torch.exp(x @ y.T)
    few = mse(Favor(E, n_dims=64, softmax_temp=1, orthogonal=orthogonal), x, y, kernel)
    many_map = Favor(E, n_dims=16384, softmax_temp=1, orthogonal=orthogonal)
    many = mse(many_map, x, y, kernel)
    assert many < 1e-3 and many < few / 20
    assert (many_map(x) > 0).all() and (many_map(3 * torch.randn(100, E)) >= 0).all()


def test_orthogonal_features_vary_less_than_independent_ones():
    x, y = pairs(0.5)
    kernel = torch.exp(x @ y.T / math.sqrt(E))
    errors = {ortho: sum(mse(Favor(E, n_dims=2 * E, orthogonal=ortho), x, y, kernel)
                         for _ in range(30)) for ortho in (False, True)}
    assert errors[True] < errors[False]


def test_orthogonal_gaussian_columns_are_orthogonal_in_blocks():
    w = orthogonal_gaussian(E, 2 * E + 3)
    assert w.shape == (E, 2 * E + 3)
    for block in (w[:, :E], w[:, E : 2 * E], w[:, 2 * E :]):
        gram = block.T @ block
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-4
    # column norms are those of N(0, I_E) vectors: mean square norm close to E
    norms = orthogonal_gaussian(E, 4000).norm(dim=0).square()
    assert abs(norms.mean().item() - E) < 1.0


def test_favor_linear_attention_approximates_softmax_attention():
    """A user swapping softmax for FAVOR+ (default temperature 1/sqrt(E)) gets
    nearly the same outputs, closer with more features."""
    N, L, H = 2, 20, 2
    q, k, v = (0.5 * torch.randn(N, L, H, E) for _ in range(3))
    exact = FullAttention().eval()(q, k, v)
    errors = [(LinearAttention(E, Favor.factory(n_dims=n))(q, k, v) - exact).abs().mean().item()
              for n in (16, 8192)]
    assert errors[1] < 0.01 and errors[1] < errors[0] / 4


def test_favor_stabilize_changes_no_attention_and_avoids_overflow():
    N, L, H = 2, 30, 2
    q, k, v = torch.randn(N, L, H, E), torch.randn(N, L, H, E), torch.randn(N, L, H, 3)
    plain = LinearAttention(E, Favor.factory(n_dims=64, redraw=2))
    stable = LinearAttention(E, Favor.factory(n_dims=64, redraw=2, stabilize=True))
    stable.feature_map.omega = plain.feature_map.omega.clone()
    plain.feature_map._calls = stable.feature_map._calls = 0  # next call: no redraw
    torch.testing.assert_close(stable(q, k, v), plain(q, k, v), atol=1e-4, rtol=1e-4)
    huge = 40 * torch.randn(N, L, H, E)
    stable.feature_map._calls = 0
    assert torch.isfinite(stable(huge, huge, v)).all()


def test_redraw_every_call_every_n_calls_and_never_in_deterministic_eval():
    x = torch.randn(5, E)

    def outputs(f, calls):
        result = []
        for _ in range(calls):
            f.new_feature_map("cpu")
            result.append(f(x))
        return result

    a, b = outputs(Favor(E, n_dims=32), 2)
    assert not torch.allclose(a, b)
    a, b, c, d = outputs(Favor(E, n_dims=32, redraw=3), 4)
    assert torch.equal(a, b) and torch.equal(b, c) and not torch.allclose(c, d)
    f = Favor(E, n_dims=32, deterministic_eval=True)
    a, b = outputs(f, 2)
    assert not torch.allclose(a, b)
    f.eval()
    (c,) = outputs(f, 1)
    assert torch.equal(b, c)


def test_random_features_are_saved_with_the_model_and_follow_its_dtype():
    f = RandomFourierFeatures(E, n_dims=32, deterministic_eval=True)
    g = RandomFourierFeatures(E, n_dims=32, deterministic_eval=True)
    g.load_state_dict(f.state_dict())
    g.eval().new_feature_map("cpu")
    x = torch.randn(5, E)
    torch.testing.assert_close(g(x), f(x))
    f.double().new_feature_map("cpu")
    assert f.omega.dtype == torch.float64 and f(x.double()).dtype == torch.float64


def test_generalized_random_features_apply_the_kernel_function():
    f = GeneralizedRandomFeatures(E, n_dims=128)
    phi = f(torch.randn(10, E))
    assert phi.shape == (10, 128) and (phi >= 0).all() and (phi > 0).any()
    g = GeneralizedRandomFeatures(E, n_dims=8, kernel_fn=torch.exp, softmax_temp=0.5)
    x = torch.randn(3, E)
    torch.testing.assert_close(g(x), torch.exp((x * math.sqrt(0.5)) @ g.omega))


def test_factory_gives_each_attention_its_own_features():
    factory = Favor.factory(n_dims=64)
    f, g = factory(E), factory(E)
    assert f.query_dims == E and f.n_dims == 64
    assert not torch.equal(f.omega, g.omega)


def test_feature_map_inside_a_two_layer_model_trains():
    x = torch.rand(3, 50, 4 * 8)
    att = AttentionLayer(LinearAttention(8, Favor.factory(n_dims=32)), 4 * 8, 4)
    mask, lengths = FullMask(50), FullMask(3, 50)
    y = att(att(x, x, x, mask, lengths, lengths), x, x, mask, lengths, lengths)
    y.sum().backward()
    assert att.query_projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_dims=1), "n_dims"), (dict(n_dims=0), "n_dims"), (dict(redraw=0), "redraw"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomFourierFeatures(E, **kwargs)
    with pytest.raises(ValueError, match="query_dimensions"):
        Favor(0)


@pytest.mark.parametrize("feature_map", [Favor.factory(n_dims=64), partial(Favor, n_dims=64),
                                         Favor, RandomFourierFeatures.factory(orthogonal=True)])
def test_builders_take_a_factory_a_partial_or_the_class(feature_map):
    """The seed's documented ways of passing a feature map to a builder."""
    transformer = TransformerEncoderBuilder.from_kwargs(
        attention_type="linear", n_layers=2, n_heads=2, query_dimensions=8, value_dimensions=8,
        feature_map=feature_map).get()
    maps = [layer.attention.inner_attention.feature_map for layer in transformer.layers]
    assert maps[0] is not maps[1] and not torch.equal(maps[0].omega, maps[1].omega)
    assert transformer(torch.rand(2, 10, 16)).shape == (2, 10, 16)
