"""analyze.py: the papers' two analyses of what pre-training taught a ViT, with figures, and
three viewers of a run.

    python analyze.py cka  --a CKPT_A [--b CKPT_B]      # layer-wise CKA heatmap (cka.json/png)
    python analyze.py attn --ckpt CKPT [CKPT ...]       # attention distance and entropy per head
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
from PIL import Image, ImageDraw, ImageFont

import plumbing

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
            plumbing.print0(f"note: dropped a batch of {n} images (CKA needs at least 4)", file=sys.stderr)
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
    from hiera import unroll_order

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


# ----------------------------------------------------------------------------------------------
# Figures (PIL only)

VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def colormap(value):
    """A value in [0, 1] -> an RGB colour of (approximately) viridis."""
    v = min(max(float(value), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(v), len(VIRIDIS) - 2)
    t = v - i
    return tuple(round(a + (b - a) * t) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def text_centered(draw, xy, text, fnt, fill=(0, 0, 0)):
    draw.text(xy, text, font=fnt, fill=fill, anchor="mm")


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
        text_centered(draw, (x0 + group / 2 - 7, top + plot_h + 12), str(blocks[layer] if blocks else layer + 1), small)
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


def draw_curves(series, title, path=None, width=520, height=300, xlabel=None):
    """A line plot with PIL: series = {label: [(x, y), ...]}, one colour per label. Points whose
    x or y is not finite are left out; a lone point is drawn as a dot; an empty plot says so.
    Returns the image, saved to path when one is given."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 30, width - 150, height - 30
    series = {label: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
              for label, pts in series.items()}
    points = [pt for pts in series.values() for pt in pts] or [(0, 0)]  # empty: axes 0..1
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text((4, top), f"{y1:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{y0:.3g}", fill="black")
    draw.text((left, bottom + 8), f"{x0:g}", fill="black")
    draw.text((right - 30, bottom + 8), f"{x1:g}", fill="black")
    if xlabel:
        draw.text(((left + right) / 2, bottom + 8), xlabel, fill="black", anchor="ma")
    if not any(series.values()):
        draw.text(((left + right) / 2, (top + bottom) / 2), "no data", fill="black", anchor="mm")
    for i, (label, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [(left + (x - x0) / (x1 - x0) * (right - left),
               bottom - (y - y0) / (y1 - y0) * (bottom - top)) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        elif xy:
            (x, y), = xy
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.rectangle([right + 10, top + 16 * i, right + 20, top + 16 * i + 10], fill=color)
        draw.text((right + 26, top + 16 * i), label, fill="black")
    if path is not None:
        img.save(path)
    return img


# Dark blue -> blue -> cyan -> yellow -> red -> dark red: a jet-like heat map for the overlays.
HEAT = [(0, 0, 143), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)]
ENLARGE_TO = 96  # images smaller than this many pixels a side are enlarged (nearest) to be seen
LABEL_STRIP = 20  # pixels above the attention figure that hold the column titles


def heat_colors(values):
    """(...,) values in [0, 1] -> (..., 3) RGB in [0, 1], interpolated along HEAT."""
    stops = torch.tensor(HEAT, dtype=torch.float32, device=values.device) / 255  # (S, 3)
    v = values.clamp(0, 1) * (len(HEAT) - 1)
    i = v.floor().long().clamp(max=len(HEAT) - 2)
    t = (v - i).unsqueeze(-1)
    return stops[i] * (1 - t) + stops[i + 1] * t


def to_pil(picture, scale=1):
    """(3, H, W) in [0, 1] -> a PIL image, enlarged `scale` times (nearest)."""
    array = (picture.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def enlarge_factor(imgs):
    """How many times a figure of these (B, 3, H, W) images is enlarged: small ones up to about
    ENLARGE_TO pixels, others not at all."""
    return max(1, ENLARGE_TO // imgs.shape[-1])


# ----------------------------------------------------------------------------------------------
# Viewer 1: MAE reconstructions


@torch.no_grad()
def reconstruction_figure(model, imgs, mask_ratio, path, seed=0, norm_pix=None):
    """Save a PNG of originals / masked inputs / reconstructions (visible patches pasted back),
    one column per image, for any pre-training model (MAE, HieraMAE: anything whose forward
    returns pred and mask, with recon_patch, recon_grid and mask_slots). imgs: (B, 3, H, W),
    ImageNet-normalised. The masking is drawn from `seed`, so figures of two runs compare.

    norm_pix says how predictions are drawn. A norm-pix model predicts each patch normalised by
    its own mean and std: True de-normalises every predicted patch with the true patch's mean
    and std (the shapes come from the model, each patch's brightness and contrast from the
    original); False draws the raw prediction (grey for a norm-pix model); "both" draws the two,
    one row each; None follows model.norm_pix_loss. Masked patches are the ImageNet mean grey
    (zero after normalisation). Returns the mask (B, L), 1 = removed, over the recon_grid patches.
    """
    import data
    from mae import patchify, unpatchify

    if norm_pix is None:
        variants = [model.norm_pix_loss]
    elif norm_pix == "both":
        variants = [True, False]
    elif isinstance(norm_pix, bool):
        variants = [norm_pix]
    else:
        raise ValueError(f"norm_pix must be None, True, False or 'both', got {norm_pix!r}")
    was_training = model.training
    model.eval()
    noise = torch.rand(imgs.shape[0], model.mask_slots,
                       generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    out = model(imgs, mask_ratio, noise)
    model.train(was_training)
    imgs = imgs.float()
    pred = out["pred"].float()  # (B, L, p*p*3)
    mask = out["mask"]  # (B, L), 1 = removed
    p = model.recon_patch
    grid = model.recon_grid
    removed = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3), p, grid) > 0.5  # pixels
    target = patchify(imgs, p)  # (B, L, p*p*3)
    rows = [imgs, torch.where(removed, torch.zeros_like(imgs), imgs)]
    for denormalise in variants:
        shown = pred
        if denormalise:  # undo the per-patch normalisation of the norm-pix target
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5  # (B, L, 1), as forward_loss
            shown = pred * std + target.mean(dim=-1, keepdim=True)
        rows.append(torch.where(removed, unpatchify(shown, p, grid), imgs))
    rows = [data.denormalize(r) for r in rows]  # each (B, 3, H, W) in [0, 1]
    picture = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows H, B W)
    to_pil(picture, enlarge_factor(imgs)).save(path)
    return mask


def read_run(path, trust=False):
    """(state dict, declared heads, run args) of a checkpoint file. Run args: our files' args, or
    a FAIR training file's argparse.Namespace as a dict; {} when the file has none."""
    from model import declared_heads, open_checkpoint, state_dict_of

    obj = open_checkpoint(path, trust)
    state = state_dict_of(obj, path)
    heads = declared_heads(path, obj, state)
    run_args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(run_args, argparse.Namespace):
        run_args = vars(run_args)
    return state, heads, run_args if isinstance(run_args, dict) else {}


def preset_of(state, heads=None):
    """The preset whose width and depth a state dict has, or None: ViTs by their cls token (the
    papers' vit_* before DeiT's, whose tensors have the same shapes, unless `heads` says
    otherwise), Hiera by its stem width and block count."""
    from hiera import HIERA_CONFIGS
    from model import VIT_CONFIGS

    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    if "cls_token" in state:
        width = state["cls_token"].shape[-1]
        found = [n for n, c in VIT_CONFIGS.items()
                 if (c["embed_dim"], c["depth"]) == (width, depth)]
        found.sort(key=lambda n: heads is not None and VIT_CONFIGS[n]["num_heads"] != heads)
    elif "patch_embed.proj.weight" in state:
        width = state["patch_embed.proj.weight"].shape[0]
        found = [n for n, c in HIERA_CONFIGS.items()
                 if (c["embed_dim"], sum(c["stages"])) == (width, depth)]
    else:
        return None
    return found[0] if found else None


def choose_model(path, state, heads, run_args, flag):
    """The architecture of a file: the run's --model (our args), else the --model flag, else the
    preset of its widths and depth. Raises CheckpointError naming the fix."""
    from hiera import HIERA_CONFIGS
    from model import VIT_CONFIGS, CheckpointError

    known = list(VIT_CONFIGS) + list(HIERA_CONFIGS)
    name = run_args.get("model") if run_args.get("model") in known else None
    if name and flag and flag != name:
        plumbing.print0(f"note: {path} was trained as --model {name}; --model {flag} is ignored")
    name = name or flag or preset_of(state, heads[0])
    if name is None:
        raise CheckpointError(f"{path} does not say its architecture and no preset has its "
                              f"widths and depth: give --model ({', '.join(known)})")
    if name not in known:
        raise CheckpointError(f"unknown --model {name}: choose one of {', '.join(known)}")
    return name


def image_size_of(path, state, run_args, flag, cls_token):
    """Input size: the --img-size flag, else the run's, else the one the file's position
    embedding was made for (its patch grid, square, times the patch or stem stride)."""
    from model import CheckpointError

    size = flag or run_args.get("img_size") or run_args.get("input_size")
    if size:
        return int(size)
    tokens = state["pos_embed"].shape[1] - (1 if cls_token else 0)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{path}'s position embedding has {tokens} patches, not a square "
                              "grid: give --img-size")
    stride = state["patch_embed.proj.weight"].shape[-1] if cls_token else 4  # Hiera: stride 4
    return side * stride


