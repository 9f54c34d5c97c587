"""Loading Meta's and our checkpoints, exporting, and architecture inference."""

import logging
import pathlib

import pytest
import torch

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import (
    _split_spec,
    export_backbone,
    infer_backbone_config,
    load_backbone,
    load_pretrained_weights,
    read_checkpoint,
)

# Meta's released dinov2_vits14_reg4_pretrain.pth, written out by hand: top-level tensors and the
# tensors of one block (every block i = 0..11 has the same set under "blocks.{i}.").
D, HIDDEN = 384, 1536
META_TOP = {
    "cls_token": (1, 1, D),
    "pos_embed": (1, 1370, D),  # 1 + (518 / 14)^2
    "register_tokens": (1, 4, D),
    "mask_token": (1, D),
    "patch_embed.proj.weight": (D, 3, 14, 14),
    "patch_embed.proj.bias": (D,),
    "norm.weight": (D,),
    "norm.bias": (D,),
}
META_BLOCK = {
    "norm1.weight": (D,),
    "norm1.bias": (D,),
    "attn.qkv.weight": (3 * D, D),
    "attn.qkv.bias": (3 * D,),
    "attn.proj.weight": (D, D),
    "attn.proj.bias": (D,),
    "ls1.gamma": (D,),
    "norm2.weight": (D,),
    "norm2.bias": (D,),
    "mlp.fc1.weight": (HIDDEN, D),
    "mlp.fc1.bias": (HIDDEN,),
    "mlp.fc2.weight": (D, HIDDEN),
    "mlp.fc2.bias": (D,),
    "ls2.gamma": (D,),
}


def meta_vits14_reg_state_dict():
    shapes = dict(META_TOP)
    for i in range(12):
        shapes.update({f"blocks.{i}.{k}": v for k, v in META_BLOCK.items()})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=g) * 0.02 for k, v in shapes.items()}


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "dinov2_vits14_reg4_pretrain.pth"
    sd = meta_vits14_reg_state_dict()
    torch.save(sd, path)
    return path, sd


def small(**kw):
    torch.manual_seed(0)
    args = dict(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1e-5,
                num_register_tokens=4, block_chunks=0, interpolate_offset=0.1)  # fmt: skip
    args.update(kw)
    m = DinoVisionTransformer(**args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def same_outputs(a, b, x=None):
    x = torch.randn(2, 3, 56, 70) if x is None else x
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(x)["x_prenorm"], b.forward_features(x)["x_prenorm"])


# ------------------------------------------------------------------ Meta's format
def test_meta_file_loads_strictly_into_hub_architecture(meta_file):
    path, sd = meta_file
    model = load_backbone("dinov2_vits14_reg", pretrained_weights=path)
    own = model.state_dict()
    assert set(own) == set(sd)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    for k in ("pos_embed", "blocks.11.mlp.fc2.weight", "register_tokens"):
        assert torch.equal(own[k], sd[k])
    assert not model.training
    assert model.interpolate_antialias and model.interpolate_offset == 0.0


def test_meta_file_architecture_is_inferred(meta_file):
    path, sd = meta_file
    cfg = infer_backbone_config(sd)
    assert cfg == {
        "img_size": 518, "patch_size": 14, "in_chans": 3, "embed_dim": 384, "depth": 12, "num_heads": 6,
        "mlp_ratio": 4.0, "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "init_values": 1e-5,
        "ffn_layer": "mlp", "block_chunks": 0, "num_register_tokens": 4,
    }  # fmt: skip
    model = load_backbone(path)
    assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
    assert model.embed_dim == 384 and model.n_blocks == 12 and model.num_heads == 6
    assert model.num_register_tokens == 4 and model.patch_embed.img_size == (518, 518)


def test_spec_with_weights_suffix():
    assert _split_spec("dinov2_vits14_reg:/w/x.pth") == ("dinov2_vits14_reg", "/w/x.pth")
    assert _split_spec("/runs/a:b/teacher.pth") == ("/runs/a:b/teacher.pth", None)


