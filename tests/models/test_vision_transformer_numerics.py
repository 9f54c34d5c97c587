"""Numerical contract of DinoVisionTransformer against an independent re-computation.

The reference below uses only the state dict and plain float64 tensor algebra: patch embedding by
unfolding pixels, position-grid resampling by explicit bicubic weight matrices (Keys' kernel, and
the PIL-style stretched kernel for antialiasing), attention as an explicit softmax per head, layer
norm, GELU/SwiGLU and LayerScale written out. A second check maps our weights into timm's DINOv2
ViT (an independent implementation) and compares outputs where timm's semantics agree with DINOv2
(timm has no `interpolate_offset`: it always resamples to the exact size with antialiasing).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2.models.vision_transformer import DinoVisionTransformer

ATOL = 1e-5
EMBED, DEPTH, HEADS, PATCH = 64, 3, 4, 14


# ------------------------------------------------------------------------------ reference pieces
def _cubic(t: float, a: float) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_weights(n_in: int, n_out: int, scale_factor: float | None) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bicubic resampling (a=-0.75, half-pixel centres, clamped
    edges). With a scale factor, source positions are (i + 0.5) / scale_factor - 0.5."""
    inv = 1.0 / scale_factor if scale_factor else n_in / n_out
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * inv - 0.5
        x0 = math.floor(src)
        for k in range(-1, 3):
            w[i, min(max(x0 + k, 0), n_in - 1)] += _cubic(k - (src - x0), -0.75)
    return w


def antialiased_bicubic_weights(n_in: int, n_out: int, scale_factor: float | None) -> torch.Tensor:
    """[n_out, n_in] weights of antialiased bicubic resampling (PIL's a=-0.5 kernel stretched by
    the downscale factor, normalised per output pixel)."""
    scale = 1.0 / scale_factor if scale_factor else n_in / n_out
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        row = torch.tensor(
            [_cubic((j - center + 0.5) * stretch, -0.5) for j in range(lo, hi)], dtype=torch.float64
        )
        w[i, lo:hi] = row / row.sum()
    return w


def reference_pos_embed(pos_embed, h0, w0, offset, antialias):
    """DINOv2's position embeddings for an h0 x w0 patch grid, from explicit weight matrices."""
    pos_embed = pos_embed.double()
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if h0 * w0 == n and h0 == w0:
        return pos_embed
    sh, sw = ((h0 + offset) / m, (w0 + offset) / m) if offset else (None, None)
    make = antialiased_bicubic_weights if antialias else bicubic_weights
    grid = pos_embed[0, 1:].reshape(m, m, -1)
    out = torch.einsum("ij,jkd,lk->ild", make(m, h0, sh), grid, make(m, w0, sw))
    return torch.cat([pos_embed[:, :1], out.reshape(1, h0 * w0, -1)], dim=1)


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def softmax(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def reference_tokens(sd, x, masks, registers, offset, antialias):
    """[B, 1+R+N, D] input tokens: unfold patches, mask, add (resampled) positions, registers."""
    b, c, h, w = x.shape
    weight = sd["patch_embed.proj.weight"]
    d = weight.shape[0]
    cols = F.unfold(x.double(), kernel_size=PATCH, stride=PATCH).transpose(1, 2)  # [B, N, C*p*p], row-major
    tok = cols @ weight.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    if masks is not None:
        tok = torch.where(masks[..., None], sd["mask_token"][0], tok)
    tok = torch.cat([sd["cls_token"].expand(b, 1, d), tok], dim=1)
    tok = tok + reference_pos_embed(sd["pos_embed"], h // PATCH, w // PATCH, offset, antialias)
    if registers:
        tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(b, -1, -1), tok[:, 1:]], dim=1)
    return tok


def reference_block(sd, i, x, heads, ffn):
    p = f"blocks.{i}."
    b, t, d = x.shape
    hd = d // heads
    y = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    wqkv, bqkv = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
    head_out = []
    for h in range(heads):
        rows = [slice(part * d + h * hd, part * d + (h + 1) * hd) for part in range(3)]
        q, k, v = (y @ wqkv[r].T + bqkv[r] for r in rows)
        head_out.append(softmax((q @ k.transpose(1, 2)) * hd**-0.5) @ v)
    a = torch.cat(head_out, dim=-1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    x = x + sd[p + "ls1.gamma"] * a
    y = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    if ffn == "mlp":
        z = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
        z = z @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    else:
        z12 = y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]
        hidden = z12.shape[-1] // 2
        z1, z2 = z12[..., :hidden], z12[..., hidden:]
        z = (z1 * torch.sigmoid(z1) * z2) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
    return x + sd[p + "ls2.gamma"] * z


