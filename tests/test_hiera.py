"""Hiera: presets, unrolled order, mask-unit attention, sparse masking, loading, MAE, scripts."""
import json

import pytest
import torch

import analyze
import classifier
import finetune
import hiera_mae
import mae
from hiera import Hiera, MaskUnitAttention, unroll_order
from checkpoints import CheckpointError, load_pretrained
from presets import build_model
from model import ViT

# A tiny Hiera: 64 px -> 16 x 16 tokens -> 2 x 2 mask units of 8 x 8 tokens; widths 8..64.
TINY = dict(img_size=64, embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), num_classes=5)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Hiera(**{**TINY, **kw}).eval()
    for p in model.parameters():  # larger weights than the init, so differences show
        p.data.normal_(0, 0.2)
    return model


def test_preset_parameter_counts():
    count = lambda name: sum(p.numel() for p in build_model(name).parameters())  # noqa: E731
    assert round(count("hiera_tiny") / 1e6, 1) == 27.9  # the Hiera paper's Hiera-T
    assert round(count("hiera_tiny_lite") / 1e6, 1) == 6.7  # width 46 (003 quotes ~6.5M)
    assert count("hiera_small") > count("hiera_tiny") and count("hiera_base") > count("hiera_small")


def test_unroll_then_reroll_is_the_identity_on_positions():
    model = tiny()
    H, W = model.grid
    raster = torch.arange(H * W, dtype=torch.float32).view(1, H * W, 1)  # feature = position
    unrolled = raster[:, model.unroll_index]
    assert torch.equal(model.to_raster(unrolled, 0).flatten(), raster.flatten())
    # the mask unit varies fastest: token n lies in unit n % units (units of 8 x 8 tokens)
    unit_of = lambda pos: (pos // W // 8) * 2 + (pos % W) // 8  # noqa: E731
    assert all(unit_of(int(p)) == n % 4 for n, p in enumerate(unrolled.flatten()))
    # one unroll step by hand on a 4 x 4 grid: offsets (0,0), (0,1), (1,0), (1,1) outermost
    assert unroll_order((4, 4), 1)[:8].tolist() == [0, 2, 8, 10, 1, 3, 9, 11]


def test_mask_unit_attention_equals_global_attention_within_each_window():
    torch.manual_seed(0)
    windowed = MaskUnitAttention(16, 16, 2, q_stride=1, window_size=6, use_mask_unit_attn=True)
    full = MaskUnitAttention(16, 16, 2, use_mask_unit_attn=False)
    full.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 18, 16)  # 3 windows of 6 tokens; token n in window n % 3
    out, logits = windowed(x, return_logits=True)
    assert logits.shape == (2, 2, 3, 6, 6)
    for w in range(3):
        alone, _ = full(x[:, w::3])
        torch.testing.assert_close(out[:, w::3], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(windowed(x)[0], out, atol=1e-5, rtol=1e-5)  # SDPA path


def test_dropping_units_equals_running_the_kept_units_alone():
    model = tiny()
    imgs = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    ends = model.stage_ends
    _, sparse, _ = model.forward_features(imgs, keep=keep, return_blocks=ends)
    # Nothing leaks: the removed units' pixels do not matter at any depth.
    other = imgs.clone()
    other[:, :, :32, 32:] = 5.0  # unit 1 is removed for image 0 ...
    other[:, :, 32:, 32:] = -3.0  # ... and unit 3 for both
    _, sparse2, _ = model.forward_features(other, keep=keep, return_blocks=ends)
    torch.testing.assert_close(sparse2[ends[-1]][0], sparse[ends[-1]][0])
    # In the mask-unit stages the kept units' tokens are those of the full image with the
    # removed pixels zeroed: deleting tokens changes nothing there.
    pixel_keep = keep.view(2, 1, 2, 2).float().repeat_interleave(32, 2).repeat_interleave(32, 3)
    _, dense, _ = model.forward_features(imgs * pixel_keep, return_blocks=ends)
    for block in ends[:2]:
        full_units = model.unit_layout(dense[block], block)[keep]  # (2 kept x 2 images, u, u, C)
        kept_units = model.unit_layout(sparse[block], block).flatten(0, 1)
        torch.testing.assert_close(kept_units, full_units, atol=1e-5, rtol=1e-5)


def official_state_dict(model):
    """Our Hiera's weights under the key names written out in the official repository."""
    names = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias", "head.projection.weight", "head.projection.bias"}
    for i, block in enumerate(model.blocks):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") + \
                (("proj",) if block.dim != block.dim_out else ()):
            names |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    state = model.state_dict()
    assert set(state) == names  # exactly the official names, nothing else
    return {"model_state": {k: v.clone() for k, v in state.items()}}


def test_official_key_names_load_strictly(tmp_path):
    source = tiny(seed=1)
    torch.save(official_state_dict(source), tmp_path / "hiera.pth")
    target = tiny(seed=2)
    report = load_pretrained(target, str(tmp_path / "hiera.pth"), verbose=False)
    assert report["dropped"] == [] and report["initialised"] == []
    imgs = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(target(imgs), source(imgs))


def test_other_architectures_are_refused():
    vit = ViT(img_size=64, patch_size=16, embed_dim=8, depth=5, num_heads=1)
    with pytest.raises(CheckpointError):
        load_pretrained(tiny(), vit.state_dict(), verbose=False)
    with pytest.raises(CheckpointError, match="lacks"):
        load_pretrained(vit, tiny().state_dict(), verbose=False)


@pytest.mark.parametrize("q_pool", [3, 2])
def test_timm_oracle_logits_and_stage_outputs(q_pool):
    timm_hiera = pytest.importorskip("timm.models.hiera")
    ours = tiny(q_pool=q_pool)
    cfg = {k: v for k, v in TINY.items() if k != "img_size"}
    theirs = timm_hiera.Hiera(img_size=(64, 64), q_pool=q_pool, **cfg).eval()
    theirs.load_state_dict(timm_hiera.checkpoint_filter_fn(ours.state_dict(), theirs))
    imgs = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(imgs), theirs(imgs), atol=1e-5, rtol=1e-5)
    keep = ours.random_unit_mask(2, 0.5)
    _, stages = theirs.forward_features(imgs, mask=keep, return_intermediates=True)
    _, out, _ = ours.forward_features(imgs, keep=keep, return_blocks=ours.stage_ends)
    for block, theirs_units in zip(ours.stage_ends, stages):
        torch.testing.assert_close(ours.unit_layout(out[block], block), theirs_units,
                                   atol=1e-5, rtol=1e-5)


