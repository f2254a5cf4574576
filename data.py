"""data.py: datasets, transforms and loaders for nanoMIM.

build_dataset(name, root, split, transform) returns a dataset of (image tensor, label) pairs, or
None in place of a sample whose file could not be read; a Loader batches it into (images,
labels), epoch by epoch, with workers that live for the run, leaving those Nones out and
counting them into a BadImages, so one corrupt JPEG never stops a multi-day run (BadImages
stops it when too many are bad). `synthetic` needs no files and is the default of
`python mae.py`.
"""
import gzip
import math
import os
import random
import struct
import sys
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from plumbing import run_seed

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DATASETS = ("synthetic", "imagefolder", "folder", "fashion_mnist", "cifar10", "cifar100",
            "flowers102", "pets", "aircraft", "cars")
NUM_CLASSES = {"synthetic": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
               "flowers102": 102, "pets": 37, "aircraft": 100, "cars": 196}


class DataError(ValueError):
    """Missing, empty or mostly unreadable data (the message names the fix)."""


# ----------------------------------------------------------------------------------------------
# Transforms


# ----------------------------------------------------------------------------------------------
# Raw datasets: each returns (PIL image, int label)


class SyntheticShapes(Dataset):
    """Deterministic, procedurally drawn images of 10 shape classes on textured backgrounds.

    Sample i of a split is always the same picture (seeded by split and index), so runs are
    reproducible without any file. Class = the shape; colours, texture, size, position and
    rotation vary.
    """

    SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar", "star",
              "hexagon")

    def __init__(self, num_images, size, split="train"):
        self.num_images = num_images
        self.size = size
        self.seed = 0 if split == "train" else 10 ** 9

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        rng = random.Random(self.seed + index)
        label = index % len(self.SHAPES)
        s = self.size
        colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
        img = Image.new("RGB", (s, s), colour())
        draw = ImageDraw.Draw(img)
        stripe_colour = colour()
        period = rng.randint(3, max(4, s // 4))
        texture = rng.choice(("hstripes", "vstripes", "checks", "plain"))
        for a in range(0, s, period):  # background texture
            if texture == "hstripes":
                draw.rectangle([0, a, s, a + period // 2], fill=stripe_colour)
            elif texture == "vstripes":
                draw.rectangle([a, 0, a + period // 2, s], fill=stripe_colour)
            elif texture == "checks":
                for b in range((a // period) % 2 * period, s, 2 * period):
                    draw.rectangle([a, b, a + period - 1, b + period - 1], fill=stripe_colour)
        r = rng.uniform(0.2, 0.35) * s  # shape radius
        cx = rng.uniform(r, s - r)
        cy = rng.uniform(r, s - r)
        turn = rng.uniform(0, 2 * np.pi)
        fill = colour()

        def polygon(n, radii):
            angles = [turn + 2 * np.pi * k / n for k in range(n)]
            return [(cx + radii[k % len(radii)] * np.cos(a), cy + radii[k % len(radii)] * np.sin(a))
                    for k, a in enumerate(angles)]

        box = [cx - r, cy - r, cx + r, cy + r]
        shape = self.SHAPES[label]
        if shape == "disc":
            draw.ellipse(box, fill=fill)
        elif shape == "ring":
            draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
        elif shape == "square":
            draw.polygon(polygon(4, [r]), fill=fill)
        elif shape == "triangle":
            draw.polygon(polygon(3, [r]), fill=fill)
        elif shape == "diamond":
            draw.polygon(polygon(4, [r, r / 2]), fill=fill)
        elif shape == "star":
            draw.polygon(polygon(10, [r, r / 2.5]), fill=fill)
        elif shape == "hexagon":
            draw.polygon(polygon(6, [r]), fill=fill)
        elif shape == "cross":
            draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
            draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)
        elif shape == "hbar":
            draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
        else:  # vbar
            draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)
        return img, label


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its IDX files (.gz or not), as the Debian package ships them."""

    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, root, split):
        images_file, labels_file = (self._find(root, f) for f in self.FILES[split])
        self.images = self._read_idx(images_file, 3)  # (N, 28, 28) uint8
        self.labels = self._read_idx(labels_file, 1)  # (N,) uint8
        if len(self.images) != len(self.labels):
            raise DataError(f"{images_file} holds {len(self.images)} images but {labels_file} "
                            f"{len(self.labels)} labels: the files are of different sets; "
                            "reinstall dataset-fashion-mnist or fetch the four .gz files again")

    @staticmethod
    def _find(root, name):
        for candidate in (os.path.join(root, name), os.path.join(root, name + ".gz")):
            if os.path.isfile(candidate):
                return candidate
        raise DataError(f"Fashion-MNIST file {name}[.gz] not found in {root}: run "
                        "`apt-get install -y dataset-fashion-mnist` or pass --data-root to the "
                        "folder holding the IDX files")

    @staticmethod
    def _read_idx(path, ndim):
        """An IDX file of uint8 with `ndim` dimensions; a truncated, corrupt or foreign file
        raises a DataError naming it."""
        broken = (f"{path} is not a whole Fashion-MNIST IDX file: reinstall "
                  "dataset-fashion-mnist or fetch its four .gz files again")
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                data = f.read()
        except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
            raise DataError(broken) from None
        # IDX header: 0, 0, dtype (8 = uint8), ndim, then ndim big-endian sizes
        if len(data) < 4 + 4 * ndim or tuple(data[:4]) != (0, 0, 8, ndim):
            raise DataError(broken)
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        if len(data) != 4 + 4 * ndim + math.prod(shape):
            raise DataError(broken)
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def load_rgb(path_or_file):
    """An image file as an upright RGB PIL image: EXIF orientation applied (cameras store
    portraits sideways with a tag), as the device loader's decoders do."""
    from PIL import ImageOps

    with Image.open(path_or_file) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _imagefolder(root, split):
    from torchvision.datasets import ImageFolder

    layout = (f"expected class folders under {root}/{split}/ (ImageNet layout: "
              f"{root}/train/<class>/<image>.JPEG); set --data-root")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        if split == "train" and os.path.isdir(os.path.join(root, "val")):
            raise DataError(f"{root} has val/ but no train/: {layout}")
        if split == "train" and os.path.isdir(root):
            folder = root  # a plain class-per-folder tree
        else:
            raise DataError(f"{folder} does not exist: {layout}")
    try:
        return ImageFolder(folder, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"no images found in {folder} ({e}): {layout}") from None


class ImageTree(Dataset):
    """--data folder: every image file under root, at any depth, for pre-training without labels
    (label 0 for all). .samples as ImageFolder's, so bad-image reports name the file. The val
    split is the same tree (it only feeds a run's pictures)."""

    def __init__(self, root):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.samples = [(os.path.join(folder, f), 0) for folder, _, files in sorted(os.walk(root))
                        for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no image files found under {root} (looked for "
                            f"{', '.join(IMG_EXTENSIONS)} at any depth): check --data-root")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return load_rgb(self.samples[index][0]), 0


def image_files(name, root, split):
    """The file-backed datasets (imagefolder, folder): their (path, label) samples' dataset."""
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root} is not a folder")
    return ImageTree(root) if name == "folder" else _imagefolder(root, split)


def _torchvision(name, root, split, download):
    from torchvision import datasets as tvd

    train = split == "train"
    makers = {
        "cifar10": lambda: tvd.CIFAR10(root, train=train, download=download),
        "cifar100": lambda: tvd.CIFAR100(root, train=train, download=download),
        "flowers102": lambda: tvd.Flowers102(root, split="train" if train else "test",
                                             download=download),
        "pets": lambda: tvd.OxfordIIITPet(root, split="trainval" if train else "test",
                                          download=download),
        "aircraft": lambda: tvd.FGVCAircraft(root, split="trainval" if train else "test",
                                             download=download),
        "cars": lambda: tvd.StanfordCars(root, split="train" if train else "test",
                                         download=download),
    }
    try:
        return makers[name]()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
        raise DataError(f"{name} not found under {root} ({e}); pass --data-root to where it is "
                        "or add --download to fetch it") from None


def build_raw_dataset(name, root=None, split="train", download=False, synthetic_size=2000,
                      img_size=64):
    """The dataset itself, yielding (PIL image, label); see build_dataset for the wrapped one."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synthetic":
        return SyntheticShapes(synthetic_size if split == "train" else synthetic_size // 4,
                               img_size, split)
    if name == "fashion_mnist":
        return FashionMNIST(root or FASHION_MNIST_DIR, split)
    if root is None:
        raise DataError(f"--data {name} needs --data-root (the folder that holds the data)")
    if name in ("imagefolder", "folder"):
        return image_files(name, root, split)
    if name in NUM_CLASSES:
        return _torchvision(name, root, split, download)
    raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Robust wrapper, loader and bad-image accounting


class SkipBadImages(Dataset):
    """Wraps a raw dataset: converts to RGB, applies `transform`, and returns None (with a
    warning) for a sample whose file cannot be read or decoded, instead of raising."""

    def __init__(self, raw, transform):
        self.raw = raw
        self.transform = transform

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, index):
        try:
            img, label = self.raw[index]
            img = img.convert("RGB")  # grayscale (Fashion-MNIST) replicated to 3 channels
        except Exception as e:  # a corrupt, truncated or unreadable file: decode errors vary
            where = getattr(self.raw, "samples", None)
            name = where[index][0] if where else f"sample {index}"
            print(f"warning: skipping unreadable image {name} ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return None
        return self.transform(img), label


def build_dataset(name, root=None, split="train", transform=None, download=False,
                  synthetic_size=2000, img_size=64):
    """A dataset of (transformed image, label), or None for an unreadable sample."""
    raw = build_raw_dataset(name, root, split, download, synthetic_size, img_size)
    if len(raw) == 0:
        raise DataError(f"{name} ({split}) under {root} is empty; check --data-root")
    return SkipBadImages(raw, transform or v2.Compose([v2.ToImage(),
                                                       v2.ToDtype(torch.float32, scale=True)]))


def evenly_spaced(dataset, max_images):
    """At most max_images samples, evenly spaced over the dataset (classes stay about balanced);
    the dataset itself when max_images is None or not smaller."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    step = len(dataset) / max_images
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(max_images)])


def samples_of(dataset):
    """[(path, label)] of a build_dataset image folder, through the Subsets of evenly_spaced and
    per_class_subset (what --loader dali reads)."""
    if isinstance(dataset, torch.utils.data.Subset):
        samples = samples_of(dataset.dataset)
        return [samples[i] for i in dataset.indices]
    return dataset.raw.samples


def labels_of(dataset):
    """The label of every sample of a build_dataset dataset, without decoding any image."""
    raw = dataset.raw
    for name in ("labels", "targets", "_labels"):  # ours; torchvision's (two spellings)
        if hasattr(raw, name):
            return [int(y) for y in getattr(raw, name)]
    if hasattr(raw, "samples"):  # ImageFolder
        return [y for _, y in raw.samples]
    return [raw[i][1] for i in range(len(raw))]


def per_class_subset(dataset, per_class, seed):
    """A fixed random subset with `per_class` samples of every class (the papers' 1% regime:
    60 per class of Fashion-MNIST's 60k), drawn with `seed`, in dataset order."""
    labels = torch.tensor(labels_of(dataset))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        where = (labels == label).nonzero().flatten()
        if len(where) < per_class:
            raise DataError(f"class {label} has {len(where)} images, fewer than "
                            f"--labels-per-class {per_class}")
        chosen += where[torch.randperm(len(where), generator=generator)[:per_class]].tolist()
    return torch.utils.data.Subset(dataset, sorted(chosen))


def collate_skipping_bad(batch):
    """Stack the good samples; returns (images, labels, number of skipped samples)."""
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


def make_loader(dataset, batch_size, epoch, seed, rank=0, world_size=1, num_workers=4,
                shuffle=True, drop_last=True, pin_memory=False, bad_images=None):
    """One epoch of a Loader (below), for a one-off pass (analysis, tests): the same batches as
    epoch `epoch` of a run's Loader; its workers end when the returned loader is dropped."""
    loader = Loader(dataset, batch_size, seed, rank=rank, world_size=world_size,
                    num_workers=num_workers, shuffle=shuffle, drop_last=drop_last,
                    pin_memory=pin_memory)
    return loader.epoch(epoch, bad_images)


class Loader:
    """A run's loader of (images, labels) over a build_dataset dataset: one DataLoader whose
    worker processes live for the whole run (persistent_workers), instead of starting anew for
    every epoch and every evaluation. epoch(e, bad_images) is epoch e's pass, unreadable images
    left out (and counted into bad_images, a BadImages, when given).

    Order and augmentation depend only on (seed, epoch, rank), so a run resumed at an epoch
    boundary sees exactly the batches an uninterrupted run would: the sampler is set to the
    epoch, and each worker reseeds its RNGs at its first image of each pass with the seeds that
    a DataLoader started for that epoch alone would have given it (EpochSeeded; with
    num_workers=0 the augmentation draws from the main process's RNG, which the training loops
    reseed every epoch). shuffle=False with drop_last=False (evaluation) shards the images
    exactly: each is seen once, by one process."""

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1, num_workers=4,
                 shuffle=True, drop_last=True, pin_memory=False):
        if shuffle or drop_last:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        else:  # evaluation: each image exactly once over all processes (DistributedSampler would
            sampler = range(rank, len(dataset), world_size)  # repeat some to even out the shards)
        self.sampler = EpochTagged(sampler)
        # a training batch of one left by unreadable files is left out, with one process only:
        # ranks that skipped different batches would fall out of step (and SyncBatchNorm, which
        # MoCo-v3 uses under DDP, takes one image on a rank)
        self.single = not drop_last or world_size > 1
        self.loader = DataLoader(EpochSeeded(dataset, seed, rank), batch_size=batch_size,
                                 sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate_skipping_bad, drop_last=drop_last,
                                 pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                 # its own generator: starting a pass must not draw from the
                                 # global RNG that the masks (and, without workers, the
                                 # augmentation) use
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.loader)  # batches per epoch

    def epoch(self, epoch, bad_images=None):
        """Epoch `epoch`'s (images, labels); iterate it before calling epoch() again."""
        self.sampler.set_epoch(epoch)
        return Readable(self.loader, bad_images, single=self.single)


class EpochTagged(torch.utils.data.Sampler):
    """The indices of `sampler`, each as ((epoch, pass), index): the tag tells EpochSeeded in a
    worker process when a new pass begins, and of which epoch (the sampler runs in the main
    process; a worker sees only the indices it is sent)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0
        self.passes = 0  # passes begun so far, over all epochs

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: the epoch's order
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        self.passes += 1
        tag = (self.epoch, self.passes)
        return ((tag, index) for index in self.sampler)


class EpochSeeded(Dataset):
    """dataset[index] for an item (tag, index) of EpochTagged. In a loader worker, the first item
    of each pass first reseeds the worker's RNGs for the tag's epoch (seed_worker): a persistent
    worker then draws the augmentations that a worker started for that epoch alone would."""

    def __init__(self, dataset, seed, rank):
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.tag = None  # the pass this worker process served last (each worker has its copy)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        tag, index = item
        worker = torch.utils.data.get_worker_info()
        if worker is not None and tag != self.tag:
            self.tag = tag
            seed_worker(self.seed, tag[0], self.rank, worker.id)
        return self.dataset[index]


def seed_worker(seed, epoch, rank, worker_id):
    """Seed this loader worker's RNGs as torch's DataLoader seeds worker `worker_id` at its start
    when the loader's generator is seeded with run_seed(seed, epoch, rank): the base seed is the
    generator's first int64; torch and random get base + worker_id, numpy torch's hash of the two
    (_generate_state in torch/utils/data/_utils/worker.py). Those were the seeds of the loaders
    made anew every epoch before the workers persisted, so the numbers are unchanged."""
    generator = torch.Generator().manual_seed(run_seed(seed, epoch, rank))
    base_seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
    torch.manual_seed(base_seed + worker_id)
    random.seed(base_seed + worker_id)
    try:
        from torch.utils.data._utils.worker import _generate_state
        np.random.seed(_generate_state(base_seed, worker_id))
    except ImportError:  # a torch without it: still a seed of (seed, epoch, rank, worker) alone
        np.random.seed((base_seed + worker_id) % 2 ** 32)


class Readable:
    """Iterates a loader of (images, labels, n_bad) as (images, labels): the unreadable images
    are counted into bad_images (if given) and a batch with no readable image is left out; with
    single=False (training in one process) so is one that unreadable files left with a single
    image, which BatchNorm layers (MoCo-v3's heads, linear probing's) cannot train on."""

    def __init__(self, batches, bad_images=None, single=True):
        self.batches = batches
        self.bad_images = bad_images
        self.single = single

    def __iter__(self):
        for imgs, labels, n_bad in self.batches:
            if self.bad_images is not None:
                self.bad_images.add(n_bad, n_bad + (0 if imgs is None else len(imgs)))
            if imgs is not None and (self.single or len(imgs) > 1 or n_bad == 0):
                yield imgs, labels


class BadImages:
    """How many images of a run could not be read, of how many were seen (kept in checkpoints as
    skipped_images / seen_images). add() stops the run with a DataError when the unreadable ones
    are more than `max_fraction` of those seen (and more than `tolerance`)."""

    def __init__(self, skipped=0, seen=0, max_fraction=0.01, tolerance=10):
        self.skipped = skipped
        self.seen = seen
        self.max_fraction = max_fraction
        self.tolerance = tolerance

    def add(self, skipped, seen):
        self.skipped += skipped
        self.seen += seen
        if self.skipped > max(self.tolerance, self.max_fraction * self.seen):
            raise DataError(f"{self.skipped} of {self.seen} images could not be read (more than "
                            f"{self.max_fraction:.0%}): the dataset is damaged; check --data-root "
                            "and the warnings above")

    def state_dict(self):
        return {"skipped_images": self.skipped, "seen_images": self.seen}


def check_epoch_read(steps, epoch, bad_images):
    """An epoch that made no step had no readable batch: stop rather than train on nothing."""
    if steps == 0:
        raise DataError(f"epoch {epoch + 1} made no step: no batch held a readable image "
                        f"({bad_images.skipped} of the {bad_images.seen} images seen were not); "
                        "see the warnings above and check the files under --data-root")