def official_hiera_decoder(state):
    """Official Hiera MAE flattens each target patch in (c, p, q) order, ours in (p, q, c) as
    FAIR's ViT MAE: reorder decoder_pred's output rows (p * p * 3 of them) to ours."""
    state = dict(state)
    patch = math.isqrt(state["decoder_pred.weight"].shape[0] // 3)
    for key in ("decoder_pred.weight", "decoder_pred.bias"):
        rows = state[key]  # (p*p*3, Dd) or (p*p*3,)
        state[key] = rows.reshape(3, patch, patch, -1).permute(1, 2, 0, 3).reshape(rows.shape)
    return state


def norm_pix_choice(path, run_args, flag):
    """(draw de-normalised?, why) for --norm-pix on / off / auto; 'both' is drawn as given."""
    if flag in ("on", "off"):
        return flag == "on", f"--norm-pix {flag}"
    if "norm_pix_loss" in run_args:
        on = bool(run_args["norm_pix_loss"])
        return on, f"the run's args say norm_pix_loss={on}"
    if "visualize" in os.path.basename(path):
        return False, "the file name says visualize: FAIR's files trained without norm-pix loss"
    return True, "the default for files that do not say (FAIR's released MAEs use norm-pix)"


def load_mae(path, model_name=None, img_size=None, decoder_heads=None, trust=False):
    """A pre-training model with its trained decoder, for reconstructions: an MAE from our files
    or FAIR's (_full and visualize files: encoder + decoder_* + mask_token), a HieraMAE from ours
    or official Hiera MAE files. The decoder's width and depth come from the file's tensors, its
    heads from the run's args, else decoder_heads, else the model's pre-training default.
    Returns (model, its preset name, run args); raises CheckpointError naming the fix."""
    from mae import DECODER_PREFIXES, PRETRAIN_DEFAULTS, build_mae
    from model import CheckpointError, load_pretrained

    state, heads, run_args = read_run(path, trust)
    if "decoder_embed.weight" not in state:
        raise CheckpointError(f"{path} has no decoder: recon needs a pre-training checkpoint with "
                              "the decoder (FAIR's _full or visualize files, ours)")
    if run_args.get("recon_layer") == 0:
        raise CheckpointError(f"{path} is a distillation-only run (--no-recon): its decoder was "
                              "never trained")
    name = choose_model(path, state, heads, run_args, model_name)
    is_vit = "cls_token" in state
    decoder_dim = state["decoder_embed.weight"].shape[0]
    decoder_depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    decoder_heads = (run_args.get("decoder_heads") or decoder_heads
                     or PRETRAIN_DEFAULTS.get(name, {}).get("decoder_heads"))
    if not decoder_heads or decoder_dim % decoder_heads:
        tried = f"{decoder_heads} do not divide it" if decoder_heads else f"{name} has no default"
        raise CheckpointError(f"{path}'s decoder is {decoder_dim} wide and the file does not say "
                              f"how many heads it has ({tried}): give --decoder-heads")
    kwargs = dict(img_size=image_size_of(path, state, run_args, img_size, is_vit),
                  decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                  decoder_heads=decoder_heads)
    if is_vit:
        kwargs.update(patch_size=state["patch_embed.proj.weight"].shape[-1],
                      recon_layer=run_args.get("recon_layer"))
    elif not run_args:
        state = official_hiera_decoder(state)
        plumbing.print0(f"note: {path} has no run args, so it is taken for an official Hiera MAE "
                        "file: decoder_pred reordered from (c, p, q) to our (p, q, c)")
    model = build_mae(name, **kwargs)
    try:
        report = load_pretrained(model, state, verbose=False, heads=heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    fixed = [] if model.decoder_pos_embed.requires_grad else ["decoder_pos_embed"]  # sin-cos
    untrained = [k for k in report["initialised"] if k.startswith(DECODER_PREFIXES)
                 and k not in fixed]
    if untrained:
        raise CheckpointError(f"{path}'s decoder does not fit {name} at {kwargs['img_size']} px "
                              f"({', '.join(untrained[:3])} not loaded): leave out --img-size "
                              "(the file's) or give the --model it was trained as")
    plumbing.print0(f"{path}: {len(report['loaded'])} tensors loaded into {name} with a "
                    f"{decoder_dim} x {decoder_depth} x {decoder_heads} decoder "
                    f"(width x blocks x heads)")
    return model.eval(), name, run_args


# ----------------------------------------------------------------------------------------------
# Viewer 2: the cls token's attention


@torch.no_grad()
def cls_attention_maps(vit, imgs, block):
    """(B, 1 + heads, rows, cols): the attention of the cls token (query 0) to every patch at
    1-indexed `block`, the probabilities the model uses (softmax over all keys, the cls key
    included and then left out, as DINO's figures); index 0 is the mean over heads."""
    _, _, logits = vit.forward_features(imgs, depth=block, return_attn=[block])
    probs = logits[block][:, :, 0].float().softmax(dim=-1)[:, :, 1:]  # (B, heads, L): patch keys
    maps = probs.reshape(*probs.shape[:2], *vit.grid)  # (B, heads, rows, cols)
    return torch.cat([maps.mean(dim=1, keepdim=True), maps], dim=1)


@torch.no_grad()
def attention_figure(vit, imgs, block, path):
    """Save a PNG, one row per image: the image, then the cls token's attention at `block`
    averaged over heads and per head, each map scaled to its own [min, max], upsampled
    (bilinear) to the image and laid over it in HEAT colours. Returns the maps as
    cls_attention_maps gives them (before the scaling)."""
    import torch.nn.functional as F

    import data

    maps = cls_attention_maps(vit, imgs, block)  # (B, 1 + heads, rows, cols)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    scaled = F.interpolate((maps - lo) / (hi - lo).clamp_min(1e-12), size=imgs.shape[-2:],
                           mode="bilinear", align_corners=False)  # (B, 1 + heads, H, W)
    shown = data.denormalize(imgs.float())  # (B, 3, H, W)
    heat = heat_colors(scaled).permute(0, 1, 4, 2, 3)  # (B, 1 + heads, 3, H, W)
    tiles = torch.cat([shown[:, None], 0.5 * shown[:, None] + 0.5 * heat], dim=1)
    B, columns, _, H, W = tiles.shape
    picture = tiles.permute(2, 0, 3, 1, 4).reshape(3, B * H, columns * W)  # rows: images
    scale = enlarge_factor(imgs)
    body = to_pil(picture, scale)
    figure = Image.new("RGB", (body.width, body.height + LABEL_STRIP), "white")
    figure.paste(body, (0, LABEL_STRIP))
    draw = ImageDraw.Draw(figure)
    titles = ["image", "mean"] + [f"head {h}" for h in range(1, columns - 1)]
    for c, title in enumerate(titles):
        text_centered(draw, ((c + 0.5) * W * scale, LABEL_STRIP / 2), title, font(12))
    figure.save(path)
    return maps


# ----------------------------------------------------------------------------------------------
# Viewer 3: training curves


class LogError(ValueError):
    """A training log that cannot be read (message names the fix)."""


def read_log(path):
    """The records of a JSONL log (one JSON object a line, blank lines skipped)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        why = "it does not exist" if isinstance(e, FileNotFoundError) else type(e).__name__
        raise LogError(f"cannot read log {path} ({why}): give the log.jsonl of a mae.py or "
                       "finetune.py run") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # NaN / Infinity, as json.dumps writes them, are read
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise LogError(f"{path} line {number} is not a JSON object: is it the log.jsonl of a "
                           "mae.py or finetune.py run?")
        records.append(record)
    if not records:
        raise LogError(f"{path} holds no records: give the log.jsonl of a run that made a step")
    return records


def points(records, x, y):
    """[(x, y)] of the records that hold both as finite numbers."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return [(r[x], r[y]) for r in records if number(r.get(x)) and number(r.get(y))]


def curve_panels(runs):
    """runs {label: records} -> [(title, x label, {label: points})]: training loss and lr by
    step (mae.py's lines, finetune.py's training lines), top-1 by epoch (finetune.py's
    evaluation lines, which hold top1) when any run has them."""
    train = {label: [r for r in records if "top1" not in r] for label, records in runs.items()}
    panels = [("loss", "step", {label: points(rs, "step", "loss") for label, rs in train.items()}),
              ("learning rate", "step", {label: points(rs, "step", "lr")
                                         for label, rs in train.items()})]
    top1 = {label: points(records, "epoch", "top1") for label, records in runs.items()}
    if any(top1.values()):
        panels.append(("top-1 accuracy (%)", "epoch", top1))
    return panels


def run_labels(log_paths):
    """Each log's folder name (out/mae/log.jsonl -> mae), or its path where two folders share a
    name."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in log_paths]
    return names if len(set(names)) == len(names) else [str(p) for p in log_paths]


def write_curves(log_paths, png_path, labels=None):
    """One PNG of the loss and lr by step, and top-1 by epoch when a log has evaluation records,
    of one or more runs (one colour a run), panels side by side. Non-finite values are left out;
    a log with one record, or none, draws what it has. Raises LogError for a missing or
    unreadable log, ValueError when labels and logs differ in number."""
    log_paths = [log_paths] if isinstance(log_paths, (str, os.PathLike)) else list(log_paths)
    labels = list(labels) if labels else run_labels(log_paths)
    if len(labels) != len(log_paths) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels names {len(labels)} runs for {len(log_paths)} logs: give one "
                         "distinct label a log")
    runs = {label: read_log(path) for label, path in zip(labels, log_paths)}
    panels = [draw_curves(series, title, xlabel=xlabel) for title, xlabel, series in
              curve_panels(runs)]
    figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (sum(p.width for p in panels[:i]), 0))
    if os.path.dirname(str(png_path)):
        os.makedirs(os.path.dirname(str(png_path)), exist_ok=True)
    figure.save(png_path)
    return figure


def write_run_curves(out_dir):
    """The training scripts' curves.png of out_dir/log.jsonl; a log that cannot be drawn gives
    a note, never an error at the end of a run that worked. Returns the PNG's path or None."""
    png = os.path.join(out_dir, "curves.png")
    try:
        write_curves([os.path.join(out_dir, "log.jsonl")], png)
    except LogError as e:
        plumbing.print0(f"note: no curves.png ({e})")
        return None
    return png


# ----------------------------------------------------------------------------------------------
# Command line


def load_model(path, model_name, img_size, patch_size, seed=0, trust=False, checkpoint=None,
               flag="--model"):
    """A ViT for analysis from any supported checkpoint (ours, FAIR MAE, MAE-Lite, timm), or a
    randomly initialised one when path is None. The pooling (final norm or fc_norm) follows the
    file, so the last layer is normalised by trained weights. trust: unpickle the file in full
    (--trust-checkpoint); checkpoint: its (state dict, declared heads) when already read."""
    from model import CheckpointError, build_model, load_pretrained, read_checkpoint

    state = None
    heads = (None, None)
    if path is not None:
        state, heads = checkpoint or read_checkpoint(path, trust)
    pool = "avg" if state is not None and "fc_norm.weight" in state and "norm.weight" not in state \
        else "token"
    torch.manual_seed(seed)
    if model_name.startswith("hiera"):
        vit = build_model(model_name, img_size=img_size, num_classes=0)
    else:
        vit = build_model(model_name, img_size=img_size, patch_size=patch_size, global_pool=pool)
    if state is not None:
        try:
            report = load_pretrained(vit, state, verbose=False, heads=heads, flag=flag)
        except CheckpointError as e:  # name the file, not "the state dict"
            raise CheckpointError(f"{path}: {e}") from None
        plumbing.print0(f"{path}: {len(report['loaded'])} tensors loaded into {model_name}")
    return vit.eval()


def analysis_loader(args):
    """The first --num-images validation images, centre-cropped, in a fixed order."""
    import data

    dataset = data.build_dataset(args.data, args.data_root, "val", data.eval_transform(args.img_size),
                                 synthetic_size=4 * args.num_images, img_size=args.img_size)
    subset = torch.utils.data.Subset(dataset, range(min(args.num_images, len(dataset))))
    return data.make_loader(subset, args.batch_size, epoch=0, seed=0, num_workers=0,
                            shuffle=False, drop_last=False)


def run_cka(args, device):
    name_a = args.names[0] if args.names else os.path.basename(args.a)
    model_a = load_model(args.a, args.model_a, args.img_size, args.patch_size,
                         trust=args.trust_checkpoint, flag="--model-a").to(device)
    if args.random_init:
        name_b = args.names[1] if args.names and len(args.names) > 1 else f"random {args.random_init}"
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
            plumbing.print0(f"{label}: Hiera global-attention blocks {kept} analysed; mask-unit and "
                  f"pooling blocks {[b for b in range(1, vit.depth + 1) if b not in kept]} skipped")
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
                  f"attention distance ({unit_name})", os.path.join(args.out_dir, "attn_distance.png"),
                  result[labels[0]]["blocks"])
    draw_boxplots({k: v["entropy_nats"] for k, v in result.items()}, labels,
                  "attention entropy (nats)", os.path.join(args.out_dir, "attn_entropy.png"),
                  result[labels[0]]["blocks"])
    plumbing.print0(f"wrote {args.out_dir}/attn.json, attn_distance.png and attn_entropy.png")


