"""ViT: parameter count, attention paths, position embedding, block access, checkpoint loading."""
import math

import pytest
import torch

from checkpoints import CheckpointError, load_pretrained, resize_pos_embed
from model import Attention, ViT, sincos_pos_embed, vit_tiny

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)


def fair_encoder_state_dict(width=64, depth=3, patch=4, chans=3, grid=8, head_classes=0):
    """An encoder state dict written from FAIR MAE's key names, not from our model."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, 1 + grid * grid, width),
          "patch_embed.proj.weight": r(width, chans, patch, patch),
          "patch_embed.proj.bias": r(width), "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(depth):
        for name, shape in (("norm1", (width,)), ("norm2", (width,)),
                            ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            if len(shape) == 1:
                sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = 1 + r(width), r(width)
            else:
                sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = r(*shape), r(shape[0])
    if head_classes:
        sd["head.weight"], sd["head.bias"] = r(head_classes, width), r(head_classes)
    return sd


def fair_decoder_keys(width=64, dec=32, patch=4, grid=8):
    return {"mask_token": torch.zeros(1, 1, dec), "decoder_embed.weight": torch.zeros(dec, width),
            "decoder_embed.bias": torch.zeros(dec),
            "decoder_pos_embed": torch.zeros(1, 1 + grid * grid, dec),
            "decoder_pred.weight": torch.zeros(patch * patch * 3, dec)}


def test_vit_tiny_parameter_count():
    # timm lists vit_tiny_patch16_224 (1000 classes) at 5,717,416 parameters; the head count
    # (12 here, 3 in timm) does not change it.
    assert sum(p.numel() for p in vit_tiny(num_classes=1000).parameters()) == 5_717_416


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, 17, 64)
    fast, none = attn(x)
    slow, logits = attn(x, return_logits=True)
    assert none is None and logits.shape == (2, 4, 17, 17)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    q, k, _ = attn.project_qkv(x)  # logits are the pre-softmax scaled q k^T
    torch.testing.assert_close(logits, q @ k.transpose(-2, -1) / math.sqrt(16))


def test_block_outputs_and_attention_by_argument():
    torch.manual_seed(0)
    model = ViT(**TINY).eval()
    imgs = torch.randn(2, 3, 32, 32)
    full, _, _ = model.forward_features(imgs)
    out, blocks, attn = model.forward_features(imgs, return_blocks=(1, 3), return_attn=(2, 3))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)  # explicit path = SDPA path
    torch.testing.assert_close(blocks[3], full, atol=1e-5, rtol=1e-5)
    assert set(attn) == {2, 3} and attn[2].shape == (2, 4, 65, 65)
    # running only the first block gives block 1's output, and nothing deeper is run
    first, _, _ = model.forward_features(imgs, depth=1)
    torch.testing.assert_close(first, blocks[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.forward_features(imgs, depth=1, return_attn=(2,))


def test_pos_embed_fair_convention_by_hand():
    # dim 8 -> each coordinate gets 4 channels, omega = [1, 1/100]; 2x2 grid, row-major tokens.
    pe = sincos_pos_embed(8, 2, 2)
    assert pe.shape == (1, 5, 8) and pe.dtype == torch.float32
    assert torch.all(pe[0, 0] == 0)  # cls row
    s, c = math.sin, math.cos

    def expect(x, y):
        return torch.tensor([s(x), s(x / 100), c(x), c(x / 100), s(y), s(y / 100), c(y), c(y / 100)])

    torch.testing.assert_close(pe[0, 2], expect(x=1, y=0))  # row 0, column 1: x first
    torch.testing.assert_close(pe[0, 3], expect(x=0, y=1))  # row 1, column 0
    torch.testing.assert_close(pe[0, 4], expect(x=1, y=1))


def test_init_follows_mae():
    model = ViT(**TINY)
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))  # xavier over the whole (3D, D) matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.blocks[0].norm1.weight == 1)
    assert not model.pos_embed.requires_grad


def test_fair_encoder_loads_strictly_and_exactly():
    sd = fair_encoder_state_dict()
    model = ViT(**TINY)
    model.load_state_dict(sd, strict=True)  # the key names are FAIR's
    report = load_pretrained(ViT(**TINY), {"model": sd}, verbose=False)
    assert report["initialised"] == [] and report["dropped"] == []
    for k, v in ViT(**TINY).state_dict().items():
        assert k in sd and sd[k].shape == v.shape


def test_fair_full_checkpoint_drops_decoder():
    sd = {**fair_encoder_state_dict(), **fair_decoder_keys()}
    model = ViT(**TINY)
    report = load_pretrained(model, {"model": sd}, verbose=False)
    assert set(report["dropped"]) == set(fair_decoder_keys())
    torch.testing.assert_close(model.blocks[2].mlp.fc2.weight, sd["blocks.2.mlp.fc2.weight"])


@pytest.mark.parametrize("prefix", ["module.model.", "module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_checkpoints_load(prefix):
    sd = fair_encoder_state_dict()
    wrapped = {"model": {prefix + k: v for k, v in sd.items()}}
    model = ViT(**TINY)
    report = load_pretrained(model, wrapped, verbose=False)
    assert report["initialised"] == []
    torch.testing.assert_close(model.cls_token, sd["cls_token"])


def test_mae_lite_moco_selects_base_encoder():
    base, momentum = fair_encoder_state_dict(), fair_encoder_state_dict()
    momentum = {k: v + 1 for k, v in momentum.items()}
    sd = {**{"module.base_encoder." + k: v for k, v in base.items()},
          **{"module.momentum_encoder." + k: v for k, v in momentum.items()}}
    model = ViT(**TINY)
    load_pretrained(model, {"model": sd}, verbose=False)
    torch.testing.assert_close(model.pos_embed, base["pos_embed"])


def test_avg_pool_model_reports_new_fc_norm_and_head():
    model = ViT(**TINY, global_pool="avg", num_classes=10)
    report = load_pretrained(model, fair_encoder_state_dict(head_classes=1000), verbose=False)
    assert set(report["initialised"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert {"norm.weight", "head.weight"} <= set(report["dropped"])


@pytest.mark.parametrize("bad, words", [
    (fair_encoder_state_dict(width=32), "another width"),
    (fair_encoder_state_dict(depth=2), "lacks"),
    (fair_encoder_state_dict(depth=4), "deeper"),
    ({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, "no ViT encoder"),
])
def test_wrong_architecture_is_refused(bad, words):
    with pytest.raises(CheckpointError, match=words):
        load_pretrained(ViT(**TINY), bad, verbose=False)


def test_missing_or_damaged_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(ViT(**TINY), str(tmp_path / "nope.pth"), verbose=False)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="damaged"):
        load_pretrained(ViT(**TINY), str(tmp_path / "broken.pth"), verbose=False)


def test_pos_embed_is_resized_to_the_grid(tmp_path):
    sd = fair_encoder_state_dict(grid=4)  # trained at 16 px
    sd["pos_embed"] = sincos_pos_embed(64, 4, 4)
    path = tmp_path / "small.pth"
    torch.save({"model": sd}, path)
    model = ViT(**TINY)  # 32 px: an 8x8 grid
    report = load_pretrained(model, str(path), verbose=False)
    assert report["resized"] == ["pos_embed (sin-cos, recomputed for the new grid)"]
    # MAE's fixed table is recomputed for the new grid, not interpolated
    torch.testing.assert_close(model.pos_embed.data, sincos_pos_embed(64, 8, 8))
    learned = sd["pos_embed"] + 0.01 * torch.randn(1, 17, 64)  # a learned one is interpolated
    sd["pos_embed"] = learned
    report = load_pretrained(model, sd, verbose=False)
    assert report["resized"] == ["pos_embed"] and model.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(model.pos_embed.data[:, :1], learned[:, :1])  # cls row kept
    torch.testing.assert_close(model.pos_embed.data, resize_pos_embed(learned, (8, 8)))


def test_timm_oracle_both_directions():
    timm = pytest.importorskip("timm")
    for pool in ("token", "avg"):
        theirs = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, num_classes=10,
            global_pool=pool).eval()
        ours = ViT(**TINY, num_classes=10, global_pool=pool).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        imgs = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours(imgs), theirs(imgs), atol=1e-5, rtol=1e-4)
        fresh = ViT(**TINY, num_classes=10, global_pool=pool).eval()
        theirs.load_state_dict(fresh.state_dict(), strict=True)
        torch.testing.assert_close(fresh(imgs), theirs(imgs), atol=1e-5, rtol=1e-4)


def test_stochastic_depth_schedule_and_behaviour():
    model = ViT(**TINY, drop_path_rate=0.2)
    assert [round(b.drop_path_rate, 6) for b in model.blocks] == [0.0, 0.1, 0.2]  # linear
    x = torch.randn(64, 5, 64)
    block = ViT(**TINY, drop_path_rate=1.0).blocks[2]  # rate 1: the residual branches vanish
    block.train()
    assert torch.equal(block(x)[0], x)
    block.eval()  # no stochastic depth at evaluation
    assert not torch.equal(block(x)[0], x)


def test_relative_position_index_matches_beit():
    timm_beit = pytest.importorskip("timm.models.beit")
    from model import relative_position_index
    for grid in ((2, 3), (4, 4)):
        assert torch.equal(relative_position_index(*grid),
                           timm_beit.gen_relative_position_index(grid))


def test_zero_rel_pos_tables_change_nothing_and_load_from_plain_files():
    torch.manual_seed(0)
    plain = ViT(**TINY).eval()
    rel = ViT(**TINY, rel_pos=True).eval()
    report = load_pretrained(rel, plain.state_dict(), verbose=False)  # a file without tables
    assert all(f"blocks.{i}.attn.relative_position_bias_table" in report["initialised"]
               for i in range(3))
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rel(imgs), plain(imgs))
    torch.testing.assert_close(rel.forward_features(imgs, return_attn=(1,))[0],
                               plain.forward_features(imgs, return_attn=(1,))[0])
    # A non-zero table moves the logits on both paths, by the same amount.
    for block in rel.blocks:
        block.attn.relative_position_bias_table.data.normal_()
    fast = rel.forward_features(imgs)[0]
    slow, _, logits = rel.forward_features(imgs, return_attn=(2,))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, plain.forward_features(imgs)[0], atol=1e-3)
    attn = rel.blocks[1].attn
    q, k, _ = attn.project_qkv(rel.blocks[1].norm1(rel.forward_features(imgs, depth=1)[0]))
    bias = attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)
    torch.testing.assert_close(logits[2], q @ k.transpose(-2, -1) / attn.head_dim ** 0.5 + bias)
    # Tables go back into a plain model only with a clear error.
    with pytest.raises(CheckpointError, match="--rel-pos"):
        load_pretrained(ViT(**TINY), rel.state_dict(), verbose=False)
