"""Module behaviour: registration, naming, state_dict, modes, initialisation, errors, Dropout."""

import math

import numpy as np
import pytest

import distad as ad

nn, F = ad.nn, ad.nn.functional


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, rng=0)
        self.scale = nn.Parameter(np.ones(3))
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.proj(x) * self.scale)


def make_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3, rng=rng))


# ---- naming and registration -------------------------------------------------------------

def test_sequential_state_dict_keys_follow_pytorch_naming():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_nested_state_dict_keys_follow_pytorch_naming():
    assert list(make_cnn().state_dict()) == [
        "0.weight", "0.bias", "4.weight", "4.bias", "5.weight", "5.bias"]
    assert list(nn.Sequential(Block(), nn.Sequential(nn.Linear(3, 2, bias=False)))
                .state_dict()) == [
        "0.scale", "0.proj.weight", "0.proj.bias", "0.norm.weight", "0.norm.bias", "1.0.weight"]


def test_named_parameters_are_in_registration_order_and_match_state_dict():
    block = Block()
    names = [n for n, _ in block.named_parameters()]
    assert names == ["scale", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    assert names == list(block.state_dict())
    assert [p for p in block.parameters()] == [p for _, p in block.named_parameters()]


def test_pytorch_layouts_of_linear_and_conv2d_weights():
    assert nn.Linear(5, 7).weight.shape == (7, 5)
    assert nn.Conv2d(3, 8, (3, 2)).weight.shape == (8, 3, 3, 2)


def test_shared_parameter_is_listed_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(model.parameters())) == 2


def test_children_and_modules_walk_the_tree():
    block = Block()
    assert [type(m).__name__ for m in block.children()] == ["Linear", "LayerNorm"]
    assert [type(m).__name__ for m in block.modules()] == ["Block", "Linear", "LayerNorm"]


def test_sequential_is_indexable_and_has_a_length():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert len(model) == 3 and isinstance(model[1], nn.ReLU) and model[-1] is model[2]
    head = model[:2]
    assert isinstance(head, nn.Sequential) and len(head) == 2 and head[0] is model[0]
    with pytest.raises(IndexError):
        model[3]


def test_assigning_before_super_init_explains_the_fix():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))

    with pytest.raises(AttributeError, match=r"super\(\)\.__init__\(\)"):
        Bad()


# ---- state_dict --------------------------------------------------------------------------

def test_load_state_dict_round_trips_into_a_fresh_model():
    a, b = make_cnn(0), make_cnn(1)
    b.load_state_dict(a.state_dict())
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        np.testing.assert_array_equal(pa, pb)
    x = np.random.default_rng(2).random((2, 1, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(a(ad.tensor(x)).data, b(ad.tensor(x)).data)


def test_state_dict_holds_numpy_copies():
    model = nn.Linear(2, 2)
    sd = model.state_dict()
    assert all(type(v) is np.ndarray for v in sd.values())
    model.weight.data += 1
    assert not np.array_equal(sd["weight"], model.weight.data)


def test_load_state_dict_shape_mismatch_names_the_key_and_both_shapes():
    sd = nn.Sequential(nn.Linear(4, 3)).state_dict()
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(3, 4\).*\(5, 4\)"):
        nn.Sequential(nn.Linear(4, 5)).load_state_dict(sd)


def test_load_state_dict_strict_rejects_missing_and_unexpected_keys():
    model = nn.Sequential(nn.Linear(2, 2))
    sd = model.state_dict()
    sd["1.weight"] = sd.pop("0.bias")
    with pytest.raises(ValueError, match=r"missing keys: \['0.bias'\].*unexpected keys"):
        model.load_state_dict(sd)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["0.bias"] and result.unexpected_keys == ["1.weight"]


def test_failed_load_state_dict_changes_nothing():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    before = model.state_dict()
    bad = nn.Sequential(nn.Linear(2, 2, rng=5), nn.Linear(2, 4)).state_dict()
    with pytest.raises(ValueError):
        model.load_state_dict(bad)
    np.testing.assert_array_equal(model[0].weight.data, before["0.weight"])


def test_load_state_dict_keeps_the_parameter_dtype():
    model = nn.Linear(2, 2)
    model.load_state_dict({k: v.astype(np.float64) for k, v in model.state_dict().items()})
    assert model.weight.dtype == np.float32


# ---- modes, gradients, dtype -------------------------------------------------------------

def test_train_and_eval_switch_every_submodule():
    model = nn.Sequential(Block(), nn.Dropout(0.5))
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_zero_grad_drops_every_gradient():
    model = Block()
    model(ad.tensor(np.ones((2, 4), np.float32))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_double_casts_parameters_to_float64():
    model = make_cnn().double()
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert model(np.zeros((1, 1, 4, 4))).dtype == np.float64


def test_functional_call_uses_the_given_values_and_restores_the_parameters():
    lin = nn.Linear(2, 1, rng=0)
    w = lin.weight
    out = nn.functional_call(lin, {"weight": np.array([[1.0, 2.0]]), "bias": np.zeros(1)},
                             np.array([[3.0, 4.0]]))
    assert float(out.data[0, 0]) == 11.0
    assert lin.weight is w


# ---- initialisation ----------------------------------------------------------------------

def test_linear_default_init_is_uniform_within_one_over_sqrt_fan_in():
    layer = nn.Linear(100, 500, rng=0)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) and the bias rule both give this
    for p in (layer.weight.data, layer.bias.data):
        assert np.abs(p).max() <= bound and np.abs(p).max() > 0.95 * bound
        assert p.dtype == np.float32


def test_conv2d_default_init_uses_fan_in_of_channels_times_kernel():
    layer = nn.Conv2d(4, 8, 3, rng=0)
    assert np.abs(layer.weight.data).max() <= 1 / math.sqrt(4 * 9)
    assert np.abs(layer.bias.data).max() <= 1 / math.sqrt(4 * 9)


def test_same_seed_gives_same_weights_and_default_generator_is_reproducible():
    np.testing.assert_array_equal(nn.Linear(3, 4, rng=7).weight.data,
                                  nn.Linear(3, 4, rng=7).weight.data)
    nn.init.manual_seed(3)
    a = nn.Linear(3, 4).weight.data
    nn.init.manual_seed(3)
    np.testing.assert_array_equal(a, nn.Linear(3, 4).weight.data)


@pytest.mark.parametrize("name,std", [
    ("kaiming_uniform", math.sqrt(2 / 200)),   # relu gain sqrt(2), fan_in 200
    ("kaiming_normal", math.sqrt(2 / 200)),
    ("xavier_uniform", math.sqrt(2 / (200 + 300))),
    ("xavier_normal", math.sqrt(2 / (200 + 300))),
])
def test_initialisers_have_their_closed_form_standard_deviation(name, std):
    kw = {"nonlinearity": "relu"} if name.startswith("kaiming") else {}
    w = getattr(nn.init, name)((300, 200), np.random.default_rng(0), **kw)
    assert w.dtype == np.float32 and w.shape == (300, 200)
    assert w.std() == pytest.approx(std, rel=0.02)


def test_zeros_and_ones():
    assert nn.init.zeros((2, 3)).sum() == 0 and nn.init.ones((2, 3)).sum() == 6


# ---- Dropout -----------------------------------------------------------------------------

def test_dropout_with_the_same_seed_draws_the_same_mask():
    x = ad.tensor(np.ones((50, 40), np.float32))
    a, b = nn.Dropout(0.3, rng=11)(x).data, nn.Dropout(0.3, rng=11)(x).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, nn.Dropout(0.3, rng=12)(x).data)


def test_dropout_zeroes_about_p_and_scales_survivors_by_one_over_keep():
    y = nn.Dropout(0.25, rng=0)(ad.tensor(np.ones((200, 100), np.float32))).data
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert (y == 0).mean() == pytest.approx(0.25, abs=0.01)


def test_dropout_in_eval_mode_is_the_identity():
    layer = nn.Dropout(0.9, rng=0).eval()
    x = ad.tensor(np.arange(6.0, dtype=np.float32))
    assert layer(x) is x


def test_dropout_gradient_uses_the_same_mask():
    x = ad.tensor(np.ones((4, 5), np.float32), requires_grad=True)
    y = nn.Dropout(0.5, rng=1)(x)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)


