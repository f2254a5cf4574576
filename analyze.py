"""analyze.py: the papers' two analyses of what pre-training taught a ViT, with figures, and
the command line of the viewers of a run (viewers.py).

    python analyze.py cka  --a CKPT_A [--b CKPT_B]      # layer-wise CKA heatmap (cka.json/png)
    python analyze.py attn --ckpt CKPT [CKPT ...]       # attention distance and entropy per head
    python analyze.py probe --ckpt CKPT | --pixels      # frozen kNN / linear accuracy per layer
    python analyze.py recon --ckpt CKPT [--images F ...]  # originals / masked / reconstructions
    python analyze.py attnmap --ckpt CKPT [--block B]   # the cls token's attention, per head
    python analyze.py curves LOG.jsonl [LOG.jsonl ...]  # loss, lr and top-1 of runs

The metric functions (linear_cka, MinibatchCKA, attention_entropy, attention_distance) depend
on torch alone and can be copied out; figures are drawn with PIL, no matplotlib.
"""
import argparse
import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw

import augment
import data
import plumbing
import viewers
from checkpoints import CheckpointError, load_model
from data import DATASETS, DataError
from hiera import unroll_order
from probe import (add_probe_command, check_probe_flags, layer_names, layer_representations,
                   run_probe)
from viewers import PALETTE, colormap, font, text_centered

# ----------------------------------------------------------------------------------------------
# CKA (Kornblith et al. 2019) with the unbiased HSIC of Nguyen, Raghu & Kornblith (2020)


def hsic_unbiased(K, L):
    """HSIC_1 (Song et al. 2012; Eq. 3 of Nguyen et al. 2020) of two (n, n) Gram matrices:
    1 / (n (n-3)) * [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2 / (n-2) 1'K~ L~ 1], where K~, L~
    are K, L with zeroed diagonals. Unbiased, so averages over minibatches converge to the truth."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 examples, got {n}")
    K = K - torch.diag(torch.diagonal(K))
    L = L - torch.diag(torch.diagonal(L))
    trace = (K * L).sum()  # tr(K L) for symmetric matrices
    sums = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (K.sum(0) @ L.sum(1))  # 1' K L 1
    return (trace + sums - cross) / (n * (n - 3))


def hsic_biased(K, L):
    """The classic HSIC_0 = tr(K H L H) / (n-1)^2 with H the centring matrix."""
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype, device=K.device) - 1.0 / n
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def gram_linear(X):
    """(n, p) features -> (n, n) linear Gram matrix in float64, features centred first
    (HSIC_1 ignores a constant shift; centring avoids float32 cancellation)."""
    X = X.reshape(X.shape[0], -1).double()
    X = X - X.mean(dim=0, keepdim=True)
    return X @ X.T


def linear_cka(X, Y, unbiased=True):
    """Linear CKA between X (n, p) and Y (n, q): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    hsic = hsic_unbiased if unbiased else hsic_biased
    K = gram_linear(X)
    L = gram_linear(Y)
    return (hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))).item()


class MinibatchCKA:
    """CKA between every layer of model A and every layer of model B, accumulated over batches:
    CKA_ij = mean HSIC(K_i, L_j) / sqrt(mean HSIC(K_i, K_i) * mean HSIC(L_j, L_j))."""

    def __init__(self, layers_a, layers_b, unbiased=True):
        self.hsic = hsic_unbiased if unbiased else hsic_biased
        self.cross = torch.zeros(layers_a, layers_b, dtype=torch.float64)
        self.self_a = torch.zeros(layers_a, dtype=torch.float64)
        self.self_b = torch.zeros(layers_b, dtype=torch.float64)
        self.batches = 0
        self.dropped = 0

    def update(self, feats_a, feats_b):
        """feats_a / feats_b: lists (one per layer) of (n, ...) features of the same n images."""
        n = feats_a[0].shape[0]
        if n < 4:  # HSIC_1 is undefined below 4 examples
            self.dropped += 1
            plumbing.print0(f"note: dropped a batch of {n} images (CKA needs at least 4)",
                            file=sys.stderr)
            return
        grams_a = [gram_linear(f).cpu() for f in feats_a]
        grams_b = [gram_linear(f).cpu() for f in feats_b]
        for i, K in enumerate(grams_a):
            self.self_a[i] += self.hsic(K, K)
            for j, L in enumerate(grams_b):
                self.cross[i, j] += self.hsic(K, L)
        for j, L in enumerate(grams_b):
            self.self_b[j] += self.hsic(L, L)
        self.batches += 1

    def compute(self):
        """(layers_a, layers_b) CKA matrix (the batch count cancels out of the means)."""
        if self.batches == 0:
            raise ValueError("no batch of at least 4 readable images was seen: give "
                             "--batch-size 4 or more, and check the warnings above for "
                             "unreadable images")
        return self.cross / torch.sqrt(self.self_a[:, None] * self.self_b[None, :])


