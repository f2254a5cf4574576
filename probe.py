"""probe.py: what a frozen encoder's features know, measured by a weighted kNN and a linear
classifier: per layer (`python analyze.py probe`), and during pre-training as the kNN monitor
of mae.py and moco.py (--knn-every).

knn_accuracy and linear_accuracy depend on torch alone and can be copied out.
"""
import argparse
import json
import os
import time

import torch

import augment
import data
import plumbing
from checkpoints import load_model
from plumbing import print0


# ----------------------------------------------------------------------------------------------
# A layer's features


def layer_names(model):
    """ViT: layers 0..depth (block inputs, then the final norm). Hiera: the embedded tokens and
    the output of each stage (its width and token count change at every stage)."""
    if hasattr(model, "stage_ends"):
        return ["embed"] + [f"stage {i + 1}" for i in range(len(model.stage_ends))]
    return [f"layer {i}" for i in range(model.depth + 1)]


@torch.no_grad()
def layer_representations(vit, imgs):
    """The depth + 1 layer representations of the papers, each (B, L * D): layer i < depth is
    the normalised input of block i+1, the last is the final norm; the cls token removed.
    For a Hiera: the embedding and the stage outputs (the last through the final norm), each
    flattened in Hiera's token order (linear CKA does not depend on the feature order)."""
    if hasattr(vit, "stage_ends"):
        blocks = [0, *vit.stage_ends]
        _, out, _ = vit.forward_features(imgs, return_blocks=blocks)
        reps = [out[b] for b in blocks]
        reps[-1] = vit.norm(reps[-1])
        return [r.flatten(1) for r in reps]
    x = vit.prepend_cls(vit.embed(imgs))
    _, block_out, _ = vit.run_blocks(x, return_blocks=range(vit.depth + 1))
    return [vit.layer_representation(block_out, i)[:, 1:].flatten(1) for i in
            range(vit.depth + 1)]


# ----------------------------------------------------------------------------------------------
# Weighted kNN and logistic regression on frozen features (torch only)


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07, chunk=1024):
    """Top-1 (%) of the weighted cosine kNN that DINO and solo-learn evaluate with: each test
    feature votes with its k most similar training features, each vote weighted by
    exp(cosine / temperature). train_x (N, D), train_y (N,), test_x (M, D), test_y (M,)."""
    train_x = torch.nn.functional.normalize(train_x.float(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), chunk):
        sim = test_x[start:start + chunk] @ train_x.T  # (m, N)
        top, index = sim.topk(k, dim=1)  # (m, k)
        weights = (top / temperature).exp()
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_y[index], weights)
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return 100.0 * correct / len(test_x)


