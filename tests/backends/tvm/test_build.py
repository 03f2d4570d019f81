"""Lowering to Relax with sparsec's kernels, TVM build directories, `sparsec compile` / `sparsec run BUILD/`.

Every build is a real TVM compile for this CPU, compared with the torch artifact within rtol/atol 1e-4 on inputs
of several shapes, including one token (the batch-1 GEMV path of the kernels) and several (the batched path).
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.errors import SparsecError, UsageError
from sparsec.inputs import run_program
from tests.calling_models import assert_takes_the_calling_convention, opt
from tests.zoo import RELU_OVERRIDE, build
from tests.cli_helpers import one_error_line, run_cli

pytest.importorskip("tvm")

TOL = dict(rtol=1e-4, atol=1e-4)


def _feeds():
    g = torch.Generator().manual_seed(1)
    out = []
    for shape in [(2, 12), (1, 5), (1, 1)]:
        ids = torch.randint(0, 256, shape, generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _transform(arch, spec):
    overrides = RELU_OVERRIDE[arch] if spec == "relufy" else {}
    model, inputs = build(arch, **overrides)
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    return sparsec.transform(model, spec, example_inputs=inputs, forward_loop=loop, measure=False)


def _matches_torch(build_dir, program):
    compiled = sparsec.load_compiled(str(build_dir))
    for feed in _feeds():
        got = compiled(feed)
        want = run_program(program, feed)
        assert len(got) == len(want)
        for g, w in zip(got.values(), want):
            torch.testing.assert_close(g, w, **TOL)  # torch inputs, torch outputs
    return compiled


@pytest.fixture(scope="module")
def llama_teal(tmp_path_factory):
    """(artifact dir, build dir, program): the zoo Llama after teal 0.5, compiled with `sparsec compile`."""
    from sparsec.cli import main

    result = _transform("llama", "teal{sparsity=0.5}")
    root = tmp_path_factory.mktemp("llama")
    art, out = root / "art", root / "build"
    sparsec.save(result, str(art))
    try:
        main(["compile", str(art), "--threads", "2", "-o", str(out)])
    except SystemExit as exc:
        assert exc.code == 0
    return art, out, result.program


def test_teal_llama_build_matches_torch(llama_teal):
    art, out, program = llama_teal
    assert sorted(os.listdir(out)) == ["manifest.json", "model.so", "params.bin"]
    assert not [n for n in os.listdir(out.parent) if "sparsec-tmp" in n]
    compiled = _matches_torch(out, program)
    m = compiled.manifest
    assert m["format"] == "sparsec-tvm-build" and m["threads"] == 2 and m["target"] == "llvm"
    assert m["sparsec"] == sparsec.__version__ and m["source"] == str(art)
    kinds = {k.split("_")[2] for k in m["kernels"]}
    assert kinds == {"threshold", "dense"}  # teal's thresholded projections, and lm_head


def test_projections_that_share_an_input_run_as_one_kernel(llama_teal):
    """q/k/v (one thresholded input, equal thresholds) and gate/up are one kernel call each over their weights
    concatenated: the build has the fused shapes' kernels, not the single projections' (64 -> 64 q, 32 k/v); the
    outputs are checked against torch by the test above."""
    art, out, program = llama_teal
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    assert sorted(kernels) == ["sparsec_linear_dense_64_256_float32",  # lm_head
                               "sparsec_linear_threshold_128_64_float32",  # down
                               "sparsec_linear_threshold_64_128_float32",  # q, k, v: 64 + 32 + 32
                               "sparsec_linear_threshold_64_256_float32",  # gate, up: 128 + 128
                               "sparsec_linear_threshold_64_64_float32"]  # o


def test_only_equal_thresholds_of_one_input_share_a_kernel():
    """A projection whose threshold differs from its siblings' (e.g. teal's greedy allocation) keeps its own kernel."""
    from sparsec.backends.tvm.lower import Constants, sibling_linears
    from sparsec.graph import module_path

    program = _transform("llama", "teal{sparsity=0.5}").program
    program.state_dict["sparsec_teal.model_layers_0_self_attn_k_proj"] += 1e-3
    groups = {tuple(sorted(module_path(n) for n in members))
              for members in sibling_linears(program, Constants(program), sparse=True).values()}
    layer = "model.layers.{}.".format
    assert groups == {(layer(0) + "self_attn.q_proj", layer(0) + "self_attn.v_proj"),
                      (layer(0) + "mlp.gate_proj", layer(0) + "mlp.up_proj"),
                      (layer(1) + "self_attn.k_proj", layer(1) + "self_attn.q_proj", layer(1) + "self_attn.v_proj"),
                      (layer(1) + "mlp.gate_proj", layer(1) + "mlp.up_proj")}
    assert sibling_linears(program, Constants(program), sparse=False) == {}  # dense: each reads its own threshold


def test_out_of_range_token_ids_wrap_around_instead_of_reading_past_the_table(llama_teal):
    """TVM's default 'fast' take reads outside the embedding table for an id >= the vocabulary (256): a crash or
    garbage. The build wraps: id 256 + 5 gives id 5's result."""
    _, out, _ = llama_teal
    compiled = sparsec.load_compiled(str(out))
    mask = torch.ones(1, 3, dtype=torch.long)
    past = compiled(input_ids=torch.tensor([[7, 256 + 5, 3]]), attention_mask=mask)["logits"]
    inside = compiled(input_ids=torch.tensor([[7, 5, 3]]), attention_mask=mask)["logits"]
    assert torch.equal(past, inside)
    far = compiled(input_ids=torch.tensor([[7, 1_000_000, 3]]), attention_mask=mask)["logits"]  # 1e6 mod 256 = 64
    assert torch.equal(far, compiled(input_ids=torch.tensor([[7, 64, 3]]), attention_mask=mask)["logits"])


