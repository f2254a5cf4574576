"""device_loader.py: `--loader device`, the input pipeline that decodes on the accelerator.

Loader workers only read file bytes; JPEGs are decoded in batches (nvJPEG on a GPU) and
RandomResizedCrop, flip and normalisation run on the device. The same kind of output as
data.Loader with augment.pretrain_transform (the same crop distribution, drawn in another
order): (B, 3, S, S) float32, ImageNet-normalised, labels in sampler order, unreadable files
skipped and counted.
"""
import functools
import io
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T
from torchvision.ops import roi_align

from augment import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from data import Readable, image_files, load_rgb


class FileBytes(Dataset):
    """(raw file bytes as a 1-D uint8 tensor, label) for each image of an image folder."""

    def __init__(self, samples):
        self.samples = samples  # [(path, label)], as ImageFolder.samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), label
        except OSError as e:
            print(f"warning: skipping unreadable file {path} ({e})", file=sys.stderr)
            return None


def collate_bytes(batch):
    """-> (list of byte tensors, labels (B,), number of unreadable files)."""
    good = [s for s in batch if s is not None]
    return [b for b, _ in good], torch.tensor([label for _, label in good]), len(batch) - len(good)


@functools.cache
def jpeg_backend():
    """'torchcodec' when TorchCodec is installed (its decode_jpeg: batched, nvJPEG on CUDA, EXIF
    orientation always applied), else 'torchvision' (its decoders are deprecated since 0.29 in
    favour of TorchCodec; its CUDA decoder ignores EXIF, which apply_orientation makes up for).
    --loader device says which it uses."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
        return "torchcodec"
    except (ImportError, OSError, RuntimeError):  # absent, or its native libraries fail to load
        return "torchvision"


# PIL's Image.transpose for each EXIF orientation (2..8), as tensor ops on (C, H, W).
ORIENTATIONS = {2: lambda x: x.flip(-1), 3: lambda x: x.flip(-1).flip(-2),
                4: lambda x: x.flip(-2), 5: lambda x: x.transpose(-1, -2),
                6: lambda x: torch.rot90(x, -1, (-2, -1)),
                7: lambda x: x.transpose(-1, -2).flip(-1).flip(-2),
                8: lambda x: torch.rot90(x, 1, (-2, -1))}


def exif_orientation(blob):
    """The EXIF orientation tag (1..8, 1 = upright) of an encoded image; reads the header only."""
    try:
        return Image.open(io.BytesIO(blob.numpy().tobytes())).getexif().get(0x0112, 1)
    except Exception:  # no or broken EXIF: decode it as stored
        return 1


def apply_orientation(img, orientation):
    """(C, H, W) as stored -> upright, as PIL's ImageOps.exif_transpose and TorchCodec do."""
    return ORIENTATIONS[orientation](img) if orientation in ORIENTATIONS else img