# ----------------------------------------------------------------------------------------------
# Attention distance and entropy


def global_blocks(hiera):
    """Hiera blocks whose attention is one map over all tokens (global, no query pooling)."""
    return [i for i, b in enumerate(hiera.blocks, start=1)
            if not b.attn.use_mask_unit_attn and b.attn.q_stride == 1]


@torch.no_grad()
def attention_maps(vit, imgs):
    """{block: (B, heads, L, L)} attention over patch tokens only: the logits with the cls token
    removed as query and key, re-softmaxed over the patch keys (as the published analysis).
    For a Hiera: its global-attention blocks only (mask-unit and pooling blocks are skipped)."""
    if hasattr(vit, "stage_ends"):
        _, _, logits = vit.forward_features(imgs, return_attn=global_blocks(vit))
        return {b: lg[:, :, 0].float().softmax(dim=-1) for b, lg in logits.items()}  # 1 window
    _, _, logits = vit.forward_features(imgs, return_attn=range(1, vit.depth + 1))
    return {b: lg[:, :, 1:, 1:].float().softmax(dim=-1) for b, lg in logits.items()}


def block_geometry(model, block):
    """(grid (rows, cols), pixels per token, token order or None) of a block's tokens: a Hiera
    block's tokens are in unrolled order on a grid pooled by its q-poolings so far."""
    if not hasattr(model, "stage_ends"):
        return model.grid, model.patch_size, None
    pools = model.pools_before(block)
    grid = (model.grid[0] // 2 ** pools, model.grid[1] // 2 ** pools)
    return grid, 4 * 2 ** pools, unroll_order(grid, model.unroll_steps - pools)


def attention_entropy(probs):
    """probs (B, heads, N, N), rows summing to 1 -> (heads,) mean entropy in nats, -sum p log p,
    averaged over query tokens and images."""
    return -torch.xlogy(probs, probs).sum(dim=-1).mean(dim=(0, 2))


def token_distances(grid_hw, patch_size):
    """(N, N) Euclidean distance between the centres of patch tokens on the grid, times
    patch_size (pixels when it is the patch size in pixels)."""
    rows, cols = grid_hw
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # (N, 2), row-major
    return torch.cdist(pos, pos) * patch_size


# The published analysis code (MAE-Lite's attn_analyzer.py) multiplies the distance on the
# token grid by a fixed 14, whatever the patch size: the papers' figures are in these units.
PAPER_DISTANCE_SCALE = 14


def attention_distance(probs, grid_hw, patch_size, order=None, unit="pixels"):
    """probs (B, heads, N, N) -> (heads,) mean attention distance sum_j p_ij G_ij, averaged over
    queries and images. unit "pixels": G = grid distance x patch size; unit "paper": G = grid
    distance x 14, the units of the papers' figures (for 16-px patches, pixels x 14 / 16).
    order: raster index of each token when they are not in raster order (Hiera)."""
    scale = {"pixels": patch_size, "paper": PAPER_DISTANCE_SCALE}[unit]
    G = token_distances(grid_hw, scale)  # (N, N)
    if order is not None:
        G = G[order][:, order]
    G = G.to(probs.device, probs.dtype)
    return (probs * G).sum(dim=-1).mean(dim=(0, 2))


def draw_cka_heatmap(matrix, name_a, name_b, path, cell=32):
    """CKA heatmap: layers of A up the y axis (origin lower left), layers of B along x, and a
    colour bar from 0 to 1."""
    rows, cols = matrix.shape
    left = 70
    top = 50
    bottom = 60
    bar = 90
    width = left + cols * cell + bar
    height = top + rows * cell + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small = font(12)
    big = font(15)
    for i in range(rows):
        y = top + (rows - 1 - i) * cell  # layer 0 at the bottom
        for j in range(cols):
            x = left + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colormap(matrix[i, j]))
        text_centered(draw, (left - 12, y + cell / 2), str(i), small)
    for j in range(cols):
        text_centered(draw, (left + j * cell + cell / 2, top + rows * cell + 12), str(j), small)
    text_centered(draw, (left + cols * cell / 2, height - 22), f"layer of {name_b}", big)
    text_centered(draw, (left + cols * cell / 2, 22), f"CKA: {name_a} vs {name_b}", big)
    label = Image.new("RGB", (rows * cell, 20), "white")  # the y label, rotated
    text_centered(ImageDraw.Draw(label), (rows * cell / 2, 10), f"layer of {name_a}", big)
    img.paste(label.rotate(90, expand=True), (8, top))
    bar_x = left + cols * cell + 25
    bar_h = rows * cell
    for k in range(bar_h):  # colour bar, 1 at the top
        draw.line([bar_x, top + k, bar_x + 18, top + k], fill=colormap(1 - k / (bar_h - 1)))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + (1 - v) * (bar_h - 1)
        draw.line([bar_x + 18, y, bar_x + 22, y], fill="black")
        draw.text((bar_x + 25, y), f"{v:.2f}", font=small, fill="black", anchor="lm")
    img.save(path)


