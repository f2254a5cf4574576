"""bench_data.py: how fast the input pipeline runs on this machine (bench.py --jpegs N and
--small-images N call it; docs/performance.md reports what it measured).

  bench_loaders      decode + crop + flip + normalise of each loader (pil, device,
                     device_batched, dali) on N synthetic ImageNet-like JPEGs, with the steady
                     rate and one thread's per-stage milliseconds (loader_stages);
  bench_small_epoch  a Fashion-MNIST fine-tuning epoch as the study runs it, loader included.
"""
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import augment
import classifier
import dali_loader
import data
import device_loader
import finetune
import loop
import plumbing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_jpegs(folder, count, seed=0):
    """`count` ImageNet-like JPEGs (500x375, quality 90, smooth content plus noise) in 10 class
    folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        os.makedirs(os.path.join(folder, f"class{i % 10}"), exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"class{i % 10}", f"{i}.jpg"), quality=90)


def loader_stages(folder, img_size, min_scale, interpolation, count=256):
    """Where the `pil` path's time goes: milliseconds per image of each stage a loader worker
    runs (read + decode, crop + resize + flip, to a uint8 tensor, collate), then of the scaling
    and normalisation of the batch (on the device in training; here on the CPU), and of the
    per-image header checks the `device` path makes in its main process, and of the `dali`
    path's pipeline (decode the crop's region + resize + flip + normalise, batches of 32, when
    DALI is installed); on `count` of the JPEGs, in this process with one thread (the best of 3
    passes)."""
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)[:count]
    geometry, to_tensor = augment.pretrain_transform(img_size, min_scale, interpolation,
                                                     uint8=True).transforms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {}

    def timed(stage, work, inputs, per=1):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            outputs = [work(x) for x in inputs]
            best = min(best, time.perf_counter() - start)
        times[stage] = 1e3 * best / len(inputs) / per
        return outputs

    try:
        images = timed("worker: read + decode (PIL, EXIF, RGB)", data.load_rgb, paths)
        crops = timed("worker: crop + resize + flip (PIL)", geometry, images)
        tensors = timed("worker: to a uint8 tensor", to_tensor, crops)
        batch = timed("worker: collate (per image)", lambda _: torch.stack(tensors), [None],
                      per=len(tensors))[0]
        timed("scale + normalise the batch (per image, CPU)", augment.normalize, [batch],
              per=len(tensors))
        blobs = timed("device path, worker: read the bytes",
                      lambda p: torch.from_numpy(np.fromfile(p, dtype=np.uint8)), paths)
        timed("device path, main: whole-JPEG check + EXIF",
              lambda b: (device_loader.is_whole_jpeg(b), device_loader.exif_orientation(b)), blobs)
        if dali_available():
            n = min(32, len(blobs))
            graph = dali_loader.mae_graph(img_size, min_scale, interpolation)
            pipe = dali_loader.build_pipeline(graph, 0, n, torch.device("cpu"), threads=1)

            def dali_batch(i):
                pipe.feed_input("jpegs", [b.numpy() for b in blobs[i:i + n]])
                return pipe.run()
            timed("dali path: decode the crop + resize + flip + normalise (DALI)", dali_batch,
                  range(0, len(blobs) - n + 1, n), per=n)
    finally:
        torch.set_num_threads(threads)
    return times


def dali_available():
    try:
        dali_loader.import_dali()
        return True
    except data.DataError as e:
        print(f"  no dali row: {e}", flush=True)
        return False


def bench_loaders(args, device):
    """Decode + augmentation of each loader with vit_tiny's pre-training crop (MAE-Lite's: scale
    0.08, bilinear or bicubic per image)."""
    min_scale = 0.08
    interpolation = "random"
    root = tempfile.mkdtemp(prefix="nanomim_jpegs_")
    rows = []
    try:
        write_jpegs(os.path.join(root, "train"), args.jpegs)
        stages = loader_stages(os.path.join(root, "train"), args.img_size, min_scale,
                               interpolation)
        for stage, ms in stages.items():
            print(f"  one worker, {stage}: {ms:.3f} ms/image", flush=True)
        batch = min(args.loader_batch, args.jpegs)
        for mode in ("pil", "device", "device_batched", "dali"):
            if mode == "dali" and not dali_available():
                continue
            if mode == "dali":  # as mae.py builds it
                run_loader = dali_loader.DaliLoader(
                    data.image_files("imagefolder", root, "train").samples, batch, 0, device,
                    dali_loader.mae_graph(args.img_size, min_scale, interpolation),
                    augment.pretrain_transform(args.img_size, min_scale, interpolation),
                    (3, args.img_size, args.img_size), num_workers=args.workers)
            elif mode == "pil":
                dataset = data.build_dataset("imagefolder", root, "train",
                                             augment.pretrain_transform(args.img_size, min_scale,
                                                                        interpolation, uint8=True))
                run_loader = data.Loader(dataset, batch, 0, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
            else:
                run_loader = device_loader.DeviceLoader(
                    root, batch, seed=0, device=device, img_size=args.img_size,
                    min_scale=min_scale, num_workers=args.workers, interpolation=interpolation,
                    batched_crops=mode == "device_batched")  # one roi_align per image size
            for epoch in range(2):  # the first pass warms the page cache and starts the workers
                loader = run_loader.epoch(epoch)  # as in training: workers kept between epochs
                start = time.perf_counter()
                count = 0
                filled = filled_count = None  # set when the fill's last batch arrives
                # the steady rate leaves out the pipeline's fill: the first round of batches,
                # one per worker, each worker having made a whole batch before handing it over
                # (an ImageNet epoch of 5,000 batches pays that once)
                fill = 1 if mode == "dali" else max(1, args.workers)  # dali reads 1 ahead
                for i, (imgs, _) in enumerate(loader):
                    imgs = imgs.to(device, non_blocking=True)
                    if mode == "pil":  # as mae.py: uint8 from the workers, normalised here
                        imgs = augment.normalize(imgs)
                    count += imgs.shape[0]
                    if i + 1 == fill:
                        sync(device)
                        filled, filled_count = time.perf_counter(), count
                sync(device)
                end = time.perf_counter()
            # only with at least two rounds of batches (fewer: all were made at once)
            enough = args.jpegs // batch >= 2 * fill and filled_count is not None
            steady = (count - filled_count) / (end - filled) if enough else None
            rows.append(dict(loader=mode, workers=args.workers, images=count,
                             images_per_s=count / (end - start), steady_images_per_s=steady,
                             fill_batches=fill, img_size=args.img_size,
                             ms_per_image_one_thread=stages if mode == "pil" else None))
            print(f"  loader {mode}: {rows[-1]['images_per_s']:.0f} images/s over the pass, "
                  + (f"{steady:.0f} after its first {fill} batches" if steady else
                     "too few batches for a steady rate"), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def bench_small_epoch(args, device):
    """A Fashion-MNIST-sized fine-tuning epoch, loader included (the figure the study's CPU
    budget is planned from): finetune.py's recipe, as the study runs it (vit_tiny from scratch,
    28 px, patch 4, --small-images training images, 1/10 of them a class, --small-batch,
    --workers loader workers, eager, bf16 unless --precision fp32), two epochs and two
    evaluations over as many validation images, each timed whole. The first of each starts the
    loader's workers; the second is what every later epoch of a run costs, its workers kept."""
    per_class = args.small_images // 10
    precision = args.precision[-1]  # "both": bf16, as the study
    ft = finetune.parse_args(["--data", "fashion_mnist", "--data-root", args.small_data_root,
                              "--img-size", "28", "--patch-size", "4", "--labels-per-class",
                              str(per_class), "--max-images", str(args.small_images),
                              "--batch-size", str(args.small_batch), "--num-workers",
                              str(args.workers), "--precision", precision, "--compile", "off"])
    train_set = data.build_dataset("fashion_mnist", ft.data_root, "train",
                                   augment.train_transform(ft))
    train_set = data.per_class_subset(train_set, per_class, ft.subset_seed)
    val_set = data.evenly_spaced(data.build_dataset("fashion_mnist", ft.data_root, "val",
                                                    augment.eval_transform(ft.img_size)),
                                 args.small_images)
    pin = device.type == "cuda"
    train_loader = data.Loader(train_set, ft.batch_size, ft.seed, num_workers=ft.num_workers,
                               pin_memory=pin)
    val_loader = data.Loader(val_set, ft.batch_size, ft.seed, num_workers=ft.num_workers,
                             shuffle=False, drop_last=False, pin_memory=pin).epoch(0)
    torch.manual_seed(ft.seed)
    model = classifier.prepare_model(ft, 10, device)
    optimizer = classifier.build_optimizer(ft, model, ft.blr * ft.batch_size / 256, device)
    mixing = augment.build_mixing(ft, 10)
    epochs = []
    evaluations = []
    steps = 0
    for epoch in range(2):
        model.train()
        start = time.perf_counter()
        for imgs, labels in train_loader.epoch(epoch):  # finetune.py's step
            imgs = imgs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            targets = labels
            if mixing is not None:
                imgs, targets = mixing(imgs, labels)
            with plumbing.autocast(device, precision):
                logits = model(imgs)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=ft.smoothing)
            loss.backward()
            loop.optimizer_step(optimizer, ft.clip_grad)
            steps += epoch == 0
        sync(device)
        epochs.append(time.perf_counter() - start)
        start = time.perf_counter()
        classifier.evaluate(model, val_loader, device, precision)
        sync(device)
        evaluations.append(time.perf_counter() - start)
    row = dict(bench="finetune_fmnist_epoch", images=steps * ft.batch_size, steps=steps,
               batch=ft.batch_size, workers=ft.num_workers, precision=precision,
               img_size=ft.img_size, patch_size=ft.patch_size, first_epoch_s=epochs[0],
               epoch_s=epochs[1], images_per_s=steps * ft.batch_size / epochs[1],
               val_images=len(val_set), first_eval_s=evaluations[0], eval_s=evaluations[1])
    print(f"  fine-tuning epoch, Fashion-MNIST {row['images']} images: {row['epoch_s']:.1f} s "
          f"({row['first_epoch_s']:.1f} s the first), evaluation {row['eval_s']:.1f} s",
          flush=True)
    return [row]
