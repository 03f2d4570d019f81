"""Artifacts: save → load reproduces outputs exactly; manifests and checksums are verified; writes are atomic."""
import json
import os

import pytest
import torch

import sparsec
from sparsec.artifact import FORMAT_VERSION, read_artifact
from sparsec.errors import SparsecError
from tests.zoo import build


@pytest.fixture(scope="module")
def llama_result():
    model, inputs = build("llama")
    return sparsec.transform(model, "relufy{to=fatrelu threshold=0.02}", example_inputs=inputs)


def test_save_load_reproduces_outputs_exactly(llama_result, tmp_path):
    out = str(tmp_path / "art")
    sparsec.save(llama_result, out)
    assert sorted(os.listdir(out)) == ["manifest.json", "model.pt2", "recipe.yaml", "report.json"]
    loaded = sparsec.load(out)
    for shape in [(2, 12), (1, 1), (3, 30)]:
        ids = torch.randint(0, 256, shape)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        assert torch.equal(loaded(**kw)[0], llama_result.module()(**kw)[0])
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["pipeline"] == ("relufy{to=fatrelu threshold=0.02 shift=0.0 scope=mlp targets={} ignore={}}")
    assert manifest["versions"]["torch"] == torch.__version__
    names = [i["name"] for i in manifest["inputs"]]
    assert names == ["input_ids", "attention_mask"]
    ids_shape = manifest["inputs"][0]["shape"]
    assert all(isinstance(d, dict) for d in ids_shape)  # batch and sequence are both dynamic
    assert len(manifest["fingerprint"]) == 64


def test_recipe_replays_to_the_same_pipeline(llama_result, tmp_path):
    from sparsec.pipeline import load_recipe

    out = str(tmp_path / "art")
    sparsec.save(llama_result, out)
    assert load_recipe(os.path.join(out, "recipe.yaml")).canonical() == llama_result.pipeline.canonical()


def test_module_paths_survive_save_and_load(llama_result, tmp_path):
    from sparsec.graph import module_path

    out = str(tmp_path / "art")
    sparsec.save(llama_result, out)
    program = read_artifact(out).program
    relus = [module_path(n) for n in program.graph.nodes if n.target == torch.ops.aten.where.ScalarOther]
    assert relus == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]


def test_tampered_file_is_refused(llama_result, tmp_path):
    out = tmp_path / "art"
    sparsec.save(llama_result, str(out))
    report = out / "report.json"
    report.write_text(report.read_text().replace('"relufy"', '"relufx"', 1))
    with pytest.raises(SparsecError, match="report.json does not match its checksum"):
        sparsec.load(str(out))


def test_newer_format_version_is_refused(llama_result, tmp_path):
    out = tmp_path / "art"
    sparsec.save(llama_result, str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SparsecError, match=f"artifact format version {FORMAT_VERSION + 1}; this sparsec reads"):
        sparsec.load(str(out))


def test_existing_output_needs_force_and_force_replaces(llama_result, tmp_path):
    out = str(tmp_path / "art")
    sparsec.save(llama_result, out)
    with pytest.raises(SparsecError, match="already exists; pass --force"):
        sparsec.save(llama_result, out)
    (tmp_path / "art" / "stale.txt").write_text("old")
    sparsec.save(llama_result, out, force=True)
    assert not (tmp_path / "art" / "stale.txt").exists()
    assert [p for p in os.listdir(tmp_path) if p != "art"] == []  # no temporaries left behind


def test_force_does_not_replace_a_non_artifact(llama_result, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SparsecError, match="exists and is not a sparsec artifact"):
        sparsec.save(llama_result, str(tmp_path / "mine"), force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_stale_temporaries_of_killed_runs_are_removed(llama_result, tmp_path):
    dead = tmp_path / ".art.sparsec-tmp-abc-999999999"  # no such pid
    dead.mkdir()
    (dead / "model.pt2").write_bytes(b"partial")
    sparsec.save(llama_result, str(tmp_path / "art"))
    assert not dead.exists()


def test_an_artifact_is_a_model_for_further_passes(llama_result, tmp_path):
    out = str(tmp_path / "art")
    sparsec.save(llama_result, out)
    again = sparsec.transform(out, "relufy{to=relu2 scope=all}")
    assert again.source["kind"] == "artifact"
    assert again.report["passes"][0]["stats"]["replaced"] == 2
