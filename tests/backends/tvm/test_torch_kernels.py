"""`sparsec.accelerate`: the transformed program in plain PyTorch with its linear layers on sparsec's TVM kernels.

Real TVM kernels built for this CPU, on the zoo Llama after teal and after relufy, against the torch program within
rtol/atol 1e-4 at one token (the GEMV path) and several (the batched path).
"""
import json
import sys
from collections import Counter

import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.errors import SparsecError, UsageError
from sparsec.inputs import run_program
from tests.zoo import RELU_OVERRIDE, build

pytest.importorskip("tvm")

from sparsec.backends.tvm import torch_kernels  # noqa: E402
from sparsec.backends.tvm.torch_kernels import TVM_LINEAR  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
THREADS = 2


def _feeds():
    g = torch.Generator().manual_seed(1)
    out = []
    for shape in [(1, 1), (1, 5), (2, 12)]:
        ids = torch.randint(0, 256, shape, generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _transform(spec, **overrides):
    model, inputs = build("llama", **overrides)
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    return model, sparsec.transform(model, spec, example_inputs=inputs, forward_loop=loop, measure=False)


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _kinds(module):
    """Counter of the kernel kind of every sparsec::tvm_linear call."""
    return Counter(n.args[4] for n in module.graph.nodes if n.op == "call_function" and n.target is TVM_LINEAR)


def _ops(module):
    return Counter(str(n.target) for n in module.graph.nodes if n.op == "call_function")


def _matches_program(module, program):
    with torch.no_grad():
        for feed in _feeds():
            torch.testing.assert_close(_logits(module(**feed)), run_program(program, feed)[0], **TOL)


@pytest.fixture(scope="module")
def teal():
    return _transform("teal{sparsity=0.5}")[1]


@pytest.fixture(scope="module")
def relufy():
    return _transform("relufy", **RELU_OVERRIDE["llama"])[1]


@pytest.fixture(scope="module")
def rotated():
    return _transform("rotate,teal{sparsity=0.5}")[1]


def test_rotations_run_on_the_dense_kernel_and_match_torch(rotated):
    """rotate's ``x @ Q`` (a matmul by a constant d x d buffer) is a linear layer: the dense kernel, not torch."""
    rotations = rotated.report["passes"][0]["stats"]["inputs_rotated"]
    assert rotations == 2  # gate/up of both blocks (the default max_cost)
    assert _ops(rotated.program.module())["aten.matmul.default"] == rotations
    module = sparsec.accelerate(rotated, threads=THREADS)
    assert "aten.matmul.default" not in _ops(module)
    assert _kinds(module) == {"threshold": 14, "dense": 1 + rotations}
    _matches_program(module, rotated.program)


def test_teal_llama_runs_fused_threshold_kernels_and_matches_torch(teal):
    module = sparsec.accelerate(teal, threads=THREADS)
    assert _kinds(module) == {"threshold": 14, "dense": 1}  # 7 projections per block; lm_head dense
    ops = _ops(module)
    assert "aten.linear.default" not in ops and "sparsec.threshold.default" not in ops  # fused into the kernels
    state = module.state_dict()
    assert "model.layers.0.mlp.down_proj.weight" not in state and "lm_head.weight" not in state  # packed instead
    assert state["sparsec_tvm.model_layers_0_mlp_down_proj_weight"].shape == (THREADS, 128, 32)  # [tiles, K, CT]
    assert "sparsec_teal.model_layers_0_mlp_down_proj" in state  # the threshold stays teal's buffer
    _matches_program(module, teal.program)


def test_relufy_llama_artifact_skips_zero_inputs_and_matches_torch(relufy, tmp_path):
    sparsec.save(relufy, str(tmp_path / "art"))
    module = sparsec.accelerate(str(tmp_path / "art"), threads=THREADS)
    assert _kinds(module) == {"sparse": 2, "dense": 13}  # the down projections read relu's output
    _matches_program(module, relufy.program)
    dense = sparsec.accelerate(relufy, threads=THREADS, sparse=False)
    assert _kinds(dense) == {"dense": 15}
    _matches_program(dense, relufy.program)


@pytest.mark.parametrize("fixture,sparse", [("relufy", True), ("rotated", True),
                                            pytest.param("teal", True, marks=pytest.mark.slow),
                                            pytest.param("teal", False, marks=pytest.mark.slow),
                                            pytest.param("relufy", False, marks=pytest.mark.slow)])
def test_routes_every_linear_as_the_tvm_lowering_does(request, fixture, sparse):
    """The same kernel kinds on the same inputs (kind, K) as `sparsec compile` lowers (which computes q/k/v and
    gate/up by one kernel each, so its N differ; to_relax takes ~4 s: one case in the fast set)."""
    from sparsec.backends.tvm.lower import to_relax

    result = request.getfixturevalue(fixture)
    module = sparsec.accelerate(result, threads=THREADS, sparse=sparse)
    ours = {(n.args[4], str(module.get_buffer(n.args[1].target).shape[1]))
            for n in module.graph.nodes if n.op == "call_function" and n.target is TVM_LINEAR}
    lowered = {tuple(str(gv.name_hint).split("_")[2:4]) for gv in to_relax(result.program, sparse=sparse).functions
               if str(gv.name_hint).startswith("sparsec_linear_")}
    assert ours == lowered


@pytest.mark.parametrize("dtype,tol", [("float32", TOL), ("float16", dict(rtol=2e-3, atol=2e-3))])
def test_mlp_with_biases_in_half_and_single_precision(dtype, tol):
    """Biases (the zoo Llama has none) and fp16 storage; relu's output feeds the second layer's sparse kernel."""
    torch.manual_seed(0)
    td = getattr(torch, dtype)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48)).to(td)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(mlp, (torch.randn(3, 5, 64, dtype=td),), dynamic_shapes=(dims,))
    module = sparsec.accelerate(program, threads=THREADS)
    assert _kinds(module) == {"dense": 1, "sparse": 1}
    with torch.no_grad():
        for shape in [(1, 1, 64), (3, 5, 64)]:
            x = torch.randn(*shape, dtype=td)
            y = module(x)
            assert y.dtype == td
            torch.testing.assert_close(y, program.module()(x), **tol)


