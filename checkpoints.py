"""checkpoints.py: reading checkpoints of every format into nanoMIM's models.

Ours, FAIR MAE (training files and _full / visualize files), MAE-Lite, DeiT, TinyMIM, timm's
hub (.safetensors + config.json), official Hiera, and DDP / torch.compile wrappers. Here too:
the architecture and head-count detection of a file.
"""
import argparse
import json
import math
import os
import pickle
import re

import torch
import torch.nn.functional as F

from hiera import HIERA_CONFIGS
from model import VIT_CONFIGS, sincos_pos_embed
from plumbing import print0
from presets import build_model, model_names


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model asked for (message names the fix)."""


# Keys the encoder cannot do without: a checkpoint lacking any of these is not this model.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
# Prefixes that select one network out of a multi-network file (MAE-Lite), tried in order.
SELECT_PREFIXES = ("module.base_encoder.", "module.model.", "model.")
# Wrappers added by DDP and torch.compile, stripped when every key carries them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# What published checkpoints pickle besides tensors and containers: the training files of FAIR
# MAE, DeiT and TinyMIM carry the run's argparse.Namespace. Anything else is refused unless the
# user passes --trust-checkpoint: a pickle can run code when it is loaded.
SAFE_GLOBALS = [argparse.Namespace]
TRUST_HINT = ("if you trust the file's source, pass --trust-checkpoint (it unpickles the file in "
              "full, so code in it can run)")


def open_checkpoint(path, trust=False):
    """The object a checkpoint file holds: torch.save files (.pth, .pt, .bin) unpickled with
    weights_only=True and SAFE_GLOBALS allowed (trust=True: in full), .safetensors files (a
    flat state dict; the optional safetensors package). Raises CheckpointError naming the fix."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder: give the file inside it (e.g. "
                              f"{os.path.join(path, 'model.safetensors')})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"reading {path} needs the safetensors package: "
                                  "pip install safetensors") from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is damaged "
                                  "or not a safetensors file") from None
    try:
        if trust:
            print(f"note: --trust-checkpoint: unpickling {path} in full (code in it can run)")
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if "Weights only load failed" not in str(e) or not found:
            raise CheckpointError(f"cannot read {path} (UnpicklingError): the file is damaged or "
                                  "not a PyTorch checkpoint") from None
        raise CheckpointError(f"{path} pickles {found.group(1)}, which no published checkpoint "
                              f"we read holds, so it was not loaded; {TRUST_HINT}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is damaged or "
                              "not a PyTorch checkpoint") from None


