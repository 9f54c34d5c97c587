"""SSLMetaArch: one full step's losses and gradients against an independent re-derivation."""

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_gloo
from omegaconf import OmegaConf

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.distributed_wrap import GradientSync
from dinov2.train.ssl_meta_arch import SSLMetaArch

DEFAULT_CFG = Path(__file__).resolve().parents[2] / "dinov2" / "configs" / "ssl_default_config.yaml"
B, N_LOCAL, GLOBAL, LOCAL, PATCH = 3, 2, 28, 14, 7
GRID = GLOBAL // PATCH  # 4 x 4 = 16 patches per global crop


def _cfg(centering="centering", separate_head=False, **extra):
    cfg = OmegaConf.load(DEFAULT_CFG)
    head = {"head_n_prototypes": 16, "head_bottleneck_dim": 8, "head_nlayers": 2, "head_hidden_dim": 24}
    overrides = {
        "train": {"centering": centering, "batch_size_per_gpu": B},
        "dino": {**head, "loss_weight": 1.0, "koleo_loss_weight": 0.3},
        "ibot": {**head, "head_n_prototypes": 12, "loss_weight": 0.7, "separate_head": separate_head},
        "crops": {"global_crops_size": GLOBAL, "local_crops_size": LOCAL, "local_crops_number": N_LOCAL},
        "student": {"patch_size": PATCH, "drop_path_rate": 0.0},
    }
    return OmegaConf.merge(cfg, overrides, extra)


def _tiny_vit():
    return DinoVisionTransformer(
        img_size=GLOBAL, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, init_values=0.5,
        block_chunks=0, num_register_tokens=1,
    )  # fmt: skip


def _arch(seed=0, **cfg_kwargs):
    torch.manual_seed(seed)
    arch = SSLMetaArch(_cfg(**cfg_kwargs), backbones=(_tiny_vit(), _tiny_vit()))
    arch.train()
    # Spread the weights so features differ clearly between images (a fresh tiny ViT maps every image
    # to almost the same CLS token), and move the teacher away from the student, so that a crossed /
    # uncrossed or teacher / student mix-up changes the losses well beyond the tolerances.
    with torch.no_grad():
        for s, t in zip(arch.student.parameters(), arch.teacher.parameters()):
            s.add_(0.3 * torch.randn_like(s))
            t.copy_(s + 0.05 * torch.randn_like(s))
    return arch


def _batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, GLOBAL, GLOBAL, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, LOCAL, LOCAL, generator=g) for _ in range(N_LOCAL)],
            },
            -1,
        )
        for _ in range(b)
    ]
    gen = MaskingGenerator(GRID, max_num_patches=GRID * GRID // 2, rng=random.Random(seed))
    batch = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, GRID * GRID, gen)
    assert batch["n_masked_patches"].item() > 0
    return batch


# ------------------------------------------------------------------ independent re-derivation
def _ce(t, s, temp=0.1):
    return -(t * F.log_softmax(s / temp, dim=-1)).sum(-1)


def _sinkhorn(logits, temp, n_iter=3):
    q = torch.exp(logits.double() / temp).t()
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / n
    return (q * n).t().float()


def _koleo(x):
    x = F.normalize(x, dim=-1)
    d = torch.cdist(x, x) + torch.diag(torch.full((len(x),), float("inf")))
    return -torch.log(d.min(dim=1).values + 1e-8).mean()


