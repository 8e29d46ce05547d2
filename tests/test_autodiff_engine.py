"""The engine's behaviour: tape, accumulation, pruning, errors, dtypes, deep graphs."""

import gc

import numpy as np
import pytest

import distad as ad


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_design_example_gradients_match_closed_form():
    xv, wv = f32(3, 4), f32(4, 2, seed=1)
    x, w = ad.tensor(xv, requires_grad=True), ad.tensor(wv, requires_grad=True)
    loss = (ad.tanh(x @ w) ** 2).mean()
    loss.backward()
    h = np.tanh(xv @ wv)
    dz = 2 * h * (1 - h * h) / h.size
    np.testing.assert_allclose(x.grad, dz @ wv.T, rtol=1e-5)
    np.testing.assert_allclose(w.grad, xv.T @ dz, rtol=1e-5)
    assert x.grad.dtype == np.float32 and x.grad.shape == x.shape


def test_gradients_accumulate_across_backward_calls():
    x = ad.tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3 + 2 * np.array([1.0, 2.0]))


def test_a_tensor_used_twice_gets_both_contributions():
    x = ad.tensor(np.array(1.5), requires_grad=True)
    y = x * x + ad.sin(x) * x
    y.backward()
    assert x.grad == pytest.approx(2 * 1.5 + np.cos(1.5) * 1.5 + np.sin(1.5))


def test_repeated_advanced_indices_accumulate():
    x = ad.tensor(np.zeros(4), requires_grad=True)
    x[np.array([1, 1, 3, 1])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 3, 0, 1])


def test_python_scalars_never_promote_float32():
    x = ad.tensor(f32(5), requires_grad=True)
    y = (2.5 * x + 1) / 3.0 - 0.5 ** x + x ** 2 * 1e-3
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_no_grad_records_nothing():
    x = ad.tensor(f32(3), requires_grad=True)
    with ad.no_grad():
        y = ad.exp(x) * 2
    assert not y.requires_grad and y.is_leaf


def test_constants_are_pruned_from_the_backward_walk():
    """Only paths that reach a requires_grad leaf are walked: a rule on a constant-only
    branch is never called."""
    calls = []
    spy = ad.Primitive("spy", lambda x: x,
                       vjp=(lambda g, y, x: calls.append(1) or g,), jvp=(lambda t, y, x: t,))
    c = ad.tensor(f32(3))                      # constant
    x = ad.tensor(f32(3), requires_grad=True)
    loss = (spy(c) * 2 + x).sum()
    loss.backward()
    assert calls == []
    assert not spy(c).requires_grad


def test_backward_frees_the_tape():
    x = ad.tensor(f32(3), requires_grad=True)
    y = (ad.exp(x) * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed graph.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = ad.tensor(np.array([0.3, 0.7]), requires_grad=True)
    y = (ad.exp(x) * 2).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * np.exp([0.3, 0.7]))