def state_dict_of(obj, name="the checkpoint"):
    """The model's plain state dict inside a loaded checkpoint object, whatever its layout:
    {"model": ...} (ours, FAIR), {"model_state": ...} (Hiera), {"state_dict": ...}, a bare state
    dict; MAE-Lite's module.model. / module.base_encoder. selected; DDP / compile prefixes
    stripped."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a dict of tensors: "
                              "save the model's state_dict()")
    for key in ("model", "model_state", "state_dict"):  # ours & FAIR, Hiera, others
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in SELECT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def read_checkpoint(path, trust=False):
    """(state dict, (declared heads, where said)) of a checkpoint file; see declared_heads."""
    obj = open_checkpoint(path, trust)
    state = state_dict_of(obj, path)
    return state, declared_heads(path, obj, state)


def read_state_dict(path_or_state_dict, trust=False):
    """Open a checkpoint in any of the supported formats and return a plain state dict."""
    if isinstance(path_or_state_dict, str):
        return state_dict_of(open_checkpoint(path_or_state_dict, trust), path_or_state_dict)
    return state_dict_of(path_or_state_dict)


# timm's (width, heads) by architecture name (FAIR MAE's and DeiT's names agree with them).
TIMM_SHAPES = {"vit_tiny": (192, 3), "deit_tiny": (192, 3), "vit_small": (384, 6),
               "deit_small": (384, 6), "vit_base": (768, 12), "deit_base": (768, 12),
               "vit_large": (1024, 16), "vit_huge": (1280, 16)}


def read_hub_config(path):
    """The config.json beside a checkpoint (timm's hub layout: model.safetensors + config.json),
    or {} when there is none."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config):
        return {}
    try:
        with open(config) as f:
            found = json.load(f)
    except (OSError, ValueError):
        raise CheckpointError(f"{config} (beside {path}) is not valid JSON: fix or remove it")
    return found if isinstance(found, dict) else {}


def declared_heads(path, obj, state):
    """(heads, where it is said) of the ViT in a checkpoint file, or (None, None) when the file
    does not say: our files' args["model"] (and FAIR's args.model), else config.json beside it
    (model_args.num_heads, else timm's count for its architecture). A name is believed only when
    its width is the state's."""
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    args = obj.get("args") if isinstance(obj, dict) else None
    name = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    if isinstance(name, str):
        if name in VIT_CONFIGS and VIT_CONFIGS[name]["embed_dim"] == width:  # ours, exactly
            return VIT_CONFIGS[name]["num_heads"], f"its args name --model {name}"
        for arch, (dim, heads) in TIMM_SHAPES.items():  # timm's vit_tiny_patch16_224, FAIR's
            if arch in name and dim == width:           # mae_vit_base_patch16
                return heads, f"its args name timm's or FAIR's {name}"
    config = read_hub_config(path)
    model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    if "num_heads" in model_args:
        return model_args["num_heads"], "num_heads in config.json"
    arch = str(config.get("architecture", ""))
    for prefix, (dim, heads) in TIMM_SHAPES.items():
        if arch.startswith(prefix) and dim == width:
            return heads, f"config.json names timm's {arch}"
    return None, None


def check_heads(model, name, heads, where, flag="--model"):
    """Refuse a file whose declared head count differs from the model's; when it declares none
    and presets of the model's shape differ in heads, print a note that says which is loaded."""
    alike = {n: c["num_heads"] for n, c in VIT_CONFIGS.items()
             if (c["embed_dim"], c["depth"]) == (model.embed_dim, model.depth)}
    if heads is not None and heads != model.num_heads:
        match = [n for n, h in alike.items() if h == heads]
        fix = f"use {flag} {match[0]}" if match else "build the model with that many heads"
        raise CheckpointError(f"{name} holds a ViT with {heads} attention heads ({where}) but "
                              f"this model has {model.num_heads}: {fix}")
    if heads is None and len(set(alike.values())) > 1:
        options = " or ".join(f"{n} ({h} heads)" for n, h in alike.items())
        print(f"note: {name} does not say how many attention heads its ViT has; it is loaded "
              f"with this model's {model.num_heads}. The tensors of {options} have the same "
              "shapes, so check the file's origin (the papers' models have 12 heads, DeiT's and "
              f"timm's 3 or 6) and pick {flag} accordingly")


# timm's Hiera renames the official keys (its checkpoint_filter_fn); these undo it.
TIMM_HIERA_RENAMES = (("head.fc.", "head.projection."), ("head.norm.", "norm."))


def from_timm_hiera(state):
    """A timm Hiera state dict (head.fc.*, head.norm.*) with the official Hiera keys that
    hiera.py uses; other state dicts are returned unchanged."""
    if not any(k.startswith(("head.fc.", "head.norm.")) for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in TIMM_HIERA_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed


def resize_pos_embed(pos_embed, grid, num_prefix=1):
    """Bicubic resize of a (1, prefix + h*w, D) position embedding to a (rows, cols) grid; the
    prefix rows (the ViT's cls; none for Hiera) are kept as they are."""
    n_patches = pos_embed.shape[1] - num_prefix
    side = int(round(math.sqrt(n_patches)))
    if side * side != n_patches:
        raise CheckpointError(f"cannot resize a position embedding of {n_patches} patches "
                              "(not a square grid); use the checkpoint's image size")
    prefix = pos_embed[:, :num_prefix]
    patches = pos_embed[:, num_prefix:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


def is_sincos(pos_embed, num_prefix=1):
    """Whether a (1, prefix + h*w, D) position embedding is the fixed sin-cos table of its square
    grid (MAE's, never trained), which is recomputed rather than interpolated for another grid."""
    side = math.isqrt(pos_embed.shape[1] - num_prefix)
    dim = pos_embed.shape[-1]
    if side * side != pos_embed.shape[1] - num_prefix or dim % 4:
        return False
    table = sincos_pos_embed(dim, side, side, num_prefix == 1)
    return torch.allclose(pos_embed.float(), table, atol=1e-5)


REL_POS_KEY = "relative_position_bias_table"  # optional: zero-initialised when a file lacks it
# What MAE-Lite's D^2-MAE files hold of their 13th block: the attention-only block of
# pre-training (its proj, norm2 and mlp are deleted), dropped by their fine-tuning.
EXTRA_BLOCK_PARTS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias"}


def split_extra_block(state, depth):
    """(state without D^2-MAE's extra block, its keys): the keys of block `depth` (0-indexed,
    i.e. one past a depth-block model) when they are the extra attention-only block and nothing
    deeper exists; otherwise (state, [])."""
    prefix = f"blocks.{depth}."
    extra = sorted(k for k in state if k.startswith(prefix))
    deeper = any(k.startswith(f"blocks.{depth + 1}.") for k in state)
    if not extra or deeper or not {k[len(prefix):] for k in extra} <= EXTRA_BLOCK_PARTS:
        return state, []
    return {k: v for k, v in state.items() if k not in extra}, extra


def describe_vit(state, flag="--model"):
    """'24 blocks of width 1024, i.e. --model vit_large' for a ViT state dict: the preset to
    give to `flag` (the script's flag that names this model's architecture)."""
    if "cls_token" not in state and preset_of(state):  # no cls token: a Hiera encoder
        return f"a {preset_of(state)} encoder, i.e. {flag} {preset_of(state)}"
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    extra = depth > 0 and split_extra_block(state, depth - 1)[1]
    depth -= 1 if extra else 0
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    presets = [name for name, cfg in VIT_CONFIGS.items()
               if cfg["depth"] == depth and cfg["embed_dim"] == width]
    plus = " (plus D^2-MAE's extra attention-only block)" if extra else ""
    return f"{depth} blocks of width {width}{plus}, " + (
        f"i.e. {flag} {presets[0]}" if presets else "which no preset has")


def file_img_size(state):
    """' --img-size 224' for a ViT state dict whose square grid (pos_embed, cls first) and patch
    give it, else ''."""
    pos = state.get("pos_embed")
    weight = state.get("patch_embed.proj.weight")
    if pos is None or weight is None or pos.ndim != 3 or weight.ndim != 4:
        return ""
    side = math.isqrt(pos.shape[1] - 1)
    return f" --img-size {side * weight.shape[-1]}" if side * side == pos.shape[1] - 1 else ""


def _is_encoder_key(key, prefixes=ENCODER_PREFIXES):
    return key.startswith(prefixes)


def load_pretrained(model, path_or_state_dict, verbose=True, trust=False, heads=(None, None),
                    flag="--model", name=None):
    """Load a checkpoint of any format the module docstring names into `model` (a ViT, a Hiera,
    or a module built on one) and return {"loaded", "dropped", "initialised", "resized",
    "extra_block"}: lists of keys. pos_embed is resized to the model's grid; keys the model lacks
    are dropped; model keys the file lacks outside the encoder (head, fc_norm, decoder) keep
    their initialisation. A file whose encoder keys are missing or of another shape raises
    CheckpointError: a silently random backbone is never returned. MAE-Lite's D^2-MAE files
    (a 13th, attention-only block) load into a 12-block ViT, the extra block listed.

    trust: unpickle the file in full (--trust-checkpoint), else only tensors, containers and
    SAFE_GLOBALS. heads: (count, source) declared for a state dict passed in (see
    declared_heads). flag: the flag that picks this model, named in messages; name: what the
    messages call a state dict passed in."""
    if isinstance(path_or_state_dict, str):
        state, heads = read_checkpoint(path_or_state_dict, trust)
    else:
        state = read_state_dict(path_or_state_dict)
    own = model.state_dict()
    if isinstance(path_or_state_dict, str):
        name = path_or_state_dict
    name = name or "the state dict"
    prefixes = getattr(model, "ENCODER_PREFIXES", ENCODER_PREFIXES)
    kind = type(model).__name__ if prefixes != ENCODER_PREFIXES else "ViT"
    extra_block = []
    if kind == "ViT":  # a D^2-MAE file of MAE-Lite: 12 blocks plus the extra attention-only one
        state, extra_block = split_extra_block(state, model.depth)
        check_heads(model, name, *heads, flag)
    else:
        state = from_timm_hiera(state)
    if not any(_is_encoder_key(k, prefixes) for k in state):
        sample = ", ".join(sorted(state)[:4]) or "none"
        raise CheckpointError(f"{name} holds no {kind} encoder weights (keys such as {sample}); "
                              "is it a checkpoint of another architecture?")
    missing = sorted(k for k in own if _is_encoder_key(k, prefixes) and k not in state
                     and not k.endswith(REL_POS_KEY))
    if missing:
        found = f"; it holds {describe_vit(state, flag)}" if kind == "ViT" else \
            f" (pick the matching {flag})"
        raise CheckpointError(f"{name} lacks {len(missing)} encoder keys of this model, e.g. "
                              f"{', '.join(missing[:3])}: it is a different depth or architecture"
                              f"{found}")
    report = {"loaded": [], "dropped": list(extra_block), "initialised": [], "resized": [],
              "extra_block": extra_block}
    to_load = {}
    for key, value in state.items():
        if key not in own:
            if key.endswith(REL_POS_KEY):
                raise CheckpointError(f"{name} has relative position tables ({key}): build the "
                                      "model with them (finetune.py --rel-pos)")
            if _is_encoder_key(key, prefixes):  # e.g. blocks.12.* into a 12-block model
                found = f": {describe_vit(state, flag)}" if kind == "ViT" else ""
                raise CheckpointError(f"{name} has {key}, which this {model.depth}-block model "
                                      f"does not; the file is deeper{found}")
            report["dropped"].append(key)
            continue
        target = own[key]
        if key == "pos_embed" and value.shape != target.shape \
                and value.shape[-1] == target.shape[-1]:
            prefix = 1 if "cls_token" in own else 0
            if is_sincos(value, prefix) and target.shape[-1] % 4 == 0:  # MAE's fixed table:
                value = sincos_pos_embed(target.shape[-1], *model.grid, prefix == 1)  # exact
                report["resized"].append(f"{key} (sin-cos, recomputed for the new grid)")
            else:  # a learned one
                value = resize_pos_embed(value, model.grid, prefix)
                report["resized"].append(key)
        if value.shape != target.shape:
            if key.endswith(REL_POS_KEY):
                raise CheckpointError(f"{name} has {key} for another grid ({tuple(value.shape)}"
                                      f" vs {tuple(target.shape)}): use the image and patch size "
                                      "it was fine-tuned with")
            if key == "patch_embed.proj.weight" and value.shape[:2] == target.shape[:2]:
                raise CheckpointError(f"{name} cuts images into {value.shape[-1]}-px patches but "
                                      f"this model into {target.shape[-1]}-px ones: use "
                                      f"--patch-size {value.shape[-1]}{file_img_size(state)}")
            if _is_encoder_key(key, prefixes) or key.startswith("norm."):
                found = f"; it holds {describe_vit(state, flag)}" if kind == "ViT" else \
                    f" (pick the matching {flag})"
                raise CheckpointError(
                    f"{name} has {key} of shape {tuple(value.shape)} but the model expects "
                    f"{tuple(target.shape)}: it is another width or architecture{found}")
            report["dropped"].append(key)  # e.g. a 1000-class head into a 10-class model
            continue
        to_load[key] = value
        report["loaded"].append(key)
    broken = [k for k, v in to_load.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise CheckpointError(f"{name} holds NaN or inf in {len(broken)} tensors (e.g. "
                              f"{broken[0]}): "
                              "it was saved by a run that diverged or is corrupt; use an earlier "
                              "checkpoint of that run")
    report["initialised"] = sorted(k for k in own if k not in to_load)
    model.load_state_dict(to_load, strict=False)
    if verbose:
        print(format_load_report(name, report))
    return report


def format_load_report(name, report):
    def show(keys):
        return ", ".join(keys) if keys else "none"

    extra = report.get("extra_block")
    block = '.'.join(extra[0].split('.')[:2]) if extra else ""
    note = (f" ({block}.* is D^2-MAE's extra attention-only block, used only in pre-training)"
            if extra else "")
    return (f"loaded {len(report['loaded'])} tensors from {name}; "
            f"resized: {show(report['resized'])}; dropped: {show(report['dropped'])}; "
            f"newly initialised: {show(report['initialised'])}{note}")


def read_run(path, trust=False):
    """(state dict, declared heads, run args) of a checkpoint file. Run args: our files' args, or
    a FAIR training file's argparse.Namespace as a dict; {} when the file has none."""
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
    known = model_names()
    name = run_args.get("model") if run_args.get("model") in known else None
    if name and flag and flag != name:
        print0(f"note: {path} was trained as --model {name}; --model {flag} is ignored")
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


def load_model(path, model_name, img_size, patch_size, seed=0, trust=False, checkpoint=None,
               flag="--model"):
    """A ViT for analysis from any supported checkpoint (ours, FAIR MAE, MAE-Lite, timm), or a
    randomly initialised one when path is None. The pooling (final norm or fc_norm) follows the
    file, so the last layer is normalised by trained weights. trust: unpickle the file in full
    (--trust-checkpoint); checkpoint: its (state dict, declared heads) when already read."""
    state = None
    heads = (None, None)
    if path is not None:
        state, heads = checkpoint or read_checkpoint(path, trust)
    pool = "avg" if state is not None and "fc_norm.weight" in state and "norm.weight" not in state \
        else "token"
    rel_pos = state is not None and any(k.endswith(REL_POS_KEY) for k in state)  # fine-tuned so
    torch.manual_seed(seed)
    vit = build_model(model_name, img_size=img_size, patch_size=patch_size, global_pool=pool,
                      num_classes=0, rel_pos=rel_pos)
    if state is not None:
        try:
            report = load_pretrained(vit, state, verbose=False, heads=heads, flag=flag)
        except CheckpointError as e:  # name the file, not "the state dict"
            raise CheckpointError(f"{path}: {e}") from None
        print0(f"{path}: {len(report['loaded'])} tensors loaded into {model_name}")
    return vit.eval()