def _reference(arch, batch, temp, weights):
    """Expected losses from the parts, with plain torch ops. Returns a dict of scalars (with graph)."""
    w_dino, w_koleo, w_ibot = weights
    g, loc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    student, teacher = arch.student, arch.teacher
    ibot_head_s = student["ibot_head"] if "ibot_head" in student else student["dino_head"]
    ibot_head_t = teacher["ibot_head"] if "ibot_head" in teacher else teacher["dino_head"]
    with torch.no_grad():
        t_out = teacher["backbone"].forward_features(g)
        t_cls_logits = teacher["dino_head"](t_out["x_norm_clstoken"])  # rows: crop 0 of images, crop 1 ...
        t_patch_logits = ibot_head_t(t_out["x_norm_patchtokens"][masks])  # masked patches, row-major order
        if arch.objective.centering == "centering":
            t_cls = torch.softmax((t_cls_logits - arch.dino_loss.center) / temp, dim=-1)
            t_patch = torch.softmax((t_patch_logits - arch.ibot_patch_loss.center[0]) / temp, dim=-1)
        else:
            t_cls, t_patch = _sinkhorn(t_cls_logits, temp), _sinkhorn(t_patch_logits, temp)
    teacher_crop = [t_cls[:B], t_cls[B:]]

    s_g = student["backbone"].forward_features(g, masks=masks)
    s_l = student["backbone"].forward_features(loc)
    s_cls_g = student["dino_head"](s_g["x_norm_clstoken"])
    s_cls_l = student["dino_head"](s_l["x_norm_clstoken"])
    s_patch = ibot_head_s(s_g["x_norm_patchtokens"][masks])

    n_pairs = 2 + 2 * N_LOCAL  # (student crop, teacher crop) pairs of different views
    glob = (_ce(teacher_crop[1], s_cls_g[:B]).mean() + _ce(teacher_crop[0], s_cls_g[B:]).mean()) / n_pairs
    local = (
        sum(
            _ce(teacher_crop[c], s_cls_l[j * B : (j + 1) * B]).mean()
            for j in range(N_LOCAL)
            for c in range(2)
        )
        / n_pairs
    )
    cls_g = s_g["x_norm_clstoken"]
    koleo = w_koleo * (_koleo(cls_g[:B]) + _koleo(cls_g[B:]))
    # iBOT: per global crop, mean CE over its masked patches (0 when unmasked); mean over the 2B crops
    ce_patch = _ce(t_patch, s_patch)
    owner = masks.nonzero()[:, 0]  # crop of each masked patch, same order as masks[masks]
    per_crop = [
        ce_patch[owner == i].mean() if (owner == i).any() else ce_patch.sum() * 0 for i in range(2 * B)
    ]
    ibot = sum(per_crop) / (2 * B)
    total = w_dino * (glob + local) + koleo + w_ibot * ibot
    return {"dino_global_crops_loss": glob, "dino_local_crops_loss": local, "koleo": koleo, "ibot": ibot,
            "total_loss": total}  # fmt: skip


def _checked_params(arch):
    s = arch.student
    named = {
        "patch_embed": s["backbone"].patch_embed.proj.weight,
        "qkv": s["backbone"].blocks[0].attn.qkv.weight,
        "mask_token": s["backbone"].mask_token,
        "register": s["backbone"].register_tokens,
        "gamma": s["backbone"].blocks[1].ls2.gamma,
        "head_mlp": s["dino_head"].mlp[0].weight,
        "last_layer_v": s["dino_head"].last_layer.weight_v,
    }
    if "ibot_head" in s:
        named["ibot_last_layer"] = s["ibot_head"].last_layer.weight_v
    return named