def draw_boxplots(values, labels, metric, path, blocks=None):
    """Box-and-whisker plots of per-head values for each layer, one colour per model.
    values: {label: [per-layer list of per-head floats]}; blocks: the x tick labels (1..n)."""
    layers = max(len(v) for v in values.values())
    flat = [x for v in values.values() for heads in v for x in heads]
    lo = min(flat)
    hi = max(flat)
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    group = 26 * len(labels) + 14
    box = 20
    left = 80
    top = 60
    plot_h = 360
    bottom = 60
    width = left + layers * group + 30
    height = top + plot_h + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small = font(12)
    big = font(15)
    to_y = lambda v: top + plot_h * (hi - v) / (hi - lo)  # noqa: E731
    decimals = max(0, 1 - math.floor(math.log10((hi - lo) / 5)))  # enough to tell ticks apart
    for k in range(6):  # y grid and ticks
        v = lo + (hi - lo) * k / 5
        draw.line([left, to_y(v), width - 30, to_y(v)], fill=(225, 225, 225))
        draw.text((left - 6, to_y(v)), f"{v:.{decimals}f}", font=small, fill="black", anchor="rm")
    draw.line([left, top, left, top + plot_h, width - 30, top + plot_h], fill="black")
    for layer in range(layers):
        x0 = left + layer * group + 7
        name = str(blocks[layer] if blocks else layer + 1)
        text_centered(draw, (x0 + group / 2 - 7, top + plot_h + 12), name, small)
        for m, label in enumerate(labels):
            if layer >= len(values[label]):
                continue
            heads = sorted(values[label][layer])
            q = lambda f: heads[min(len(heads) - 1, int(round(f * (len(heads) - 1))))]  # noqa
            x = x0 + m * 26
            colour = PALETTE[m % len(PALETTE)]
            pale = tuple(int(c + (255 - c) * 0.55) for c in colour)
            draw.line([x + box / 2, to_y(heads[0]), x + box / 2, to_y(heads[-1])], fill=colour,
                      width=2)  # whiskers: min to max
            draw.rectangle([x, to_y(q(0.75)), x + box, to_y(q(0.25))], fill=pale, outline=colour,
                           width=2)
            draw.line([x, to_y(q(0.5)), x + box, to_y(q(0.5))], fill=colour, width=3)  # median
    text_centered(draw, (left + layers * group / 2, height - 20), "layer (block)", big)
    text_centered(draw, (left + layers * group / 2, 20), f"{metric} per head", big)
    label_img = Image.new("RGB", (plot_h, 20), "white")
    text_centered(ImageDraw.Draw(label_img), (plot_h / 2, 10), metric, big)
    img.paste(label_img.rotate(90, expand=True), (8, top))
    for m, label in enumerate(labels):  # legend, one row at the top right
        y = 38
        x = width - 30 - (len(labels) - m) * 130
        draw.rectangle([x, y - 6, x + 14, y + 6], fill=PALETTE[m % len(PALETTE)])
        draw.text((x + 20, y), label, font=small, fill="black", anchor="lm")
    img.save(path)


# ----------------------------------------------------------------------------------------------
# Command line


