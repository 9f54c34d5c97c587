"""torch.hub entry points, used offline through `source="local"`."""

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.hub import backbones
from dinov2.models.weights import export_backbone

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")]


def test_hubconf_lists_all_backbones_and_torch_dependency():
    # torch.hub.list only takes GitHub repos; import hubconf the way torch.hub.load(source="local") does.
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert sorted(entry_points) == sorted(NAMES)
    assert hubconf.dependencies == ["torch"]


@pytest.fixture(scope="module")
def vits14_reg_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = backbones.dinov2_vits14_reg(pretrained=False)
    with torch.no_grad():
        model.cls_token.normal_()  # distinguishable from any fresh init
    return export_backbone(model, tmp_path_factory.mktemp("hub") / "dinov2_vits14_reg4_pretrain.pth"), model


def test_torch_hub_load_local_with_weights(vits14_reg_weights):
    path, src = vits14_reg_weights
    model = torch.hub.load(str(REPO_ROOT), "dinov2_vits14_reg", source="local", pretrained_weights=str(path))
    assert not model.training and model.num_register_tokens == 4
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src.eval()(x))


def test_hub_load_in_fresh_process_without_network(vits14_reg_weights, tmp_path):
    """A clean interpreter with proxies pointing nowhere still loads: nothing is downloaded."""
    path, _ = vits14_reg_weights
    code = (
        "import torch; "
        f"m = torch.hub.load({str(REPO_ROOT)!r}, 'dinov2_vits14_reg', source='local', "
        f"pretrained_weights={str(path)!r}); print(m.embed_dim, m.num_register_tokens)"
    )
    env = {"OMP_NUM_THREADS": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["384", "4"]


def test_hub_without_weights_warns_and_pretrained_true_needs_path(caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"), torch.device("meta"):
        model = backbones.dinov2_vitb14()
    assert "randomly initialised" in caplog.text and model.embed_dim == 768
    with pytest.raises(ValueError, match="pretrained=True needs pretrained_weights=PATH"):
        backbones.dinov2_vitl14_reg(pretrained=True)