@pytest.mark.parametrize(
    "centering,separate_head",
    [("centering", False), ("sinkhorn_knopp", False), ("centering", True)],
)
def test_one_step_losses_and_gradients_match_re_derivation(centering, separate_head):
    arch = _arch(centering=centering, separate_head=separate_head)
    with torch.no_grad():  # a non-zero center, as after some training
        arch.dino_loss.center.normal_(0, 0.1)
        arch.ibot_patch_loss.center.normal_(0, 0.1)
    batch = _batch()
    temp = 0.05
    ref = _reference(arch, batch, temp, (1.0, 0.3, 0.7))
    params = _checked_params(arch)
    expected_grads = torch.autograd.grad(ref["total_loss"], list(params.values()))

    loss_dict = arch.forward_backward(batch, teacher_temp=temp)

    expected_keys = {
        "dino_local_crops_loss",
        "dino_global_crops_loss",
        "koleo_loss",
        "ibot_loss",
        "total_loss",
    }
    assert set(loss_dict) == expected_keys
    for key in ("dino_global_crops_loss", "dino_local_crops_loss", "total_loss"):
        assert loss_dict[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-6), key
    # DINOv2 logs koleo and ibot per global crop
    assert loss_dict["koleo_loss"].item() == pytest.approx(ref["koleo"].item() / 2, rel=1e-5)
    assert loss_dict["ibot_loss"].item() == pytest.approx(ref["ibot"].item() / 2, rel=1e-5)
    for (name, p), g in zip(params.items(), expected_grads):
        assert p.grad is not None, name
        # float32 summation order differs between the two computations: compare to the gradient's scale
        scale = g.abs().max().item()
        assert (p.grad - g).abs().max().item() <= 1e-5 * scale, name
    assert all(p.grad is None for p in arch.teacher.parameters())


def test_lazy_center_update_and_ema_over_two_steps():
    arch = _arch(seed=1)
    b1, b2 = _batch(1), _batch(2)
    with torch.no_grad():
        out = arch.teacher["backbone"].forward_features(b1["collated_global_crops"])
        logits1 = arch.teacher["dino_head"](out["x_norm_clstoken"])
        patch1 = arch.teacher["dino_head"](out["x_norm_patchtokens"][b1["collated_masks"]])
    arch.forward_backward(b1, teacher_temp=0.07)
    assert torch.equal(arch.dino_loss.center, torch.zeros(1, 16)), "update waits for the next centering"
    student_before = [p.detach().clone() for p in arch.student.parameters()]
    teacher_before = [p.detach().clone() for p in arch.teacher.parameters()]
    arch.update_teacher(0.9)
    for t_new, t_old, s in zip(arch.teacher.parameters(), teacher_before, student_before):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)
    arch.forward_backward(b2, teacher_temp=0.07)
    torch.testing.assert_close(
        arch.dino_loss.center, 0.1 * logits1.mean(0, keepdim=True), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        arch.ibot_patch_loss.center.reshape(-1), 0.1 * patch1.mean(0), rtol=1e-5, atol=1e-7
    )


def test_teacher_starts_as_student_copy_and_stays_in_eval():
    torch.manual_seed(0)
    arch = SSLMetaArch(_cfg(), backbones=(_tiny_vit(), _tiny_vit()))
    for (name, t), s in zip(arch.teacher.state_dict().items(), arch.student.state_dict().values()):
        assert torch.equal(t, s), name
    assert not any(p.requires_grad for p in arch.teacher.parameters())
    arch.train()
    assert arch.student.training and not arch.teacher.training
    assert arch.dino_loss.out_dim == 16 and arch.ibot_patch_loss.patch_out_dim == 16  # shared head
    with pytest.raises(RuntimeError, match="forward_backward"):
        arch(None)


def test_frozen_backbone_gets_no_gradient_and_param_groups_cover_student():
    arch = _arch()
    groups = arch.get_params_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in arch.student.parameters())
    arch.freeze_backbone(True)
    arch.forward_backward(_batch(), teacher_temp=0.07)
    assert all(p.grad is None for p in arch.student["backbone"].parameters())
    assert all(p.grad is not None for p in arch.student["dino_head"].parameters())
    arch.freeze_backbone(False)
    assert all(p.requires_grad for p in arch.student["backbone"].parameters())


