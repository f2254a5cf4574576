"""dali_loader.py: `--loader dali`, the input pipeline through NVIDIA DALI.

DALI decodes the JPEGs (only each crop's region where one view is cropped; nvJPEG on a GPU,
libjpeg-turbo threads on the CPU), then crops, resizes, flips, colours and normalises. This
module orders and reads the files: each rank gets its shard of each epoch in the pil path's
order (DistributedSampler, seed + epoch), and DALI's random draws come from a pipeline built
for each epoch and seeded by (seed, epoch, rank), so a resumed run sees the same images. Whole
JPEGs go to DALI; other formats, truncated files, and every file of a batch DALI fails on go
to PIL and the pil path's transform; unreadable files are skipped and counted.

Three graphs, each the counterpart of one of augment.py's transforms (the differences are in
docs/performance.md): mae_graph (pretrain_transform), moco_graph (MocoViews: two views) and
finetune_graph (train_transform without RandAugment). Output as data.Loader's: images
(B, 3, S, S) or (B, 2, 3, S, S), float32, ImageNet-normalised, and labels.
Install: pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12).
"""
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from augment import IMAGENET_MEAN, IMAGENET_STD
from data import DataError, Readable, load_rgb
from device_loader import is_whole_jpeg

INSTALL = ("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13; "
           "nvidia-dali-cuda120 for CUDA 12), or use --loader pil")


def import_dali():
    """DALI's modules the graphs use (.fn, .types, .math, .Pipeline, .feed_ndarray), or
    DataError naming how to install it."""
    try:
        import nvidia.dali.math as math
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except (ImportError, OSError) as e:  # absent, or its native libraries fail to load
        raise DataError(f"{INSTALL} ({e})") from None
    return SimpleNamespace(fn=fn, types=types, math=math, Pipeline=Pipeline,
                           feed_ndarray=feed_ndarray)


# ----------------------------------------------------------------------------------------------
# The graphs: (DALI, encoded JPEGs, on a GPU?) -> one DALI node, a sample per image


def interp(dali, interpolation):
    """DALI's resize filter for augment.INTERPOLATIONS' name; "random": one of two per image."""
    fn, types = dali.fn, dali.types
    modes = {"bicubic": [types.INTERP_CUBIC], "bilinear": [types.INTERP_LINEAR],
             "random": [types.INTERP_LINEAR, types.INTERP_CUBIC]}[interpolation]
    if len(modes) == 1:
        return modes[0]
    return fn.cast(fn.random.choice([int(m) for m in modes]), dtype=types.DALIDataType.INTERP_TYPE)


def normalise(dali, images, flip=True):
    """(S, S, 3) uint8 or float -> (3, S, S) float32, ImageNet-normalised, flipped with p 0.5."""
    fn, types = dali.fn, dali.types
    return fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(probability=0.5) if flip else 0, dtype=types.FLOAT,
        output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD])


def mae_graph(img_size, min_scale, interpolation):
    """augment.pretrain_transform: the crop's region decoded (area in [min_scale, 1], aspect
    ratio in [3/4, 4/3]), resized with antialiasing, flipped, normalised."""
    def graph(dali, jpegs, gpu):
        fn, types = dali.fn, dali.types
        images = fn.decoders.image_random_crop(  # (H', W', 3) uint8: the crop's region only
            jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
            random_area=[min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        images = fn.resize(images, size=[img_size, img_size],
                           interp_type=interp(dali, interpolation), antialias=True)
        return normalise(dali, images)
    return graph


def coin(dali, probability):
    """1.0 with `probability`, else 0.0, drawn per image."""
    return dali.fn.cast(dali.fn.random.coin_flip(probability=probability), dtype=dali.types.FLOAT)


def beside(node, data):
    """`node` (drawn on the CPU) moved to the GPU when `data` is there, to combine with it."""
    return node.gpu() if getattr(data, "device", "cpu") == "gpu" and node.device == "cpu" \
        else node


def maybe(dali, probability, value, otherwise):
    """`value` with `probability`, else `otherwise`, drawn per image (float nodes or numbers)."""
    if probability >= 1:
        return value
    heads = beside(beside(coin(dali, probability), value), otherwise)
    return heads * value + (1 - heads) * otherwise


def moco_view(dali, images, img_size, min_scale, blur_p, solarize_p):
    """One of MoCo-v3's augmentations (augment.moco_augmentation) of decoded images."""
    fn, types = dali.fn, dali.types
    crop = fn.random_resized_crop(images, size=[img_size, img_size], random_area=[min_scale, 1.0],
                                  random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                  interp_type=types.INTERP_LINEAR, antialias=True)
    # ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 (all four or none: one coin), then grayscale
    # with p 0.2 (saturation 0)
    jittered = coin(dali, 0.8)
    jitter = [jittered * fn.random.uniform(range=r) + (1 - jittered)
              for r in ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2))]
    hue = jittered * fn.random.uniform(range=(-36.0, 36.0))  # degrees: 0.1 of a turn
    saturation = jitter[2] * maybe(dali, 0.2, 0.0, 1.0)
    x = fn.color_twist(crop, brightness=jitter[0], contrast=jitter[1], saturation=saturation,
                       hue=hue, dtype=types.FLOAT)  # (S, S, 3) float in [0, 255]
    x = dali.math.clamp(x, 0.0, 255.0)
    if blur_p > 0:  # Gaussian blur, sigma uniform in [0.1, 2.0] px
        blurred = fn.gaussian_blur(x, sigma=fn.random.uniform(range=(0.1, 2.0)))
        x = maybe(dali, blur_p, blurred, x)
    if solarize_p > 0:  # pixels >= 128 inverted
        bright = fn.cast(x >= 128.0, dtype=types.FLOAT)
        x = maybe(dali, solarize_p, x + bright * (255.0 - 2.0 * x), x)
    return normalise(dali, x)