def test_cli_run_build(llama_teal, tmp_path, capsys):
    _, out, program = llama_teal
    feed = _feeds()[0]
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in feed.items()})
    code, stdout, err = run_cli(capsys, "run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["backend"] == "tvm" and info["outputs"] == [{"name": "logits", "dtype": "float32",
                                                             "shape": [2, 12, 256]}]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o.npz")["logits"]),
                               run_program(program, feed)[0], **TOL)
    code, _, err = run_cli(capsys, "run", out)
    assert code == 2 and "running the TVM build" in one_error_line(err) and "needs inputs: --inputs FILE" in err
    np.savez(tmp_path / "bad.npz", attention_mask=feed["attention_mask"].numpy())
    code, _, err = run_cli(capsys, "run", out, "--inputs", tmp_path / "bad.npz")
    assert code == 1 and "has no input 'input_ids'" in one_error_line(err)


def test_build_takes_the_calling_convention(tmp_path, capsys):
    """On a model no other test compiles (OPT): keyword or dict inputs, torch or numpy, a defaulted attention_mask,
    outputs named as the model names them; `sparsec run` the same."""
    model, ids = opt()
    result = sparsec.transform(model, "relufy", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                               measure=False)
    sparsec.compile(result, str(tmp_path / "b"), threads=2)
    compiled = sparsec.load_compiled(str(tmp_path / "b"))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert compiled.manifest["output_names"] == ["logits"]
    assert_takes_the_calling_convention(compiled, want, ids, TOL)
    with pytest.raises(SparsecError) as e:
        compiled(attention_mask=torch.ones_like(ids))
    assert re.fullmatch(rf"the call has no input 'input_ids'; build '{re.escape(str(tmp_path / 'b'))}' takes"
                        r" input_ids: int64\[\w+, \w+\], attention_mask: int64\[\w+, \w+\] \(pass each by keyword,"
                        r" or all in one dict\)", str(e.value))
    np.savez(tmp_path / "in.npz", input_ids=ids.numpy())
    code, stdout, err = run_cli(capsys, "run", tmp_path / "b", "--inputs", tmp_path / "in.npz", "-o",
                                tmp_path / "o.npz", "--json")
    assert code == 0, err
    assert [o["name"] for o in json.loads(stdout)["outputs"]] == ["logits"]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o.npz")["logits"]), want, **TOL)