def test_backward_of_a_non_scalar_without_cotangent_says_so():
    x = ad.tensor(f32(2, 3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"\(2, 3\) is not a scalar.*cotangent"):
        (x * 2).backward()


def test_backward_with_explicit_cotangent():
    x = ad.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * x).backward(np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(x.grad, [2.0, 0.0, 12.0])


def test_cotangent_of_the_wrong_shape_is_rejected():
    x = ad.tensor(f32(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"cotangent shape \(2,\).*\(3,\)"):
        (x * 2).backward(np.ones(2, np.float32))


def test_shape_mismatch_names_the_op_and_both_shapes():
    a, b = ad.tensor(f32(3, 4), requires_grad=True), ad.tensor(f32(5, 4))
    with pytest.raises(ValueError, match=r"matmul.*\(3, 4\).*\(5, 4\)"):
        a @ b
    with pytest.raises(ValueError, match=r"add.*\(3, 4\).*\(5, 4\)"):
        a + b


def test_backward_on_a_tensor_without_history_says_so():
    with pytest.raises(RuntimeError, match="does not depend"):
        ad.tensor(f32(1)).sum().backward()


def test_chain_of_100000_ops_backpropagates_without_recursion():
    x = ad.tensor(np.float32(0.5), requires_grad=True)
    y = x
    for _ in range(50_000):                  # 2 ops per iteration: 100,000 vertices
        y = y * 1.00001 + 0.1
    y.backward()
    assert x.grad == pytest.approx(1.00001 ** 50_000, rel=1e-3)


def test_graph_holds_no_reference_cycles():
    """Vertices reference inputs, never consumers: freeing the output frees the graph
    without the cyclic garbage collector."""
    gc.collect()
    gc.disable()
    try:
        x = ad.tensor(f32(8), requires_grad=True)
        y = x
        for _ in range(50):
            y = ad.sin(y) * 1.01 + 0.1
        y.sum().backward(retain_graph=True)
        del y
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_softmax_family_is_finite_for_logits_of_1e4():
    z = ad.tensor(np.array([[1e4, -1e4, 0.0], [1e4, 1e4, 1e4]], np.float32), requires_grad=True)
    for fn in (lambda t: ad.log_softmax(t), lambda t: ad.softmax(t),
               lambda t: ad.logsumexp(t, axis=1)):
        out = fn(z)
        assert np.all(np.isfinite(out.data))
        (out * out).sum().backward()
        assert np.all(np.isfinite(z.grad))
    np.testing.assert_allclose(ad.logsumexp(z, axis=1).data, [1e4, 1e4 + np.log(3)], rtol=1e-6)


def test_hooks_fire_when_the_gradient_is_final_and_may_replace_it():
    seen = []
    w = ad.tensor(np.array([1.0, 2.0]), requires_grad=True)
    w.register_hook(lambda g: seen.append(g.copy()) or g * 10)
    loss = (w * 3).sum() + (w * w).sum()     # two uses: the hook sees the sum
    loss.backward()
    np.testing.assert_allclose(seen[0], 3 + 2 * np.array([1.0, 2.0]))
    np.testing.assert_allclose(w.grad, 10 * seen[0])


def test_hook_count_follows_registration_and_removal():
    w = ad.tensor(np.array([1.0, 2.0]), requires_grad=True)
    assert w.hook_count == 0
    remove = w.register_hook(lambda g: None)
    w.register_hook(lambda g: None)
    assert w.hook_count == 2
    remove()
    assert w.hook_count == 1


def test_leaf_gradients_are_final_in_reverse_layer_order():
    """The order data parallelism relies on: the last layer's weight first."""
    order = []
    ws = [ad.tensor(f32(4, 4, seed=i), requires_grad=True) for i in range(3)]
    for i, w in enumerate(ws):
        w.register_hook(lambda g, i=i: order.append(i))
    h = ad.tensor(f32(2, 4))
    for w in ws:
        h = ad.tanh(h @ w)
    h.sum().backward()
    assert order == [2, 1, 0]


def test_grad_arrays_are_read_only():
    x = ad.tensor(f32(3), requires_grad=True)
    (x * 2).sum().backward()
    with pytest.raises(ValueError, match="read-only"):
        x.grad *= 2


def test_numpy_on_the_left_defers_to_tensor():
    x = ad.tensor(f32(3), requires_grad=True)
    y = np.ones(3, np.float32) * x + np.float32(2) - np.arange(3, dtype=np.float32) @ x
    assert isinstance(y, ad.Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1 - 3 * np.arange(3))


def test_backward_after_an_optimizer_step_changed_a_used_parameter_raises():
    """The saved weight is stale once SGD has updated it in place: backward names the op and
    the shape instead of returning gradients of the old weights (a version counter)."""
    model = ad.nn.Linear(3, 2, rng=0)
    opt = ad.optim.SGD(model.parameters(), lr=0.1)
    x = ad.tensor(np.ones((4, 3), np.float32), requires_grad=True)
    loss = (model(x) ** 2).sum()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match=r"input 1 of 'linear' \(shape \(2, 3\).*changed in "
                                           r"place"):
        loss.backward()


def test_load_state_dict_between_forward_and_backward_raises_and_a_fresh_forward_works():
    model = ad.nn.Linear(3, 2, rng=0)
    state = {k: v * 2 for k, v in model.state_dict().items()}
    x = np.ones((4, 3), np.float32)
    loss = model(x).sum()
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="changed in place"):
        loss.backward()
    model(x).sum().backward()  # a graph built after the change is fine
    np.testing.assert_allclose(model.weight.grad, np.full((2, 3), 4.0))


def test_accumulating_over_micro_batches_then_stepping_is_not_an_error():
    model = ad.nn.Linear(3, 2, rng=0)
    opt = ad.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for xb in (np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)):
            model(xb).sum().backward()
        opt.step()
        opt.zero_grad()
    assert model.weight._version == 2