def test_sparsity_zero_reproduces_the_original_model():
    model, result = _transform("teal{sparsity=0}")
    module = sparsec.accelerate(result, threads=THREADS)
    assert _kinds(module) == {"threshold": 14, "dense": 1}
    with torch.no_grad():
        for feed in _feeds():
            torch.testing.assert_close(_logits(module(**feed)), model(**feed).logits, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("arch,spec", [("gpt2", "teal{sparsity=0.5}"), ("gpt2", "relufy"),
                                       ("mistral", "teal{sparsity=0.5}"), ("qwen2", "relufy"),
                                       ("llama", "teal{sparsity=0.5 prefill=half}")])
def test_zoo_models_match_torch(arch, spec):
    """GPT-2's Conv1D (addmm with a bias), the other zoo decoders, and teal's prefill threshold (its zeros skipped)."""
    model, inputs = build(arch, **(RELU_OVERRIDE[arch] if spec == "relufy" else {}))
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, spec, example_inputs=inputs, forward_loop=loop, measure=False)
    module = sparsec.accelerate(result, threads=THREADS)
    assert "aten.linear.default" not in _ops(module) and "aten.addmm.default" not in _ops(module)
    fused = spec.startswith("teal") and "prefill" not in spec
    assert set(_kinds(module)) == {"threshold" if fused else "sparse", "dense"}
    _matches_program(module, result.program)


def test_kernels_take_torch_memory_zero_copy(relufy, monkeypatch):
    """The op hands the kernel the activation, the module's packed weight and bias and its torch.empty output
    themselves (same data pointers), and the real kernel reads the weight buffer where torch keeps it."""
    import tvm_ffi

    module = sparsec.accelerate(relufy, threads=THREADS)
    weight = module.get_buffer("sparsec_tvm.lm_head_weight")
    bias = module.get_buffer("sparsec_tvm.lm_head_bias")
    x, t = torch.randn(2, 3, 64), torch.tensor(0.5)
    seen = []
    key = (64, 256, "float32", "threshold", THREADS)
    torch_kernels.linear_kernel_fn(*key)
    monkeypatch.setitem(torch_kernels._KERNELS, key, tvm_ffi.convert(lambda *a: seen.extend(v.data_ptr() for v in a)))
    y = torch.ops.sparsec.tvm_linear(x, weight, bias, t, "threshold")  # the kernel's arguments: x, Wp, thr, bias, y
    assert seen == [x.data_ptr(), weight.data_ptr(), t.data_ptr(), bias.data_ptr(), y.data_ptr()]
    monkeypatch.undo()

    feed = _feeds()[2]
    with torch.no_grad():
        assert _logits(module(**feed)).abs().max() > 0
        weight.zero_()  # in place: the kernel reads this memory, so the logits become the (zero) bias
        assert torch.equal(_logits(module(**feed)), torch.zeros(2, 12, 256))