def analysis_loader(args):
    """The first --num-images validation images, centre-cropped, in a fixed order."""
    dataset = data.build_dataset(args.data, args.data_root, "val",
                                 augment.eval_transform(args.img_size),
                                 synthetic_size=4 * args.num_images, img_size=args.img_size)
    subset = torch.utils.data.Subset(dataset, range(min(args.num_images, len(dataset))))
    return data.make_loader(subset, args.batch_size, epoch=0, seed=0, num_workers=0,
                            shuffle=False, drop_last=False)


def run_cka(args, device):
    name_a = args.names[0] if args.names else os.path.basename(args.a)
    model_a = load_model(args.a, args.model_a, args.img_size, args.patch_size,
                         trust=args.trust_checkpoint, flag="--model-a").to(device)
    if args.random_init:
        name_b = args.names[1] if args.names and len(args.names) > 1 \
            else f"random {args.random_init}"
        model_b = load_model(None, args.random_init, args.img_size, args.patch_size).to(device)
    elif args.b:
        name_b = args.names[1] if args.names and len(args.names) > 1 else os.path.basename(args.b)
        model_b = load_model(args.b, args.model_b or args.model_a, args.img_size,
                             args.patch_size, trust=args.trust_checkpoint,
                             flag="--model-b").to(device)
    else:
        name_b = name_a
        model_b = model_a
    names_a = layer_names(model_a)
    names_b = layer_names(model_b)
    cka = MinibatchCKA(len(names_a), len(names_b), unbiased=not args.biased)
    for imgs, _ in analysis_loader(args):
        imgs = imgs.to(device)
        feats_a = layer_representations(model_a, imgs)
        feats_b = feats_a if model_b is model_a else layer_representations(model_b, imgs)
        cka.update(feats_a, feats_b)
    matrix = cka.compute()
    result = {"matrix": matrix.tolist(), "a": name_a, "b": name_b,
              "layers_a": names_a, "layers_b": names_b,
              "unbiased": not args.biased, "batches": cka.batches, "dropped_batches": cka.dropped}
    with open(os.path.join(args.out_dir, "cka.json"), "w") as f:
        json.dump(result, f, indent=1)
    draw_cka_heatmap(matrix, name_a, name_b, os.path.join(args.out_dir, "cka.png"))
    plumbing.print0(f"wrote {args.out_dir}/cka.json and cka.png ({cka.batches} batches)")


def run_attn(args, device):
    ckpts = list(args.ckpt or [])
    models = args.model if len(args.model) > 1 else args.model * len(ckpts)
    if len(models) != len(ckpts):
        raise ValueError(f"--model names {len(models)} models for {len(ckpts)} checkpoints")
    labels = args.labels or [os.path.basename(c) for c in ckpts]
    if len(labels) != len(ckpts):
        raise ValueError(f"--labels names {len(labels)} labels for {len(ckpts)} checkpoints")
    vits = [load_model(c, m, args.img_size, args.patch_size, trust=args.trust_checkpoint)
            for c, m in zip(ckpts, models)]
    if args.random_init:
        vits.append(load_model(None, args.random_init, args.img_size, args.patch_size))
        labels.append(f"random {args.random_init}")
    if not vits:
        raise ValueError("give --ckpt and/or --random-init")
    result = {}
    distance_key = {"pixels": "distance_px", "paper": "distance_paper_units"}[args.distance_unit]
    for label, vit in zip(labels, vits):
        vit = vit.to(device)
        if hasattr(vit, "stage_ends") and args.distance_unit == "paper":
            raise ValueError("--distance-unit paper is defined on a ViT's patch grid (x 14); "
                             "Hiera's pooled grids have other strides: use pixels")
        if hasattr(vit, "stage_ends"):
            kept = global_blocks(vit)
            skipped = [b for b in range(1, vit.depth + 1) if b not in kept]
            plumbing.print0(f"{label}: Hiera global-attention blocks {kept} analysed; mask-unit "
                            f"and pooling blocks {skipped} skipped")
        sums = {}
        count = 0
        for imgs, _ in analysis_loader(args):
            for block, probs in attention_maps(vit, imgs.to(device)).items():
                dist = attention_distance(probs, *block_geometry(vit, block),
                                          unit=args.distance_unit) * len(imgs)
                ent = attention_entropy(probs) * len(imgs)
                prev = sums.get(block, (0, 0))
                sums[block] = (prev[0] + dist.cpu(), prev[1] + ent.cpu())
            count += len(imgs)
        result[label] = {"blocks": sorted(sums),
                         distance_key: [(sums[b][0] / count).tolist() for b in sorted(sums)],
                         "entropy_nats": [(sums[b][1] / count).tolist() for b in sorted(sums)]}
    with open(os.path.join(args.out_dir, "attn.json"), "w") as f:
        json.dump({"layers": "blocks 1..depth; per block one value per head", **result}, f,
                  indent=1)
    unit_name = {"pixels": "pixels", "paper": "grid x 14, the papers' units"}[args.distance_unit]
    draw_boxplots({k: v[distance_key] for k, v in result.items()}, labels,
                  f"attention distance ({unit_name})",
                  os.path.join(args.out_dir, "attn_distance.png"),
                  result[labels[0]]["blocks"])
    draw_boxplots({k: v["entropy_nats"] for k, v in result.items()}, labels,
                  "attention entropy (nats)", os.path.join(args.out_dir, "attn_entropy.png"),
                  result[labels[0]]["blocks"])
    plumbing.print0(f"wrote {args.out_dir}/attn.json, attn_distance.png and attn_entropy.png")