def read_images(paths, img_size):
    """(B, 3, img_size, img_size) from image files, opened with PIL as RGB and transformed as
    for evaluation (short side resized, centre crop, ImageNet normalisation)."""
    import data

    transform = data.eval_transform(img_size)
    imgs = []
    for path in paths:
        if not os.path.isfile(path):
            raise data.DataError(f"image {path} does not exist: check the path")
        try:
            imgs.append(transform(data.load_rgb(path)))  # EXIF-upright, as the loaders
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise data.DataError(f"cannot read image {path} ({type(e).__name__}): the file is "
                                 "damaged or not an image") from None
    return torch.stack(imgs)


def dataset_images(args, img_size):
    """The first --num-images readable images of --data's validation split (else its training
    split), transformed as for evaluation."""
    import data

    transform = data.eval_transform(img_size)
    try:
        dataset = data.build_dataset(args.data, args.data_root, "val", transform,
                                     synthetic_size=4 * args.num_images, img_size=img_size)
    except data.DataError:
        dataset = data.build_dataset(args.data, args.data_root, "train", transform,
                                     synthetic_size=4 * args.num_images, img_size=img_size)
    samples = (dataset[i] for i in range(min(args.num_images, len(dataset))))
    imgs = [s[0] for s in samples if s is not None]
    if not imgs:
        raise data.DataError(f"none of the first {args.num_images} images of {args.data} could be "
                             "read")
    return torch.stack(imgs)


