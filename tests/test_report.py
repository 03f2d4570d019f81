"""Reports: model-level sparsity definitions, the generic per-layer table, `sparsec inspect` text / --json / --plot."""
import json

import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.report import layer_table, model_sparsity
from tests.test_eval import run_cli
from tests.zoo import build


def _ids(seed, n=16):
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, inputs = build("llama")
    result = sparsec.transform(model, "teal{sparsity=0.4}", example_inputs=inputs, measure=False,
                               forward_loop=token_forward_loop(_ids(1), batch_size=8),
                               heldout_loop=token_forward_loop(_ids(2), batch_size=8))
    out = tmp_path_factory.mktemp("report") / "out"
    sparsec.save(result, str(out))
    return str(out), result.report


def test_model_sparsity_definitions():
    measured = {"q": {"input_sparsity": 0.5, "mlp_intermediate": False, "weight_bytes": 400},
                "down": {"input_sparsity": 0.8, "mlp_intermediate": True, "weight_bytes": 1600},
                "lm_head": {"input_sparsity": 0.0, "mlp_intermediate": False, "weight_bytes": 2000}}
    s = model_sparsity(measured, {"q": 100, "down": 400})
    assert s == {"teal_param_weighted": round((0.5 * 100 + 0.8 * 400) / 500, 6),
                 "linear_input_element_weighted": round(1.3 / 3, 6), "mlp_intermediate": 0.8,
                 "weight_bytes_skipped": round((0.5 * 400 + 0.8 * 1600) / 4000, 6)}


def test_layer_table_columns_come_from_every_entry():
    """Entries of different passes (teal thresholds, prune's weight sparsity) each show their own columns."""
    lines = layer_table([{"pass": "teal", "module": "a.q", "op": "teal", "threshold": 0.123456, "target_sparsity": 0.5,
                          "measured_sparsity": None},
                         {"pass": "prune", "module": "a.longer_name", "op": "prune", "weight_sparsity": 0.5,
                          "pattern": "2:4", "flops_removed": 1024, "bytes_removed": 2048, "rows": [1, 2]}])
    assert lines[0].split() == ["module", "pass", "op", "threshold", "target_sparsity", "measured_sparsity",
                                "weight_sparsity", "pattern", "flops_removed", "bytes_removed"]
    assert lines[1].split() == ["a.q", "teal", "teal", "0.1235", "0.5", "-", "-", "-", "-", "-", "-"][:len(
        lines[1].split())]
    assert lines[2].split() == ["a.longer_name", "prune", "prune", "-", "-", "-", "0.5", "2:4", "1024", "2048"]
    assert layer_table([]) == []


def test_inspect_text_json_and_plot(artifact, tmp_path, capsys):
    out, report = artifact
    sp = report["sparsity"]
    assert set(sp) == {"heldout_data", "teal_param_weighted", "linear_input_element_weighted", "mlp_intermediate",
                       "weight_bytes_skipped"}
    assert abs(sp["teal_param_weighted"] - 0.4) <= 0.02
    assert 0 < sp["weight_bytes_skipped"] < sp["teal_param_weighted"]  # the LM head and embeddings stay dense
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("module"))
    assert header.split() == ["module", "pass", "op", "threshold", "target_sparsity", "measured_sparsity",
                              "weight_numel", "heldout_sparsity"]
    assert sum(line.startswith("model.layers.") for line in lines) == 14
    assert f"  TEAL (parameter-weighted, thresholded linear inputs): {sp['teal_param_weighted']:.1%}" in lines
    assert f"  weight bytes a sparse kernel skips: {sp['weight_bytes_skipped']:.1%}" in lines
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert code == 0 and len(data["layers"]) == 14
    for e in data["layers"]:
        assert {"module", "threshold", "target_sparsity", "measured_sparsity", "heldout_sparsity"} <= set(e)
        assert abs(e["measured_sparsity"] - 0.4) <= 0.02 and abs(e["heldout_sparsity"] - 0.4) <= 0.05
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    code, stdout, err = run_cli(capsys, "inspect", out, "--plot", png)
    assert code == 0 and f"wrote {png}" in stdout, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for args, want in [(["--plot", png], (1, f"error: --plot file '{png}' already exists; pass --force to replace"
                                                " it")),
                       (["--plot", tmp_path / "x.jpg"], (2, f"error: --plot '{tmp_path / 'x.jpg'}' must end in"
                                                             " .png"))]:
        code, _, err = run_cli(capsys, "inspect", out, *args)
        assert (code, err.strip()) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png"]  # nothing partially written
