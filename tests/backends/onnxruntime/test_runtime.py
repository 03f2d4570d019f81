"""sparsec.load_onnx (OnnxModel) and `sparsec run` on an ONNX model follow the one calling convention
(sparsec.calling), on a model no other ONNX test exports (OPT)."""
import json

import numpy as np
import pytest
import torch

import sparsec
from sparsec.errors import SparsecError
from tests.calling_models import assert_takes_the_calling_convention, opt
from tests.cli_helpers import run_cli

pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-4, atol=1e-4)


def test_onnx_model_takes_the_calling_convention(tmp_path, capsys):
    model, ids = opt()
    result = sparsec.transform(model, "relufy", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                               measure=False)
    path = str(tmp_path / "m.onnx")
    sparsec.export_onnx(result, path)
    onnx = sparsec.load_onnx(path)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert onnx.output_names == ["logits"]
    assert_takes_the_calling_convention(onnx, want, ids, TOL)
    with pytest.raises(SparsecError) as e:
        onnx(attention_mask=torch.ones_like(ids))
    assert str(e.value).startswith("the call has no input 'input_ids'; the ONNX model takes input_ids: int64[")
    assert str(e.value).endswith("] (pass each by keyword, or all in one dict)")
    np.savez(tmp_path / "in.npz", input_ids=ids.numpy())
    code, stdout, err = run_cli(capsys, "run", path, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz",
                                "--json")
    assert code == 0, err
    assert [o["name"] for o in json.loads(stdout)["outputs"]] == ["logits"]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o.npz")["logits"]), want, **TOL)
