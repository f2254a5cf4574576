"""dali_loader.py: `--loader dali`, MAE pre-training's input pipeline through NVIDIA DALI.

DALI decodes only each JPEG's random crop (region-of-interest decoding, nvJPEG on a GPU,
libjpeg-turbo threads on the CPU), then resizes, flips and normalises it. This module orders
and reads the files: each rank gets its shard of each epoch in the pil path's order
(DistributedSampler, seed + epoch), and DALI's random draws come from a pipeline built for
each epoch and seeded by (seed, epoch, rank), so a resumed run sees the same crops. Whole JPEGs
go to DALI; other formats and truncated files are decoded by PIL and augmented as the device
loader does; a batch DALI cannot decode goes to PIL file by file; unreadable files are skipped
and counted. The output is data.Loader's: (B, 3, S, S) float32, ImageNet-normalised, labels.

Differences from the pil path (augment.pretrain_transform), one line each:
  - the crop's area and aspect ratio are drawn by DALI (uniform area in [min_scale, 1], aspect
    ratio in [3/4, 4/3]); after 10 failed draws DALI takes the whole image, torchvision a
    centre crop;
  - resizing is DALI's antialiased bilinear or cubic filter, not PIL's;
  - JPEGs are decoded by libjpeg-turbo or nvJPEG (DCT and upsampling may differ by a grey level).
Install: pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12).
"""
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from augment import IMAGENET_MEAN, IMAGENET_STD
from data import DataError, Readable, image_files
from device_loader import decode_with_pil, device_augment, is_whole_jpeg

INSTALL = ("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13; "
           "nvidia-dali-cuda120 for CUDA 12), or use --loader pil / device")


def import_dali():
    """(fn, types, Pipeline, feed_ndarray) of DALI, or DataError naming how to install it."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except (ImportError, OSError) as e:  # absent, or its native libraries fail to load
        raise DataError(f"{INSTALL} ({e})") from None
    return fn, types, Pipeline, feed_ndarray


def epoch_seed(seed, epoch, rank, batch=0):
    """DALI's seed for one rank's epoch (and for the batches after a failed one: batch > 0)."""
    return int(np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1)[0] >> 1)


def build_pipeline(seed, batch_size, img_size, min_scale, interpolation, device, threads):
    """The DALI pipeline of one epoch: encoded JPEGs fed as "jpegs" -> (B, 3, S, S) float32.
    Run synchronously, so that a failing batch is the one just fed."""
    fn, types, Pipeline, _ = import_dali()
    gpu = device.type == "cuda"
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, seed=seed,
                    device_id=(device.index or 0) if gpu else None,
                    exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    modes = {"bicubic": [types.INTERP_CUBIC], "bilinear": [types.INTERP_LINEAR],
             "random": [types.INTERP_LINEAR, types.INTERP_CUBIC]}[interpolation]
    with pipe:
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image_random_crop(  # (H', W', 3) uint8: the crop's region only
            jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
            random_area=[min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        if len(modes) > 1:  # one filter per image, as the pil path's "random"
            mode = fn.cast(fn.random.choice([int(m) for m in modes]),
                           dtype=types.DALIDataType.INTERP_TYPE)
        else:
            mode = modes[0]
        images = fn.resize(images, size=[img_size, img_size], interp_type=mode, antialias=True)
        images = fn.crop_mirror_normalize(  # (3, S, S) float32
            images, mirror=fn.random.coin_flip(probability=0.5), dtype=types.FLOAT,
            output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD])
        pipe.set_outputs(images)
    pipe.build()
    return pipe


def read_bytes(path):
    """A file's bytes as a 1-D uint8 array, or None (with a warning) when it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        print(f"warning: skipping unreadable file {path} ({e})", file=sys.stderr)
        return None