def decode_jpegs(blobs, device):
    """JPEG byte tensors -> upright RGB uint8 (3, H, W) tensors on `device`, in one batched call
    (nvJPEG on CUDA). Raises RuntimeError if any blob is not a decodable JPEG."""
    if device.type == "cuda":
        # nvJPEG's hardware decoder can write its output before kernels already queued on the
        # stream have finished reading memory the caching allocator has since reused
        # (pytorch/vision#9606, torchcodec#1634); a host-side wait for them is what avoids it.
        torch.cuda.current_stream(device).synchronize()
    if jpeg_backend() == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg(blobs, mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision applies EXIF orientation on the CPU only; done here alike on every device
    images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    return [apply_orientation(img, exif_orientation(blob)) for img, blob in zip(images, blobs)]


def decode_with_pil(blob):
    """Any format PIL reads -> upright RGB uint8 (3, H, W) on the CPU, as the pil path loads it."""
    img = load_rgb(io.BytesIO(blob.numpy().tobytes()))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def is_whole_jpeg(blob):
    """True for a byte tensor that starts with JPEG's SOI marker (FF D8) and ends with its EOI
    marker (FF D9; zero padding after it allowed). nvJPEG decodes a truncated JPEG without an
    error, the missing rows grey (seen on an H100), where libjpeg and PIL refuse it: checking the
    ends first makes the device loader skip such a file on every device alike."""
    b = blob.numpy()
    end = len(b)
    while end > 4 and b[end - 1] == 0:
        end -= 1
    return end >= 4 and b[0] == 0xFF and b[1] == 0xD8 and b[end - 2] == 0xFF and b[end - 1] == 0xD9


def decode_images(blobs, device):
    """Decode a batch of encoded images to upright RGB uint8 (3, H, W) tensors on `device`: the
    whole JPEGs in one batched call (decode_jpegs; one by one if that call fails), everything
    else (other formats, JPEGs with data after EOI, broken files) through PIL on the CPU, which
    refuses a truncated file. Returns (images, ok) with None for an undecodable blob."""
    images = [None] * len(blobs)
    jpegs = [i for i, blob in enumerate(blobs) if is_whole_jpeg(blob)]
    try:
        decoded = decode_jpegs([blobs[i] for i in jpegs], device) if jpegs else []
        for i, image in zip(jpegs, decoded):
            images[i] = image
    except RuntimeError:  # a corrupt file among them: one by one
        for i in jpegs:
            try:
                images[i] = decode_jpegs([blobs[i]], device)[0]
            except RuntimeError:
                pass
    for i, blob in enumerate(blobs):
        if images[i] is None:
            try:
                images[i] = decode_with_pil(blob).to(device)
            except Exception:  # PIL's errors vary by format
                pass
    return images, [image is not None for image in images]


def crop_params(images, min_scale, interpolation):
    """Each image's RandomResizedCrop box (top, left, h, w) and interpolation mode, drawn from
    torch's global RNG in the order the per-image path always drew them."""
    modes = INTERPOLATIONS[interpolation]
    params = []
    for img in images:
        box = T.RandomResizedCrop.get_params(img, (min_scale, 1.0), (3 / 4, 4 / 3))
        params.append((box, modes[torch.randint(len(modes), ()).item()] if len(modes) > 1
                       else modes[0]))
    return params


def crops_one_by_one(images, params, img_size):
    """(B, 3, S, S) float: each crop resized by its own antialiased interpolate call."""
    crops = []
    for img, ((top, left, h, w), mode) in zip(images, params):
        crop = img[None, :, top:top + h, left:left + w].float()  # (1, 3, h, w)
        crops.append(torch.nn.functional.interpolate(crop, size=(img_size, img_size),
                                                     mode=mode.value, antialias=True))
    return torch.cat(crops)


def crops_batched(images, params, img_size):
    """(B, 3, S, S) float: every crop in one roi_align call per source-image size (ImageNet's
    JPEGs come in a few sizes). roi_align averages ceil(h / S) x ceil(w / S) bilinear samples
    per output pixel: a box-filtered bilinear resize, close to an antialiased bilinear one,
    whatever the interpolation mode the crops drew (it is ignored here)."""
    out = torch.empty(len(images), 3, img_size, img_size, device=images[0].device)
    buckets = {}
    for i, img in enumerate(images):
        buckets.setdefault(tuple(img.shape[-2:]), []).append(i)
    for index in buckets.values():
        batch = torch.stack([images[i] for i in index]).float()  # (n, 3, H, W)
        boxes = torch.tensor([[k, left, top, left + w, top + h] for k, ((top, left, h, w), _)
                              in enumerate(params[i] for i in index)],
                             dtype=torch.float32, device=batch.device)  # (n, 5): x1 y1 x2 y2
        out[index] = roi_align(batch, boxes, (img_size, img_size), spatial_scale=1.0,
                               sampling_ratio=-1, aligned=True)
    return out


def device_augment(images, img_size, min_scale, interpolation="bicubic", batched=False):
    """MAE's pre-training augmentation on decoded uint8 images (each (3, H, W), any size, on
    the device): RandomResizedCrop (antialiased; bicubic, bilinear, or "random": one of the two
    per image) to img_size, horizontal flip with probability 0.5, ImageNet normalisation.
    batched: the crops in one call per image size (crops_batched), not one call per image.
    Returns (B, 3, S, S) float32."""
    params = crop_params(images, min_scale, interpolation)
    crop = crops_batched if batched else crops_one_by_one
    x = crop(images, params, img_size).clamp_(0, 255)  # (B, 3, S, S), bicubic may overshoot
    flip = (torch.rand(len(images)) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


class DeviceLoader:
    """The MAE training loader of `--loader device`: persistent workers read bytes, the main
    process decodes and augments on `device`. epoch(e, bad_images) yields (images on device,
    labels) as a make_loader loader does; its randomness is torch's global RNG (reseeded every
    epoch by the training loop), so a resumed run sees the same crops."""

    def __init__(self, root, batch_size, seed, device, img_size, min_scale=0.2, rank=0,
                 world_size=1, num_workers=4, split="train", interpolation="bicubic",
                 data="imagefolder", batched_crops=False):
        folder = image_files(data, root, split)
        self.dataset = FileBytes(folder.samples)
        self.device = device
        self.img_size = img_size
        self.min_scale = min_scale
        self.interpolation = interpolation
        self.batched_crops = batched_crops  # device_augment's batched
        self.world_size = world_size
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_workers, collate_fn=collate_bytes,
                                 drop_last=True, persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None,
                                 # its own generator: creating the iterator must not draw from
                                 # the global RNG that the augmentation and masks use
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.dataset)

    def epoch(self, epoch, bad_images=None):
        """One epoch of (images, labels) on the device, as make_loader's."""
        self.sampler.set_epoch(epoch)
        return Readable(self.decoded_batches(), bad_images, single=self.world_size > 1)

    def decoded_batches(self):
        for blobs, labels, n_unread in self.loader:
            images, ok = decode_images(blobs, self.device)
            for good, blob in zip(ok, blobs):
                if not good:
                    print(f"warning: skipping an undecodable image ({len(blob)} bytes)",
                          file=sys.stderr)
            keep = [i for i, good in enumerate(ok) if good]
            n_bad = n_unread + len(blobs) - len(keep)
            if not keep:
                yield None, None, n_bad
                continue
            imgs = device_augment([images[i] for i in keep], self.img_size, self.min_scale,
                                  self.interpolation, self.batched_crops)
            yield imgs, labels[keep].to(self.device, non_blocking=True), n_bad
