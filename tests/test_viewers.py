"""The viewers of analyze.py: recon (pixels checked against the mask and a hand de-normalisation),
attnmap (maps against attention computed by hand), curves (log formats, NaN, one-line logs) and
their one-line errors."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import augment
import hiera
import mae_model
import model
import presets
import viewers

IMG = 32
PATCH = 8  # a 4 x 4 grid of 16 patches
SCALE = viewers.ENLARGE_TO // IMG  # 3: small images are enlarged to be seen
GREY = tuple(round(255 * m) for m in augment.IMAGENET_MEAN)  # a removed patch: zero, de-normalised


@pytest.fixture
def micro(monkeypatch):
    """Tiny presets (width 32, depth 2; a 5-block Hiera of width 8), registered where the real ones
    live, so that the files below go through the same paths as vit_base or hiera_base files."""
    monkeypatch.setitem(model.VIT_CONFIGS, "vit_micro", dict(embed_dim=32, depth=2, num_heads=2))
    monkeypatch.setitem(model.PRESETS, "vit_micro",
                        lambda **kw: model.ViT(embed_dim=32, depth=2, num_heads=2, **kw))
    monkeypatch.setitem(mae_model.PRETRAIN_DEFAULTS, "vit_micro",
                        dict(decoder_dim=32, decoder_depth=2, decoder_heads=2, mask_ratio=0.5))
    monkeypatch.setitem(hiera.HIERA_CONFIGS, "hiera_micro",
                        dict(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1)))


def micro_mae(norm_pix_loss=True, seed=0):
    torch.manual_seed(seed)
    return presets.build_mae("vit_micro", img_size=IMG, patch_size=PATCH, decoder_dim=32,
                             decoder_depth=2, decoder_heads=2, norm_pix_loss=norm_pix_loss)


def save_ours(path, mae_model, mask_ratio=0.75):
    """A checkpoint as mae.py writes it: the MAE under FAIR's key names, and the run's args."""
    args = dict(model="vit_micro", img_size=IMG, patch_size=PATCH, decoder_dim=32, decoder_depth=2,
                decoder_heads=2, norm_pix_loss=mae_model.norm_pix_loss, mask_ratio=mask_ratio)
    torch.save({"model": mae_model.state_dict(), "args": args}, path)
    return str(path)


def read_png(path):
    """The PNG as (H, W, 3) uint8 at the images' own resolution (the nearest enlargement undone)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))[::SCALE, ::SCALE]


def tile(picture, row, column, size=IMG):
    return picture[row * size:(row + 1) * size, column * size:(column + 1) * size]


def removed_by_hand(count, slots, mask_ratio, seed=0):
    """(count, slots) bool, True = removed: FAIR's rule, the patches of the smallest noise kept."""
    noise = torch.rand(count, slots, generator=torch.Generator().manual_seed(seed))
    removed = torch.ones(count, slots, dtype=torch.bool)
    kept = noise.argsort(dim=1)[:, :int(slots * (1 - mask_ratio))]
    removed[torch.arange(count)[:, None], kept] = False
    return removed