def linear_accuracy(train_x, train_y, test_x, test_y, c=1.0, steps=100):
    """Top-1 (%) of a multinomial logistic regression on standardised features (the mean and
    std of the training features), fitted by L-BFGS to the mean cross-entropy plus
    ||W||^2 / (2 C N): scikit-learn's LogisticRegression objective, its default C = 1."""
    mean, std = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    train_x, test_x = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + \
            linear.weight.square().sum() / (2 * c * len(train_x))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (linear(test_x).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def pooled_layer_features(model, imgs, layers):
    """{layer: (B, D)} the mean over patch tokens of each layer's normalised representation
    (layer_representation; layer 0: the embedded tokens), from one forward pass. Hiera: the
    embedding and stage outputs (`layers` then indexes layer_names(model)), token mean."""
    if hasattr(model, "stage_ends"):
        reps = layer_representations(model, imgs)  # (B, L * D) flattened per stage
        _, out, _ = model.forward_features(imgs, return_blocks=[0, *model.stage_ends])
        widths = [out[b].shape[-1] for b in [0, *model.stage_ends]]
        return {i: reps[i].view(len(imgs), -1, widths[i]).mean(1) for i in layers}
    _, block_out, _ = model.run_blocks(model.prepend_cls(model.embed(imgs)),
                                       return_blocks=range(model.depth + 1))
    return {i: model.layer_representation(block_out, i)[:, 1:].mean(1) for i in layers}


@torch.no_grad()
def logit_rms(model, imgs, block):
    """Root mean square of block `block`'s pre-softmax attention logits (a distillation target:
    a trained ViT's are a few units; in the hundreds, softmax is one-hot and an MSE on logits
    is dominated by their scale)."""
    _, _, logits = model.forward_features(imgs, return_attn=[block])
    return logits[block].float().square().mean().sqrt().item()


# ----------------------------------------------------------------------------------------------
# analyze.py probe: every layer, or raw pixels


def feature_set(args, model, split, indices, device):
    """({layer: (N, D)} features, (N,) labels) of the images `indices` of a split: raw pixels
    (one channel, 0-1) when model is None, else pooled_layer_features of every layer."""
    transform = None if model is None else augment.eval_transform(args.img_size)
    dataset = data.build_dataset(args.data, args.data_root, split, transform,
                                 img_size=args.img_size)
    subset = torch.utils.data.Subset(dataset, indices)
    loader = data.make_loader(subset, args.batch_size, epoch=0, seed=0, num_workers=0,
                              shuffle=False, drop_last=False)
    feats, labels = {}, []
    for imgs, y in loader:
        if model is None:
            batch = {0: imgs[:, 0].flatten(1)}
        else:
            batch = pooled_layer_features(model, imgs.to(device), range(len(layer_names(model))))
        for i, f in batch.items():
            feats.setdefault(i, []).append(f.float().cpu())
        labels.append(y)
    if len(labels) == 0 or sum(len(y) for y in labels) < len(indices):
        raise ValueError(f"{len(indices) - sum(len(y) for y in labels)} unreadable images among "
                         f"the {split} images probed")
    return {i: torch.cat(f) for i, f in feats.items()}, torch.cat(labels)


def add_probe_command(sub, common):
    """analyze.py probe's flags (sub: analyze.py's subparsers; common: its shared flags)."""
    probe = sub.add_parser("probe", parents=[common],
                           help="frozen kNN / linear accuracy of every layer (or raw pixels)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = probe.add_mutually_exclusive_group()
    what.add_argument("--ckpt", default=None, help="checkpoint of the encoder probed (or "
                      "--random-init MODEL, or --pixels)")
    what.add_argument("--pixels", action="store_true", help="probe raw pixels (a baseline)")
    probe.add_argument("--model", default="vit_tiny", help="architecture of the encoder")
    probe.add_argument("--name", default=None, help="name of the model in probe.json")
    probe.add_argument("--labels-per-class", type=int, default=100,
                       help="labelled training images of each class the probes fit")
    probe.add_argument("--subset-seeds", type=int, nargs="+", default=[0],
                       help="one labelled subset per seed (finetune.py --subset-seed's draw)")
    probe.add_argument("--max-images", type=int, default=None,
                       help="val images scored, evenly spaced (none: all)")
    probe.add_argument("--linear", action="store_true",
                       help="also a logistic regression (L-BFGS, C = 1) on each layer")


def check_probe_flags(parser, args, num_images_default):
    """`analyze.py probe`'s rules, one line each (parser.error): one source of features, distinct
    subset seeds, and no --num-images (cka's and attn's; a probe scores --max-images)."""
    given = [f for f, v in (("--ckpt", args.ckpt), ("--random-init", args.random_init),
                            ("--pixels", args.pixels)) if v]
    if len(given) != 1:
        parser.error("probe needs one of --ckpt CKPT, --random-init MODEL or --pixels"
                     + (f", not {' and '.join(given)}" if given else ""))
    if len(set(args.subset_seeds)) != len(args.subset_seeds):
        parser.error(f"--subset-seeds {' '.join(map(str, args.subset_seeds))} repeats a seed "
                     "(the same subset): give each once")
    if args.num_images != num_images_default:
        parser.error("probe scores --max-images validation images (--num-images is cka's and "
                     "attn's)")


def run_probe(args, device):
    """Frozen-feature kNN and linear accuracy of every layer (or of raw pixels), trained on
    --labels-per-class labelled training images (one subset per --subset-seeds seed) and scored
    on the first --max-images images of the val split."""
    if args.pixels:
        model, name = None, "pixels"
    elif args.random_init:
        model = load_model(None, args.random_init, args.img_size, args.patch_size).to(device)
        name = args.name or f"random {args.random_init}"
    else:
        model = load_model(args.ckpt, args.model, args.img_size, args.patch_size,
                           trust=args.trust_checkpoint).to(device)
        name = args.name or os.path.basename(args.ckpt)
    train = data.build_raw_dataset(args.data, args.data_root, "train", img_size=args.img_size)
    val = data.build_raw_dataset(args.data, args.data_root, "val", img_size=args.img_size)
    evaluated = list(range(len(val)))
    if args.max_images is not None and args.max_images < len(val):
        evaluated = [int(i * len(val) / args.max_images) for i in range(args.max_images)]
    subsets = {seed: data.per_class_subset(data.SkipBadImages(train, None), args.labels_per_class,
                                           seed).indices for seed in args.subset_seeds}
    union = sorted(set().union(*subsets.values()))
    train_feats, train_labels = feature_set(args, model, "train", union, device)
    test_feats, test_labels = feature_set(args, model, "val", evaluated, device)
    position = {index: row for row, index in enumerate(union)}
    layers = sorted(train_feats)
    result = {"name": name, "layers": ["pixels"] if model is None else layer_names(model),
              "labels_per_class": args.labels_per_class, "eval_images": len(evaluated),
              "knn": {}, "linear": {}}
    for seed, indices in subsets.items():
        rows = torch.tensor([position[i] for i in indices])
        result["knn"][seed] = [knn_accuracy(train_feats[i][rows], train_labels[rows],
                                            test_feats[i], test_labels) for i in layers]
        if args.linear:
            result["linear"][seed] = [linear_accuracy(train_feats[i][rows], train_labels[rows],
                                                      test_feats[i], test_labels) for i in layers]
        print0(f"subset {seed}: kNN last layer {result['knn'][seed][-1]:.2f}" +
               (f", linear {result['linear'][seed][-1]:.2f}" if args.linear else ""))
    if model is not None and not hasattr(model, "stage_ends"):
        imgs = torch.stack([data.build_dataset(args.data, args.data_root, "val",
                                               augment.eval_transform(args.img_size))[i][0]
                            for i in evaluated[:64]]).to(device)
        result["attn_logit_rms"] = logit_rms(model, imgs, model.depth)
    with open(os.path.join(args.out_dir, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    print0(f"wrote {args.out_dir}/probe.json")
    return result


# ----------------------------------------------------------------------------------------------
# The kNN monitor of pre-training (mae.py, moco.py --knn-every)


class KnnMonitor:
    """--knn-every of mae.py / moco.py: the weighted kNN top-1 (k 20, T 0.07, knn_accuracy) of
    an encoder's pooled features (its forward_head without a head: the normalised cls token, or
    the mean for avg pooling; Hiera its pooled output), fitted on `images` labelled training
    images and scored on images / 2 validation images, both drawn once (seed 0) for the run
    and centre-cropped; without a validation split, on as many other training images. Costs
    one forward pass over 1.5 x `images` images."""

    def __init__(self, name, root, img_size, images=None, batch_size=256, synthetic_size=2000):
        def split_set(split):
            return data.build_dataset(name, root, split, augment.eval_transform(img_size),
                                      synthetic_size=synthetic_size, img_size=img_size)

        train = split_set("train")
        if images is None:  # a tenth of the training set, at most 1,000: a few % of an epoch
            images = max(10, min(1000, len(train) // 10))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        try:
            val = split_set("val")
        except data.DataError:
            val = None
        if val is None:  # a held-out part of train, none of it among the fitted images
            scored = max(1, min(images // 2, len(train) // 3))
            fitted = min(images, len(train) - scored)
            print0(f"kNN monitor: no validation split, so it scores {scored} training images "
                   f"kept apart from the {fitted} it fits")
            self.train = torch.utils.data.Subset(train, sorted(order[:fitted]))
            self.val = torch.utils.data.Subset(train, sorted(order[fitted:fitted + scored]))
        else:  # a seeded random draw: evenly spaced indices can alias with a class-periodic order
            val_order = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))
            self.train = torch.utils.data.Subset(train, sorted(order[:images]))
            self.val = torch.utils.data.Subset(val, sorted(val_order[:max(1, images // 2)]
                                                           .tolist()))
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, encoder, dataset, device, precision="fp32"):
        feats, labels = [], []
        for imgs, y in data.make_loader(dataset, self.batch_size, epoch=0, seed=0, num_workers=0,
                                        shuffle=False, drop_last=False):
            with plumbing.autocast(device, precision):  # the run's precision: its cost
                tokens = encoder.forward_features(imgs.to(device))[0]
            # a Hiera MAE has no head nor final norm (its decoder reads fused stages): the mean
            pooled = encoder.forward_head(tokens) if hasattr(encoder, "head") else tokens.mean(1)
            feats.append(pooled.float().cpu())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    def __call__(self, encoder, device, precision="fp32"):
        """kNN top-1 (%) of `encoder` now, its forward in `precision` (plumbing.autocast); its
        train / eval mode is restored."""
        was_training = encoder.training
        encoder.eval()
        try:
            train = self.features(encoder, self.train, device, precision)
            val = self.features(encoder, self.val, device, precision)
        finally:
            encoder.train(was_training)
        return knn_accuracy(*train, *val)


def add_monitor_flags(parser):
    """The kNN monitor of the pre-training scripts (mae.py, moco.py)."""
    parser.add_argument("--knn-every", type=int, default=None,
                        help="every this many epochs, the weighted kNN top-1 (k 20, T 0.07) of "
                             "the encoder's features (none: every epoch on labelled data, off "
                             "on --data folder, which has no labels; 0: off)")
    parser.add_argument("--knn-images", type=int, default=None,
                        help="labelled training images the kNN monitor fits (and half as many "
                             "validation images it scores), drawn once for the run (none: a "
                             "tenth of the training set, at most 1,000)")


def knn_monitor(args):
    """The run's KnnMonitor, or None when --knn-every is 0 or the data has no labels.
    Sets args.knn_every to what the run does (unset: 1 on labelled data, 0 without labels)."""
    if args.data == "folder":
        if args.knn_every != 0:
            print0("kNN monitor off: --data folder has no labels")
        args.knn_every = 0
    elif args.knn_every is None:
        args.knn_every = 1
    if args.knn_every == 0:
        return None
    return KnnMonitor(args.data, args.data_root, args.img_size, args.knn_images,
                      synthetic_size=args.synthetic_size)


def monitor_epoch(monitor, args, epoch, encoder, device, precision, log, step):
    """The kNN monitor at the end of epoch `epoch` (0-indexed) when it is due, in the run's
    precision: its top-1 and seconds go to the log; returns the text for the epoch line ('' when
    not run)."""
    if monitor is None or (epoch + 1) % args.knn_every:
        return ""
    start = time.time()
    top1 = monitor(encoder, device, precision)
    seconds = time.time() - start
    log.write(step=step, epoch=epoch + 1, knn_top1=top1, knn_seconds=seconds)
    return f", kNN top-1 {top1:.2f} ({seconds:.1f} s)"
