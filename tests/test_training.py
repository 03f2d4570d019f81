"""sparsec.training: the HF Trainer callback on a transformed zoo model, DDP with 2 real torchrun processes (both
slow: make test-all), and holder classes restored after export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsec
from sparsec.training import after_step, regularization_loss
from tests.zoo import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_hf_trainer_callback_runs_after_step_and_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    from sparsec.training import SparsecTrainerCallback

    model, inputs = build("llama", hidden_act="relu")
    gm = sparsec.transform(model, "jsrelu{mixing_steps=3},regularize{weight=0.01}", example_inputs=inputs,
                           measure=False).module()
    before = gm.get_parameter("model.layers.0.mlp.down_proj.weight").detach().clone()
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
    penalties = []

    class SparseTrainer(Trainer):
        def compute_loss(self, model, batch, return_outputs=False, num_items_in_batch=None):
            logits = model(**batch)[0]
            task = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), batch["input_ids"][:, 1:].reshape(-1))
            penalty = regularization_loss(model, step=self.state.global_step)
            penalties.append(float(penalty))
            return task + penalty

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                             learning_rate=1e-2, disable_tqdm=True)
    SparseTrainer(model=gm, args=args, train_dataset=data, callbacks=[SparsecTrainerCallback()]).train()
    assert float(gm.sparsec_jsrelu.mix) == 1.0  # after_step ran for steps 0, 1, 2: k = 3 / 3
    assert len(penalties) == 3 and all(p > 0 for p in penalties)
    assert not torch.equal(gm.get_parameter("model.layers.0.mlp.down_proj.weight"), before)


WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, os.environ["SPARSEC_ROOT"])
import sparsec
from sparsec.training import after_step, regularization_loss
from tests.test_training import Block, SPEC, batch

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x, y = batch()
gm = sparsec.transform(Block(), SPEC, example_inputs=(x[:4],), measure=False).module()
model = nn.parallel.DistributedDataParallel(gm)
shard = slice(rank * 4, rank * 4 + 4)
task = (model(x[shard]) - y[shard]).pow(2).mean()
penalty = regularization_loss(model.module, step=0)
(task + penalty).backward()
values = torch.stack([task.detach(), penalty.detach()])
dist.all_reduce(values)
after_step(model, 0)
if rank == 0:
    out = {"task": values[0].item() / world, "penalty": values[1].item() / world,
           "grads": {k: p.grad.tolist() for k, p in gm.named_parameters()}}
    json.dump(out, open(os.environ["SPARSEC_OUT"], "w"))
dist.destroy_process_group()
'''

SPEC = "db-mlp,regularize{kind=tl1 a=0.5 weight=0.1 normalize=true}"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, 8, generator=g), torch.randn(8, 6, 8, generator=g)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out.json"
    script.write_text(WORKER)
    env = {**os.environ, "SPARSEC_ROOT": str(ROOT), "SPARSEC_OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())

    torch.manual_seed(0)
    x, y = batch()
    gm = sparsec.transform(Block(), SPEC, example_inputs=(x[:4],), measure=False).module()
    task = (gm(x) - y).pow(2).mean()
    penalty = regularization_loss(gm, step=0)
    (task + penalty).backward()
    assert abs(ddp["task"] - task.item()) < 1e-6 and abs(ddp["penalty"] - penalty.item()) < 1e-6
    grads = dict(gm.named_parameters())
    assert set(ddp["grads"]) == set(grads)
    for name, g in ddp["grads"].items():
        torch.testing.assert_close(torch.tensor(g), grads[name].grad, rtol=1e-5, atol=1e-6)


def test_after_step_finds_holders_in_a_wrapper():
    """A DDP-like wrapper (.module) and a reloaded program: hooks still run (classes restored after export)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    gm = sparsec.transform(Block(), "jsrelu{mixing_steps=2}", example_inputs=(x,), measure=False).module()
    exported = torch.export.export(gm, (x,)).module()  # a plain nn.Module at sparsec_jsrelu
    assert type(exported.sparsec_jsrelu) is nn.Module
    wrapper = nn.Module()
    wrapper.module = exported
    after_step(wrapper, 0)
    assert type(exported.sparsec_jsrelu).__name__ == "JSReLUMixing" and float(exported.sparsec_jsrelu.mix) == 0.5
