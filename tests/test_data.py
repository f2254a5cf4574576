"""Datasets, transforms, skipping corrupt images, clear errors on missing data."""
import gzip
import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import augment
import data
import device_loader


def write_image_folder(root, classes=("cat", "dog"), per_class=4, size=40, corrupt=1):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.jpg", quality=90)
    for i in range(corrupt):
        (root / classes[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_synthetic_is_deterministic_and_labelled():
    ds = data.SyntheticShapes(30, 32)
    img_a, label_a = ds[7]
    img_b, label_b = ds[7]
    assert img_a.size == (32, 32) and label_a == label_b == 7
    assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert not np.array_equal(np.asarray(ds[8][0]), np.asarray(img_a))
    assert sorted({ds[i][1] for i in range(30)}) == list(range(10))
    val = data.SyntheticShapes(30, 32, split="val")
    assert not np.array_equal(np.asarray(val[7][0]), np.asarray(img_a))


def test_pretrain_transform_output():
    ds = data.build_dataset("synthetic", transform=augment.pretrain_transform(32), img_size=48)
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert -2.2 < img.min() and img.max() < 2.7  # ImageNet-normalised range


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_uint8_crops_normalised_as_a_batch_equal_the_float_path(jitter):
    """mae.py's pil loader: workers stop at uint8 crops, `normalize` scales and normalises the
    batch on the device. Same seed, same crop; the numbers are the float path's, and both are
    (x / 255 - mean) / std worked out in float64 (within float32 rounding)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    floats = augment.pretrain_transform(16, 0.2, "random", jitter)(img)
    torch.manual_seed(0)
    crops = augment.pretrain_transform(16, 0.2, "random", jitter, uint8=True)(img)
    assert crops.dtype == torch.uint8 and crops.shape == floats.shape
    batch = torch.stack([crops, crops])  # (2, [views,] 3, 16, 16), as collated
    assert torch.equal(augment.normalize(batch)[1], floats)
    mean = torch.tensor(augment.IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    oracle = (crops.double() / 255 - mean) / std
    assert torch.allclose(floats.double(), oracle, atol=1e-6)


def test_image_folder_skips_corrupt_file(tmp_path, capsys):
    write_image_folder(tmp_path / "train")
    ds = data.build_dataset("imagefolder", str(tmp_path), "train", augment.pretrain_transform(32))
    assert len(ds) == 9
    bad_images = data.BadImages()
    loader = data.make_loader(ds, batch_size=3, epoch=0, seed=0, num_workers=0, drop_last=False,
                              bad_images=bad_images)
    shapes, labels = [], []
    for imgs, lab in loader:
        shapes.append(imgs.shape[1:])
        labels += lab.tolist()
    assert bad_images.state_dict() == {"skipped_images": 1, "seen_images": 9}
    assert len(labels) == 8 and set(labels) == {0, 1}
    assert all(s == (3, 32, 32) for s in shapes)
    assert "broken0.jpg" in capsys.readouterr().err


def test_too_many_bad_images_stop_the_run():
    data.BadImages().add(10, 100)  # within the tolerance
    data.BadImages().add(11, 10_000)  # a small fraction
    with pytest.raises(data.DataError, match="11 of 200 images could not be read"):
        data.BadImages(skipped=1, seen=100).add(10, 100)


def test_missing_and_empty_data_are_clear(tmp_path):
    with pytest.raises(data.DataError, match="--data-root"):
        data.build_dataset("imagefolder", str(tmp_path / "nowhere"), "val")
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(data.DataError, match="class folders"):
        data.build_dataset("imagefolder", str(tmp_path / "empty"), "train")
    with pytest.raises(data.DataError, match="--download"):
        data.build_dataset("cifar10", str(tmp_path), "train")
    with pytest.raises(data.DataError, match="--data-root"):
        data.build_dataset("cifar10", None, "train")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    ds = data.build_dataset("fashion_mnist", str(tmp_path), "val")
    img, label = ds[2]
    assert label == 9 and img.shape == (3, 28, 28)  # grayscale replicated to 3 channels
    assert torch.equal(img[0], img[2])
    assert torch.allclose(img[0] * 255, torch.tensor(images[2], dtype=torch.float32))
    with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
        data.build_dataset("fashion_mnist", str(tmp_path), "train")


def test_fashion_mnist_real_files(fmnist_slice):
    ds = data.build_dataset("fashion_mnist", fmnist_slice, "val")
    assert len(ds) == 1000 and ds[0][1] == 9 and ds[0][0].shape == (3, 28, 28)  # 9: ankle boot
    train = data.build_dataset("fashion_mnist", fmnist_slice, "train")
    assert len(train) == 2000 and [train[i][1] for i in range(5)] == [9, 0, 0, 3, 0]


def test_loader_order_depends_only_on_seed_and_epoch():
    ds = data.build_dataset("synthetic", transform=augment.pretrain_transform(16), synthetic_size=40,
                            img_size=16)

    def first_batch(epoch, workers):
        torch.manual_seed(123)  # augmentation RNG of the main process (workers=0)
        imgs, labels = next(iter(data.make_loader(ds, 8, epoch, 0, num_workers=workers)))
        return imgs, labels

    a, b = first_batch(1, 0), first_batch(1, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c, d = first_batch(1, 2), first_batch(1, 2)  # worker seeds come from (seed, epoch, rank)
    assert torch.equal(c[0], d[0])
    assert not torch.equal(first_batch(2, 0)[1], a[1])


def jpeg_with_orientation(orientation, size=(30, 20)):
    """A noisy JPEG (stored size w x h) whose EXIF says how to turn it upright."""
    pixels = np.random.default_rng(orientation).integers(0, 256, (size[1], size[0], 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_as_pils_exif_transpose(orientation):
    blob = torch.frombuffer(bytearray(jpeg_with_orientation(orientation)), dtype=torch.uint8)
    assert device_loader.exif_orientation(blob) == orientation
    stored = np.asarray(Image.open(io.BytesIO(blob.numpy().tobytes())).convert("RGB"))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob.numpy().tobytes())))
                         .convert("RGB"))
    ours = device_loader.apply_orientation(torch.from_numpy(stored.copy()).permute(2, 0, 1), orientation)
    assert torch.equal(ours.permute(1, 2, 0), torch.from_numpy(upright.copy()))


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_device_decoding_is_upright_as_the_pil_path(tmp_path, monkeypatch, backend):
    if backend == "torchcodec" and device_loader.jpeg_backend() != "torchcodec":
        pytest.skip("TorchCodec is not installed (or does not load) here")
    monkeypatch.setattr(device_loader, "jpeg_backend", lambda: backend)
    blobs, expected = [], []
    for orientation in (1, 3, 6, 8):
        path = tmp_path / f"{orientation}.jpg"
        path.write_bytes(jpeg_with_orientation(orientation))
        blobs.append(torch.from_numpy(np.fromfile(path, dtype=np.uint8)))
        expected.append(torch.from_numpy(np.asarray(data.load_rgb(path)).copy()).permute(2, 0, 1))
    png = io.BytesIO()
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(png, "PNG")
    blobs.append(torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8))
    expected.append(torch.zeros(3, 5, 7, dtype=torch.uint8))
    images, ok = device_loader.decode_images(blobs, torch.device("cpu"))  # the PNG: one by one, PIL
    assert all(ok) and [i.shape for i in images] == [e.shape for e in expected]
    for ours, theirs in zip(images, expected):
        assert (ours.int() - theirs.int()).abs().max() <= 1  # libjpeg builds may round apart
    images, _ = device_loader.decode_images(blobs[:4], torch.device("cpu"))  # all JPEG: one batch
    assert [i.shape[1:] for i in images] == [(20, 30), (20, 30), (30, 20), (30, 20)]


def test_a_truncated_jpeg_is_skipped_before_the_batched_decoder(tmp_path, monkeypatch):
    # nvJPEG decodes a truncated JPEG into grey rows without an error (seen on an H100), so such
    # a file must never reach decode_jpegs; PIL then refuses it, as libjpeg does on the CPU
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buffer, "JPEG")
    whole = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    padded = torch.cat([whole, torch.zeros(7, dtype=torch.uint8)])
    truncated = whole[:len(whole) // 2].clone()
    assert device_loader.is_whole_jpeg(whole) and device_loader.is_whole_jpeg(padded)
    assert not device_loader.is_whole_jpeg(truncated)
    assert not device_loader.is_whole_jpeg(torch.zeros(3, dtype=torch.uint8))
    seen = []
    real = device_loader.decode_jpegs
    monkeypatch.setattr(device_loader, "decode_jpegs", lambda blobs, device: seen.extend(blobs) or
                        real(blobs, device))
    images, ok = device_loader.decode_images([whole, truncated, padded], torch.device("cpu"))
    assert ok == [True, False, True] and images[1] is None
    assert len(seen) == 2 and all(device_loader.is_whole_jpeg(b) for b in seen)  # one batch of two


def test_device_loader_matches_the_classic_path(tmp_path, capsys):
    write_image_folder(tmp_path / "train", per_class=5, corrupt=1)  # 11 files, one broken
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "train" / "dog" / "x.png")
    classic = data.build_dataset("imagefolder", str(tmp_path), "train",
                                 augment.pretrain_transform(16))
    fast = device_loader.DeviceLoader(str(tmp_path), 4, seed=3, device=torch.device("cpu"), img_size=16,
                                      num_workers=1)
    assert len(fast) == len(classic) == 12
    lo = (0 - max(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    hi = (1 - min(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    for epoch in (0, 1):
        bad_a, bad_b = data.BadImages(), data.BadImages()
        a = list(data.make_loader(classic, 4, epoch, seed=3, num_workers=0, bad_images=bad_a))
        b = list(fast.epoch(epoch, bad_b))
        assert [len(y) for _, y in a] == [len(y) for _, y in b]  # the broken file, same batch
        assert bad_a.state_dict() == bad_b.state_dict() == {"skipped_images": 1,
                                                            "seen_images": 12}
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)  # same images in the same order
            assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
            assert lo - 1e-4 <= xb.min() and xb.max() <= hi + 1e-4
    assert "undecodable" in capsys.readouterr().err


@pytest.mark.parametrize("batched", [False, True])
def test_device_augment_on_a_whole_image_is_the_image(batched):
    img = (torch.arange(3 * 8 * 8) % 251).to(torch.uint8).view(3, 8, 8)
    torch.manual_seed(0)
    out = device_loader.device_augment([img], 8, min_scale=1.0, batched=batched)  # the image
    expected = (img.float() / 255 - torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out[0], expected, atol=1e-4) or \
        torch.allclose(out[0], expected.flip(-1), atol=1e-4)


def test_batched_crops_match_the_per_image_crops_they_replace():
    """The same boxes and flips (drawn in the same order), and crops within a few grey levels
    of the antialiased bilinear ones on smooth images of two sizes."""
    torch.manual_seed(0)
    smooth = lambda h, w: torch.nn.functional.interpolate(  # noqa: E731
        torch.rand(1, 3, h // 8, w // 8) * 255, size=(h, w), mode="bicubic")[0].clamp(0, 255)
    images = [smooth(96, 128).to(torch.uint8) for _ in range(5)] + \
        [smooth(128, 96).to(torch.uint8) for _ in range(4)]
    torch.manual_seed(1)
    params = device_loader.crop_params(images, 0.2, "bilinear")
    one = device_loader.crops_one_by_one(images, params, 32)
    batched = device_loader.crops_batched(images, params, 32)
    assert batched.shape == one.shape == (9, 3, 32, 32)
    assert (batched - one).abs().mean() < 1.5 and (batched - one).abs().max() < 15
    torch.manual_seed(2)
    a = device_loader.device_augment(images, 32, 0.2, "bilinear")
    torch.manual_seed(2)
    b = device_loader.device_augment(images, 32, 0.2, "bilinear", batched=True)
    assert (a - b).abs().mean() < 0.05  # normalised units: the same crops and flips


def test_cuda_decodes_wait_for_the_stream_first(monkeypatch):
    """The nvJPEG race (pytorch/vision#9606, torchcodec#1634): before a batched CUDA decode the
    host waits for the work queued on the stream. Checked on CPU with the CUDA calls recorded."""
    import torchvision.io

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    real = torchvision.io.decode_jpeg

    def decode(blobs, mode, device):
        calls.append(f"decode on {device}")
        return real(blobs, mode=mode)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    monkeypatch.setattr(device_loader, "jpeg_backend", lambda: "torchvision")
    blob = torch.frombuffer(bytearray(jpeg_with_orientation(6)), dtype=torch.uint8)
    images = device_loader.decode_jpegs([blob, blob], torch.device("cuda", 0))
    assert calls == ["synchronize", "decode on cuda:0"]
    assert images[0].shape == (3, 30, 20)  # and turned upright, as torchvision's CUDA path won't


class Draws(torch.utils.data.Dataset):
    """Item i: (a draw from each RNG a transform may use: torch, random, numpy; the worker's pid),
    label i."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        import random

        draws = [torch.rand(()).item(), random.random(), np.random.rand(), float(os.getpid())]
        return torch.tensor(draws, dtype=torch.float64), index


def test_persistent_workers_draw_what_workers_started_each_epoch_drew():
    # The oracle: torch's own per-epoch seeding, a DataLoader made anew for every epoch with its
    # generator seeded by (seed, epoch, rank), as make_loader did before the workers persisted.
    from torch.utils.data import DataLoader, DistributedSampler

    from plumbing import run_seed

    def fresh_epoch(epoch, rank):
        sampler = DistributedSampler(Draws(), num_replicas=2, rank=rank, shuffle=True, seed=5,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(Draws(), batch_size=4, sampler=sampler, num_workers=2,
                            collate_fn=data.collate_skipping_bad, drop_last=True,
                            generator=torch.Generator().manual_seed(run_seed(5, epoch, rank)))
        return [(x, y) for x, y, _ in loader]

    for rank in (0, 1):
        run = data.Loader(Draws(), 4, seed=5, rank=rank, world_size=2, num_workers=2)
        assert run.loader.persistent_workers
        next(iter(run.epoch(0)))  # an epoch cut short (the loops' islice): its prefetch is left
        pids = set()
        for epoch in (1, 2, 1):  # an epoch again (a resumed run): the same draws again
            ours = list(run.epoch(epoch))
            want = fresh_epoch(epoch, rank)
            assert len(ours) == len(want) == 3
            for (x, y), (x_want, y_want) in zip(ours, want):
                assert torch.equal(y, y_want)  # the same images in the same order
                assert torch.equal(x[:, :3], x_want[:, :3])  # the same torch, random, numpy draws
            pids |= {int(p) for x, _ in ours for p in x[:, 3]}
        assert len(pids) == 2  # the same two worker processes served every epoch


def test_the_evaluation_loader_keeps_its_workers_and_shards_exactly():
    val = data.Loader(Draws(), 5, seed=0, rank=1, world_size=2, num_workers=2, shuffle=False,
                      drop_last=False).epoch(0)
    first, second = list(val), list(val)  # two evaluations
    assert [y.tolist() for _, y in first] == [[1, 3, 5, 7, 9], [11, 13, 15, 17, 19], [21, 23]]
    assert {int(p) for x, _ in first + second for p in x[:, 3]} == \
        {int(p) for x, _ in first for p in x[:, 3]}  # no new worker for the second pass


@pytest.fixture
def loaders_built(monkeypatch):
    """Records each data.Loader with worker processes that the scripts build (its shuffle flag)
    and each pass they ask of it (the epoch), in order. (Loaders without workers, such as the
    kNN monitor's one-off passes, start no process and are left out.)"""
    record = {"built": [], "passes": []}

    class Recorded(data.Loader):
        def __init__(self, dataset, *args, **kwargs):
            super().__init__(dataset, *args, **kwargs)
            self.recorded = kwargs.get("num_workers", 4) > 0
            if self.recorded:
                record["built"].append(kwargs.get("shuffle", True))

        def epoch(self, epoch, bad_images=None):
            if self.recorded:
                record["passes"].append(epoch)
            return super().epoch(epoch, bad_images)

    monkeypatch.setattr(data, "Loader", Recorded)
    return record


@pytest.mark.parametrize("script", ["mae", "moco", "finetune"])
def test_each_script_builds_its_loaders_once_a_run(script, tmp_path, loaders_built):
    import importlib

    flags = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "32", "--batch-size",
             "8", "--num-workers", "1", "--epochs", "2", "--out-dir", str(tmp_path)]
    if script == "finetune":
        flags += ["--eval-every", "1"]
    importlib.import_module(script).main(flags)
    if script == "finetune":  # the evaluation's loader (one pass, read at each evaluation)
        assert loaders_built == {"built": [False, True], "passes": [0, 0, 1]}
    else:
        assert loaders_built == {"built": [True], "passes": [0, 1]}


def test_a_training_batch_left_with_one_image_by_bad_files_is_left_out():
    """BatchNorm layers (MoCo-v3's heads, linear probing's) cannot train on one image; a batch
    of one by design (batch size 1, or evaluation) is kept."""
    one, two = torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    batches = [(one, torch.zeros(1), 3), (two, torch.zeros(2), 1), (one, torch.zeros(1), 0),
               (None, None, 4)]
    bad = data.BadImages(tolerance=100)
    kept = list(data.Readable(batches, bad, single=False))
    assert [len(b[0]) for b in kept] == [2, 1] and (bad.skipped, bad.seen) == (8, 12)
    assert [len(b[0]) for b in data.Readable(batches, single=True)] == [1, 2, 1]
    # only in one process: ranks that left out different batches would fall out of step
    images = list(range(8))
    assert data.Loader(images, 2, 0, num_workers=0).single is False
    assert data.Loader(images, 2, 0, rank=0, world_size=2, num_workers=0).single is True
    assert data.Loader(images, 2, 0, num_workers=0, shuffle=False, drop_last=False).single