def test_sparse_mae_reduces_the_loss_and_loads_into_the_classifier():
    torch.manual_seed(0)
    model = hiera_mae.HieraMAE(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), img_size=64,
                               decoder_dim=16, decoder_heads=2)
    imgs = torch.randn(4, 3, 64, 64)
    noise = torch.rand(4, 4)
    out = model(imgs, 0.5, noise)
    loss, pred, mask = out["loss"], out["pred"], out["mask"]
    assert pred.shape == (4, 16, 16 * 16 * 3) and mask.shape == (4, 16)  # 4 x 4 patches of 16 px
    assert torch.all(mask.sum(1) == 8)  # 2 of 4 units removed, 4 patches each
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(60):
        loss = model(imgs, 0.5, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    classifier = Hiera(**TINY)  # q_pool 3, the same weights
    report = load_pretrained(classifier, model.state_dict(), verbose=False)
    assert "decoder_pred.weight" in report["dropped"] and "encoder_norm.weight" in report["dropped"]
    assert report["initialised"] == ["head.projection.bias", "head.projection.weight",
                                     "norm.bias", "norm.weight"]


def test_layer_decay_follows_the_block_index():
    depth = 12
    assert classifier.layer_id("pos_embed", depth) == 0
    assert classifier.layer_id("patch_embed.proj.weight", depth) == 0
    assert classifier.layer_id("blocks.3.proj.weight", depth) == 4
    assert classifier.layer_id("head.projection.weight", depth) == 13
    assert classifier.layer_id("norm.weight", depth) == 13


def test_scripts_end_to_end(tmp_path):
    run = ["--model", "hiera_tiny_lite", "--synthetic-size", "32", "--batch-size", "8",
           "--num-workers", "0", "--log-every", "1"]
    mae.main(run + ["--epochs", "1", "--out-dir", str(tmp_path / "mae")])
    ckpt = str(tmp_path / "mae" / "checkpoint.pth")
    assert (tmp_path / "mae" / "reconstruction.png").exists()
    rows = finetune.main(run + ["--init", ckpt, "--epochs", "1", "--layer-decay", "0.8",
                                "--out-dir", str(tmp_path / "ft")])
    assert rows[0][1]["images"] == 8  # 64 px, 8 validation images
    analyze.main(["attn", "--ckpt", ckpt, "--model", "hiera_tiny_lite", "--img-size", "64",
                  "--num-images", "8", "--batch-size", "4", "--out-dir", str(tmp_path / "an")])
    result = json.loads((tmp_path / "an" / "attn.json").read_text())
    assert result["checkpoint.pth"]["blocks"] == [5, 6, 7, 8, 9, 10, 12]  # global, unpooled
    analyze.main(["cka", "--a", ckpt, "--model-a", "hiera_tiny_lite", "--img-size", "64",
                  "--num-images", "8", "--batch-size", "4", "--out-dir", str(tmp_path / "an")])
    cka = json.loads((tmp_path / "an" / "cka.json").read_text())
    assert cka["layers_a"] == ["embed", "stage 1", "stage 2", "stage 3", "stage 4"]
    torch.testing.assert_close(torch.tensor(cka["matrix"]).diagonal(), torch.ones(5))


@pytest.mark.parametrize("flags,message", [
    (["--img-size", "48"], "multiple of 32"),
    (["--teacher", "t.pth", "--teacher-model", "vit_base"], "from a Hiera teacher"),
    (["--teacher", "t.pth", "--distill-target", "relation"], "attention or representations"),
    (["--recon-layer", "8"], "for ViT students"),
    (["--img-size", "32"], "keep at least one of the 1 mask units"),
])
def test_bad_hiera_mae_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        mae.main(["--model", "hiera_tiny_lite"] + flags)
    assert message in capsys.readouterr().err


def test_distillation_from_a_hiera_teacher(tmp_path, capsys):
    run = ["--model", "hiera_tiny_lite", "--synthetic-size", "16", "--batch-size", "8",
           "--num-workers", "0", "--log-every", "1", "--epochs", "1"]
    mae.main(run + ["--out-dir", str(tmp_path / "teacher")])
    teacher = ["--teacher", str(tmp_path / "teacher" / "checkpoint.pth"), "--teacher-model",
               "hiera_tiny_lite"]
    for target in ("attn", "rep"):
        out = tmp_path / target
        mae.main(run + teacher + ["--distill-target", target, "--out-dir", str(out)])
        log = [r for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
        assert all(r["distill_loss"] > 0 and r["recon_loss"] > 0 for r in log)
        ckpt = torch.load(out / "checkpoint.pth")
        assert any(k.startswith("head_maps." if target == "attn" else "rep_maps.")
                   for k in ckpt["distill"])
    with pytest.raises(SystemExit, match="do not attend over the same tokens"):
        mae.main(run + teacher + ["--distill-layer", "3", "--teacher-layer", "12",
                                  "--out-dir", str(tmp_path / "bad")])


def test_hiera_mae_under_torchrun_on_cpu(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "mae.py", "--model", "hiera_tiny_lite", "--synthetic-size", "32", "--batch-size", "8",
         "--num-workers", "0", "--log-every", "1", "--epochs", "1", "--out-dir", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    log = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2]  # 32 images / (8 x 2 processes)


def test_decoder_places_the_kept_units_as_boolean_indexing_and_compiles_whole():
    # forward_decoder scatters by index (no nonzero(): torch.compile keeps one graph); the
    # oracle is the plain boolean assignment it replaced
    torch.manual_seed(0)
    model = hiera_mae.HieraMAE(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), img_size=64,
                               decoder_dim=16, decoder_heads=2)
    latent, keep, _, _ = model.forward_encoder(torch.randn(3, 3, 64, 64), 0.5)
    x = model.decoder_embed(latent)  # (B, K, u, u, Dd)
    B, u, Dd = keep.shape[0], model.unit_final, x.shape[-1]
    expected = model.mask_token.expand(B, model.num_units, u * u, Dd).clone()
    expected[keep] = x.reshape(-1, u * u, Dd)
    captured = {}
    model.decoder_blocks[0].register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0]))
    model.forward_decoder(latent, keep)
    mh, mw = model.mask_grid
    placed = (captured["x"] - model.decoder_pos_embed).view(B, mh, u, mw, u, Dd)
    placed = placed.permute(0, 1, 3, 2, 4, 5).reshape(B, model.num_units, u * u, Dd)
    torch.testing.assert_close(placed, expected)
    compiled = torch.compile(model.forward_decoder, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(latent, keep), model.forward_decoder(latent, keep))
