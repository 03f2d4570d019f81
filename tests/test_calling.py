"""One calling convention (sparsec.calling) for the torch modules sparsec hands out: keyword or dict inputs, torch or
numpy, a defaulted attention_mask, outputs named as the model names them, and .train() / .eval()."""
import re

import numpy as np
import pytest
import torch

import sparsec
from sparsec.errors import SparsecError
from tests.calling_models import opt, roberta


@pytest.fixture(scope="module")
def opt_artifact(tmp_path_factory):
    model, ids = opt()
    result = sparsec.transform(model, "relufy", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out = str(tmp_path_factory.mktemp("opt") / "a")
    sparsec.save(result, out)
    return model, ids, result, out


@pytest.fixture(scope="module")
def roberta_result():
    model, inputs = roberta()
    return model, inputs, sparsec.transform(model, "relufy", example_inputs=inputs)


def test_loaded_artifact_defaults_the_attention_mask(opt_artifact):
    model, ids, result, out = opt_artifact
    with torch.no_grad():
        want = model(input_ids=ids).logits  # Hugging Face defaults the mask to ones
    for module in (sparsec.load(out), result.module()):
        torch.testing.assert_close(module(input_ids=ids)["logits"], want)
        torch.testing.assert_close(module({"input_ids": ids})["logits"], want)


def test_outputs_are_named_as_the_model_names_them(opt_artifact, roberta_result):
    model, ids, result, out = opt_artifact
    assert sparsec.load_artifact(out, load_program=False).manifest["output_names"] == ["logits"]
    got = sparsec.load(out)(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert list(got) == ["logits"] and got[0] is got["logits"] and got.logits is got["logits"]
    model, inputs, result = roberta_result
    got = result.module()(**inputs)
    assert list(got) == ["last_hidden_state", "pooler_output"]
    with torch.no_grad():
        want = model(**inputs)
    torch.testing.assert_close(got["pooler_output"], want.pooler_output)
    torch.testing.assert_close(got[0], want.last_hidden_state)


def test_numpy_inputs_give_numpy_outputs(opt_artifact):
    model, ids, result, out = opt_artifact
    got = sparsec.load(out)({"input_ids": ids.numpy()})["logits"]
    assert isinstance(got, np.ndarray)
    with torch.no_grad():
        np.testing.assert_array_equal(got, sparsec.load(out)(input_ids=ids)["logits"].numpy())


def test_a_missing_input_is_named_with_the_inputs_the_model_takes(roberta_result):
    model, inputs, result = roberta_result
    module = result.module()
    with pytest.raises(SparsecError) as e:
        module(input_ids=inputs["input_ids"])
    assert re.fullmatch(r"the call has no input 'token_type_ids'; the model takes input_ids: int64\[\w+, \w+\],"
                        r" attention_mask: int64\[\w+, \w+\], token_type_ids: int64\[\w+, \w+\] \(pass each by"
                        r" keyword, or all in one dict\)", str(e.value))
    with pytest.raises(SparsecError, match="^the call has an input 'position_ids' that the model does not take;"):
        module(**inputs, position_ids=inputs["input_ids"])
    with pytest.raises(SparsecError, match="^pass the inputs by keyword or in one dict, not both"):
        module({"input_ids": inputs["input_ids"]}, attention_mask=inputs["attention_mask"])


def test_modules_handed_out_accept_train_and_eval(opt_artifact):
    model, ids, result, out = opt_artifact
    for module in (result.module(), sparsec.load(out), sparsec.load_artifact(out).module()):
        assert module.train() is module and module.training
        assert module.eval() is module and not module.training


def test_cli_run_of_an_artifact_defaults_the_mask_and_names_the_outputs(opt_artifact, tmp_path, capsys):
    import json

    from tests.cli_helpers import run_cli

    model, ids, result, out = opt_artifact
    np.savez(tmp_path / "in.npz", input_ids=ids.numpy())
    code, stdout, err = run_cli(capsys, "run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz",
                                "--json")
    assert code == 0, err
    assert [o["name"] for o in json.loads(stdout)["outputs"]] == ["logits"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o.npz")["logits"]), want)


def test_a_loaded_module_captured_again_keeps_its_output_names(opt_artifact):
    model, ids, result, out = opt_artifact
    again = sparsec.transform(sparsec.load(out), "relufy", measure=False,
                              example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert again.output_names == ["logits"]
    torch.testing.assert_close(again.module()(input_ids=ids)["logits"], result.module()(input_ids=ids)["logits"])