def reference_forward(sd, x, masks=None, *, registers, offset, antialias, heads=HEADS, ffn="mlp"):
    """Token states after each block ([B, T, D] list, float64) and the final norm function."""
    tok = reference_tokens(sd, x, masks, registers, offset, antialias)
    states = []
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        tok = reference_block(sd, i, tok, heads, ffn)
        states.append(tok)
    return states, lambda t: layer_norm(t, sd["norm.weight"], sd["norm.bias"])


# ------------------------------------------------------------------------------ fixtures
def make_model(registers=4, offset=0.1, antialias=False, ffn="mlp", img_size=224, block_chunks=0, seed=0):
    torch.manual_seed(seed)
    model = DinoVisionTransformer(
        img_size=img_size,
        patch_size=PATCH,
        embed_dim=EMBED,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1e-5,
        ffn_layer=ffn,
        block_chunks=block_chunks,
        num_register_tokens=registers,
        interpolate_offset=offset,
        interpolate_antialias=antialias,
    ).eval()
    # Random values everywhere (not the near-identity init), so every term shows in the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "gamma" in name or "token" in name or "pos" in name else 0.1
            if name == "patch_embed.proj.weight":
                scale = 0.03  # 588 inputs per patch: keep token values O(1) for float32 precision
            p.copy_(torch.randn_like(p) * scale)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
    return model


def flat_sd(model):
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def check_outputs(out, states, norm, registers, masks):
    final = states[-1]
    normed = norm(final)
    torch.testing.assert_close(out["x_prenorm"].double(), final, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_norm_clstoken"].double(), normed[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        out["x_norm_regtokens"].double(), normed[:, 1 : 1 + registers], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        out["x_norm_patchtokens"].double(), normed[:, 1 + registers :], atol=ATOL, rtol=0
    )
    assert out["masks"] is masks


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "h0,w0,offset,antialias",
    [(7, 11, 0.1, False), (7, 11, 0.0, True), (20, 9, 0.1, False), (20, 9, 0.0, True), (7, 11, 0.0, False)],
)
def test_reference_resampling_matches_torch_bicubic(h0, w0, offset, antialias):
    """The hand-written weight matrices reproduce F.interpolate, so the forward checks below test
    our interpolation call against an independent formula."""
    m = 16
    grid = torch.randn(1, 5, m, m)
    kw = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset else {"size": (h0, w0)}
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    sh, sw = kw["scale_factor"] if offset else (None, None)
    make = antialiased_bicubic_weights if antialias else bicubic_weights
    ref = torch.einsum("ij,bdjk,lk->bdil", make(m, h0, sh), grid.double(), make(m, w0, sw))
    assert out.shape == (1, 5, h0, w0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_interpolated_grid_sizes_by_hand():
    """98x154 px at patch 14 is a 7x11 grid; DINOv2's offset path asks for scale factors
    (7.1/16, 11.1/16), whose floor(16 * s) is 7 and 11, and the offset changes the values."""
    model = make_model(registers=0, offset=0.1)
    assert math.floor(16 * (7 + 0.1) / 16) == 7 and math.floor(16 * (11 + 0.1) / 16) == 11
    tokens = torch.zeros(1, 1 + 7 * 11, EMBED)
    pos = model.interpolate_pos_encoding(tokens, 98, 154)
    assert pos.shape == (1, 1 + 77, EMBED)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])
    no_offset = make_model(registers=0, offset=0.0)
    no_offset.load_state_dict(model.state_dict())
    pos0 = no_offset.interpolate_pos_encoding(tokens, 98, 154)
    assert (pos - pos0).abs().max() > 1e-3
    # The training size returns the learned table itself.
    assert model.interpolate_pos_encoding(torch.zeros(1, 257, EMBED), 224, 224) is model.pos_embed


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("with_masks", [False, True])
def test_forward_features_training_size(registers, with_masks):
    model = make_model(registers=registers)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    masks = (torch.rand(2, 256) < 0.4) if with_masks else None
    with torch.no_grad():
        out = model.forward_features(x, masks)
    states, norm = reference_forward(
        flat_sd(model), x, masks, registers=registers, offset=0.1, antialias=False
    )
    check_outputs(out, states, norm, registers, masks)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
@pytest.mark.parametrize("with_masks", [False, True])
def test_forward_features_non_square_interpolated(offset, antialias, with_masks):
    model = make_model(registers=4, offset=offset, antialias=antialias)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 98, 154)
    masks = (torch.rand(2, 77) < 0.3) if with_masks else None
    with torch.no_grad():
        out = model.forward_features(x, masks)
    assert out["x_norm_patchtokens"].shape == (2, 77, EMBED)
    states, norm = reference_forward(
        flat_sd(model), x, masks, registers=4, offset=offset, antialias=antialias
    )
    check_outputs(out, states, norm, 4, masks)