def viewer_images(args, img_size):
    return read_images(args.images, img_size) if args.images else dataset_images(args, img_size)


def run_recon(args, device):
    from mae import PRETRAIN_DEFAULTS

    model, name, run_args = load_mae(args.ckpt, args.model, args.img_size, args.decoder_heads,
                                     trust=args.trust_checkpoint)
    mask_ratio = args.mask_ratio
    if mask_ratio is None:  # the run's, else the model's pre-training default (deit_*: ViTs')
        default = PRETRAIN_DEFAULTS.get(name, PRETRAIN_DEFAULTS["vit_tiny"])["mask_ratio"]
        mask_ratio = run_args.get("mask_ratio", default)
    if not 0 <= mask_ratio < 1 or int(model.mask_slots * (1 - mask_ratio)) < 1:
        raise ValueError(f"--mask-ratio {mask_ratio} must be in [0, 1) and keep at least one of "
                         f"the {model.mask_slots} patches (Hiera: mask units)")
    if args.norm_pix == "both":
        norm_pix = "both"
        how = ("row 3 de-normalised with each true patch's mean and std, row 4 the raw "
               "prediction (--norm-pix both)")
    else:
        norm_pix, why = norm_pix_choice(args.ckpt, run_args, args.norm_pix)
        how = ("de-normalised with each true patch's mean and std" if norm_pix else
               "the raw prediction") + f" (norm-pix {'on' if norm_pix else 'off'}: {why})"
    imgs = viewer_images(args, model.img_size[0]).to(device)
    png = os.path.join(args.out_dir, "recon.png")
    reconstruction_figure(model.to(device), imgs, mask_ratio, png, seed=args.seed,
                          norm_pix=norm_pix)
    plumbing.print0(f"wrote {png}: {len(imgs)} images, mask ratio {mask_ratio} (seed "
                    f"{args.seed}); reconstructions {how}")


