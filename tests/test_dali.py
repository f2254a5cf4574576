"""--loader dali (dali_loader.py) on the CPU: its crops against the pil path's, measured from
the pixels of gradient images (the oracle: each output pixel says where in the source it came
from); labels and each rank's shard checked through solid colours; MoCo-v3's two views and
fine-tuning's colour jitter and random erasing against the pil path's statistics; tiny runs of
moco.py (resumed exactly) and finetune.py (mae.py's run and resume: test_mae.py, beside the
device loader's); unreadable and undecodable files; the one-line errors without DALI."""
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
import finetune
import mae
import moco
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


def mae_loader(root, batch, seed=0, min_scale=0.2, interpolation="bicubic", num_workers=1,
               rank=0, world_size=1):
    samples = data.image_files("imagefolder", str(root), "train").samples
    return dali_loader.DaliLoader(
        samples, batch, seed, torch.device("cpu"),
        dali_loader.mae_graph(S, min_scale, interpolation),
        augment.pretrain_transform(S, min_scale, interpolation), (3, S, S), rank, world_size,
        num_workers)


def test_dali_crops_have_the_pil_paths_statistics(tmp_path):
    write_gradients(tmp_path, 64)
    transform = augment.pretrain_transform(S, 0.2, "random")
    loader = mae_loader(tmp_path, 32, min_scale=0.2, interpolation="random", num_workers=2)
    dali = torch.cat([x for e in range(8) for x, _ in loader.epoch(e)])  # 512 crops
    torch.manual_seed(0)
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