class DaliLoader:
    """The MAE training loader of `--loader dali`. epoch(e, bad_images) yields (images on
    device, labels) as data.Loader does. `num_workers` threads read files (a batch ahead) and
    as many DALI threads decode on the CPU."""

    def __init__(self, root, batch_size, seed, device, img_size, min_scale=0.2, rank=0,
                 world_size=1, num_workers=4, split="train", interpolation="bicubic",
                 data="imagefolder"):
        import_dali()  # one line now, not at the first batch, when DALI is missing
        self.samples = image_files(data, root, split).samples  # [(path, label)]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.device = device
        self.img_size = img_size
        self.min_scale = min_scale
        self.interpolation = interpolation
        self.threads = max(1, num_workers)
        self.sampler = DistributedSampler(range(len(self.samples)), num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.readers = ThreadPoolExecutor(self.threads)

    def __len__(self):
        return len(self.samples)

    def epoch(self, epoch, bad_images=None):
        """One epoch of (images, labels) on the device, as data.Loader's."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        batches = [order[i:i + self.batch_size]
                   for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        return Readable(self.decoded_batches(epoch, batches), bad_images)

    def pipeline(self, epoch, batch=0):
        return build_pipeline(epoch_seed(self.seed, epoch, self.rank, batch), self.batch_size,
                              self.img_size, self.min_scale, self.interpolation, self.device,
                              self.threads)

    def decoded_batches(self, epoch, batches):
        pipe = self.pipeline(epoch)
        reading = self.readers.map(read_bytes, [self.samples[i][0] for i in batches[0]]) \
            if batches else None
        for b, index in enumerate(batches):
            blobs = list(reading)
            if b + 1 < len(batches):  # the next batch is read while this one decodes
                reading = self.readers.map(read_bytes,
                                           [self.samples[i][0] for i in batches[b + 1]])
            labels = torch.tensor([self.samples[i][1] for i in index])
            images, ok = self.decode(pipe, blobs)
            if images is None:  # DALI failed on this batch: its files through PIL
                pipe = self.pipeline(epoch, b + 1)  # a failed pipeline cannot run again
                images, ok = self.decode_with_pil(blobs)
            keep = [i for i, good in enumerate(ok) if good]
            yield (images[keep] if keep else None, labels[keep] if keep else None,
                   len(blobs) - len(keep))

    def decode(self, pipe, blobs):
        """(B, 3, S, S) images and which blobs they are: the whole JPEGs through DALI, the rest
        through PIL; (None, None) if DALI fails on the batch."""
        _, _, _, feed_ndarray = import_dali()
        jpegs = [i for i, blob in enumerate(blobs)
                 if blob is not None and is_whole_jpeg(torch.from_numpy(blob))]
        others = [i for i, blob in enumerate(blobs) if blob is not None and i not in jpegs]
        out = torch.empty(len(blobs), 3, self.img_size, self.img_size, device=self.device)
        ok = [False] * len(blobs)
        if jpegs:
            try:
                pipe.feed_input("jpegs", [blobs[i] for i in jpegs])
                (decoded,) = pipe.run()
            except RuntimeError:
                return None, None
            dense = torch.empty(len(jpegs), 3, self.img_size, self.img_size, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" \
                else None
            feed_ndarray(decoded.as_tensor(), dense, cuda_stream=stream)
            out[jpegs] = dense
            for i in jpegs:
                ok[i] = True
        if others:
            pil, pil_ok = self.decode_with_pil([blobs[i] for i in others])
            out[others] = pil
            for i, good in zip(others, pil_ok):
                ok[i] = good
        return out, ok

    def decode_with_pil(self, blobs):
        """PIL decoding and the device loader's augmentation (torch's global RNG) of each blob;
        (images, ok) with a warning for each one PIL cannot read either."""
        decoded, ok = [], []
        for blob in blobs:
            try:
                decoded.append(decode_with_pil(torch.from_numpy(blob)).to(self.device))
                ok.append(True)
            except Exception:  # PIL's errors vary by format; blob None: unreadable file
                if blob is not None:
                    print(f"warning: skipping an undecodable image ({len(blob)} bytes)",
                          file=sys.stderr)
                ok.append(False)
        out = torch.zeros(len(blobs), 3, self.img_size, self.img_size, device=self.device)
        if decoded:
            out[[i for i, good in enumerate(ok) if good]] = device_augment(
                decoded, self.img_size, self.min_scale, self.interpolation)
        return out, ok
