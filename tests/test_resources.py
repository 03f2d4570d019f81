"""Memory budget: sizes, the estimate computed from the graph, and runs refused before they start."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import sparsec
from sparsec.errors import SparsecError, UsageError
from sparsec.resources import check_memory, human_size, parameter_bytes, parse_memory, peak_activation_bytes
from tests.zoo import build


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("text,size", [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("2GB", 2 * 10**9),
                                       ("1.5 GiB", 3 << 29), ("1000", 1000), ("4k", 4000), (1234, 1234)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["8 gigs", "GiB", "-1GiB", "0MiB", "", "1e9", "8GiB8"])
def test_bad_memory_sizes(text):
    with pytest.raises(UsageError) as info:
        parse_memory(text)
    assert info.value.message in (f"bad memory size {text!r}: expected a number with a unit, e.g. 8GiB, 512MiB or 2GB",
                                  f"bad memory size {text!r}: it must be more than 0 bytes")
    assert info.value.exit_code == 2


def test_peak_activations_of_an_mlp_are_exact():
    """x[B,16] -> up[B,32] -> gelu[B,32] -> down[B,16]: the peak is while gelu runs, up and gelu both alive
    (x is freed after up): 64 floats per row."""
    program = torch.export.export(MLP(), (torch.randn(4, 16),), dynamic_shapes={"x": {0: Dim.AUTO}})
    assert peak_activation_bytes(program) == 64 * 4 * 4
    assert peak_activation_bytes(program, batch=1000) == 64 * 1000 * 4
    assert parameter_bytes(program) == (16 * 32 + 32 + 32 * 16 + 16) * 4


@pytest.fixture(scope="module")
def llama():
    """The zoo's Llama, its example inputs and its captured program."""
    model, inputs = build("llama")
    return model, inputs, sparsec.transform(model, "relufy", example_inputs=inputs, measure=False).program


def test_attention_grows_with_the_square_of_the_sequence(llama):
    model, _, program = llama
    short, long = peak_activation_bytes(program, 4, 256), peak_activation_bytes(program, 4, 1024)
    # 4 heads: the attention weights alone are 4*4*L*L floats; at L=1024 that is 64 MiB
    assert long >= 4 * 4 * 1024 * 1024 * 4 > 4 * short
    assert parameter_bytes(program) == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])


@pytest.fixture(scope="module")
def llama_tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "tokens.pt"
    torch.save(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)), path)
    return str(path)


def test_budget_follows_seq_len_and_batch_size(llama, llama_tokens):
    """A budget between the estimates of a 1 x 16 and a 4 x 64 calibration batch: the small run passes, the large one
    is refused before calibration starts, naming the estimate, the batch and how to fix it."""
    _, _, program = llama
    small = check_memory(program, budget=1 << 40, batch=1, seq=16, token_bytes=4 * 16 * 8)["total"]
    large = check_memory(program, budget=1 << 40, batch=4, seq=64, token_bytes=8 * 64 * 8)["total"]
    assert small < large
    budget = (small + large) // 2
    run = dict(calib_data=llama_tokens, max_memory=budget, measure=False)
    ok = sparsec.transform(program, "teal{sparsity=0.3 calib_rounds=1}", calib_samples=4, seq_len=16, batch_size=1,
                           **run)
    assert ok.report["passes"][0]["name"] == "teal"
    with pytest.raises(SparsecError) as info:
        sparsec.transform(program, "teal{sparsity=0.3 calib_rounds=1}", calib_samples=8, seq_len=64, batch_size=4,
                          **run)
    msg = info.value.message
    assert info.value.exit_code == 1 and "\n" not in msg
    assert msg.startswith(f"not enough memory: the transform needs about {human_size(large)} (parameters ")
    assert "for a calibration batch of 4 x 64 tokens + calibration tokens" in msg
    assert f"but the budget is {human_size(budget)} (--max-memory); lower --batch-size, --seq-len or --calib-samples" in msg


def test_model_larger_than_the_budget_is_refused(llama):
    _, _, program = llama
    with pytest.raises(SparsecError, match=r"^not enough memory: the transform needs about 4\d\d\.\d\d KiB \(parameters"
                                           r" 417\.31 KiB \+ peak activations \d+\.\d\d KiB\) but the budget is"
                                           r" 100\.00 KiB \(--max-memory\); use a smaller model, or raise"
                                           r" --max-memory if more memory can be used$"):
        sparsec.transform(program, "relufy", max_memory="100KiB")
    assert sparsec.transform(program, "relufy", max_memory="8GiB", measure=False).report["passes"]
