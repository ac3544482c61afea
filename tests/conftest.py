"""Settings every test shares."""

import onnx
import pytest


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich sizes tables to the terminal and wraps headers that do not fit; the tests read
    # table text, whose widths vary with the numbers (CUDA statistics print other digits
    # than the CPU's), so give every console the same ample width.
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def checker_refuses_protos(monkeypatch):
    """onnx.checker as it behaves past protobuf's 2 GB, where only files can be checked; the
    real checker is returned for the test's own checks."""
    check_file = onnx.checker.check_model

    def check_files_only(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto):
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
        return check_file(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check_files_only)
    return check_file


@pytest.fixture
def sampled_threshold(monkeypatch):
    """Call it to send masks' global threshold through its sampled bracket even for few
    scores, and to fail the test should it fall back to copying all scores."""
    from ecprune_onnx import masks

    def copying(scores, count):
        raise AssertionError("fell back to a copy of all scores")

    def force() -> None:
        monkeypatch.setattr(masks, "SAMPLE_SIZE", 256)
        monkeypatch.setattr(masks, "_lowest_by_copy", copying)

    return force