def write_solid(root, colours):
    """One 40x48 JPEG (quality 100) of one colour for each (class, (r, g, b)) in `colours`."""
    for i, (label, rgb) in enumerate(colours):
        os.makedirs(root / "train" / label, exist_ok=True)
        pixels = np.broadcast_to(np.array(rgb, dtype=np.uint8), (40, 48, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(root / "train" / label / f"{i}.jpg",
                                                           quality=100)


def colours_of(images):
    """(N, 3) mean RGB in grey levels of (N, 3, S, S) normalised images."""
    mean = torch.tensor(augment.IMAGENET_MEAN)
    std = torch.tensor(augment.IMAGENET_STD)
    return (images.mean((2, 3)) * std + mean) * 255


def test_dali_epochs_repeat_by_seed_epoch_and_rank_and_shard_as_the_sampler(tmp_path):
    write_solid(tmp_path, [("a", (15 * i, 100, 200)) for i in range(16)])  # red says which

    def epoch(e, rank=0, seed=0):
        loader = mae_loader(tmp_path, 4, seed=seed, rank=rank, world_size=2)
        return torch.cat([x for x, _ in loader.epoch(e)])

    first = epoch(1)
    assert first.shape == (8, 3, S, S)  # rank 0's half of 16 images
    assert torch.equal(first, epoch(1))  # a new loader (a resumed run) gives the same crops
    for other in (epoch(2), epoch(1, seed=1)):
        assert not torch.equal(first, other)
    files = [int(path.split("/")[-1][:-4]) for path, _ in
             data.image_files("imagefolder", str(tmp_path), "train").samples]
    for rank in (0, 1):  # each rank's images, in DistributedSampler's order for (seed, epoch)
        sampler = torch.utils.data.DistributedSampler(range(16), 2, rank, seed=0, drop_last=True)
        sampler.set_epoch(1)
        red = colours_of(epoch(1, rank=rank))[:, 0]
        assert (red / 15).round().long().tolist() == [files[i] for i in sampler]


def test_dali_skips_what_nothing_can_decode_and_sends_the_rest_to_pil(tmp_path, capsys):
    write_gradients(tmp_path, 12)
    folder = tmp_path / "train" / "a"
    whole = (folder / "0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[:len(whole) // 2])  # PIL refuses it too
    (folder / "noise.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9")
    (folder / "text.jpg").write_bytes(b"not an image")
    Image.open(folder / "0.jpg").save(folder / "png.jpg", format="PNG")  # PIL reads it
    loader = mae_loader(tmp_path, 16)
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
    loader = mae_loader(tmp_path, 4, min_scale=0.9)
    red = torch.cat([x for x, _ in loader.epoch(0)])[:, 0]  # the column gradient of the stored
    along_width = (red[:, :, -1] - red[:, :, 0]).abs().mean()  # image, upright: down the rows
    along_height = (red[:, -1, :] - red[:, 0, :]).abs().mean()
    assert along_height > 3 and along_width < 0.1  # measured 4.05 and 0.006


def colour_stats(views):
    """Per image (N, 3, S, S) normalised: (is grey: channels equal, mean grey level, contrast:
    the std of its grey levels)."""
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    x = (views * std + mean) * 255
    grey = (x.amax(1) - x.amin(1)).amax((1, 2)) < 4
    return grey.float(), x.mean((1, 2, 3)), x.mean(1).std((1, 2))


def test_dali_moco_views_have_the_pil_paths_statistics(tmp_path):
    import bench_data

    bench_data.write_jpegs(str(tmp_path / "train"), 64)  # smooth colour images
    samples = data.image_files("imagefolder", str(tmp_path), "train").samples
    views = augment.MocoViews(S, 0.08)
    loader = dali_loader.DaliLoader(samples, 32, 0, torch.device("cpu"),
                                    dali_loader.moco_graph(S, 0.08), views, (2, 3, S, S),
                                    num_workers=2)
    dali = torch.cat([x for e in range(6) for x, _ in loader.epoch(e)])  # (384, 2, 3, S, S)
    torch.manual_seed(0)
    pil = torch.stack([views(data.load_rgb(samples[i % 64][0])) for i in range(384)])
    assert dali.shape == pil.shape
    for v in (0, 1):
        (grey_d, mean_d, contrast_d), (grey_p, mean_p, contrast_p) = \
            colour_stats(dali[:, v]), colour_stats(pil[:, v])
        # greyscale with p 0.2 (+ saturation 0.8 of the time never greys): 0.2 each, 4 SE apart
        assert abs(grey_d.mean() - 0.2) < 0.08 and abs(grey_p.mean() - 0.2) < 0.08
        n = len(mean_d)
        for a, b in ((mean_d, mean_p), (contrast_d, contrast_p)):
            assert abs(a.mean() - b.mean()) < 4 * ((a.var() + b.var()) / n).sqrt(), (v, a, b)


def test_dali_random_erasing_erases_as_often_and_as_much_as_timms(tmp_path):
    write_gradients(tmp_path, 64)
    samples = data.image_files("imagefolder", str(tmp_path), "train").samples
    args = finetune.parse_args(["--img-size", str(S), "--patch-size", "4", "--rand-aug", "0",
                                "--color-jitter", "0", "--reprob", "0.5", "--min-crop-scale",
                                "0.5", "--out-dir", str(tmp_path / "unused")])
    transform = augment.train_transform(args)
    graph = dali_loader.finetune_graph(S, 0.5, 0.0, 0.5)
    loader = dali_loader.DaliLoader(samples, 32, 0, torch.device("cpu"), graph, transform,
                                    (3, S, S), num_workers=2)
    dali = torch.cat([x for e in range(8) for x, _ in loader.epoch(e)])
    torch.manual_seed(0)
    source = data.load_rgb(samples[0][0])
    pil = torch.stack([transform(source) for _ in range(512)])

    def erased(x):  # the fraction of each image that is noise: a gradient is smooth
        return ((x[:, :, :, 1:] - x[:, :, :, :-1]).abs().amax(1) > 0.5).float().mean((1, 2))

    for x in (dali, pil):
        assert abs((erased(x) > 0.01).float().mean() - 0.5) < 0.1  # one image in two
    d, p = erased(dali)[erased(dali) > 0.01], erased(pil)[erased(pil) > 0.01]
    assert abs(d.mean() - p.mean()) < 4 * (d.var() / len(d) + p.var() / len(p)).sqrt()


def test_moco_and_finetune_run_with_dali(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs" / "train", per_class=8, corrupt=1)
    write_image_folder(tmp_path / "imgs" / "val", per_class=2, corrupt=0)
    folder = ["--data", "imagefolder", "--data-root", str(tmp_path / "imgs"), "--loader", "dali",
              "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--num-workers",
              "1", "--log-every", "1", "--compile", "off", "--epochs", "2", "--save-every", "1",
              "--warmup-epochs", "1"]
    run = folder + ["--mlp-dim", "32", "--out-dim", "16"]
    moco.main(run + ["--out-dir", str(tmp_path / "straight")])
    moco.main(run + ["--out-dir", str(tmp_path / "resumed"),
                     "--resume", str(tmp_path / "straight" / "checkpoint-1.pth")])
    straight = [r for r in map(json.loads, open(tmp_path / "straight" / "log.jsonl"))
                if "loss" in r]
    resumed = [r for r in map(json.loads, open(tmp_path / "resumed" / "log.jsonl"))
               if "loss" in r]
    assert len(straight) == 8 and [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(straight[4:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    with pytest.raises(SystemExit):
        finetune.main(folder + ["--out-dir", str(tmp_path / "ft")])
    assert "--loader dali has no RandAugment" in capsys.readouterr().err
    finetune.main(folder + ["--rand-aug", "0", "--out-dir", str(tmp_path / "ft")])
    log = [r for r in map(json.loads, open(tmp_path / "ft" / "log.jsonl")) if "loss" in r]
    assert len(log) == 8 and log[-1]["skipped_images"] == 2


def test_dali_labels_follow_their_images_through_dali_and_pil(tmp_path):
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # labels 0, 1, 2
    write_solid(tmp_path, [(c, colours[c]) for c in colours for _ in range(4)])
    Image.new("RGB", (40, 48), colours["green"]).save(tmp_path / "train" / "green" / "p.jpg",
                                                      format="PNG")  # PIL decodes it
    (tmp_path / "train" / "red" / "noise.jpg").write_bytes(  # fails DALI's whole batch
        b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9")
    loader = mae_loader(tmp_path, 7, min_scale=0.5)
    bad = data.BadImages(max_fraction=1.0)
    seen = 0
    for epoch in range(4):
        for images, labels in loader.epoch(epoch, bad):
            channel = colours_of(images).argmax(1)  # red 0, green 1, blue 2
            assert channel.tolist() == [2 - label for label in labels.tolist()]
            seen += len(labels)
    assert (seen, bad.skipped) == (4 * 13, 4)


def test_dali_moco_jitter_is_one_coin_for_all_four_factors(tmp_path):
    write_solid(tmp_path, [("a", (200, 120, 60))] * 64)
    samples = data.image_files("imagefolder", str(tmp_path), "train").samples
    views = augment.MocoViews(S, 0.08)
    loader = dali_loader.DaliLoader(samples, 32, 0, torch.device("cpu"),
                                    dali_loader.moco_graph(S, 0.08), views, (2, 3, S, S),
                                    num_workers=2)
    dali = torch.cat([x for e in range(8) for x, _ in loader.epoch(e)])[:, 0]  # view 1: 512
    torch.manual_seed(0)
    source = data.load_rgb(samples[0][0])
    pil = torch.stack([views(source)[0] for _ in range(512)])
    for x in (dali, pil):  # neither jittered (0.2) nor grey (0.8): 0.16 of the views
        unchanged = (colours_of(x) - torch.tensor([200.0, 120.0, 60.0])).abs().amax(1) < 3
        assert abs(unchanged.float().mean() - 0.16) < 0.07  # 4 standard errors


def test_dali_finetune_colour_jitter_spreads_brightness_as_the_pil_path(tmp_path):
    # middle grey: contrast (about the image's mean grey, or DALI's 128) and saturation idle
    write_solid(tmp_path, [("a", (128, 128, 128))] * 64)
    samples = data.image_files("imagefolder", str(tmp_path), "train").samples
    args = finetune.parse_args(["--img-size", str(S), "--patch-size", "4", "--rand-aug", "0",
                                "--color-jitter", "0.4", "--reprob", "0", "--out-dir",
                                str(tmp_path / "unused")])
    transform = augment.train_transform(args)
    loader = dali_loader.DaliLoader(samples, 32, 0, torch.device("cpu"),
                                    dali_loader.finetune_graph(S, 0.08, 0.4, 0.0), transform,
                                    (3, S, S), num_workers=2)
    dali = colours_of(torch.cat([x for e in range(8) for x, _ in loader.epoch(e)]))[:, 0]
    torch.manual_seed(0)
    source = data.load_rgb(samples[0][0])
    pil = colours_of(torch.stack([transform(source) for _ in range(512)]))[:, 0]
    for x in (dali, pil):  # brightness x U(0.6, 1.4) of grey 128: 77..179, std 128 * 0.23
        assert x.min() > 77 - 3 and x.max() < 179 + 3 and abs(x.std() - 29.6) < 4
    assert abs(dali.mean() - pil.mean()) < 4 * ((dali.var() + pil.var()) / 512).sqrt()


def test_a_pipeline_dali_cannot_build_is_one_line(tmp_path, monkeypatch):
    from nvidia.dali.pipeline import Pipeline

    def refuse(self):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\n"
                           "C++ context: ...")
    write_gradients(tmp_path, 4)
    monkeypatch.setattr(Pipeline, "build", refuse)
    with pytest.raises(data.DataError) as e:
        list(mae_loader(tmp_path, 4).epoch(0))
    assert str(e.value).startswith("DALI cannot build its pipeline on cpu (CUDA driver version "
                                   "is insufficient") and "\n" not in str(e.value)