def test_no_local_crops_and_disabled_terms():
    arch = _arch(**{"ibot": {"loss_weight": 0.0}, "dino": {"koleo_loss_weight": 0.0}})
    batch = _batch()
    batch["collated_local_crops"] = torch.empty(0)
    ref_cls = arch.student["backbone"].forward_features(
        batch["collated_global_crops"], masks=batch["collated_masks"]
    )
    loss_dict = arch.forward_backward(batch, teacher_temp=0.07)
    assert set(loss_dict) == {"dino_global_crops_loss", "total_loss"}
    with torch.no_grad():
        t = arch.teacher["backbone"].forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        t = torch.softmax(arch.teacher["dino_head"](t) / 0.07, dim=-1)
        s = arch.student["dino_head"](ref_cls["x_norm_clstoken"])
        # two pairs (g0 vs t1, g1 vs t0), each a batch mean, divided by the 2 pairs
        expected = (_ce(t[B:], s[:B]).mean() + _ce(t[:B], s[B:]).mean()) / 2
    assert loss_dict["total_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_grad_scaler_scales_the_backpropagated_loss():
    plain, scaled = _arch(), _arch()
    plain_losses = plain.forward_backward(_batch(), teacher_temp=0.07)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    losses = scaled.forward_backward(_batch(), teacher_temp=0.07, grad_scaler=scaler)
    assert losses["total_loss"].item() == pytest.approx(plain_losses["total_loss"].item())  # logged unscaled
    for (name, p), q in zip(plain.student.named_parameters(), scaled.student.parameters()):
        torch.testing.assert_close(q.grad, 1024.0 * p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_batches_and_configs_raise():
    arch = _arch()
    batch = _batch()
    del batch["masks_weight"]
    with pytest.raises(ValueError, match="masks_weight"):
        arch.forward_backward(batch, teacher_temp=0.07)
    batch = _batch()
    batch["collated_global_crops"] = batch["collated_global_crops"][:5]
    with pytest.raises(ValueError, match="2 global crops"):
        arch.forward_backward(batch, teacher_temp=0.07)
    with pytest.raises(ValueError, match="centering"):
        SSLMetaArch(_cfg(centering="mean"), backbones=(_tiny_vit(), _tiny_vit()))
    with pytest.raises(ValueError, match="both 0"):
        SSLMetaArch(
            _cfg(**{"dino": {"loss_weight": 0}, "ibot": {"loss_weight": 0}}),
            backbones=(_tiny_vit(), _tiny_vit()),
        )


def test_builds_backbones_from_config():
    cfg = _cfg(**{"student": {"arch": "vit_small", "patch_size": 14, "num_register_tokens": 2}})
    arch = SSLMetaArch(cfg)
    assert arch.embed_dim == 384
    assert arch.student["backbone"].num_register_tokens == 2
    assert "student.backbone.blocks.0.attn.qkv.weight" in arch.state_dict()
    assert "teacher.dino_head.last_layer.weight_g" in arch.state_dict()
    assert {"dino_loss.center", "ibot_patch_loss.center"} <= set(arch.state_dict())


def test_centre_keys_and_shapes_and_an_old_checkpoint_s_centres_load():
    arch = _arch()
    assert arch.centers() == (arch.dino_loss.center_update, arch.ibot_patch_loss.center_update)
    state = arch.state_dict()
    assert state["dino_loss.center"].shape == (1, 16)  # [1, dino.head_n_prototypes]
    assert state["ibot_patch_loss.center"].shape == (1, 1, 16)  # shared head: [1, 1, dino prototypes]
    assert [k for k in state if "loss" in k] == ["dino_loss.center", "ibot_patch_loss.center"]
    # A checkpoint's model state as written before the centre update became a component.
    old = dict(state)
    old["dino_loss.center"] = torch.linspace(-1, 1, 16).reshape(1, 16)
    old["ibot_patch_loss.center"] = torch.linspace(2, 3, 16).reshape(1, 1, 16)
    fresh = _arch(seed=1)
    fresh.load_state_dict(old, strict=True)
    torch.testing.assert_close(fresh.dino_loss.center, old["dino_loss.center"])
    torch.testing.assert_close(fresh.ibot_patch_loss.center, old["ibot_patch_loss.center"])


# ------------------------------------------------------------------ two processes (gloo)
def _rank_batch(batch: dict, rank: int, world: int, b: int) -> dict:
    """The part of a collated batch of b images that rank `rank` sees (its images, both crops, same masks)."""
    per = b // world
    rows = [c * b + rank * per + i for c in range(2) for i in range(per)]
    local_rows = [j * b + rank * per + i for j in range(N_LOCAL) for i in range(per)]
    masks = batch["collated_masks"][rows]
    weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    idx = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": batch["collated_global_crops"][rows],
        "collated_local_crops": batch["collated_local_crops"][local_rows],
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": weights,
        "upperbound": batch["upperbound"],
        "n_masked_patches": torch.tensor([len(idx)]),
    }


def _two_rank_step(rank: int, world: int) -> dict:
    import torch.distributed as dist

    arch = _arch(centering="sinkhorn_knopp", **{"dino": {"koleo_loss_weight": 0.0}})
    batch = _rank_batch(_batch(3, b=4), rank, world, b=4)
    # The training loop's ddp gradient sync, with small buckets so that several all_reduces
    # start from hooks while backward runs.
    sync = GradientSync(arch.student.parameters(), bucket_mb=0.01)
    losses = arch.forward_backward(batch, teacher_temp=0.05)
    started_during_backward = sum(b.handle is not None for b in sync.buckets)
    sync.finish()
    assert len(sync.buckets) > 3 and started_during_backward == len(sync.buckets)
    grads = [p.grad.clone() for p in arch.student.parameters()]
    values = torch.stack([losses[k] for k in sorted(losses)])
    dist.all_reduce(values)
    return {"grads": grads, "losses": dict(zip(sorted(losses), values / world))}


@pytest.mark.slow
def test_two_processes_with_overlapped_gradient_sync_equal_one_process_on_the_full_batch(tmp_path):
    # 4 images split 2 + 2. KoLeo is left out: it compares neighbours within each process's batch.
    arch = _arch(centering="sinkhorn_knopp", **{"dino": {"koleo_loss_weight": 0.0}})
    full = arch.forward_backward(_batch(3, b=4), teacher_temp=0.05)
    out = run_on_gloo(_two_rank_step, tmp_path)
    for key, value in full.items():
        assert out["losses"][key].item() == pytest.approx(value.item(), rel=1e-5), key
    for (name, p), g in zip(arch.student.named_parameters(), out["grads"]):
        scale = p.grad.abs().max().item()
        assert (p.grad - g).abs().max().item() <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("head_dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_heads_compute_in_their_configured_dtype_under_a_bf16_backbone(head_dtype, expected):
    heads = {
        who: {part: {"mixed_precision": {"param_dtype": head_dtype}} for part in ("dino_head", "ibot_head")}
        for who in ("student", "teacher")
    }
    arch = _arch(separate_head=True, compute_precision=heads)
    assert arch.autocast_dtype == torch.bfloat16  # the default backbone precision
    arch.autocast_devices = ("cuda", "cpu")  # run the GPU's autocast path on the CPU (bf16 works there)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, set()).add(output.dtype)

        return hook

    for who in ("student", "teacher"):
        for part in ("dino_head", "ibot_head"):
            getattr(arch, who)[part].mlp[0].register_forward_hook(record(f"{who}.{part}"))
        getattr(arch, who)["backbone"].blocks[0].mlp.fc1.register_forward_hook(record(f"{who}.backbone"))
    losses = arch.forward_backward(_batch(1), teacher_temp=0.05)
    assert seen.pop("student.backbone") == {torch.bfloat16} and seen.pop("teacher.backbone") == {
        torch.bfloat16
    }
    assert seen == {
        f"{w}.{p}": {expected} for w in ("student", "teacher") for p in ("dino_head", "ibot_head")
    }
    assert all(torch.isfinite(v) for v in losses.values())
