"""augment.py: every image transform of nanoMIM, PIL image in, normalised tensor out.

MAE's crop and flip (and TinyMIM's jittered pair), evaluation's resize and centre crop,
fine-tuning's RandAugment, random erasing and mixup / cutmix (timm's, as the papers' code
calls them), and MoCo-v3's two asymmetric views. Depends on torch, torchvision and PIL only.
"""
import random

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

# ----------------------------------------------------------------------------------------------
# Pre-training (MAE) and evaluation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Crop interpolation choices: "random" draws bilinear or bicubic per image (timm's "random").
INTERPOLATIONS = {"bicubic": [InterpolationMode.BICUBIC], "bilinear": [InterpolationMode.BILINEAR],
                  "random": [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC]}


def pretrain_transform(img_size, min_scale=0.2, interpolation="bicubic", student_color_jitter=0.0,
                       uint8=False):
    """MAE pre-training augmentation: RandomResizedCrop(min_scale-1), flip, normalise.

    FAIR MAE crops with min_scale 0.2, bicubic; MAE-Lite's code (the papers' MAE-Tiny, D-MAE,
    D^2-MAE) with 0.08 and interpolation "random" (bilinear or bicubic, drawn per image, timm's).
    student_color_jitter > 0 (TinyMIM) returns a (2, C, S, S) pair [teacher view, student view]
    of the same crop and flip, with ColorJitter(j, j, j) on the student's view only.
    uint8=True stops before the scaling and normalisation, which `normalize` then does on the
    whole batch on the device, with the same numbers (as timm's prefetching loader): a loader
    worker is spared the float work and the batches are a quarter of the bytes."""
    crop = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=mode,
                                 antialias=True) for mode in INTERPOLATIONS[interpolation]]
    geometry = v2.Compose([crop[0] if len(crop) == 1 else v2.RandomChoice(crop),
                           v2.RandomHorizontalFlip()])
    to_tensor = v2.ToImage() if uint8 else v2.Compose([v2.ToImage(), Normalize()])
    if student_color_jitter <= 0:
        return v2.Compose([geometry, to_tensor])
    return TwoViews(geometry, to_tensor, v2.ColorJitter(*(3 * [student_color_jitter])))


def normalize(imgs):
    """uint8 images (..., C, H, W), on any device -> float32 in [0, 1], ImageNet-normalised:
    torchvision's ToDtype(scale=True) and Normalize kernels, so the same numbers as
    pretrain_transform's float output, for a batch at once."""
    scaled = v2.functional.to_dtype(imgs, torch.float32, scale=True)
    return v2.functional.normalize(scaled, list(IMAGENET_MEAN), list(IMAGENET_STD))


class Normalize:
    """`normalize` as a transform step (a class, so that loader workers can pickle it)."""

    def __call__(self, img):
        return normalize(img)


class TwoViews:
    """TinyMIM's pair from one image: a shared crop and flip, then [teacher view, student view],
    only the student's colour-jittered (brightness, contrast, saturation). A class, not a
    closure, so that loader workers can pickle it."""

    def __init__(self, geometry, to_tensor, jitter):
        self.geometry = geometry
        self.to_tensor = to_tensor
        self.jitter = jitter

    def __call__(self, img):
        img = self.geometry(img)
        return torch.stack([self.to_tensor(img), self.to_tensor(self.jitter(img))])  # (2, C, S, S)


