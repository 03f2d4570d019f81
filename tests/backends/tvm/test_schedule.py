"""sparsec's CPU pipeline: the vectorizable transcendental functions against float64, and the schedules of the ops
TVM would leave serial (parallel over rows from PARALLEL_MIN elements on, vectorized, the same values either way)."""
import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.env import cpu_target, import_tvm  # noqa: E402
from sparsec.backends.tvm.schedule import PARALLEL_MIN, cpu_pipeline  # noqa: E402


def _unary_module(op, width: int):
    """A Relax module ``main(x [m, width] float32) = op(x)``, ``m`` symbolic."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("m", "int64"), width], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def _vm(mod):
    from tvm import relax

    import_tvm()
    target = cpu_target()
    return relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())


def _ops():
    from tvm import relax

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    return {"exp": (relax.op.exp, np.exp), "sigmoid": (relax.op.sigmoid, lambda v: 1 / (1 + np.exp(-v))),
            "tanh": (relax.op.tanh, np.tanh), "silu": (relax.op.nn.silu, lambda v: v / (1 + np.exp(-v))),
            "gelu_tanh": (relax.op.nn.gelu_tanh, gelu_tanh)}


def _inputs(width: int):
    x = np.concatenate([np.linspace(-100, 100, width * 40), np.random.default_rng(0).normal(0, 3, width * 8)])
    return x.astype(np.float32).reshape(-1, width)


def _run(name, x):
    op, ref = _ops()[name]
    out = _vm(_unary_module(op, x.shape[1]))["main"](tvm.runtime.tensor(x)).numpy()
    with np.errstate(over="ignore"):
        return out, ref(x.astype(np.float64))


# the most units in the last place seen against float64 over [-100, 100] (torch's own: exp 0.56, sigmoid 2.2)
MAX_ULP = {"exp": 1.0, "sigmoid": 2.5, "tanh": 1.5}


@pytest.mark.parametrize("name", sorted(MAX_ULP))
def test_transcendental_ops_are_within_a_few_ulp_of_float64(name):
    x = _inputs(4096)
    out, exact = _run(name, x)
    with np.errstate(over="ignore"):
        rounded = exact.astype(np.float32)
    normal = np.isfinite(rounded) & (np.abs(exact) >= np.finfo(np.float32).tiny)
    ulp = np.abs(out[normal] - exact[normal]) / np.spacing(np.abs(rounded[normal]))
    assert ulp.max() <= MAX_ULP[name], (name, float(ulp.max()), float(x[normal].ravel()[np.argmax(ulp)]))
    # outside the normal range: overflow to the same infinities, underflow to within float32's least normal
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(rounded))
    assert np.all(np.abs(out[~normal & np.isfinite(rounded)] - exact[~normal & np.isfinite(rounded)]) < 1.2e-38)


@pytest.mark.parametrize("name", ["silu", "gelu_tanh"])
def test_activations_match_float64(name):
    """Absolute error too: x * sigmoid(x) underflows below x = -87, and tanh-GELU's 1 + tanh(z) cancels below
    x = -3 in any float32 evaluation (torch's included)."""
    out, exact = _run(name, _inputs(4096))
    np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)


def test_exp_at_its_edges():
    x = np.array([[-np.inf, -1000, -87.5, -87.3, 0, 1, 88.7, 88.75, 1000, np.inf, np.nan, -0.0]], np.float32)
    from tvm import relax

    out = _vm(_unary_module(relax.op.exp, x.shape[1]))["main"](tvm.runtime.tensor(x)).numpy()[0]
    assert out[0] == 0 and out[1] == 0 and out[2] == 0  # below float32's least normal: 0
    np.testing.assert_allclose(out[3:7], np.exp(x[0, 3:7].astype(np.float64)), rtol=2e-7)
    assert out[4] == 1 and out[5] == np.float32(math.e)
    assert np.isposinf(out[7]) and np.isposinf(out[8]) and np.isposinf(out[9])
    assert np.isnan(out[10]) and out[11] == 1


def _scheduled(op, width):
    target = cpu_target()
    with target:
        mod = cpu_pipeline(target)(_unary_module(op, width))
    return [f for _, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)]


def test_elementwise_functions_run_rows_in_parallel_from_parallel_min_elements_and_vectorize():
    from tvm import relax

    [sigmoid] = _scheduled(relax.op.sigmoid, 2048)
    text = sigmoid.script()
    assert f"m * T.int64(2048) >= T.int64({PARALLEL_MIN})" in text  # one branch per size
    assert text.count("T.parallel(") == 1 and text.count("T.vectorized(") == 2
    vm = _vm(_unary_module(relax.op.sigmoid, 2048))
    rows = np.random.default_rng(1).normal(0, 4, (PARALLEL_MIN // 2048 * 2, 2048)).astype(np.float32)
    parallel = vm["main"](tvm.runtime.tensor(rows)).numpy()
    serial = np.concatenate([vm["main"](tvm.runtime.tensor(rows[i:i + 1])).numpy() for i in range(len(rows))])
    np.testing.assert_array_equal(parallel, serial)


def test_rms_norm_reductions_are_scheduled_and_match_numpy():
    from tvm import relax

    def rms_norm(x):
        return relax.op.multiply(x, relax.op.rsqrt(relax.op.add(relax.op.mean(relax.op.multiply(x, x), axis=[-1],
                                                                               keepdims=True),
                                                                relax.const(1e-6, "float32"))))

    [mean] = [f for f in _scheduled(rms_norm, 2048) if "T.parallel(" in f.script() and "_red" in f.script()]
    assert "T.vectorized(" in mean.script() or "pragma_auto_unroll_max_step" in mean.script()
    x = np.random.default_rng(2).normal(0, 1, (64, 2048)).astype(np.float32)
    out = _vm(_unary_module(rms_norm, 2048))["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6),
                               rtol=1e-5, atol=1e-6)