def run_attnmap(args, device):
    state, heads, run_args = read_run(args.ckpt, args.trust_checkpoint)
    name = choose_model(args.ckpt, state, heads, run_args, args.model)
    if name.startswith("hiera"):
        raise ValueError(f"attnmap shows the cls token's attention and {name} has no cls token: "
                         "use analyze.py attn for Hiera's attention distance and entropy")
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"{args.ckpt} holds no ViT patch embedding: is it a ViT checkpoint?")
    img_size = image_size_of(args.ckpt, state, run_args, args.img_size, cls_token=True)
    vit = load_model(args.ckpt, name, img_size, state["patch_embed.proj.weight"].shape[-1],
                     checkpoint=(state, heads)).to(device)
    block = args.block or vit.depth
    if not 1 <= block <= vit.depth:
        raise ValueError(f"--block {block} is beyond {name}'s {vit.depth} blocks (choose "
                         f"1..{vit.depth})")
    imgs = viewer_images(args, img_size).to(device)
    png = os.path.join(args.out_dir, "attnmap.png")
    attention_figure(vit, imgs, block, png)
    plumbing.print0(f"wrote {png}: the cls token's attention at block {block} of {vit.depth}, "
                    f"{len(imgs)} images x (mean + {vit.num_heads} heads), each map scaled to "
                    "its own range")


