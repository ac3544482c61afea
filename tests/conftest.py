"""Settings every test shares."""

import pytest


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich sizes tables to the terminal and wraps headers that do not fit; the tests read
    # table text, whose widths vary with the numbers (CUDA statistics print other digits
    # than the CPU's), so give every console the same ample width.
    monkeypatch.setenv("COLUMNS", "200")