class _LinearAndWeight(torch.nn.Module):
    """A linear layer that also returns its weight: an output that is a parameter of the build."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 48)

    def forward(self, x):
        return self.linear(x), self.linear.weight


@pytest.mark.filterwarnings("ignore:strip. nothing to strip")
def test_calls_convert_inputs_once_and_return_outputs_the_caller_owns(tmp_path):
    """Aligned torch inputs go in without a copy, any other input (unaligned, read-only or strided numpy, a strided
    or grad-requiring torch tensor) through a kept buffer, all with the same result; each call's outputs are the
    caller's: a later call does not overwrite them, and writing to a returned weight does not change the build.
    The input spec is checked once per signature: a new signature is still checked."""
    torch.manual_seed(0)
    model = _LinearAndWeight().eval()
    result = sparsec.transform(model, "strip", example_inputs=(torch.randn(3, 64),), measure=False)
    sparsec.compile(result, str(tmp_path / "b"), threads=2)
    compiled = sparsec.load_compiled(str(tmp_path / "b"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model.linear(x)
    first = compiled(x=x)
    torch.testing.assert_close(first[0], want, **TOL)
    kept = first[0].clone()
    unaligned = np.zeros(3 * 64 + 1, np.float32)[1:].reshape(3, 64)
    unaligned[...] = x.numpy()
    read_only = x.numpy().copy()
    read_only.flags.writeable = False
    strided = np.asfortranarray(x.numpy())
    for feed in (unaligned, read_only, strided, x.T.contiguous().T, x.clone().requires_grad_()):
        got = compiled(x=feed)
        assert isinstance(got[0], np.ndarray) == isinstance(feed, np.ndarray)
        np.testing.assert_array_equal(np.asarray(got[0].detach() if hasattr(got[0], "detach") else got[0]),
                                      first[0].numpy())
    compiled(x=2 * x)
    assert torch.equal(first[0], kept)  # not overwritten by later calls
    first[1].zero_()  # the returned weight is a copy
    again = compiled(x=x)
    torch.testing.assert_close(again[0], want, **TOL)
    assert torch.equal(again[1], model.linear.weight.detach())
    with pytest.raises(SparsecError, match=r"input 'x' has shape \[3, 65\]; dim 1 must be 64"):
        compiled(x=torch.randn(3, 65))


_PEAK_RSS_OF_LOAD = """
import sys
import torch, tvm
from sparsec.backends.tvm.build import load_compiled

def peak():  # VmHWM: this process's peak resident bytes (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

before = peak()
compiled = load_compiled(sys.argv[1])
print(peak() - before)
"""


@pytest.mark.filterwarnings("ignore:strip. nothing to strip")
def test_loading_a_build_keeps_one_copy_of_its_weights(tmp_path):
    """Loading a build raises the process's peak RSS by about its weights' bytes once (64 MiB here), not twice (a
    memory map of params.bin copied into TVM tensors holds both until loading ends); measured in a fresh process."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 8192, bias=False)).eval()
    result = sparsec.transform(model, "strip", example_inputs=(torch.randn(1, 2048),), measure=False)
    sparsec.compile(result, str(tmp_path / "b"), threads=2)
    weights = os.path.getsize(tmp_path / "b" / "params.bin")
    assert weights >= 64 << 20
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_LOAD, str(tmp_path / "b")], capture_output=True,
                         text=True, check=True)
    assert int(run.stdout) < 1.35 * weights, (int(run.stdout) / weights, run.stderr)


@pytest.mark.parametrize("field,value,message", [
    ("sparsec", "0.0.1", "was made by sparsec 0.0.1, this is sparsec"),
    ("cpu", "some-other-cpu", "was compiled for CPU 'some-other-cpu', this machine is"),
    ("files", {"model.so": "0" * 64}, "model.so is missing or does not match its checksum"),
])
def test_build_from_elsewhere_is_refused(llama_teal, tmp_path, capsys, field, value, message):
    _, out, _ = llama_teal
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m[field] = value
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SparsecError, match="rebuild it here with 'sparsec compile OUT/ -o BUILD/ --force'"):
        sparsec.load_compiled(str(copy))
    np.savez(tmp_path / "in.npz", input_ids=np.zeros((1, 2), np.int64), attention_mask=np.ones((1, 2), np.int64))
    code, _, err = run_cli(capsys, "run", copy, "--inputs", tmp_path / "in.npz")
    assert code == 1 and message in one_error_line(err)


def _elf_machines(library) -> set[int]:
    """The ELF machine numbers of the objects in ``library`` (a shared object, or a tar of object files)."""
    import tarfile

    blobs = []
    if tarfile.is_tarfile(library):
        with tarfile.open(library) as tar:
            blobs = [tar.extractfile(m).read(20) for m in tar.getmembers() if m.name.endswith(".o")]
    else:
        blobs = [library.read_bytes()[:20]]
    assert blobs and all(b[:4] == b"\x7fELF" for b in blobs)
    return {int.from_bytes(b[18:20], "little") for b in blobs}