def test_swiglu_giant_keys_and_inference():
    with torch.device("meta"):
        from dinov2.models.vision_transformer import make_released_backbone

        g = make_released_backbone("dinov2_vitg14")
    keys = g.state_dict()
    assert tuple(keys["blocks.39.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(keys["blocks.39.mlp.w3.weight"].shape) == (1536, 4096)
    assert not any(".fc1." in k for k in keys)
    cfg = infer_backbone_config(keys)
    assert (cfg["ffn_layer"], cfg["mlp_ratio"], cfg["depth"], cfg["num_heads"]) == (
        "swiglufused",
        4.0,
        40,
        24,
    )


# ------------------------------------------------------------------ strictness and errors
def test_strict_load_names_missing_and_unexpected_keys(meta_file):
    _, sd = meta_file
    broken = dict(sd)
    del broken["blocks.7.ls2.gamma"]
    broken["blocks.7.mlp.fc3.weight"] = torch.zeros(1)
    model = load_backbone("dinov2_vits14_reg")
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(model, broken)
    msg = str(err.value)
    assert "missing keys [blocks.7.ls2.gamma]" in msg and "unexpected keys [blocks.7.mlp.fc3.weight]" in msg
    result = load_pretrained_weights(model, broken, strict=False)
    assert result.missing_keys == ["blocks.7.ls2.gamma"] and result.unexpected_keys == [
        "blocks.7.mlp.fc3.weight"
    ]


def test_shape_mismatch_is_named():
    m = small()
    sd = m.state_dict()
    sd["blocks.1.attn.proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(
        ValueError, match=r"blocks.1.attn.proj.weight: checkpoint \(32, 31\) vs model \(32, 32\)"
    ):
        load_pretrained_weights(small(), sd)


def test_missing_file_and_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_backbone(tmp_path / "nothere.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_pretrained_weights(small(), tmp_path / "nothere.pth")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="notes.pth is not a PyTorch checkpoint"):
        load_backbone(text)
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="x.safetensors is not a valid safetensors file"):
        read_checkpoint(bad_st)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "iteration": 3}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        load_backbone(tmp_path / "opt.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 backbone state dict: no 'cls_token'"):
        load_backbone(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unknown backbone name 'dinov2_vitx14'"):
        load_backbone("dinov2_vitx14")


class _Payload:
    """Unpickling this would create a marker file: loading must refuse before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing to load it"):
        load_backbone(path)
    assert not marker.exists()


# ------------------------------------------------------------------ our checkpoints
def test_training_checkpoint_teacher_is_loaded(tmp_path):
    student, teacher = small(), small()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    head = {"dino_head.mlp.0.weight": torch.zeros(4, 32), "dino_head.last_layer.weight_g": torch.ones(8, 1)}
    ckpt = {
        "model": {
            "student": {f"backbone.{k}": v for k, v in student.state_dict().items()} | head,
            "teacher": {f"module.backbone.{k}": v for k, v in teacher.state_dict().items()} | head,
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "iteration": 10,
        "config": {"student": {"interpolate_antialias": False, "interpolate_offset": 0.1}},
    }
    path = tmp_path / "model_0000010.pth"
    torch.save(ckpt, path)
    loaded = load_backbone(path, num_heads=2)  # auto-detects the EMA teacher
    same_outputs(loaded, teacher)
    assert loaded.interpolate_offset == 0.1 and not loaded.interpolate_antialias  # from the stored config
    target = small()
    load_pretrained_weights(target, path, checkpoint_key="student")
    same_outputs(target, student)
    with pytest.raises(ValueError, match="no entry 'ema'"):
        load_pretrained_weights(target, path, checkpoint_key="ema")


def test_ssl_meta_arch_state_dict_checkpoint(tmp_path):
    """Our training checkpoints: "model" is the flat SSLMetaArch state dict ("student.*",
    "teacher.*", loss centers); the teacher is the default, the student on request."""
    student, teacher = small(), small()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(-1.0)
    model = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    model |= {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    model |= {
        "teacher.dino_head.last_layer.weight_g": torch.ones(8, 1),
        "dino_loss.center": torch.zeros(1, 8),
    }
    path = tmp_path / "model_0000100.pth"
    torch.save({"model": model, "optimizer": {"state": {}}, "iteration": 100}, path)
    same_outputs(
        load_backbone(path, num_heads=2, interpolate_offset=0.1, interpolate_antialias=False), teacher
    )
    for key, ref in (("teacher", teacher), ("student", student)):
        target = small()
        load_pretrained_weights(target, path, checkpoint_key=key)
        same_outputs(target, ref)
    with pytest.raises(ValueError, match="no entry 'ema'"):
        load_pretrained_weights(small(), path, checkpoint_key="ema")


def test_teacher_export_dict_and_compiled_prefix(tmp_path):
    teacher = small()
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone._orig_mod.{k}": v for k, v in teacher.state_dict().items()}}, path)
    target = small()
    load_pretrained_weights(target, path, checkpoint_key="teacher")
    same_outputs(target, teacher)


def test_chunked_checkpoint_into_flat_model_and_back():
    chunked = small(block_chunks=3)
    assert "blocks.2.2.norm1.weight" in chunked.state_dict()
    flat = small(block_chunks=0)
    with torch.no_grad():
        for p in flat.parameters():
            p.normal_()
    load_pretrained_weights(chunked, flat.state_dict())
    same_outputs(chunked, flat)
    fresh = small(block_chunks=0)
    load_pretrained_weights(fresh, chunked.state_dict())
    same_outputs(fresh, flat)


def test_pos_embed_resampled_for_other_training_size():
    src = small(img_size=70)  # 5x5 grid
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.25  # a constant grid stays constant under normalised bicubic weights
    dst = small(img_size=42)  # 3x3 grid
    load_pretrained_weights(dst, src.state_dict())
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    torch.testing.assert_close(dst.pos_embed[:, 1:], torch.full((1, 9, 32), 0.25))
    with pytest.raises(ValueError, match="pos_embed: checkpoint"):
        load_pretrained_weights(small(img_size=42), src.state_dict(), resample_pos_embed=False)


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_round_trip(tmp_path, suffix):
    model = small(block_chunks=3, interpolate_offset=0.1, interpolate_antialias=False)
    path = export_backbone(model, tmp_path / "sub" / f"backbone{suffix}")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    content, metadata = read_checkpoint(path)
    assert set(content) == {k for k in small(block_chunks=0).state_dict()}  # Meta's flat key names
    loaded = load_backbone(path, num_heads=2, interpolate_offset=0.1, interpolate_antialias=False)
    same_outputs(loaded, model)
    if suffix == ".safetensors":
        assert '"interpolate_offset": 0.1' in metadata["dinov2_config"]
        plain = load_backbone(path)  # settings come from the file's metadata
        assert plain.interpolate_offset == 0.1 and not plain.interpolate_antialias
        same_outputs(plain, model)


def test_heads_cannot_be_guessed_for_non_standard_widths(tmp_path):
    path = export_backbone(small(), tmp_path / "b.pth")  # embed_dim 32: not 64 per head
    with pytest.raises(ValueError, match="embed_dim 32 is not a multiple of head_dim 64; pass num_heads"):
        load_backbone(path)


def test_export_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported backbone file type '.bin'"):
        export_backbone(small(), tmp_path / "b.bin")


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        with torch.device("meta"):
            load_backbone("dinov2_vits14", device="meta")
    assert "randomly initialised" in caplog.text