def patch_pixels(picture, index, grid=IMG // PATCH, patch=PATCH):
    i, j = divmod(index, grid)
    return picture[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]


def test_recon_of_our_checkpoint_greys_removed_patches_and_pastes_visible_ones_back(
        tmp_path, micro, capsys):
    ckpt = save_ours(tmp_path / "checkpoint.pth", micro_mae())
    analyze.main(["recon", "--ckpt", ckpt, "--num-images", "3", "--out-dir", str(tmp_path)])
    assert "norm-pix on: the run's args say norm_pix_loss=True" in capsys.readouterr().out
    with Image.open(tmp_path / "recon.png") as img:
        assert img.size == (3 * IMG * SCALE, 3 * IMG * SCALE)  # 3 columns x 3 rows, enlarged
    picture = read_png(tmp_path / "recon.png")
    removed = removed_by_hand(3, 16, 0.75)
    assert removed.sum() == 3 * 12
    for b in range(3):
        original, masked, recon = (tile(picture, r, b) for r in range(3))
        for index in range(16):
            if removed[b, index]:
                assert (patch_pixels(masked, index) == GREY).all()
            else:
                assert (patch_pixels(masked, index) == patch_pixels(original, index)).all()
                assert (patch_pixels(recon, index) == patch_pixels(original, index)).all()
        changed = [not (patch_pixels(recon, i) == patch_pixels(original, i)).all()
                   for i in range(16) if removed[b, i]]
        assert sum(changed) >= 10  # removed patches show the prediction, not the original


def test_norm_pix_on_and_off_are_the_hand_de_normalisation_and_the_raw_prediction(tmp_path):
    torch.manual_seed(1)
    net = mae_model.MAE(embed_dim=32, depth=2, num_heads=2, img_size=IMG, patch_size=PATCH,
                        decoder_dim=32, decoder_depth=1, decoder_heads=2)
    imgs = 0.5 * torch.randn(2, 3, IMG, IMG) + 1.0  # patch statistics far from (0, 1)
    mask = viewers.reconstruction_figure(net, imgs, 0.75, tmp_path / "both.png", seed=3,
                                         norm_pix="both")
    assert torch.equal(mask.bool(), removed_by_hand(2, 16, 0.75, seed=3))
    assert net.training  # left in the mode it was called in (mae.py calls it mid-run)
    net.eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    pred = net(imgs, 0.75, noise)["pred"].detach()  # (B, L, p*p*3), (p, q, c) order
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    to_pixels = lambda x: ((x * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()  # noqa
    picture = read_png(tmp_path / "both.png")
    assert picture.shape == (4 * IMG, 2 * IMG, 3)  # originals, masked, de-normalised, raw
    for b in range(2):
        for index in torch.nonzero(mask[b]).flatten().tolist():
            i, j = divmod(index, IMG // PATCH)
            truth = imgs[b, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH]  # (3, p, p)
            raw = pred[b, index].view(PATCH, PATCH, 3).permute(2, 0, 1)  # (3, p, p)
            denormalised = raw * (truth.var() + 1e-6) ** 0.5 + truth.mean()  # the patch's stats
            on = patch_pixels(tile(picture, 2, b), index).astype(float)
            off = patch_pixels(tile(picture, 3, b), index).astype(float)
            assert np.abs(on - to_pixels(denormalised)).max() <= 1
            assert np.abs(off - to_pixels(raw)).max() <= 1
            assert np.abs(on - off).max() > 5


def test_recon_of_fair_files_follows_their_names_and_the_model_defaults(tmp_path, micro, capsys):
    state = micro_mae().state_dict()  # FAIR's files: the state dict alone, no args
    for name, mode in (("mae_pretrain_micro_full.pth", "on"), ("mae_visualize_micro.pth", "off")):
        torch.save({"model": state}, tmp_path / name)
        out = tmp_path / mode
        analyze.main(["recon", "--ckpt", str(tmp_path / name), "--num-images", "2",
                      "--out-dir", str(out)])
        printed = capsys.readouterr().out
        assert "vit_micro with a 32 x 2 x 2 decoder" in printed  # preset and decoder inferred
        assert f"norm-pix {mode}" in printed and "mask ratio 0.5" in printed
        picture = read_png(out / "recon.png")
        masked = [tile(picture, 1, b) for b in range(2)]
        grey = sum((patch_pixels(m, i) == GREY).all() for m in masked for i in range(16))
        assert grey == 2 * 8  # vit_micro's pre-training mask ratio, 0.5
    assert not np.array_equal(read_png(tmp_path / "on" / "recon.png"),
                              read_png(tmp_path / "off" / "recon.png"))


def test_recon_of_an_official_hiera_file_matches_ours(tmp_path, micro):
    torch.manual_seed(0)
    net = presets.build_mae("hiera_micro", img_size=64, decoder_dim=16, decoder_depth=1,
                            decoder_heads=2)
    ours = tmp_path / "ours.pth"
    torch.save({"model": net.state_dict(),
                "args": dict(model="hiera_micro", img_size=64, decoder_heads=2)}, ours)
    official = dict(net.state_dict())
    p = net.recon_patch
    for key in ("decoder_pred.weight", "decoder_pred.bias"):  # rows in Hiera's (c, p, q) order
        rows = official[key]
        official[key] = rows.reshape(p, p, 3, -1).permute(2, 0, 1, 3).reshape(rows.shape)
    torch.save({"model_state": official}, tmp_path / "official.pth")
    for name in ("ours", "official"):
        analyze.main(["recon", "--ckpt", str(tmp_path / f"{name}.pth"), "--decoder-heads", "2",
                      "--mask-ratio", "0.5", "--num-images", "2", "--out-dir",
                      str(tmp_path / name)])
    with Image.open(tmp_path / "ours" / "recon.png") as a, \
            Image.open(tmp_path / "official" / "recon.png") as b:
        assert a.size == (2 * 64, 3 * 64)  # 64 px images are not enlarged (96 // 64 = 1)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_recon_refuses_an_encoder_only_file_in_one_line(tmp_path, micro):
    path = tmp_path / "encoder.pth"
    torch.save({"model": mae_model.encoder_state_dict(micro_mae())}, path)
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["recon", "--ckpt", str(path), "--out-dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "has no decoder: recon needs a pre-training checkpoint with the decoder" in message


def test_images_from_files_and_a_corrupt_one(tmp_path, micro):
    ckpt = save_ours(tmp_path / "checkpoint.pth", micro_mae())
    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate([(40, 50), (32, 32)]):  # any size: resized and centre-cropped
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(files[-1])
    analyze.main(["recon", "--ckpt", ckpt, "--images", *files, "--out-dir", str(tmp_path)])
    with Image.open(tmp_path / "recon.png") as img:
        assert img.size == (2 * IMG * SCALE, 3 * IMG * SCALE)
    original = tile(read_png(tmp_path / "recon.png"), 0, 1)
    expected = viewers.read_images([files[1]], IMG)  # 32 px: resized to 36, cropped to 32
    assert np.abs(original.astype(float) -
                  (augment.denormalize(expected)[0] * 255).permute(1, 2, 0).numpy()).max() <= 1
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    for bad, words in (("bad.jpg", "cannot read image"), ("missing.png", "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(["recon", "--ckpt", ckpt, "--images", files[0], str(tmp_path / bad),
                          "--out-dir", str(tmp_path)])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and words in message and "\n" not in message


def test_cls_attention_maps_against_attention_by_hand():
    torch.manual_seed(0)
    vit = model.ViT(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2).eval()
    imgs = torch.randn(3, 3, IMG, IMG)
    maps = viewers.cls_attention_maps(vit, imgs, 1)
    assert maps.shape == (3, 1 + 2, 4, 4)
    with torch.no_grad():  # block 1 by hand: softmax(q k^T / sqrt(d)) of the cls query
        x = vit.blocks[0].norm1(vit.prepend_cls(vit.embed(imgs)))  # (B, 1 + L, D)
        qkv = vit.blocks[0].attn.qkv(x).view(3, 17, 3, 2, 16)  # (B, N, q/k/v, heads, hd)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, heads, N, hd)
        k = qkv[:, :, 1].transpose(1, 2)
        probs = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(dim=-1)  # (B, heads, N, N)
    heads = probs[:, :, 0, 1:].reshape(3, 2, 4, 4)  # cls row, patch columns, on the grid
    assert torch.allclose(maps[:, 1:], heads, atol=1e-6)
    assert torch.allclose(maps[:, 0], heads.mean(dim=1), atol=1e-6)
    last = viewers.cls_attention_maps(vit, imgs, 2)
    _, _, logits = vit.forward_features(imgs, return_attn=[2])
    assert torch.allclose(last[:, 1:].flatten(2), logits[2][:, :, 0].softmax(-1)[:, :, 1:])
    assert torch.allclose(last[:, 0], last[:, 1:].mean(dim=1))
    assert not torch.allclose(last, maps)


def test_attnmap_cli_size_and_bad_requests(tmp_path, micro, capsys):
    ckpt = save_ours(tmp_path / "checkpoint.pth", micro_mae())  # an MAE file: decoder dropped
    analyze.main(["attnmap", "--ckpt", ckpt, "--num-images", "3", "--out-dir", str(tmp_path)])
    assert "block 2 of 2" in capsys.readouterr().out
    with Image.open(tmp_path / "attnmap.png") as img:
        assert img.size == ((2 + 2) * IMG * SCALE, viewers.LABEL_STRIP + 3 * IMG * SCALE)
        picture = np.asarray(img.convert("RGB"))[viewers.LABEL_STRIP:]
    images = picture[:, :IMG * SCALE]
    overlays = picture[:, IMG * SCALE:]
    assert np.abs(overlays[:, :IMG * SCALE].astype(int) - images).max() > 50  # heat laid over
    hiera_file = tmp_path / "hiera.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 256, 8)}, "args": {"model": "hiera_micro"}},
               hiera_file)
    for argv, words in ((["--ckpt", str(hiera_file)], "has no cls token"),
                        (["--ckpt", ckpt, "--block", "3"], "--block 3 is beyond vit_micro's 2")):
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(["attnmap", *argv, "--out-dir", str(tmp_path)])
        assert words in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # NaN as json.dumps writes it
    return str(path)


def test_curves_of_a_mae_and_a_finetune_log(tmp_path):
    mae_log = write_jsonl(tmp_path / "mae.jsonl", [
        dict(step=s, epoch=1 + s // 4, loss=2.0 / s, recon_loss=1.5 / s, distill_loss=0.5 / s,
             lr=1e-4 * s, images_per_s=100.0, skipped_images=0) for s in range(1, 9)])
    ft_log = write_jsonl(tmp_path / "ft.jsonl", [
        dict(step=2, epoch=1, loss=2.3, lr=1e-4, images_per_s=50.0),
        dict(step=4, epoch=1, loss=2.1, lr=2e-4, images_per_s=50.0),
        dict(epoch=1, step=4, top1=30.0, top5=80.0, val_loss=1.9, images=64, best_top1=30.0),
        dict(step=6, epoch=2, loss=1.8, lr=1e-4, images_per_s=50.0),
        dict(epoch=2, step=6, top1=45.0, top5=90.0, loss=1.6, images=64, best_top1=45.0)])
    runs = {"mae": viewers.read_log(mae_log), "ft": viewers.read_log(ft_log)}
    (loss_title, loss_x, loss), (_, _, lr), (top1_title, top1_x, top1) = viewers.curve_panels(runs)
    assert (loss_x, top1_x) == ("step", "epoch") and "top-1" in top1_title
    assert loss["ft"] == [(2, 2.3), (4, 2.1), (6, 1.8)]  # evaluation lines are not training loss
    assert lr["mae"][-1] == (8, pytest.approx(8e-4))
    assert top1 == {"mae": [], "ft": [(1, 30.0), (2, 45.0)]}
    png = tmp_path / "curves.png"
    analyze.main(["curves", mae_log, ft_log, "--labels", "pre-training", "fine-tuning",
                  "--out", str(png)])
    with Image.open(png) as img:
        assert img.size == (3 * 520, 300)  # loss, lr, top-1 side by side
    analyze.main(["curves", mae_log, "--out", str(png)])
    with Image.open(png) as img:
        assert img.size == (2 * 520, 300)  # no evaluation records: no top-1 panel


def test_write_curves_tolerates_one_record_and_nan_and_refuses_bad_logs(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [dict(step=1, epoch=1, loss=2.0, lr=1e-4)])
    nan = write_jsonl(tmp_path / "nan.jsonl", [
        dict(step=1, epoch=1, loss=2.0, lr=1e-4), dict(step=2, epoch=1, loss=float("nan"), lr=2e-4),
        dict(step=3, epoch=1, loss=float("inf"), lr=float("nan")),
        dict(epoch=1, step=3, top1=float("nan"), best_top1=0.0)])
    viewers.write_curves([one, nan], tmp_path / "sub" / "curves.png")
    assert (tmp_path / "sub" / "curves.png").stat().st_size > 0
    panels = viewers.curve_panels({"nan": viewers.read_log(nan)})
    assert panels[0][2]["nan"] == [(1, 2.0)] and panels[1][2]["nan"] == [(1, 1e-4), (2, 2e-4)]
    assert len(panels) == 2  # its only evaluation record is NaN
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    (tmp_path / "torn.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    for path, words in ((tmp_path / "missing.jsonl", "does not exist"),
                        (tmp_path / "torn.jsonl", "line 2 is not a JSON object"),
                        (empty, "holds no records")):
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(["curves", str(path), "--out", str(tmp_path / "x.png")])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and words in message and "\n" not in message


def test_study_draws_with_the_shared_line_plot():
    import study_report

    assert study_report.draw_curves is viewers.draw_curves


def test_trust_checkpoint_reaches_every_reader(tmp_path, micro):
    import datetime

    path = tmp_path / "pickled.pth"
    torch.save({"model": micro_mae().state_dict(), "written": datetime.date(2024, 1, 1)}, path)
    for command in (["recon"], ["attnmap"]):
        argv = [*command, "--ckpt", str(path), "--model", "vit_micro", "--num-images", "2",
                "--out-dir", str(tmp_path)]
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(argv)
        assert "--trust-checkpoint" in str(exit_info.value.code)  # checkpoints.py's message: the fix
        analyze.main([*argv, "--trust-checkpoint"])
    for command in (["cka", "--a", "x.pth"], ["attn"]):
        assert analyze.get_parser().parse_args([*command, "--trust-checkpoint"]).trust_checkpoint


def test_a_flat_series_of_huge_values_is_drawn(tmp_path):
    """x0 + 1 == x0 once |x0| > 1e16: a flat run of a diverged loss must still draw."""
    for value in (1e20, -1e20, 0.0, 3.0):
        img = viewers.draw_curves({"run": [(1, value), (2, value)], "flat x": [(5e17, value)]},
                                  "loss", tmp_path / "c.png")
        assert img.size == (520, 300) and (tmp_path / "c.png").stat().st_size > 0