def test_aarch64_cross_compile_writes_arm_code_and_is_refused_here(llama_teal, tmp_path, capsys):
    """--target aarch64 generates 64-bit ARM code for the whole model (ELF machine 183, EM_AARCH64), linked into
    model.so with a cross compiler when one is installed, else kept as object files that TVM links on the ARM
    machine; this x86 machine refuses to load it with one line."""
    art, _, _ = llama_teal
    out = tmp_path / "arm"
    code, stdout, err = run_cli(capsys, "compile", art, "--target", "aarch64", "--threads", "4", "-o", out, "--json")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["target"] == "aarch64" and m["threads"] == 4 and m["library"] in ("model.so", "model.tar")
    assert m["kernels"] and all(k.startswith("sparsec_linear_") for k in m["kernels"])
    assert _elf_machines(out / m["library"]) == {183}
    np.savez(tmp_path / "in.npz", input_ids=np.zeros((1, 2), np.int64))
    code, _, err = run_cli(capsys, "run", out, "--inputs", tmp_path / "in.npz")
    assert code == 1 and "was compiled for aarch64 CPUs, this machine is x86_64: run it on an aarch64 machine" \
        in one_error_line(err)


def test_compile_refuses_existing_output_and_non_artifacts(llama_teal, tmp_path, capsys):
    art, out, _ = llama_teal
    code, _, err = run_cli(capsys, "compile", art, "-o", out)
    assert code == 1 and "already exists; pass --force" in one_error_line(err)
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = run_cli(capsys, "compile", plain, "-o", tmp_path / "b")
    assert code == 1 and "is not a sparsec artifact" in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["plain"]


def test_cuda_target_without_nvcc_names_it(llama_teal, tmp_path, capsys, monkeypatch):
    art, _, _ = llama_teal
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_cli(capsys, "compile", art, "--target", "cuda", "-o", tmp_path / "b")
    assert code == 1 and one_error_line(err) == (
        "error: --target cuda needs the CUDA compiler nvcc, which is not on PATH: install the CUDA toolkit (or add"
        " its bin/ directory to PATH), or use --target llvm")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cuda_build_of_teal_llama(llama_teal, tmp_path, capsys):
    """The whole model for sm_90: sparsec's GPU kernel in the linear layers, dlight for the rest, nvcc-checked."""
    import ctypes.util

    art, _, _ = llama_teal
    code, _, err = run_cli(capsys, "compile", art, "--target", "cuda", "-o", tmp_path / "b", "--json")
    assert code == 0, err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["target"] == "cuda" and m["arch"] == "sm_90" and m["source"] == str(art)
    assert {k.split("_")[2] for k in m["kernels"]} == {"threshold", "dense"}
    if ctypes.util.find_library("cuda") is None:
        np.savez(tmp_path / "in.npz", input_ids=np.zeros((1, 2), np.int64), attention_mask=np.ones((1, 2), np.int64))
        code, _, err = run_cli(capsys, "run", tmp_path / "b", "--inputs", tmp_path / "in.npz")
        assert code == 1 and "needs the NVIDIA driver (libcuda.so.1 was not found)" in one_error_line(err)


class _Kth(torch.nn.Module):
    def forward(self, x):
        return x - x.kthvalue(2, dim=-1, keepdim=True).values


class _Unsupported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down, self.tail = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), _Kth()

    def forward(self, x):
        return self.tail(self.down(self.act(self.up(x))))


def test_unsupported_op_names_op_and_module(tmp_path, capsys):
    result = sparsec.transform(_Unsupported().eval(), "relufy", example_inputs=(torch.randn(2, 3, 8),), measure=False)
    message = ("the TVM backend cannot compile op 'aten.kthvalue.default' (in tail); TVM's importer does not support"
               " it: use the ONNX backend (sparsec export OUT/ --to onnx) or remove the op")
    with pytest.raises(UsageError) as info:
        sparsec.compile(result, str(tmp_path / "b"))
    assert str(info.value) == message
    sparsec.save(result, str(tmp_path / "art"))
    code, _, err = run_cli(capsys, "compile", tmp_path / "art", "-o", tmp_path / "b")
    assert code == 2 and one_error_line(err) == f"error: {message}"
    assert sorted(os.listdir(tmp_path)) == ["art"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,spec", [("mistral", "teal{sparsity=0.5}"), ("qwen2", "teal{sparsity=0.5}"),
                                       ("gpt2", "teal{sparsity=0.5}"), ("llama", "relufy"), ("mistral", "relufy"),
                                       ("qwen2", "relufy"), ("gpt2", "relufy")])
def test_zoo_build_matches_torch(arch, spec, tmp_path):
    result = _transform(arch, spec)
    manifest = sparsec.compile(result, str(tmp_path / "b"), threads=2)
    _matches_torch(tmp_path / "b", result.program)
    kinds = {k.split("_")[2] for k in manifest["kernels"]}
    assert kinds == {"threshold" if spec.startswith("teal") else "sparse", "dense"}  # dense: lm_head