def test_accelerated_module_exports_with_torch_export(teal):
    module = sparsec.accelerate(teal, threads=THREADS)
    feed = _feeds()[2]
    exported = torch.export.export(module, (), feed)
    assert _ops(exported.module())["sparsec.tvm_linear.default"] == 15
    again = sparsec.accelerate(exported, threads=THREADS)  # nothing left to replace; its packed weights kept
    with torch.no_grad():
        assert torch.equal(_logits(exported.module()(**feed)), _logits(module(**feed)))
        assert torch.equal(_logits(again(**feed)), _logits(module(**feed)))


def test_kernel_libraries_are_cached_on_disk(relufy, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))
    monkeypatch.setattr(torch_kernels, "_KERNELS", {})
    module = sparsec.accelerate(relufy, threads=THREADS)
    libs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tvm-kernels").iterdir()}
    assert sorted(name.split("-")[1] + "-" + name.split("-")[2] for name in libs) == [
        "dense-64x128", "dense-64x256", "dense-64x32", "dense-64x64", "sparse-128x64"]
    monkeypatch.setattr(torch_kernels, "_KERNELS", {})  # a new process: loaded from the cache, not rebuilt
    again = sparsec.accelerate(relufy, threads=THREADS)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tvm-kernels").iterdir()} == libs
    feed = _feeds()[1]
    with torch.no_grad():
        assert torch.equal(_logits(again(**feed)), _logits(module(**feed)))


def test_without_tvm_says_how_to_install_it(relufy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # what `import tvm` does when TVM is not installed
    with pytest.raises(SparsecError) as info:
        sparsec.accelerate(relufy)
    assert info.value.exit_code == 1
    assert str(info.value).startswith("the TVM backend needs Apache TVM, which is not installed (")
    assert str(info.value).endswith("): pip install 'sparsec[tvm]' (apache-tvm==0.27.0.post1)")


def test_unsupported_dtype_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).double()
    program = torch.export.export(model, (torch.randn(2, 8, dtype=torch.float64),))
    with pytest.raises(SparsecError) as info:
        sparsec.accelerate(program)
    assert info.value.exit_code == 1
    assert str(info.value) == ("linear layer '0' computes in float64; sparsec's TVM kernels take float32, float16,"
                               " bfloat16: convert the model (e.g. model.float()) before sparsec transform")


def test_a_module_that_was_not_transformed_is_refused():
    with pytest.raises(UsageError) as info:
        sparsec.accelerate(torch.nn.Linear(4, 4))
    assert info.value.exit_code == 2
    assert str(info.value) == ("sparsec.accelerate takes a TransformResult, an artifact directory or Artifact, or an"
                               " ExportedProgram, not Linear: transform the model first (sparsec.transform(model,"
                               " PIPELINE, example_inputs=...))")


def test_accelerated_module_accepts_train_and_eval():
    from tests.calling_models import opt

    model, ids = opt()
    result = sparsec.transform(model, "relufy", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                               measure=False)
    module = sparsec.accelerate(result, threads=1)
    assert module.train() is module and module.training
    assert module.eval() is module and not module.training


def test_kernels_take_the_tuning_databases_schedule(teal, tmp_path, monkeypatch):
    """A schedule the tuning database holds for this CPU (as `sparsec compile --tune-seconds` records it) is the one
    `accelerate` packs the weight for and compiles; the module still matches torch."""
    from sparsec.backends.tvm import tuning
    from sparsec.backends.tvm.env import host_cpu

    db = tmp_path / "tuning.json"
    key = tuning.entry_key(host_cpu(), THREADS, 128, 64, "float32", "threshold")  # every down_proj
    db.write_text(json.dumps({"format": "sparsec-tuning", "version": tuning.VERSION,
                              "entries": {key: {"rows_per_pass": 2, "tiles_per_thread": 4, "group": 1, "splits": 2}}}))
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))
    monkeypatch.setattr(torch_kernels, "_KERNELS", {})
    monkeypatch.setattr(torch_kernels, "_SCHEDULERS", {})
    module = sparsec.accelerate(teal, threads=THREADS)
    state = module.state_dict()
    assert state["sparsec_tvm.model_layers_0_mlp_down_proj_weight"].shape[0] == 2 * THREADS  # [tiles, K, CT]
    assert state["sparsec_tvm.model_layers_0_mlp_up_proj_weight"].shape[0] == THREADS  # not in it: the default
    libs = sorted(p.name.split("-")[1:8] for p in (tmp_path / "tvm-kernels").iterdir())
    assert ["threshold", "128x64", "float32", f"{2 * THREADS}t", "r2", "g1", "s2"] in libs
    _matches_program(module, teal.program)
