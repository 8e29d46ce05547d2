"""Layer and loss gradients against finite differences (float64), and the nn primitive table.

Layers are checked through their Modules: `functional_call` substitutes the
gradcheck's float64 arrays for the parameters, so the same forward that
training runs is the one differentiated.
"""

import math

import numpy as np
import pytest

import distad as ad
from distad.nn import functional as F
from distad.nn import functional_call
from distad.nn import primitives as P

nn = ad.nn
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def spread(*shape):
    """Distinct values (a shuffled grid plus noise): no ties for max pooling to straddle."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.1 + rng.uniform(0, 0.01, n)).reshape(shape)


def module_fn(module, names):
    """f(x, *params) that runs `module` with its named parameters replaced."""
    return lambda x, *ps: functional_call(module, dict(zip(names, ps)), x)


# ---- each layer against finite differences -----------------------------------------------

def test_linear_gradients_match_finite_differences():
    layer = nn.Linear(4, 3, rng=0)
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), randn(5, 4), randn(3, 4), randn(3))


def test_linear_on_batched_3d_input_gradients_match_finite_differences():
    layer = nn.Linear(4, 2, rng=0)
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), randn(2, 3, 4), randn(2, 4),
                        randn(2))


@pytest.mark.parametrize("shape", [(5, 20), (2, 3, 20), (20,), (70, 20)])
def test_linear_with_a_wide_weight_and_few_rows_equals_the_formula(shape):
    """Few rows against >= 256 outputs take the W @ x.T path (faster in OpenBLAS); 70 rows
    the x @ W.T one: both are x W^T + b, with gradients to match."""
    layer = nn.Linear(20, 300, rng=0).double()
    x = randn(*shape)
    expect = x @ layer.weight.data.T + layer.bias.data
    np.testing.assert_allclose(layer(x).data, expect, rtol=1e-12, atol=1e-12)
    assert layer(x).data.flags.c_contiguous
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), x[..., :20], randn(300, 20),
                        randn(300))


def test_linear_without_bias_gradients_match_finite_differences():
    layer = nn.Linear(3, 2, bias=False, rng=0)
    assert ad.gradcheck(module_fn(layer, ["weight"]), randn(4, 3), randn(2, 3))


def test_conv2d_with_stride_and_padding_gradients_match_finite_differences():
    layer = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), rng=0)
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), randn(2, 2, 5, 4),
                        randn(3, 2, 3, 2), randn(3))


def test_conv2d_overlapping_stride_1_gradients_match_finite_differences():
    layer = nn.Conv2d(3, 2, kernel_size=3, padding=1, rng=0)
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), randn(1, 3, 4, 4),
                        randn(2, 3, 3, 3), randn(2))


def _direct_conv(x, w, b, stride, padding, dilation, groups):
    """The definition, one output pixel at a time (a test oracle, not a kernel)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.empty((n, o, oh, ow))
    per = o // groups
    for f in range(o):
        chans = slice((f // per) * cg, (f // per + 1) * cg)
        for r in range(oh):
            for q in range(ow):
                rows = slice(r * stride[0], r * stride[0] + dilation[0] * (kh - 1) + 1,
                             dilation[0])
                cols = slice(q * stride[1], q * stride[1] + dilation[1] * (kw - 1) + 1,
                             dilation[1])
                out[:, f, r, q] = (xp[:, chans, rows, cols] * w[f]).sum(axis=(1, 2, 3)) + b[f]
    return out


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    ((1, 1), (0, 0), (2, 2), 1), ((2, 1), (2, 1), (2, 3), 1), ((1, 1), (1, 1), (1, 1), 2),
    ((1, 2), (2, 2), (2, 1), 3), ((1, 1), (1, 1), (1, 1), 6)])
def test_dilated_and_grouped_conv2d_equals_the_definition_and_its_gradients(
        stride, padding, dilation, groups):
    x, w, b = randn(2, 6, 7, 6), randn(6, 6 // groups, 3, 2), randn(6)
    got = F.conv2d(x, w, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(got, _direct_conv(x, w, b, stride, padding, dilation, groups),
                               rtol=1e-12, atol=1e-12)
    layer = nn.Conv2d(6, 6, (3, 2), stride, padding, dilation, groups, rng=0).double()
    assert layer.weight.shape == (6, 6 // groups, 3, 2)
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), x[:1, :, :6, :5], w, b)


def test_conv2d_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="groups=4 must divide in_channels=6"):
        nn.Conv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 6, H, W\) for weight"):
        F.conv2d(randn(1, 4, 5, 5), randn(6, 3, 3, 3), groups=2)


