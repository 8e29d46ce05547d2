"""The per-rank engine: Tensor, primitives with VJP/JVP rules, and functional transforms."""

from .checkpoint import checkpoint, checkpoint_sequential
from .custom import custom_jvp, custom_vjp
from .engine import (
    Primitive,
    Tensor,
    backprop,
    detect_anomaly,
    enable_grad,
    is_grad_enabled,
    mark_modified,
    no_grad,
    queue_callback,
    tensor,
)
from .gradcheck import GradcheckError, gradcheck
from .ops import (
    abs,
    broadcast_to,
    cast,
    clip,
    concatenate,
    cos,
    erf,
    exp,
    log,
    log_softmax,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    relu,
    reshape,
    scatter_add,
    sigmoid,
    sin,
    softmax,
    sqrt,
    stack,
    sum,
    sum_to,
    tanh,
    transpose,
    where,
)
from .transforms import grad, hessian, hvp, jacobian, jvp, value_and_grad, vjp

__all__ = [
    "Primitive", "Tensor", "backprop", "detect_anomaly", "enable_grad", "is_grad_enabled",
    "mark_modified", "no_grad", "queue_callback", "tensor", "checkpoint", "checkpoint_sequential",
    "custom_jvp", "custom_vjp",
    "GradcheckError", "gradcheck",
    "grad", "hessian", "hvp", "jacobian", "jvp", "value_and_grad", "vjp",
    "abs", "broadcast_to", "cast", "clip", "concatenate", "cos", "erf", "exp", "log", "log_softmax",
    "logsumexp", "matmul", "max", "maximum", "mean", "min", "minimum", "relu", "reshape",
    "scatter_add", "sigmoid", "sin", "softmax", "sqrt", "stack", "sum", "sum_to", "tanh",
    "transpose", "where",
]