def run_curves(args):
    write_curves(args.logs, args.out, args.labels)
    plumbing.print0(f"wrote {args.out} ({len(args.logs)} run(s))")


def get_parser():
    from data import DATASETS

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
    common.add_argument("--num-images", type=int, default=1024, help="images analysed")
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
                        help="log.jsonl files of mae.py or finetune.py runs")
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
          "curves": {}}


def main(argv=None):
    from data import DataError
    from model import CheckpointError

    parser = get_parser()
    args = parser.parse_args(argv)
    plumbing.check_ranges(parser, args, {k: v for k, v in RANGES[args.command].items()
                                         if hasattr(args, k)})
    if args.command == "curves":
        if not args.out.endswith(".png"):
            parser.error(f"--out {args.out} must name a .png file")
        plumbing.check_out_dir(parser, os.path.dirname(args.out) or ".", "--out's folder")
        if args.labels is not None and len(args.labels) != len(args.logs):
            parser.error(f"--labels gives {len(args.labels)} labels for {len(args.logs)} logs")
    else:
        plumbing.check_out_dir(parser, args.out_dir)
    if args.command == "cka" and args.names is not None and len(args.names) > 2:
        parser.error(f"--names takes the names of A and B, not {len(args.names)}")
    try:
        if args.command == "curves":
            run_curves(args)
            return
        os.makedirs(args.out_dir, exist_ok=True)
        run = {"cka": run_cka, "attn": run_attn, "recon": run_recon, "attnmap": run_attnmap}
        run[args.command](args, plumbing.default_device())
    except (DataError, CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
