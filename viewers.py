"""viewers.py: pictures of a run, drawn with PIL (no matplotlib): MAE reconstructions, the cls
token's attention over the image, and training curves; with the line plot and colours that
analyze.py's figures share. analyze.py is their command line:

    python analyze.py recon --ckpt CKPT [--images F ...]  # originals / masked / reconstructions
    python analyze.py attnmap --ckpt CKPT [--block B]   # the cls token's attention, per head
    python analyze.py curves LOG.jsonl [LOG.jsonl ...]  # loss, lr and top-1 of runs

mae.py, finetune.py and moco.py call write_run_curves (and mae.py reconstruction_figure) at the
end of every run.
"""
import json
import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

import augment
import data
import plumbing
from checkpoints import (CheckpointError, choose_model, image_size_of, load_model,
                         load_pretrained, read_run)
from mae_model import DECODER_PREFIXES, PRETRAIN_DEFAULTS, patchify, unpatchify
from presets import build_mae, preset_facts

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
    # a flat series gets a span of its own size (x0 + 1 == x0 once |x0| > 1e16)
    x1 = x1 if x1 > x0 else x0 + max(1.0, abs(x0))
    y1 = y1 if y1 > y0 else y0 + max(1.0, abs(y0))
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
    rows = [augment.denormalize(r) for r in rows]  # each (B, 3, H, W) in [0, 1]
    picture = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows H, B W)
    to_pil(picture, enlarge_factor(imgs)).save(path)
    return mask


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

    maps = cls_attention_maps(vit, imgs, block)  # (B, 1 + heads, rows, cols)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    scaled = F.interpolate((maps - lo) / (hi - lo).clamp_min(1e-12), size=imgs.shape[-2:],
                           mode="bilinear", align_corners=False)  # (B, 1 + heads, H, W)
    shown = augment.denormalize(imgs.float())  # (B, 3, H, W)
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
                           "mae.py, moco.py or finetune.py run?")
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
    evaluation lines, which hold top1) and the kNN monitor's top-1 by epoch when any run has
    them."""
    train = {label: [r for r in records if "top1" not in r] for label, records in runs.items()}
    panels = [("loss", "step", {label: points(rs, "step", "loss") for label, rs in train.items()}),
              ("learning rate", "step", {label: points(rs, "step", "lr")
                                         for label, rs in train.items()})]
    top1 = {label: points(records, "epoch", "top1") for label, records in runs.items()}
    if any(top1.values()):
        panels.append(("top-1 accuracy (%)", "epoch", top1))
    knn = {label: points(records, "epoch", "knn_top1") for label, records in runs.items()}
    if any(knn.values()):  # mae.py / moco.py --knn-every
        panels.append(("kNN top-1 (%)", "epoch", knn))
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
    if len({os.path.abspath(p) for p in log_paths}) != len(log_paths):
        raise ValueError("a log is given twice: give each log once")
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
# The viewers' command lines (analyze.py parses the flags)


def read_images(paths, img_size):
    """(B, 3, img_size, img_size) from image files, opened with PIL as RGB and transformed as
    for evaluation (short side resized, centre crop, ImageNet normalisation)."""
    transform = augment.eval_transform(img_size)
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
    transform = augment.eval_transform(img_size)
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
    if "token" not in preset_facts(name)["poolings"]:
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