def moco_graph(img_size, min_scale):
    """augment.MocoViews: (2, 3, S, S), view 1 always blurred, view 2 blurred with p 0.1 and
    solarised with p 0.2, each its own crop of the image decoded once."""
    def graph(dali, jpegs, gpu):
        fn, types = dali.fn, dali.types
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return fn.stack(moco_view(dali, images, img_size, min_scale, 1.0, 0.0),
                        moco_view(dali, images, img_size, min_scale, 0.1, 0.2))
    return graph


def finetune_graph(img_size, min_scale, color_jitter=0.0, reprob=0.0):
    """augment.train_transform without RandAugment: the crop's region decoded, resized
    (bicubic), flipped, colour-jittered (brightness, contrast, saturation), normalised, and a
    random rectangle (area 2-33%, aspect 0.3-3.3) erased to per-pixel noise with p reprob."""
    def graph(dali, jpegs, gpu):
        fn, types = dali.fn, dali.types
        x = fn.decoders.image_random_crop(
            jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
            random_area=[min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        x = fn.resize(x, size=[img_size, img_size], interp_type=types.INTERP_CUBIC, antialias=True)
        if color_jitter > 0:
            r = (max(0.0, 1 - color_jitter), 1 + color_jitter)
            x = fn.color_twist(x, brightness=fn.random.uniform(range=r),
                               contrast=fn.random.uniform(range=r),
                               saturation=fn.random.uniform(range=r), dtype=types.FLOAT)
            x = dali.math.clamp(x, 0.0, 255.0)
        x = normalise(dali, x)  # (3, S, S)
        if reprob > 0:
            x = erase(dali, x, img_size, reprob)
        return x
    return graph


def erase(dali, x, size, probability):
    """timm's RandomErasing (mode "pixel") on (3, S, S): with `probability`, one rectangle of
    area 2-33% of the image and log-uniform aspect 0.3-3.3, filled with N(0, 1) noise."""
    fn, types = dali.fn, dali.types
    area = fn.random.uniform(range=(0.02, 1 / 3)) * size * size
    aspect = dali.math.exp(fn.random.uniform(range=(np.log(0.3), np.log(1 / 0.3))))
    h = dali.math.min(dali.math.sqrt(area * aspect), size - 1.0)
    w = dali.math.min(dali.math.sqrt(area / aspect), size - 1.0)
    top = fn.random.uniform(range=(0.0, 1.0)) * (size - h)
    left = fn.random.uniform(range=(0.0, 1.0)) * (size - w)
    ones = fn.constant(fdata=1.0, shape=[1, size, size], dtype=types.FLOAT)
    mask = 1.0 - fn.erase(ones, anchor=fn.stack(top, left), shape=fn.stack(h, w), axes=[1, 2],
                          fill_value=0.0)  # (1, S, S): 1 inside the rectangle
    mask = beside(maybe(dali, probability, mask, 0.0), x)
    noise = fn.random.normal(x)
    return x * (1.0 - mask) + noise * mask


# ----------------------------------------------------------------------------------------------
# The loader


def epoch_seed(seed, epoch, rank, batch=0):
    """DALI's seed for one rank's epoch (and for the batches after a failed one: batch > 0)."""
    return int(np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1)[0] >> 1)


def build_pipeline(graph, seed, batch_size, device, threads):
    """One epoch's DALI pipeline: encoded JPEGs fed as "jpegs" -> graph's samples. Run
    synchronously, so that a failing batch is the one just fed."""
    dali = import_dali()
    gpu = device.type == "cuda"
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=threads, seed=seed,
                         device_id=(device.index or 0) if gpu else None,
                         exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    with pipe:
        jpegs = dali.fn.external_source(name="jpegs", dtype=dali.types.UINT8, ndim=1)
        pipe.set_outputs(graph(dali, jpegs, gpu))
    try:
        pipe.build()
    except RuntimeError as e:  # e.g. a DALI build for another CUDA than the driver's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"DALI cannot build its pipeline on {device} ({first}): install the "
                        "nvidia-dali build of your CUDA (nvidia-dali-cuda130 or -cuda120), or "
                        "use --loader pil") from None
    return pipe