def eval_transform(img_size):
    """Evaluation: resize the short side to 256/224 of the size (bicubic), centre crop."""
    return v2.Compose([
        v2.Resize(int(img_size * 256 / 224), interpolation=InterpolationMode.BICUBIC,
                  antialias=True),
        v2.CenterCrop(img_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(imgs):
    """(B, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# Fine-tuning: RandAugment, random erasing, mixup / cutmix


# RandAugment as the papers' fine-tuning code calls it: timm's "rand-m10-mstd0.5-inc1" (impr)
# or "rand-m9-mstd0.5-inc1" (FAIR's mae recipe). The "increasing" op set (no Identity; Invert
# and SolarizeAdd in), each op's strength growing with the level on a 0-10 scale.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel")


MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104): timm's fill


def rand_op(img, name, level, sign=1.0, resample=Image.BICUBIC, fill=MEAN_PIXEL):
    """One op of RAND_OPS on an RGB PIL image at `level` in [0, 10] (timm's level-to-argument
    maps), `sign` +1 or -1 for the ops that have a direction. Shears and translations call PIL's
    affine transform with timm's matrix (about the top-left corner); torchvision's affine would
    rebuild it from angles and differ in the last bit."""
    m = level / 10
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Rotate":  # about the centre, up to 30 degrees
        return TF.rotate(img, sign * m * 30, resample, fill=fill)  # Pillow's constant is accepted
    if name == "PosterizeIncreasing":  # keep 4 .. 0 bits; 0 bits is black (the papers' Pillow)
        bits = 4 - int(m * 4)
        return TF.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)
    if name == "SolarizeIncreasing":  # invert pixels >= 256 .. 0
        return TF.solarize(img, 256 - min(256, int(m * 256)))
    if name == "SolarizeAdd":  # add up to 110 to pixels below 128
        add = min(128, int(m * 110))
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    factor = max(0.1, 1.0 + sign * m * 0.9)  # the enhance ops: factor in [0.1, 1.9]
    enhance = {"ColorIncreasing": TF.adjust_saturation, "ContrastIncreasing": TF.adjust_contrast,
               "BrightnessIncreasing": TF.adjust_brightness,
               "SharpnessIncreasing": TF.adjust_sharpness}
    if name in enhance:
        return enhance[name](img, factor)
    shift = sign * m * 0.45  # translations: up to 45% of the side
    matrix = {"ShearX": (1, sign * m * 0.3, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * m * 0.3, 1, 0),
              "TranslateXRel": (1, 0, shift * img.size[0], 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, shift * img.size[1])}[name]
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


class RandAugment:
    """timm's RandAugment (rand-m{magnitude}-mstd{std}-inc1) on PIL images: num_ops ops drawn
    with replacement from RAND_OPS, each applied with probability `prob`, each with its own
    level drawn from N(magnitude, std) and clipped to [0, 10], and its own random sign; fill is
    the mean pixel, resampling bicubic. About 1 op per image on average (2 x 0.5)."""

    def __init__(self, magnitude=10, std=0.5, num_ops=2, prob=0.5):
        self.magnitude = magnitude
        self.std = std
        self.num_ops = num_ops
        self.prob = prob

    def __call__(self, img):
        for index in torch.randint(len(RAND_OPS), (self.num_ops,)).tolist():
            if torch.rand(()).item() >= self.prob:
                continue
            level = self.magnitude + self.std * torch.randn(()).item()
            sign = -1.0 if torch.rand(()).item() < 0.5 else 1.0
            img = rand_op(img, RAND_OPS[index], min(10.0, max(0.0, level)), sign)
        return img


def train_transform(args):
    """RandomResizedCrop (min_crop_scale-1, bicubic) + flip, then RandAugment or colour jitter,
    normalise, random erasing (timm's per-pixel noise)."""
    steps = [v2.RandomResizedCrop(args.img_size, scale=(args.min_crop_scale, 1.0),
                                  interpolation=InterpolationMode.BICUBIC, antialias=True),
             v2.RandomHorizontalFlip()]
    if args.rand_aug > 0:
        steps.append(RandAugment(args.rand_aug, args.rand_aug_std))
    elif args.color_jitter > 0:
        steps.append(v2.ColorJitter(*(3 * [args.color_jitter])))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if args.reprob > 0:
        steps.append(T.RandomErasing(p=args.reprob, value="random"))
    return v2.Compose(steps)


def build_mixing(args, num_classes):
    """Batch-level MixUp / CutMix (torchvision v2), switched with probability 0.5 when both are
    on, as timm; returns None when both are off. Targets become class probabilities."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return (v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0]) if mixers else None


# ----------------------------------------------------------------------------------------------
# MoCo-v3: two asymmetric views


class RandomBlur:
    """PIL's Gaussian blur with a sigma drawn from [low, high] (MoCo-v3's, from SimCLR)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img)  # invert pixels >= 128


def moco_augmentation(img_size, min_scale, blur_p, solarize_p):
    """One of MoCo-v3's two (BYOL) augmentations of a PIL image."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),  # bilinear
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([RandomBlur()], p=blur_p),
        v2.RandomApply([Solarize()], p=solarize_p),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MocoViews:
    """(2, C, S, S): the asymmetric pair of the reference, view 1 always blurred, view 2 blurred
    with probability 0.1 and solarised with 0.2. A class so loader workers can pickle it."""

    def __init__(self, img_size, min_scale=0.08):
        self.view1 = moco_augmentation(img_size, min_scale, blur_p=1.0, solarize_p=0.0)
        self.view2 = moco_augmentation(img_size, min_scale, blur_p=0.1, solarize_p=0.2)

    def __call__(self, img):
        img = img.convert("RGB")
        return torch.stack([self.view1(img), self.view2(img)])