NUM_IMAGES = 1024  # what cka and attn analyse by default


def get_parser():
    p = argparse.ArgumentParser(description="CKA and attention analyses, and viewers of a run "
                                            "(nanoMIM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-checkpoint", action="store_true",
                       help="unpickle checkpoint files in full (code in them can run); needed "
                            "only for files holding Python objects besides tensors")
    common = argparse.ArgumentParser(add_help=False, parents=[trust])
    common.add_argument("--data", default="synthetic", choices=DATASETS,
                        help="dataset; its val split")
    common.add_argument("--data-root", default=None, help="dataset folder")
    common.add_argument("--num-images", type=int, default=NUM_IMAGES, help="images analysed "
                        "(cka, attn; probe: --max-images)")
    common.add_argument("--batch-size", type=int, default=64, help="images per batch")
    common.add_argument("--img-size", type=int, default=224, help="input size in pixels")
    common.add_argument("--patch-size", type=int, default=16, help="patch size in pixels")
    common.add_argument("--random-init", default=None, metavar="MODEL",
                        help="a randomly initialised MODEL as reference (cka: model B; attn: "
                             "one more model)")
    common.add_argument("--out-dir", default="out/analysis", help="where JSON and PNGs go")
    cka = sub.add_parser("cka", parents=[common], help="layer-wise CKA heatmap",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cka.add_argument("--a", required=True, help="checkpoint of model A (y axis)")
    cka.add_argument("--b", default=None, help="checkpoint of model B (x axis; default: A)")
    cka.add_argument("--model-a", default="vit_tiny", help="architecture of A")
    cka.add_argument("--model-b", default=None, help="architecture of B (default: --model-a)")
    cka.add_argument("--names", nargs="+", default=None, help="names of A and B in the figure")
    cka.add_argument("--biased", action="store_true", help="classic biased HSIC instead of HSIC_1")
    attn = sub.add_parser("attn", parents=[common], help="attention distance and entropy",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    attn.add_argument("--ckpt", nargs="+", default=None, help="checkpoints to compare")
    attn.add_argument("--model", nargs="+", default=["vit_tiny"],
                      help="architecture, one for all or one per checkpoint")
    attn.add_argument("--labels", nargs="+", default=None, help="legend labels")
    attn.add_argument("--distance-unit", default="pixels", choices=["pixels", "paper"],
                      help="pixels (grid distance x patch size) or the papers' figures' units "
                           "(grid distance x 14, as their analysis code)")

    add_probe_command(sub, common)

    viewer = argparse.ArgumentParser(add_help=False, parents=[trust])
    viewer.add_argument("--ckpt", required=True, help="checkpoint file")
    viewer.add_argument("--model", default=None,
                        help="architecture, for files that do not say (our runs' args do, and "
                             "win); none given: the preset of the file's width and depth")
    viewer.add_argument("--images", nargs="+", default=None, metavar="FILE",
                        help="image files to show, any size (resized and centre-cropped as for "
                             "evaluation); none given: --data's validation images")
    viewer.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset")
    viewer.add_argument("--data-root", default=None, help="dataset folder")
    viewer.add_argument("--img-size", type=int, default=None,
                        help="input size in pixels (none given: the run's, else the size the "
                             "file's position embedding was made for)")
    viewer.add_argument("--out-dir", default="out/analysis", help="where the PNG goes")
    recon = sub.add_parser("recon", parents=[viewer],
                           help="originals / masked inputs / reconstructions of an MAE",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    recon.add_argument("--num-images", type=int, default=8, help="dataset images (columns)")
    recon.add_argument("--mask-ratio", type=float, default=None,
                       help="fraction of patches removed (none given: the run's, else the "
                            "model's pre-training default)")
    recon.add_argument("--seed", type=int, default=0, help="seed of the random masking")
    recon.add_argument("--norm-pix", default="auto", choices=["auto", "on", "off", "both"],
                       help="on: de-normalise each predicted patch with the true patch's mean "
                            "and std (models trained with norm-pix loss); off: the raw "
                            "prediction; both: one row each; auto: the run's norm_pix_loss, off "
                            "for files named *visualize*, else on")
    recon.add_argument("--decoder-heads", type=int, default=None,
                       help="decoder heads for files that do not say (none given: the "
                            "model's pre-training default, e.g. 16 for vit_base / vit_large)")
    attnmap = sub.add_parser("attnmap", parents=[viewer],
                             help="the cls token's attention maps over the image, per head",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    attnmap.add_argument("--num-images", type=int, default=4, help="dataset images (rows)")
    attnmap.add_argument("--block", type=int, default=None,
                         help="block whose attention is shown, 1-indexed (none given: the last)")
    curves = sub.add_parser("curves", help="loss, lr and top-1 of one or more runs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    curves.add_argument("logs", nargs="+", metavar="LOG.jsonl",
                        help="log.jsonl files of mae.py, moco.py or finetune.py runs")
    curves.add_argument("--labels", nargs="+", default=None,
                        help="one legend label a log (none given: each log's folder name)")
    curves.add_argument("--out", default="out/analysis/curves.png", help="the PNG written")
    return p


# The range of every numeric flag, per subcommand (plumbing.check_ranges). CKA's unbiased HSIC
# needs at least 4 images in a batch.
SIZES = {"img_size": "[1, inf)", "patch_size": "[1, inf)"}
RANGES = {"cka": dict(SIZES, num_images="[4, inf)", batch_size="[4, inf)"),
          "attn": dict(SIZES, num_images="[4, inf)", batch_size="[1, inf)"),
          "recon": dict(SIZES, num_images="[1, inf)", seed="[0, 4294967295]",
                        decoder_heads="[1, inf)"),
          "attnmap": dict(SIZES, num_images="[1, inf)", block="[1, inf)"),
          "probe": dict(SIZES, num_images="[1, inf)", batch_size="[1, inf)",
                        labels_per_class="[1, inf)", max_images="[1, inf)"),
          "curves": {}}


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    plumbing.check_ranges(parser, args, {k: v for k, v in RANGES[args.command].items()
                                         if hasattr(args, k)})
    if args.command == "curves":
        if not args.out.lower().endswith(".png") or os.path.basename(args.out).lower() == ".png":
            parser.error(f"--out {args.out} must name a .png file (curves.png)")
        plumbing.check_out_dir(parser, os.path.dirname(args.out) or ".", "--out's folder")
        if args.labels is not None and len(args.labels) != len(args.logs):
            parser.error(f"--labels gives {len(args.labels)} labels for {len(args.logs)} logs")
    else:
        plumbing.check_out_dir(parser, args.out_dir)
    if args.command == "probe" and args.data == "folder":
        parser.error("--data folder has no labels: probes need class folders (--data imagefolder)")
    if args.command == "probe":
        check_probe_flags(parser, args, NUM_IMAGES)
    if args.command == "cka" and args.names is not None and len(args.names) > 2:
        parser.error(f"--names takes the names of A and B, not {len(args.names)}")
    if args.command == "cka" and args.random_init and (args.b or args.model_b):
        parser.error("--random-init is model B: give it, or --b / --model-b, not both")
    if args.command == "cka" and args.model_b and not args.b:
        parser.error("--model-b names the architecture of --b: give --b too (without it, A is "
                     "compared with itself)")
    try:
        if args.command == "curves":
            viewers.run_curves(args)
            return
        os.makedirs(args.out_dir, exist_ok=True)
        run = {"cka": run_cka, "attn": run_attn, "probe": run_probe, "recon": viewers.run_recon,
               "attnmap": viewers.run_attnmap}
        run[args.command](args, plumbing.default_device())
    except (DataError, CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
