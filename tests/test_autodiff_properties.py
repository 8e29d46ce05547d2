"""Property test: random compositions of ops, autodiff against finite differences."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import distad as ad

UNARY = [ad.sin, ad.cos, ad.tanh, ad.sigmoid, ad.exp,
         lambda x: ad.log(x * x + 1.0), lambda x: ad.sqrt(x * x + 0.5),
         lambda x: x * 0.7 - 0.2, lambda x: ad.softmax(x, axis=-1),
         lambda x: ad.log_softmax(x, axis=0), lambda x: x ** 2, lambda x: x.T.T]
BINARY = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b,
          lambda a, b: a / (b * b + 1.0), lambda a, b: a @ b.T @ a * 0.1,
          lambda a, b: ad.maximum(a, b * 0.5 + 3.0), lambda a, b: ad.concatenate([a, b])[:3]]
REDUCE = [lambda x: x.sum(), lambda x: x.mean(), lambda x: ad.logsumexp(x),
          lambda x: (x * x).sum(axis=0).max()]


# Derandomized: CI runs the same 60 compositions every time, so a pass means something fixed.
@settings(max_examples=60, deadline=None, derandomize=True)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11), st.integers(0, 6)),
                    min_size=1, max_size=6),
       red=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_random_compositions_match_finite_differences(ops, red, seed):
    rng = np.random.default_rng(seed)
    a0 = rng.uniform(-1, 1, (3, 4))
    b0 = rng.uniform(-1, 1, (3, 4))

    def f(a, b):
        h = a
        for is_binary, u, bi in ops:
            h = BINARY[bi](h, b) if is_binary else UNARY[u](h)
        return REDUCE[red](h)

    # Central differences err by about h^2 f''' / 6: on compositions that blow up (x**2
    # nested six times is x**64) that error, not autodiff, exceeds the tolerance.
    assume(abs(float(f(a0, b0))) < 1e3)
    assert ad.gradcheck(f, a0, b0, atol=1e-5, rtol=1e-4)
