"""presets.py: every model preset by name, ViT (model.py) or Hiera (hiera.py), and what the
scripts ask of a preset instead of branching on its family.

    build_model("vit_tiny", img_size=224, patch_size=16)   # an encoder / classifier
    build_mae("hiera_tiny_lite", img_size=224)             # its MAE
    preset_facts("hiera_tiny_lite")["size_unit"]           # 32: image sizes in 32-px multiples
"""
import model as vit_models
from hiera import HIERA_CONFIGS, build_hiera
from hiera_mae import HieraMAE
from mae_model import MAE
from model import PRESETS, VIT_CONFIGS


# What differs between the two families, asked by the scripts instead of branching on them.
FAMILY_FACTS = {
    "vit": dict(
        title="ViT",
        size_unit=None,          # images are cut into --patch-size patches
        decodes_any_block=True,  # MAE's decoder can read any block (--recon-layer)
        poolings=("token", "avg"), rel_pos=True,
        draws_head=True,         # fine-tuning re-draws the head at the recipe's std
        timm_init=True,          # --fresh-init timm applies (timm's ViT initialisation)
        timm_export=True,        # --export writes timm's VisionTransformer
        demo_img_size=None,      # the synthetic demo's size fits it
        mae_has_norm=True,       # its MAE files carry the encoder's final norm
        distill_targets=("attn", "rep", "relation"), teacher_inputs=("visible", "full"),
        pair_by_relative_depth=False),  # distilled block i <- teacher block i
    "hiera": dict(
        title="Hiera",
        size_unit=32,            # stride 4 x mask unit 8: sizes in 32-px multiples
        decodes_any_block=False, poolings=("avg",), rel_pos=False, draws_head=False,
        timm_init=False, timm_export=False, demo_img_size=64, mae_has_norm=False,
        distill_targets=("attn", "rep"), teacher_inputs=("visible",),
        pair_by_relative_depth=True),  # the same stage: block 12 of 12 <- 24 of 24
}


def model_names():
    """Every preset --model accepts: the ViTs, then the Hieras."""
    return list(VIT_CONFIGS) + list(HIERA_CONFIGS)


def preset_facts(name):
    """FAMILY_FACTS of a preset's family, with its family and depth (blocks)."""
    if name in HIERA_CONFIGS:
        depth = sum(HIERA_CONFIGS[name]["stages"])
        return dict(FAMILY_FACTS["hiera"], family="hiera", depth=depth)
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return dict(FAMILY_FACTS["vit"], family="vit", depth=VIT_CONFIGS[name]["depth"])


# Arguments of the other family that the builders drop (the scripts pass both kinds).
VIT_ONLY = ("patch_size", "recon_layer", "global_pool", "rel_pos")


HIERA_ONLY = ("q_pool", "mask_unit_size")


def build_model(name, **kwargs):
    """A preset by name: a ViT (model.py) or a Hiera (hiera.py; it takes img_size,
    num_classes, drop_path_rate, q_pool, mask_unit_size). Each drops the other's arguments."""
    if name in HIERA_CONFIGS:
        return build_hiera(name, **{k: v for k, v in kwargs.items() if k not in VIT_ONLY})
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return vit_models.build_model(name, **{k: v for k, v in kwargs.items() if k not in HIERA_ONLY})


def build_mae(name, **kwargs):
    """A ViT MAE or a Hiera sparse MAE by preset name (Hiera ignores patch_size/recon_layer)."""
    if name in HIERA_CONFIGS:
        kwargs = {k: v for k, v in kwargs.items() if k not in VIT_ONLY}
        return HieraMAE(**HIERA_CONFIGS[name], **kwargs)
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return MAE(**VIT_CONFIGS[name], **kwargs)