def read_bytes(path):
    """A file's bytes as a 1-D uint8 array, or None (with a warning) when it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        print(f"warning: skipping unreadable file {path} ({e})", file=sys.stderr)
        return None


class DaliLoader:
    """A run's loader for `--loader dali`: epoch(e, bad_images) yields (images on device,
    labels) as data.Loader does. samples: [(path, label)]; graph: one of the *_graph above;
    fallback: the pil path's transform (PIL image -> tensor of the graph's sample shape), used
    with torch's global RNG for what DALI does not decode. `num_workers` threads read the files
    (a batch ahead) and as many DALI threads work on the CPU."""

    def __init__(self, samples, batch_size, seed, device, graph, fallback, sample_shape,
                 rank=0, world_size=1, num_workers=4):
        import_dali()  # one line now, not at the first batch, when DALI is missing
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.graph = graph
        self.fallback = fallback
        self.sample_shape = tuple(sample_shape)  # (3, S, S) or (2, 3, S, S)
        self.threads = max(1, num_workers)
        self.sampler = DistributedSampler(range(len(samples)), num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.readers = ThreadPoolExecutor(self.threads)

    def __len__(self):
        return len(self.sampler) // self.batch_size  # batches per epoch, as data.Loader's

    def epoch(self, epoch, bad_images=None):
        """One epoch of (images, labels) on the device, as data.Loader's."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        batches = [order[i:i + self.batch_size]
                   for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        return Readable(self.decoded_batches(epoch, batches), bad_images, single=self.world_size > 1)

    def pipeline(self, epoch, batch=0):
        return build_pipeline(self.graph, epoch_seed(self.seed, epoch, self.rank, batch),
                              self.batch_size, self.device, self.threads)

    def read(self, index):
        return self.readers.map(read_bytes, [self.samples[i][0] for i in index])

    def decoded_batches(self, epoch, batches):
        pipe = self.pipeline(epoch)
        reading = self.read(batches[0]) if batches else None
        for b, index in enumerate(batches):
            blobs = list(reading)
            if b + 1 < len(batches):  # the next batch is read while this one decodes
                reading = self.read(batches[b + 1])
            labels = torch.tensor([self.samples[i][1] for i in index])
            images, ok = self.decode(pipe, blobs)
            if images is None:  # DALI failed on this batch: its files through PIL
                pipe = self.pipeline(epoch, b + 1)  # a failed pipeline cannot run again
                images, ok = self.decode_with_pil(blobs)
            keep = [i for i, good in enumerate(ok) if good]
            yield (images[keep] if keep else None, labels[keep] if keep else None,
                   len(blobs) - len(keep))

    def decode(self, pipe, blobs):
        """(B, *sample_shape) images and which blobs they are: the whole JPEGs through DALI, the
        rest through PIL; (None, None) if DALI fails on the batch."""
        feed_ndarray = import_dali().feed_ndarray
        jpegs = [i for i, blob in enumerate(blobs)
                 if blob is not None and is_whole_jpeg(torch.from_numpy(blob))]
        others = [i for i in range(len(blobs)) if i not in jpegs]
        out = torch.empty(len(blobs), *self.sample_shape, device=self.device)
        ok = [False] * len(blobs)
        if jpegs:
            try:
                pipe.feed_input("jpegs", [blobs[i] for i in jpegs])
                (decoded,) = pipe.run()
            except RuntimeError:
                return None, None
            dense = torch.empty(len(jpegs), *self.sample_shape, device=self.device)
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
        """Each blob through PIL and the fallback transform: (images, ok), with a warning for
        each one PIL cannot read either (None: a file that could not be read, already said)."""
        out = torch.zeros(len(blobs), *self.sample_shape, device=self.device)
        ok = [False] * len(blobs)
        for i, blob in enumerate(blobs):
            if blob is None:
                continue
            try:
                image = load_rgb(io.BytesIO(blob.tobytes()))
            except Exception:  # PIL's errors vary by format
                print(f"warning: skipping an undecodable image ({len(blob)} bytes)",
                      file=sys.stderr)
                continue
            out[i] = self.fallback(image).to(self.device)
            ok[i] = True
        return out, ok
