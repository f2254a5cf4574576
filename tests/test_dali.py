"""--loader dali (dali_loader.py) on the CPU: its crops against the pil path's, measured from
the pixels of gradient images (the oracle: each output pixel says where in the source it came
from); a tiny pre-training and its exact resume; unreadable and undecodable files; the one line
a user without DALI gets."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import dali_loader
import data
import mae
from test_data import write_image_folder

W, H, S = 160, 120, 32  # source width, height; crop size


def write_gradients(root, count):
    """JPEGs whose red channel is the column (0..255 left to right) and green the row."""
    os.makedirs(root / "train" / "a", exist_ok=True)
    red = np.broadcast_to(np.linspace(0, 255, W)[None, :], (H, W))
    green = np.broadcast_to(np.linspace(0, 255, H)[:, None], (H, W))
    pixels = np.stack([red, green, np.full((H, W), 128.0)], -1).round().astype(np.uint8)
    for i in range(count):
        Image.fromarray(pixels).save(root / "train" / "a" / f"{i}.jpg", quality=98)


def crop_geometry(images):
    """(relative area, pixel aspect ratio w / h, flipped) of each (3, S, S) normalised crop of a
    gradient image, from its edge columns' red and edge rows' green."""
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    x = (images * std + mean) * 255  # (N, 3, S, S) in grey levels
    # the edge pixels average half an output pixel inwards: scale the spans back by S / (S - 1)
    width = (x[:, 0, :, -1] - x[:, 0, :, 0]).mean(1) / 255 * S / (S - 1)  # signed: < 0 flipped
    height = (x[:, 1, -1, :] - x[:, 1, 0, :]).mean(1) / 255 * S / (S - 1)
    return width.abs() * height, width.abs() * W / (height * H), width < 0


def test_dali_crops_have_the_pil_paths_statistics(tmp_path):
    write_gradients(tmp_path, 64)
    loader = dali_loader.DaliLoader(str(tmp_path), 32, seed=0, device=torch.device("cpu"),
                                    img_size=S, min_scale=0.2, num_workers=2,
                                    interpolation="random")
    dali = torch.cat([x for e in range(8) for x, _ in loader.epoch(e)])  # 512 crops
    torch.manual_seed(0)
    transform = augment.pretrain_transform(S, 0.2, "random")
    source = Image.open(tmp_path / "train" / "a" / "0.jpg").convert("RGB")
    pil = torch.stack([transform(source) for _ in range(512)])
    (area_d, aspect_d, flip_d), (area_p, aspect_p, flip_p) = map(crop_geometry, (dali, pil))
    for area, aspect in ((area_d, aspect_d), (area_p, aspect_p)):  # within the asked ranges
        assert area.min() > 0.2 - 0.03 and area.max() < 1 + 0.03
        assert aspect.min() > 3 / 4 - 0.05 and aspect.max() < 4 / 3 + 0.05
    # the same distributions: means within 4 standard errors (area ~U(0.2, 1): SE 0.014 apart)
    assert abs(area_d.mean() - area_p.mean()) < 4 * (area_d.var() / 512 + area_p.var() / 512).sqrt()
    log_d, log_p = aspect_d.log(), aspect_p.log()
    assert abs(log_d.mean() - log_p.mean()) < 4 * (log_d.var() / 512 + log_p.var() / 512).sqrt()
    assert abs(flip_d.float().mean() - 0.5) < 0.1 and abs(flip_p.float().mean() - 0.5) < 0.1
    # and the same mean image (measured 0.024 apart in normalised units; crops of at least 0.6
    # of the image instead of 0.2 put it 0.082 away)
    assert (dali.mean(0) - pil.mean(0)).abs().mean() < 0.05


def test_dali_epochs_repeat_by_seed_epoch_and_rank(tmp_path):
    write_gradients(tmp_path, 16)

    def epoch(e, rank=0, seed=0):
        loader = dali_loader.DaliLoader(str(tmp_path), 4, seed=seed, device=torch.device("cpu"),
                                        img_size=S, rank=rank, world_size=2, num_workers=1)
        return torch.cat([x for x, _ in loader.epoch(e)])

    first = epoch(1)
    assert first.shape == (8, 3, S, S)  # rank 0's half of 16 images
    assert torch.equal(first, epoch(1))  # a new loader (a resumed run) gives the same crops
    for other in (epoch(2), epoch(1, rank=1), epoch(1, seed=1)):
        assert not torch.equal(first, other)


def test_dali_pretraining_runs_and_resumes_exactly(tmp_path):
    write_image_folder(tmp_path / "imgs" / "train", per_class=8, corrupt=1)
    run = ["--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--log-every", "1",
           "--data", "imagefolder", "--data-root", str(tmp_path / "imgs"), "--loader", "dali",
           "--num-workers", "1", "--epochs", "2", "--save-every", "1", "--warmup-epochs", "1"]
    mae.main(run + ["--out-dir", str(tmp_path / "straight")])
    mae.main(run + ["--out-dir", str(tmp_path / "resumed"),
                    "--resume", str(tmp_path / "straight" / "checkpoint-1.pth")])

    def losses(folder):
        return [r for r in map(json.loads, open(tmp_path / folder / "log.jsonl")) if "loss" in r]

    straight, resumed = losses("straight"), losses("resumed")
    assert len(straight) == 8 and straight[-1]["skipped_images"] == 2  # 1 bad file per epoch
    assert [r["step"] for r in straight[4:]] == [r["step"] for r in resumed]
    for a, b in zip(straight[4:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6


def test_dali_skips_what_nothing_can_decode_and_sends_the_rest_to_pil(tmp_path, capsys):
    write_gradients(tmp_path, 12)
    folder = tmp_path / "train" / "a"
    whole = (folder / "0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[:len(whole) // 2])  # PIL refuses it too
    (folder / "noise.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9")
    (folder / "text.jpg").write_bytes(b"not an image")
    Image.open(folder / "0.jpg").save(folder / "png.jpg", format="PNG")  # PIL reads it
    loader = dali_loader.DaliLoader(str(tmp_path), 16, seed=0, device=torch.device("cpu"),
                                    img_size=S, num_workers=1)
    bad = data.BadImages(max_fraction=1.0)
    images = torch.cat([x for x, _ in loader.epoch(0, bad)])
    assert (bad.skipped, bad.seen) == (3, 16) and images.shape == (13, 3, S, S)
    assert images.isfinite().all() and capsys.readouterr().err.count("skipping") == 3
    # the noise file fails DALI's whole batch: the batch's good images still come, through PIL
    area, aspect, _ = crop_geometry(images)
    assert ((area > 0.2 - 0.03) & (area < 1.03)).all()


def test_without_dali_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "imgs" / "train", per_class=2, corrupt=0)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali fails
    with pytest.raises(SystemExit) as e:
        mae.main(["--img-size", "16", "--patch-size", "4", "--data", "imagefolder",
                  "--data-root", str(tmp_path / "imgs"), "--loader", "dali",
                  "--out-dir", str(tmp_path / "run")])
    assert str(e.value).startswith("error: --loader dali needs NVIDIA DALI: pip install "
                                   "nvidia-dali-cuda130") and "\n" not in str(e.value)


def test_dali_turns_images_upright_by_their_exif_orientation(tmp_path):
    write_gradients(tmp_path, 4)
    for path in (tmp_path / "train" / "a").iterdir():  # stored sideways: "rotate 90 to view"
        image = Image.open(path)
        exif = image.getexif()
        exif[0x0112] = 6
        image.save(path, exif=exif, quality=98)
    loader = dali_loader.DaliLoader(str(tmp_path), 4, seed=0, device=torch.device("cpu"),
                                    img_size=S, min_scale=0.9, num_workers=1)
    red = torch.cat([x for x, _ in loader.epoch(0)])[:, 0]  # the column gradient of the stored
    along_width = (red[:, :, -1] - red[:, :, 0]).abs().mean()  # image, upright: down the rows
    along_height = (red[:, -1, :] - red[:, 0, :]).abs().mean()
    assert along_height > 3 and along_width < 0.1  # measured 4.05 and 0.006