def test_swiglu_and_chunked_blocks_match_reference():
    model = make_model(registers=4, ffn="swiglufused", block_chunks=3)
    x = torch.randn(1, 3, 112, 140)
    with torch.no_grad():
        out = model.forward_features(x)
    flat = {k: v.double() for k, v in model.state_dict().items()}
    # chunked keys blocks.{chunk}.{i}. -> blocks.{i}. for the reference
    flat = {
        (".".join([k.split(".")[0]] + k.split(".")[2:]) if k.startswith("blocks.") else k): v
        for k, v in flat.items()
    }
    states, norm = reference_forward(flat, x, registers=4, offset=0.1, antialias=False, ffn="swiglu")
    check_outputs(out, states, norm, 4, None)


def test_get_intermediate_layers_match_reference():
    model = make_model(registers=4)
    x = torch.randn(2, 3, 98, 154)
    states, norm = reference_forward(flat_sd(model), x, registers=4, offset=0.1, antialias=False)
    with torch.no_grad():
        (last,) = model.get_intermediate_layers(x, n=1)
        torch.testing.assert_close(last.double(), norm(states[-1])[:, 5:], atol=ATOL, rtol=0)

        two = model.get_intermediate_layers(x, n=[0, 2], return_class_token=True, norm=False)
        for (patches, cls), i in zip(two, [0, 2]):
            torch.testing.assert_close(patches.double(), states[i][:, 5:], atol=ATOL, rtol=0)
            torch.testing.assert_close(cls.double(), states[i][:, 0], atol=ATOL, rtol=0)

        maps = model.get_intermediate_layers(x, n=2, reshape=True)
        assert len(maps) == 2 and maps[0].shape == (2, EMBED, 7, 11)
        for fmap, i in zip(maps, [1, 2]):
            expected = norm(states[i])[:, 5:].reshape(2, 7, 11, EMBED).permute(0, 3, 1, 2)
            torch.testing.assert_close(fmap.double(), expected, atol=ATOL, rtol=0)
        # row-major: token r*11 + c is grid cell (r, c)
        torch.testing.assert_close(maps[1][:, :, 3, 5], last[:, 3 * 11 + 5])


def test_last_self_attention_matches_reference():
    model = make_model(registers=4)
    x = torch.randn(2, 3, 98, 98)
    sd = flat_sd(model)
    states, _ = reference_forward(sd, x, registers=4, offset=0.1, antialias=False)
    y = layer_norm(states[-2], sd["blocks.2.norm1.weight"], sd["blocks.2.norm1.bias"])
    w, b = sd["blocks.2.attn.qkv.weight"], sd["blocks.2.attn.qkv.bias"]
    hd = EMBED // HEADS
    with torch.no_grad():
        probs = model.get_last_self_attention(x)
    assert probs.shape == (2, HEADS, 1 + 4 + 49, 1 + 4 + 49)
    for h in range(HEADS):
        q = y @ w[h * hd : (h + 1) * hd].T + b[h * hd : (h + 1) * hd]
        k = y @ w[EMBED + h * hd : EMBED + (h + 1) * hd].T + b[EMBED + h * hd : EMBED + (h + 1) * hd]
        torch.testing.assert_close(
            probs[:, h].double(), softmax(q @ k.transpose(1, 2) / math.sqrt(hd)), atol=ATOL, rtol=0
        )


# ------------------------------------------------------------------------------ timm cross-check
def _to_timm(sd, registers):
    """Our (Meta's) keys -> timm's VisionTransformer keys. With registers timm's DINOv2 models use
    no_embed_class: the CLS position embedding is folded into cls_token and the grid has no CLS slot."""
    out = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens")}
    if registers:
        out["reg_token"] = sd["register_tokens"]
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd["pos_embed"][:, 1:]
    return out


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(224, 224), (98, 154)])
def test_matches_timm_dinov2(registers, size):
    timm = pytest.importorskip("timm")
    # timm resamples the grid to the exact size with antialiasing == DINOv2 with offset 0, antialias on.
    model = make_model(registers=registers, offset=0.0, antialias=True)
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    ref = timm.create_model(
        name, pretrained=False, img_size=224, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
        num_classes=0, dynamic_img_size=True,
    ).eval()  # fmt: skip
    ref.load_state_dict(_to_timm(model.state_dict(), registers), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = ref.forward_features(x)
    ours_tokens = torch.cat(
        [ours["x_norm_clstoken"][:, None], ours["x_norm_regtokens"], ours["x_norm_patchtokens"]], dim=1
    )
    torch.testing.assert_close(ours_tokens, theirs, atol=ATOL, rtol=0)
