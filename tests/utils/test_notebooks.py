import json

from dinov2.utils.notebooks import has_outputs, main, strip_notebook


def _notebook():
    return {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# title"]},
            {
                "cell_type": "code",
                "execution_count": 3,
                "metadata": {"execution": {"iopub.status.busy": "x"}},
                "outputs": [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}],
                "source": ["print('hi')"],
            },
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_strip_removes_outputs_and_counts_but_keeps_sources():
    nb = _notebook()
    assert has_outputs(nb)
    assert strip_notebook(nb) is True
    code = nb["cells"][1]
    assert code["outputs"] == [] and code["execution_count"] is None
    assert code["source"] == ["print('hi')"] and "execution" not in code["metadata"]
    assert not has_outputs(nb)
    assert strip_notebook(nb) is False  # idempotent


def test_cli_check_then_strip(tmp_path):
    path = tmp_path / "a.ipynb"
    path.write_text(json.dumps(_notebook()))
    assert main(["--check", str(path)]) == 1
    assert main(["--strip", str(path)]) == 1  # reports that it rewrote the file
    assert main(["--check", str(path)]) == 0
    assert json.loads(path.read_text())["cells"][0]["source"] == ["# title"]