def test_conv2d_equals_the_direct_sum_over_the_kernel():
    x, w, b = randn(2, 3, 6, 5), randn(4, 3, 3, 2), randn(4)
    s, p = (2, 1), (1, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    oh, ow = (6 + 2 - 3) // 2 + 1, (5 + 2 - 2) // 1 + 1
    expected = np.zeros((2, 4, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * s[0]:i * s[0] + 3, j * s[1]:j * s[1] + 2]
            expected[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w) + b
    got = F.conv2d(ad.tensor(x), w, b, stride=s, padding=p)
    np.testing.assert_allclose(got.data, expected, rtol=1e-12, atol=1e-12)


def test_max_pool2d_overlapping_with_padding_gradients_match_finite_differences():
    assert ad.gradcheck(lambda x: nn.MaxPool2d(3, stride=2, padding=1)(x), spread(2, 2, 5, 6))


def test_max_pool2d_gradients_match_finite_differences():
    assert ad.gradcheck(lambda x: nn.MaxPool2d(2)(x), spread(2, 3, 4, 6))


def test_max_pool2d_gives_a_tied_window_gradient_to_its_first_maximum():
    x = ad.tensor(np.ones((1, 1, 2, 2)), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad, [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_avg_pool2d_with_stride_and_padding_gradients_match_finite_differences():
    assert ad.gradcheck(lambda x: nn.AvgPool2d(3, stride=2, padding=1)(x), randn(2, 2, 5, 4))


def test_avg_pool2d_is_the_window_mean():
    x = randn(1, 2, 4, 4)
    expected = x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(F.avg_pool2d(x, 2), expected, rtol=1e-12)


def test_layer_norm_gradients_match_finite_differences():
    layer = nn.LayerNorm((3, 4))
    assert ad.gradcheck(module_fn(layer, ["weight", "bias"]), randn(2, 3, 4), randn(3, 4),
                        randn(3, 4))


def test_layer_norm_output_has_zero_mean_and_unit_variance():
    y = nn.LayerNorm(8)(ad.tensor(randn(5, 8) * 3 + 2)).data
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)  # var / (var + eps)


def test_embedding_gradients_with_repeated_indices_match_finite_differences():
    layer = nn.Embedding(5, 3, rng=0)
    idx = np.array([[0, 2, 2], [4, 0, 2]])
    assert ad.gradcheck(lambda w: functional_call(layer, {"weight": w}, idx), randn(5, 3))


def test_gelu_gradients_match_finite_differences():
    assert ad.gradcheck(lambda x: nn.GELU()(x), randn(3, 4) * 2)


def test_exact_gelu_gradients_match_finite_differences_and_the_closed_form():
    x = randn(3, 4) * 2
    assert ad.gradcheck(lambda a: nn.GELU("none")(a), x)
    xt = ad.Tensor(x, requires_grad=True)
    F.gelu(xt, approximate="none").sum().backward()
    phi = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    Phi = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(x.shape)
    np.testing.assert_allclose(xt.grad, Phi + x * phi, rtol=1e-13)


def test_exact_gelu_is_x_phi_and_keeps_float32_and_higher_derivatives():
    x = np.linspace(-6, 6, 61)
    expected = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(F.gelu(x, approximate="none"), expected, rtol=1e-14, atol=1e-300)
    assert F.gelu(x.astype(np.float32), approximate="none").dtype == np.float32
    assert np.abs(F.gelu(x, "none") - F.gelu(x)).max() < 5e-4  # the tanh form is close
    second = ad.grad(lambda a: ad.grad(lambda b: F.gelu(b, "none").sum())(a).sum())
    pdf = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(second(x), pdf * (2 - x * x), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        nn.GELU("exact")


def test_gelu_is_the_tanh_approximation():
    x = np.linspace(-4, 4, 17)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(F.gelu(x), expected, rtol=1e-14)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradients_match_finite_differences(smoothing, reduction):
    labels = np.array([2, 0, 3])
    assert ad.gradcheck(lambda z: F.cross_entropy(z, labels, smoothing, reduction), randn(3, 4))


def test_cross_entropy_gradient_is_softmax_minus_smoothed_onehot_over_n():
    z, labels, s = randn(4, 5), np.array([0, 4, 1, 1]), 0.2
    g = ad.grad(lambda z: F.cross_entropy(z, labels, label_smoothing=s))(z)
    softmax = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    q = np.full((4, 5), s / 5)
    q[np.arange(4), labels] += 1 - s
    np.testing.assert_allclose(g, (softmax - q) / 4, rtol=1e-12, atol=1e-15)


def test_cross_entropy_with_smoothing_equals_its_definition():
    z, labels, s = randn(3, 4), np.array([1, 3, 0]), 0.1
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = np.mean((1 - s) * -logp[np.arange(3), labels] - s / 4 * logp.sum(1))
    assert float(F.cross_entropy(z, labels, label_smoothing=s)) == pytest.approx(expected,
                                                                               rel=1e-12)


def test_nll_loss_gradients_match_finite_differences():
    assert ad.gradcheck(lambda z: F.nll_loss(ad.log_softmax(z), np.array([1, 0])), randn(2, 3))


def test_mse_loss_gradients_match_finite_differences():
    assert ad.gradcheck(lambda a, b: F.mse_loss(a, b), randn(3, 2), randn(3, 2))


def test_second_order_gradients_through_conv_pool_linear_and_cross_entropy():
    """The nn rules are written with distad ops, so grad(grad) works (Hessian-vector check)."""
    w1, w2 = randn(2, 1, 3, 3), randn(3, 8)
    x, labels = randn(2, 1, 4, 4), np.array([0, 2])

    def loss(w1, w2):
        h = F.max_pool2d(ad.tanh(F.conv2d(x, w1, padding=1)), 2).reshape(2, 8)
        return F.cross_entropy(F.linear(F.gelu(h), w2), labels, label_smoothing=0.1)

    v1, v2 = randn(*w1.shape), randn(*w2.shape)

    def directional_grad(w1, w2):  # d/dw <grad loss, v>, i.e. Hessian @ v
        g1, g2 = ad.grad(loss, argnums=(0, 1))(w1, w2)
        return (g1 * v1).sum() + (g2 * v2).sum()

    assert ad.gradcheck(directional_grad, w1, w2)


# ---- the nn primitive table: JVP is the transpose of VJP ---------------------------------

TABLE = [
    ("linear", lambda x, w, b: P.linear_p(x, w, b), [randn(3, 4), randn(2, 4), randn(2)]),
    ("gelu", P.gelu_p, [randn(3, 2)]),
    ("gelu_erf", P.gelu_erf_p, [randn(3, 2)]),
    ("cross_entropy", lambda z: P.cross_entropy_p(z, labels=np.array([1, 0]), smoothing=0.1,
                                                  reduction="mean"), [randn(2, 3)]),
    ("im2col", lambda x: P.im2col(x, (3, 2), (2, 1), (1, 1)), [randn(2, 2, 5, 4)]),
    ("im2col-dilated", lambda x: P.im2col(x, (2, 2), (1, 2), (1, 0), (2, 3)),
     [randn(2, 2, 5, 7)]),
    ("col2im-dilated", lambda c: P.col2im(c, (1, 2, 5, 7), (2, 2), (1, 2), (1, 0), (2, 3)),
     [randn(10, 8)]),
    ("col2im", lambda c: P.col2im(c, (2, 2, 5, 4), (3, 2), (2, 1), (1, 1)), [randn(30, 12)]),
    ("max_pool2d", lambda x: P.max_pool2d(x, (3, 3), (2, 2), (1, 1)), [spread(1, 2, 5, 5)]),
    ("avg_pool2d", lambda x: P.avg_pool2d(x, (2, 3), (1, 2), (1, 1)), [randn(1, 2, 4, 5)]),
    ("avg_unpool", lambda g: P.avg_unpool_p(g, shape=(1, 2, 4, 5), kernel=(2, 3), stride=(1, 2),
                                            padding=(1, 1)), [randn(1, 2, 5, 3)]),
]


@pytest.mark.parametrize("name,fn,inputs", TABLE, ids=[t[0] for t in TABLE])
def test_nn_primitive_vjp_matches_finite_differences(name, fn, inputs):
    assert ad.gradcheck(fn, *inputs)


@pytest.mark.parametrize("name,fn,inputs", TABLE, ids=[t[0] for t in TABLE])
def test_nn_primitive_jvp_is_the_transpose_of_vjp(name, fn, inputs):
    """<J v, u> == <v, J^T u> for random v and u."""
    vs = tuple(randn(*x.shape) for x in inputs)
    out, jv = ad.jvp(fn, tuple(inputs), vs)
    u = randn(*np.shape(out))
    _, vjp_fn = ad.vjp(fn, *inputs)
    rhs = sum(float(np.sum(v * g)) for v, g in zip(vs, vjp_fn(u)))
    assert float(np.sum(np.asarray(jv) * u)) == pytest.approx(rhs, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name,fn,inputs", TABLE, ids=[t[0] for t in TABLE])
def test_nn_primitive_reverse_over_forward_matches_finite_differences(name, fn, inputs):
    """Reverse mode through each nn primitive's JVP rule: grad of x -> <u, J(x) v>."""
    vs = tuple(randn(*x.shape) for x in inputs)
    u = randn(*np.shape(ad.jvp(fn, tuple(inputs), vs)[1]))
    assert ad.gradcheck(lambda *a: (ad.jvp(fn, a, vs)[1] * u).sum(), *inputs,
                        atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,fn,inputs", TABLE, ids=[t[0] for t in TABLE])
def test_nn_primitive_forward_over_forward_matches_reverse_over_forward(name, fn, inputs):
    """jvp of jvp through each nn primitive's JVP rule: the derivative of x -> <u, J(x) v>
    along w equals <w, its gradient by reverse over forward>."""
    vs = tuple(randn(*x.shape) for x in inputs)
    ws = tuple(randn(*x.shape) for x in inputs)
    u = randn(*np.shape(ad.jvp(fn, tuple(inputs), vs)[1]))

    def directional(*a):
        return (ad.jvp(fn, a, vs)[1] * u).sum()

    nested = float(ad.jvp(directional, tuple(inputs), ws)[1])
    grads = ad.grad(directional, argnums=tuple(range(len(inputs))))(*inputs)
    assert nested == pytest.approx(sum(float((w * g).sum()) for w, g in zip(ws, grads)),
                                   rel=1e-9, abs=1e-9)


# ---- float32 stays float32 ---------------------------------------------------------------

LAYERS = [
    ("Linear", lambda: nn.Linear(4, 3, rng=0), (2, 4)),
    ("Conv2d", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, rng=0), (2, 2, 5, 5)),
    ("MaxPool2d", lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    ("AvgPool2d", lambda: nn.AvgPool2d(3, stride=1, padding=1), (2, 2, 4, 4)),
    ("LayerNorm", lambda: nn.LayerNorm(4), (3, 4)),
    ("GELU", lambda: nn.GELU(), (3, 4)),
    ("Dropout", lambda: nn.Dropout(0.3, rng=0), (3, 4)),
    ("Sequential", lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 2, rng=0), nn.Tanh(),
                                         nn.Sigmoid(), nn.ReLU()), (3, 2, 4)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[t[0] for t in LAYERS])
def test_float32_in_gives_float32_out_params_and_grads(name, make, shape):
    layer = make()
    x = ad.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
    y = layer(x)
    assert y.dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    for pname, p in layer.named_parameters():
        assert p.dtype == np.float32 and p.grad.dtype == np.float32, pname


def test_float32_cross_entropy_loss_and_gradient_stay_float32():
    z = ad.tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    loss = F.cross_entropy(z, np.array([0, 1, 2, 0]), label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == np.float32 and z.grad.dtype == np.float32


def test_embedding_float32_gradient_stays_float32():
    layer = nn.Embedding(4, 2, rng=0)
    layer(np.array([1, 1, 3])).sum().backward()
    assert layer.weight.grad.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.grad[:, 0], [0, 2, 0, 1])


# ---- numerical stability -----------------------------------------------------------------

def test_cross_entropy_is_finite_for_logits_of_1e4():
    z = ad.tensor(np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=np.float32),
                  requires_grad=True)
    loss = F.cross_entropy(z, np.array([1, 2]))  # row 0: 1e4; row 1: log 2
    loss.backward()
    assert float(loss) == pytest.approx((1e4 + np.log(2)) / 2, rel=1e-6)
    assert np.all(np.isfinite(z.grad))
    np.testing.assert_allclose(z.grad, [[0.5, -0.5, 0], [0, 0.25, -0.25]], atol=1e-6)


# ---- batch normalisation ------------------------------------------------------------------

def _bn_reference(x, gamma, beta, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("layer, shape", [(nn.BatchNorm2d, (4, 3, 2, 2)),
                                          (nn.BatchNorm1d, (6, 3)), (nn.BatchNorm1d, (3, 3, 4))])
def test_batch_norm_training_gradients_match_finite_differences(layer, shape):
    bn = layer(3).double()
    assert ad.gradcheck(module_fn(bn, ["weight", "bias"]), randn(*shape), randn(3), randn(3))


def test_batch_norm_eval_gradients_match_finite_differences_and_use_the_running_statistics():
    bn = nn.BatchNorm2d(3).double().eval()
    bn.running_mean[:] = [0.5, -1.0, 2.0]
    bn.running_var[:] = [0.25, 4.0, 1.0]
    x, g, b = randn(2, 3, 2, 2), randn(3), randn(3)
    assert ad.gradcheck(module_fn(bn, ["weight", "bias"]), x, g, b)
    y = functional_call(bn, {"weight": g, "bias": b}, x).data
    s = (1, 3, 1, 1)
    expect = ((x - bn.running_mean.reshape(s)) / np.sqrt(bn.running_var.reshape(s) + 1e-5)
              * g.reshape(s) + b.reshape(s))
    np.testing.assert_allclose(y, expect, rtol=1e-12)


def test_batch_norm_output_and_running_statistics_follow_the_formulas():
    x1, x2 = randn(5, 3, 2, 2), randn(5, 3, 2, 2) * 2 + 1
    g, b = randn(3), randn(3)
    for momentum in (0.1, None):
        bn = nn.BatchNorm2d(3, momentum=momentum).double()
        bn.weight.data[:], bn.bias.data[:] = g, b
        np.testing.assert_allclose(bn(x1).data, _bn_reference(x1, g, b), rtol=1e-10, atol=1e-12)
        bn(x2)
        n = 5 * 2 * 2
        means = [x.mean(axis=(0, 2, 3)) for x in (x1, x2)]
        variances = [x.var(axis=(0, 2, 3)) * n / (n - 1) for x in (x1, x2)]  # unbiased
        if momentum is None:  # the cumulative average of the batches
            rm, rv = sum(means) / 2, sum(variances) / 2
        else:
            rm = 0.9 * (0.9 * 0 + 0.1 * means[0]) + 0.1 * means[1]
            rv = 0.9 * (0.9 * 1 + 0.1 * variances[0]) + 0.1 * variances[1]
        np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
        assert int(bn.num_batches_tracked) == 2


def test_batch_norm_forward_mode_matches_reverse_mode():
    """<u, J v> from jvp equals <J^T u, v> from backward: forward mode goes through the same
    composed statistics as reverse mode."""
    bn = nn.BatchNorm1d(3).double()
    x, v, u = randn(5, 3), randn(5, 3), randn(5, 3)
    _, jv = ad.jvp(bn, (x,), (v,))
    xt = ad.Tensor(x, requires_grad=True)
    (bn(xt) * u).sum().backward()
    np.testing.assert_allclose((np.asarray(jv) * u).sum(), (xt.grad * v).sum(), rtol=1e-10)


def test_batch_norm_rejects_bad_shapes_with_the_shapes_in_the_message():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        nn.BatchNorm1d(3)(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"does not match the 3 channels.*\(2, 3, 2, 2\)"):
        F.batch_norm(randn(2, 3, 2, 2), np.zeros(4), np.ones(4), training=True)
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected a 4-d input, got shape \(2, 3\)"):
        nn.BatchNorm2d(3)(randn(2, 3))


def test_sync_batch_norm_on_one_rank_is_batch_norm_and_its_gradients_match():
    sync, plain = ad.parallel.SyncBatchNorm(3).double(), nn.BatchNorm2d(3).double()
    x, g, b = randn(4, 3, 2, 2), randn(3), randn(3)
    for m in (sync, plain):
        m.weight.data[:], m.bias.data[:] = g, b
    np.testing.assert_array_equal(sync(x).data, plain(x).data)
    np.testing.assert_array_equal(sync.running_var, plain.running_var)
    assert ad.gradcheck(module_fn(sync, ["weight", "bias"]), x, g, b)
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected a 2-d or 3-d or 4-d input"):
        sync(randn(3))