# ---- errors ------------------------------------------------------------------------------

def test_linear_with_wrong_input_shape_names_the_layer_and_shapes():
    with pytest.raises(ValueError, match=r"Linear\(in_features=64.*\(\.\.\., 64\).*\(32, 10\)"):
        nn.Linear(64, 128)(np.zeros((32, 10), np.float32))


def test_conv2d_with_wrong_input_shape_names_the_layer_and_shapes():
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8.*\(N, 3, H, W\).*\(2, 1, 8, 8\)"):
        nn.Conv2d(3, 8, 3)(np.zeros((2, 1, 8, 8), np.float32))


def test_conv2d_kernel_larger_than_input_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        nn.Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), np.float32))


def test_cross_entropy_label_out_of_range_is_a_clear_error():
    with pytest.raises(IndexError, match=r"label 10 is out of range for 10 classes"):
        F.cross_entropy(np.zeros((2, 10), np.float32), np.array([3, 10]))


def test_cross_entropy_rejects_float_labels_and_wrong_label_shape():
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        F.cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_embedding_index_out_of_range_is_a_clear_error():
    with pytest.raises(IndexError, match="index 5 is out of range for 5 embeddings"):
        nn.Embedding(5, 2)(np.array([0, 5]))


# ---- buffers -------------------------------------------------------------------------------

class _WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2, rng=0)
        self.register_buffer("count", np.zeros((), np.int64))
        self.register_buffer("stat", np.arange(3, dtype=np.float32))
        self.register_buffer("scratch", np.ones(2, np.float32), persistent=False)


def test_buffers_are_attributes_state_and_not_parameters():
    m = _WithBuffers()
    assert [n for n, _ in m.named_buffers()] == ["count", "stat", "scratch"]
    assert all(id(b) not in {id(p.data) for p in m.parameters()} for b in m.buffers())
    assert list(m.state_dict()) == ["count", "stat", "lin.weight", "lin.bias"]  # own first
    m.stat = np.full(3, 5.0, np.float32)  # assignment replaces the buffer
    assert m.stat[0] == 5.0 and m.state_dict()["stat"][0] == 5.0
    with pytest.raises(TypeError, match="buffer 'stat'"):
        m.stat = [1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="register_buffer"):
        m.register_buffer("bad", 3.0)


def test_buffers_round_trip_through_state_dict_in_place_and_cast_with_to():
    m, other = _WithBuffers(), _WithBuffers()
    m.count += 4
    m.stat[:] = [7.0, 8.0, 9.0]
    held = other.stat
    other.load_state_dict(m.state_dict())
    assert int(other.count) == 4 and other.stat is held  # loaded in place
    np.testing.assert_array_equal(other.stat, [7.0, 8.0, 9.0])
    with pytest.raises(ValueError, match="'stat'"):
        other.load_state_dict({**m.state_dict(), "stat": np.zeros(4, np.float32)})
    other.double()
    assert other.stat.dtype == np.float64 and other.scratch.dtype == np.float64
    assert other.count.dtype == np.int64  # counters stay integers
