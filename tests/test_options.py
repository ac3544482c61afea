"""options.py: the method names the CLI shows match the registries, and the model-free checks."""

import numpy as np
import pytest

from ecprune_onnx.errors import UsageError
from ecprune_onnx.masks import choose_masks
from ecprune_onnx.options import (
    DEFAULT_METHOD,
    RECONSTRUCTION_METHODS,
    SCOPES,
    SCORE_METHODS,
    check_data_file,
    check_method,
    check_model_file,
    check_ratio,
)
from ecprune_onnx.scores import METHODS
from ecprune_onnx.sequential import RECONSTRUCTORS


def test_method_names_are_those_of_the_registries():
    assert tuple(METHODS) == SCORE_METHODS
    assert tuple(RECONSTRUCTORS) == RECONSTRUCTION_METHODS
    assert DEFAULT_METHOD in RECONSTRUCTORS


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(UsageError, match="--ratio"):
        check_ratio(ratio)


def test_unknown_method_is_refused_naming_the_flag():
    with pytest.raises(UsageError, match="--weight-method ecx: expected one of ec, "):
        check_method("ecx", "--weight-method")


def test_missing_and_folder_paths_are_refused(tmp_path):
    with pytest.raises(UsageError, match="model file not found"):
        check_model_file(tmp_path / "absent.onnx")
    with pytest.raises(UsageError, match="not a file"):
        check_model_file(tmp_path)
    with pytest.raises(UsageError, match="--calib .*absent.npz: file not found"):
        check_data_file(tmp_path / "absent.npz", "--calib")


def test_every_scope_is_one_choose_masks_takes():
    for scope in SCOPES:
        keep = choose_masks({"a": np.array([[1.0, 2.0], [4.0, 3.0]])}, 0.5, scope)["a"]
        assert keep.sum() == 2
