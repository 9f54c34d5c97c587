"""The main job end to end at toy scale, and the three notebooks executed on its checkpoint."""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from dinov2.run.demo import DemoSettings, run_demo

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(
        output_dir=out,
        synthetic_per_class=12,
        iterations=3,
        max_per_class=12,
        attention_images=2,
        num_workers=0,
        overrides=[
            "train.OFFICIAL_EPOCH_LENGTH=3",
            "optim.epochs=1",
            "train.batch_size_per_gpu=8",
            "evaluation.eval_period_iterations=3",
        ],
    )
    report = run_demo(settings)
    return settings, report


def test_report_embeds_existing_pictures_and_the_three_tables(demo):
    settings, report = demo
    text = report.read_text()
    for heading in (
        "## Pretrained teacher",
        "## Same network at random initialisation",
        "## Six colour statistics",
    ):
        assert heading in text
    # Three fork-layout tables (teacher, random init, colour statistics) with three classifier rows each.
    assert len(re.findall(r"^\| 20-NN ", text, flags=re.M)) == 3
    assert len(re.findall(r"^\| Linear Probing ", text, flags=re.M)) == 3
    summary = json.loads((report.parent / "demo_summary.json").read_text())["summary"]
    gain = 100 * (summary["pretrained"]["20-NN"]["balanced_accuracy"]["mean"]
                  - summary["colorstats"]["20-NN"]["balanced_accuracy"]["mean"])  # fmt: skip
    assert "over colour statistics: 1-NN" in text and f"20-NN {gain:+.1f}" in text
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pictures) == 3 + settings.attention_images  # confusion, 2 UMAPs, attention grids
    for rel in pictures:
        assert (report.parent / rel).stat().st_size > 1000, rel
    summary = json.loads((report.parent / "demo_summary.json").read_text())
    assert summary["info"]["train"]["iterations"] == 3
    assert summary["info"]["scan"] == {"files": 96, "broken": 0, "cached": 0}


def test_second_run_reuses_data_checkpoint_and_features(demo):
    settings, report = demo
    data = settings.output_dir / "data" / "synthetic_cells"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*.jpg")}
    checkpoints = sorted((settings.output_dir / "train" / "checkpoints").glob("*.pth"))
    run_demo(settings)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.jpg")} == before
    assert sorted((settings.output_dir / "train" / "checkpoints").glob("*.pth")) == checkpoints
    summary = json.loads((report.parent / "demo_summary.json").read_text())
    assert summary["info"]["scan"]["cached"] == 96  # the scan cache answered every file
    assert summary["info"]["train"]["iterations"] == 3  # nothing was trained again


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dinov2_embedding_visualisation", ["visualisation/umap.png", "visualisation/umap_thumbnails.png"]),
        ("embedding_testing", ["embedding_testing/results.md", "embedding_testing/metrics.json"]),
        ("attention_maps", ["attention_maps"]),
    ],
)
def test_notebook_runs_on_the_demo_checkpoint(demo, tmp_path, name, expected):
    settings, _ = demo
    teacher = sorted((settings.output_dir / "train" / "eval").glob("*/teacher_checkpoint.pth"))[-1]
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "each notebook has exactly one parameters cell"
    params[0].source = "\n".join(
        [
            f"BACKBONE = {str(teacher)!r}",
            f"DATA = {str(settings.output_dir / 'data' / 'synthetic_cells')!r}",
            "DEVICE = 'cpu'",
            "MAX_PER_CLASS = 8",
            "IMAGE_SIZE = 64",
            f"OUTPUT_DIR = {str(tmp_path)!r}",
        ]
    )
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    for rel in expected:
        assert (tmp_path / rel).exists(), rel
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{name} displayed no figure"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    if name == "embedding_testing":
        table = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
        assert "Linear Probing" in table[0]["data"]["text/markdown"]
    if name == "attention_maps":
        assert len(list((tmp_path / "attention_maps").glob("*_attention.png"))) == 4  # one per class, first 4
