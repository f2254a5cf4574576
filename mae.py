"""mae.py: masked-autoencoder pre-training of a ViT, the one pre-training loop of nanoMIM.

    python mae.py                                   # demo: vit_tiny on synthetic shapes, CPU ok
    python mae.py --data imagefolder --data-root /path/to/imagenet --epochs 400 ...   # MAE-Tiny

The model follows FAIR MAE (He et al. 2021) step by step, in named functions: patchify,
random_masking, forward_encoder, forward_decoder, forward_loss. Its state-dict keys are FAIR's
(encoder keys at the top level, decoder_*), so our checkpoints load in FAIR's and timm's code.
"""
import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import distill
import plumbing
import weights
from hiera import HIERA_CONFIGS, Hiera
from model import (VIT_CONFIGS, Block, CheckpointError, ViT, init_mae_weights, load_pretrained,
                   sincos_pos_embed)


# ----------------------------------------------------------------------------------------------
# The MAE model


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, L, p*p*C), each patch flattened in FAIR's (p, q, c) order."""
    B, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, q, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, patch_size, grid, channels=3):
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of patchify."""
    B = x.shape[0]
    p = patch_size
    (h, w) = grid
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(B, channels, h * p, w * p)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by sorting uniform noise, exactly as FAIR MAE.

    x: (B, L, D) patch tokens. Returns
      x_kept (B, K, D) with K = int(L * (1 - mask_ratio)), the visible tokens in shuffled order;
      mask (B, L): 0 is keep, 1 is remove, in the original patch order;
      ids_restore (B, L): argsort of ids_shuffle, un-shuffles [kept, removed] back to patch order;
      ids_keep (B, K): the patch index of each visible token (a teacher must see the same ones).
    """
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)  # uniform in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return x_kept, mask, ids_restore, ids_keep


class MAE(ViT):
    """A ViT encoder (the inherited modules, FAIR key names) plus the lightweight MAE decoder.

    recon_layer: the decoder reads the normalised output of this encoder block (1-indexed;
    default the last; 0 = no reconstruction, for distillation alone). Only the blocks needed
    are run.
    """

    def __init__(self, embed_dim=192, depth=12, num_heads=12, img_size=224, patch_size=16,
                 in_chans=3, decoder_dim=96, decoder_depth=1, decoder_heads=3, mlp_ratio=4.0,
                 norm_pix_loss=True, recon_layer=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, num_classes=0, global_pool="token")
        self.recon_layer = depth if recon_layer is None else recon_layer
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.grid[0] * self.grid[1]
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, *self.grid),
                                              requires_grad=False)  # (1, 1 + L, Dd), fixed
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        init_mae_weights(nn.ModuleList([self.decoder_embed, self.decoder_blocks,
                                        self.decoder_norm, self.decoder_pred]))
        nn.init.normal_(self.mask_token, std=0.02)
        # what viewers.reconstruction_figure needs: predicted patches and the masking noise per image
        self.recon_patch = patch_size
        self.recon_grid = self.grid
        self.mask_slots = num_patches

    def forward_encoder(self, imgs, mask_ratio, noise=None, return_blocks=(), return_attn=()):
        """Encode the visible patches. Returns (latent, mask, ids_restore, ids_keep, block_out,
        attn_logits): latent (B, 1 + K, D) is the normalised output of block `recon_layer`, cls
        first (None when recon_layer is 0); block_out / attn_logits hold {block: output} /
        {block: attention logits} for the blocks asked for (block 0: the input tokens)."""
        x = self.embed(imgs)  # (B, L, D), position added before masking
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise)
        x = self.prepend_cls(x)  # (B, 1 + K, D)
        depth = max([self.recon_layer, *return_blocks, *return_attn])
        x, block_out, attn_logits = self.run_blocks(x, depth, {self.recon_layer, *return_blocks},
                                                    return_attn)
        latent = self.norm(block_out[self.recon_layer]) if self.recon_layer else None
        return latent, mask, ids_restore, ids_keep, block_out, attn_logits

    def forward_decoder(self, latent, ids_restore):
        """(B, 1 + K, D) latent -> (B, L, p*p*C) pixel predictions for every patch."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # (B, L - K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd), shuffled order, no cls
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # cls back in front
        for block in self.decoder_blocks:
            x, _ = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1 + L, p*p*C)
        return x[:, 1:]  # drop the cls token

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on the removed patches only. With norm_pix_loss each target patch
        is normalised by its own mean and variance (eps 1e-6; unbiased variance, as FAIR)."""
        target = patchify(imgs, self.recon_patch)  # (B, L, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L), per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None, return_blocks=(), return_attn=()):
        """One MAE step. Returns a dict, the same for every pre-training model (HieraMAE,
        distill.DistilledMAE): loss (the reconstruction loss; 0 when recon_layer is 0), pred
        (B, L, p*p*C) or None, mask (B, L) with 1 = removed, keep (B, K) the visible patches (what
        a teacher must see), blocks / attn: {block: output} / {block: logits} asked for."""
        latent, mask, ids_restore, ids_keep, blocks, attn = self.forward_encoder(
            imgs, mask_ratio, noise, return_blocks, return_attn)
        loss = torch.zeros((), device=imgs.device)
        pred = None
        if latent is not None:
            pred = self.forward_decoder(latent, ids_restore)
            loss = self.forward_loss(imgs, pred, mask)
        return dict(loss=loss, pred=pred, mask=mask, keep=ids_keep, blocks=blocks, attn=attn)


class HieraMAE(Hiera):
    """Hiera's sparse MAE (Ryali et al. 2023): the encoder (inherited, official key names) sees
    only the kept mask units, whose tokens are deleted rather than replaced; stage outputs are
    fused (a strided conv per pooled stage, `multi_scale_fusion_heads`), normalised
    (`encoder_norm`) and decoded at the final stride 4 * 2^q_pool (16 with q_pool 2), where each
    mask unit is u x u tokens. The loss is norm-pix MSE on the removed units' patches.

    Pre-training uses q_pool 2 (stage 4 stays at stride 16); the weights are those of the
    q_pool-3 classifier, which loads them with the decoder keys dropped. Patches are flattened
    in (p, q, c) order, as the ViT MAE's patchify (official Hiera uses (c, p, q); only the
    decoder_pred rows differ).
    """

    def __init__(self, embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), img_size=224, q_pool=2,
                 mask_unit_size=8, in_chans=3, decoder_dim=96, decoder_depth=1, decoder_heads=3,
                 mlp_ratio=4.0, norm_pix_loss=True):
        super().__init__(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                         num_heads=num_heads, num_classes=0, stages=stages, q_pool=q_pool,
                         mask_unit_size=mask_unit_size, mlp_ratio=mlp_ratio)
        del self.norm, self.head
        dim = self.num_features
        self.norm_pix_loss = norm_pix_loss
        self.recon_layer = self.depth  # the decoder reads the last stage (fused with earlier)
        self.unit_final = mask_unit_size // 2 ** q_pool  # tokens per unit side at the decoder
        self.fused_blocks = self.stage_ends[:q_pool] + [self.depth]
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        heads = []
        for end in self.stage_ends[:q_pool]:  # pooled stages: u x u -> unit_final^2 by a conv
            k = mask_unit_size // 2 ** self.pools_before(end) // self.unit_final
            heads.append(nn.Conv2d(self.blocks[end - 1].dim_out, dim, kernel_size=k, stride=k))
        self.multi_scale_fusion_heads = nn.ModuleList(heads + [nn.Identity()])
        self.recon_patch = 4 * 2 ** q_pool
        self.recon_grid = (self.grid[0] // 2 ** q_pool, self.grid[1] // 2 ** q_pool)
        self.mask_slots = self.num_units
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.recon_grid[0] * self.recon_grid[1], decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.recon_patch ** 2 * in_chans)
        init_mae_weights(self)  # as the reference: MAE init everywhere, then these
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))

    def forward_encoder(self, imgs, mask_ratio, noise=None, return_blocks=(), return_attn=()):
        """Returns (latent (B, K, u, u, D) for the K kept units, keep-mask (B, units) with True
        = kept, {block: output}, {block: logits})."""
        keep = self.random_unit_mask(imgs.shape[0], mask_ratio, noise, imgs.device)
        _, block_out, attn_logits = self.forward_features(
            imgs, keep=keep, return_blocks={*self.fused_blocks, *return_blocks},
            return_attn=return_attn)
        latent = 0
        for block, head in zip(self.fused_blocks, self.multi_scale_fusion_heads):
            units = self.unit_layout(block_out[block], block)  # (B, K, u_b, u_b, C_b)
            if not isinstance(head, nn.Identity):
                B, K, u, _, C = units.shape
                units = head(units.reshape(B * K, u, u, C).permute(0, 3, 1, 2))  # (BK, D, u', u')
                units = units.permute(0, 2, 3, 1).reshape(B, K, *units.shape[2:], -1)
            latent = latent + units
        return self.encoder_norm(latent), keep, block_out, attn_logits

    def forward_decoder(self, latent, keep):
        """Kept units' latents + mask tokens for removed units -> (B, L, p*p*C) predictions for
        the L patches of the final-stride grid, in raster order."""
        x = self.decoder_embed(latent)  # (B, K, u, u, Dd)
        B = keep.shape[0]
        u = self.unit_final
        Dd = x.shape[-1]
        K = x.shape[1]
        # the K kept units' indices in unit order (removed units sort last as num_units): a
        # fixed-size scatter, where full[keep] = ... would need nonzero(), a data-dependent
        # shape that breaks torch.compile's graph
        units = torch.arange(self.num_units, device=keep.device).expand(B, -1)
        kept = torch.where(keep, units, self.num_units).sort(dim=1).values[:, :K]  # (B, K)
        full = self.mask_token.to(x.dtype).expand(B, self.num_units, u * u, Dd)
        full = full.scatter(1, kept[:, :, None, None].expand(B, K, u * u, Dd),
                            x.reshape(B, K, u * u, Dd))  # kept units into their slots
        mh, mw = self.mask_grid
        x = full.view(B, mh, mw, u, u, Dd).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, Dd)  # raster
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    forward_loss = MAE.forward_loss  # the same norm-pix MSE on removed patches (recon_patch)

    def removed_patches(self, keep):
        """(B, units) keep-mask -> (B, L) float, 1 for patches of removed units (raster)."""
        u = self.unit_final
        removed = (~keep).view(-1, *self.mask_grid).float()
        return removed.repeat_interleave(u, 1).repeat_interleave(u, 2).flatten(1)

    def forward(self, imgs, mask_ratio=0.6, noise=None, return_blocks=(), return_attn=()):
        """One sparse MAE step; the same dict as MAE.forward (keep: the kept units (B, units))."""
        latent, keep, blocks, attn = self.forward_encoder(imgs, mask_ratio, noise, return_blocks,
                                                          return_attn)
        pred = self.forward_decoder(latent, keep)
        mask = self.removed_patches(keep)
        return dict(loss=self.forward_loss(imgs, pred, mask), pred=pred, mask=mask, keep=keep,
                    blocks=blocks, attn=attn)


def build_mae(name, **kwargs):
    """A ViT MAE or a Hiera sparse MAE by preset name (Hiera ignores patch_size/recon_layer)."""
    if name in HIERA_CONFIGS:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("patch_size", "recon_layer")}
        return HieraMAE(**HIERA_CONFIGS[name], **kwargs)
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of "
                         f"{', '.join(list(VIT_CONFIGS) + list(HIERA_CONFIGS))}")
    return MAE(**VIT_CONFIGS[name], **kwargs)


# The pre-training-only modules of MAE and HieraMAE (the decoder side).
DECODER_PREFIXES = ("decoder_", "mask_token", "multi_scale_fusion", "encoder_norm")


def encoder_state_dict(model):
    """The backbone alone (what fine-tuning and timm load): every key but the decoder's."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(DECODER_PREFIXES)}


# ----------------------------------------------------------------------------------------------
# Command line


def block_list(text):
    """argparse type of --distill-layer / --teacher-layer: '6,12' -> [6, 12]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be block numbers separated by commas, "
                                         "e.g. 12 or 6,12") from None


def get_parser():
    """The flags, with vit_tiny's defaults on real data (ImageNet-1k); parse_args layers the
    other models' and the synthetic demo's defaults on top."""
    p = argparse.ArgumentParser(description="MAE pre-training of a ViT (nanoMIM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_tiny", choices=list(VIT_CONFIGS) + list(HIERA_CONFIGS),
                   help="encoder (hiera_*: Hiera's sparse MAE)")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size in pixels (--data synthetic: 32, Hiera 64)")
    p.add_argument("--patch-size", type=int, default=16,
                   help="patch size in pixels (--data synthetic: 4)")
    p.add_argument("--mask-ratio", type=float, default=0.75,
                   help="fraction of patches (Hiera: mask units) removed (hiera_tiny_lite 0.4 "
                        "as MAE-Lite, other Hiera 0.6)")
    p.add_argument("--recon-layer", type=int, default=None,
                   help="encoder block (1-indexed) whose normalised output the decoder reads "
                        "(none given: the last block)")
    p.add_argument("--decoder-dim", type=int, default=96,
                   help="decoder width (vit_small 192, larger models 512)")
    p.add_argument("--decoder-depth", type=int, default=1,
                   help="decoder blocks (larger models 8)")
    p.add_argument("--decoder-heads", type=int, default=3,
                   help="decoder heads (vit_small 6, larger models 16)")
    p.add_argument("--student-drop-path", type=float, default=0.0,
                   help="stochastic depth, the same rate on every encoder block but the last "
                        "(TinyMIM's student: 0.1)")
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="regress raw (normalised-image) pixels instead of per-patch normalised")
    g = p.add_argument_group("distillation from a teacher (see distill.py)")
    g.add_argument("--teacher", default=None,
                   help="teacher: a checkpoint (FAIR MAE, MAE-Lite, ours) or a published name ("
                        f"{weights.names_text()}; --list-weights), downloaded once into torch's "
                        "hub cache; enables distillation. None given with --distill-layer: the "
                        "papers' mae_vit_base on real data at 224 px, patch 16; on the synthetic "
                        "demo a vit_small MAE trained first into out/demo_teacher (beside "
                        "--out-dir), then reused")
    g.add_argument("--teacher-model", default="vit_base",
                   choices=list(VIT_CONFIGS) + list(HIERA_CONFIGS),
                   help="teacher architecture (a published --teacher: its own; Hiera students: "
                        "hiera_base)")
    g.add_argument("--distill-target", default="attn", choices=["attn", "rep", "relation"],
                   help="attention maps (D-MAE), representations, or TinyMIM Q-K/V-V relations")
    g.add_argument("--distill-on", default="logits", choices=["logits", "probs"],
                   help="attention target: pre-softmax logits (published) or probabilities")
    g.add_argument("--distill-layer", type=block_list, default=None,
                   help="student blocks to distil, 1-indexed, comma-separated, e.g. 12 or 6,12 "
                        "(none given: the last block)")
    g.add_argument("--teacher-layer", type=block_list, default=None,
                   help="matching teacher blocks (none given: the papers' pairing: the same "
                        "index, TinyMIM's 18 of vit_large for relations, Hiera the same "
                        "relative depth)")
    g.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distill loss")
    g.add_argument("--teacher-input", default="visible", choices=["visible", "full"],
                   help="teacher sees the student's visible patches, or the whole image "
                        "(TinyMIM; then only the visible tokens are compared)")
    g.add_argument("--no-recon", dest="recon_layer", action="store_const", const=0,
                   help="no reconstruction loss: distillation alone (the same as --recon-layer 0)")
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (imagefolder: the folder "
                   "holding train/<class>/...)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--loader", default="pil", choices=["pil", "device"],
                   help="pil: PIL decode + augment in workers; device: workers read bytes, JPEGs "
                        "decoded in batches (nvJPEG on CUDA) and augmented on the device "
                        "(--data imagefolder)")
    p.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest RandomResizedCrop area (MAE-Lite's for the lightweight models; "
                        "larger models 0.2, FAIR's)")
    p.add_argument("--crop-interpolation", default="random", choices=list(data.INTERPOLATIONS),
                   help="RandomResizedCrop interpolation; random = bilinear or bicubic per image "
                        "(MAE-Lite's; larger models bicubic, FAIR's)")
    p.add_argument("--student-color-jitter", type=float, default=0.0,
                   help="ColorJitter(j, j, j) on the student's view only; the teacher sees the "
                        "same crop and flip without it (TinyMIM: 0.4)")
    p.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    p.add_argument("--max-images", type=int, default=None,
                   help="pre-train on at most this many training images, evenly spaced (none: "
                        "all)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per GPU per step (--data synthetic: 64)")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="gradient accumulation steps (effective batch = batch * accum * GPUs)")
    p.add_argument("--epochs", type=int, default=400,
                   help="training epochs (--data synthetic: 8)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warmup epochs (none given: 10%% of --epochs, the papers' 40 of "
                        "400; --data synthetic: 1)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay, on every parameter but biases and norms (as the "
                        "papers' code: cls and mask tokens are decayed)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (none or 0: no clipping)")
    plumbing.add_run_flags(p, "out/mae")
    plumbing.add_monitor_flags(p)
    p.add_argument("--init", default=None,
                   help="warm start: weights of an encoder or encoder + decoder checkpoint (ours, "
                        "FAIR's, MAE-Lite's, timm's .safetensors) or a published name (e.g. "
                        "mae_vit_base_full; --list-weights), with a fresh optimizer and schedule "
                        "(unlike --resume)")
    p.add_argument("--list-weights", action=weights.ListWeights,
                   help="print the published weights --teacher and --init take by name "
                        "(architecture, source, licence) and exit")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle --init / --teacher files in full (only for files you trust: a "
                        "pickle can run code); by default only tensors and argparse.Namespace")
    p.add_argument("--save-every", type=int, default=20,
                   help="also keep checkpoint-<epoch>.pth every this many epochs")
    return p


# The papers' pre-training settings per model, the defaults of every flag not given: MAE-Lite's
# for the lightweight students (mae_lite_exp.py / models_mae.py: crop scale 0.08 with a random
# bilinear/bicubic interpolation, decoders 96x1x3 and 192x1x6, Hiera-Tiny mask ratio 0.4), FAIR
# MAE's and Hiera's for the large models (crop 0.2 bicubic, decoder 512 wide x 8 blocks x 16
# heads, Hiera mask ratio 0.6).
LIGHT = dict(min_crop_scale=0.08, crop_interpolation="random")
LARGE = dict(min_crop_scale=0.2, crop_interpolation="bicubic", decoder_dim=512, decoder_depth=8,
             decoder_heads=16)
PRETRAIN_DEFAULTS = {
    "vit_tiny": dict(LIGHT, decoder_dim=96, decoder_depth=1, decoder_heads=3, mask_ratio=0.75),
    "vit_small": dict(LIGHT, decoder_dim=192, decoder_depth=1, decoder_heads=6, mask_ratio=0.75),
    "vit_base": dict(LARGE, mask_ratio=0.75),
    "vit_large": dict(LARGE, mask_ratio=0.75),
    "hiera_tiny_lite": dict(LIGHT, decoder_dim=96, decoder_depth=1, decoder_heads=3,
                            mask_ratio=0.4, teacher_model="hiera_base"),
    "hiera_tiny": dict(LARGE, mask_ratio=0.6, teacher_model="hiera_base"),
    "hiera_small": dict(LARGE, mask_ratio=0.6, teacher_model="hiera_base"),
    "hiera_base": dict(LARGE, mask_ratio=0.6, teacher_model="hiera_base"),
}
PRETRAIN_DEFAULTS["deit_tiny"] = PRETRAIN_DEFAULTS["vit_tiny"]  # DeiT's head counts, same recipe
PRETRAIN_DEFAULTS["deit_small"] = PRETRAIN_DEFAULTS["vit_small"]
# The synthetic demo is small enough for a laptop CPU (Hiera: 64 px, two mask units a side).
DEMO_DEFAULTS = dict(img_size=32, patch_size=4, batch_size=64, epochs=8, warmup_epochs=1)
WARMUP_FRACTION = 0.1  # --warmup-epochs not given: the papers' 40 of 400 epochs
# The architecture flags a warm start (--init) of one of our checkpoints takes from its run.
INIT_ARGS = ("model", "img_size", "patch_size", "decoder_dim", "decoder_depth", "decoder_heads",
             "norm_pix_loss")


def parse_args(argv=None):
    """Flags -> checked args. The defaults are layered once, before the real parse: the model's
    paper defaults (PRETRAIN_DEFAULTS), the synthetic demo's sizes, and with --resume the flags
    of the run it continues (so a change of defaults never changes a run half-way); a flag given
    on the command line wins over all of them."""
    parser = get_parser()
    given, _ = parser.parse_known_args(argv)
    auto = given.resume == "auto"
    given.resume = plumbing.resolve_resume(given.resume, given.out_dir)
    if auto and given.resume and given.init:  # a relaunched warm start: the run continues
        plumbing.print0(f"--resume auto: the run continues, so --init {given.init} is not read")
        given.init = None
    source = {}  # ours or a published name: its architecture
    if given.init:
        source = weights.stated_args(given.init) or plumbing.checkpoint_args(given.init)
    source = {k: v for k, v in source.items() if k in INIT_ARGS}
    parser.set_defaults(**source)  # its --model first, so the presets below are that model's
    model = parser.parse_known_args(argv)[0].model
    parser.set_defaults(**PRETRAIN_DEFAULTS[model])
    if given.teacher in weights.WEIGHTS:  # a published teacher names its architecture
        parser.set_defaults(teacher_model=weights.WEIGHTS[given.teacher]["model"])
    if given.data == "synthetic":
        parser.set_defaults(**DEMO_DEFAULTS)
        if model in HIERA_CONFIGS:
            parser.set_defaults(img_size=64)
    parser.set_defaults(**source)
    if given.resume:
        plumbing.check_resume_script(parser, given.resume, "mae.py")
        resumed = plumbing.resumed_defaults(given.resume, vars(given))
        parser.set_defaults(**resumed)
        plumbing.print0(f"--resume: flags not given take the values of the run that wrote "
                        f"{given.resume}")
    args = parser.parse_args(argv)
    args.resume, args.init = given.resume, given.init
    plumbing.warmup_from_fraction(args, WARMUP_FRACTION)
    if args.teacher is None and (args.distill_layer or args.teacher_layer):
        default_teacher(args, parser)
    validate(args, parser)
    try:  # names -> files in the hub cache (downloaded once); from here on only paths
        args.init = weights.resolve(args.init, "--init")
        args.teacher = weights.resolve(args.teacher, "--teacher")
    except weights.WeightsError as e:
        sys.exit(f"error: {e}")
    return args


# The teacher the synthetic demo trains for itself (default_teacher): the papers' teacher sees
# 224-px images in 16-px patches and cannot see the demo's 32-px images in 4-px patches.
DEMO_TEACHER_MODEL = "vit_small"
# The run's flags the demo teacher takes, so that it sees the same images in the same patches.
DEMO_TEACHER_FLAGS = ("img_size", "patch_size", "synthetic_size", "batch_size", "num_workers",
                      "precision", "compile", "knn_every")


def demo_teacher_dir(out_dir):
    """Beside the run's --out-dir: out/demo_teacher for the default out/mae."""
    return os.path.join(os.path.dirname(os.path.normpath(out_dir)), "demo_teacher")


def demo_teacher_argv(args):
    """The demo teacher's mae.py flags: DEMO_TEACHER_MODEL, its folder, and the run's
    DEMO_TEACHER_FLAGS that differ from the demo's defaults."""
    parser = get_parser()
    argv = ["--model", DEMO_TEACHER_MODEL, "--out-dir", demo_teacher_dir(args.out_dir)]
    for key in DEMO_TEACHER_FLAGS:
        if getattr(args, key) != DEMO_DEFAULTS.get(key, parser.get_default(key)):
            argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return argv


def default_teacher(args, parser):
    """--distill-layer / --teacher-layer without --teacher: a teacher that fits, said in the
    run's first lines. Real data at the papers' size: the published MAE of --teacher-model
    (mae_vit_base: the papers' teacher); the synthetic demo: a DEMO_TEACHER_MODEL MAE that
    main() pre-trains on the same data into demo_teacher_dir (once, then reused); anything
    else: one line naming the fix."""
    if args.model in HIERA_CONFIGS:
        parser.error("--distill-layer needs --teacher for a Hiera student: a Hiera MAE checkpoint "
                     "with --teacher-model hiera_* (no Hiera weights are published by name)")
    if args.data == "synthetic":
        args.teacher = os.path.join(demo_teacher_dir(args.out_dir), "checkpoint.pth")
        args.teacher_model = DEMO_TEACHER_MODEL
        plumbing.print0(
            f"--distill-layer without --teacher: the papers' teacher (mae_vit_base, 224-px images "
            f"in 16-px patches) cannot see the synthetic demo's {args.img_size}-px images in "
            f"{args.patch_size}-px patches, so the teacher is a {DEMO_TEACHER_MODEL} MAE "
            f"pre-trained on the same images into {os.path.dirname(args.teacher)} (once; later "
            f"runs reuse it). By hand: python mae.py {' '.join(demo_teacher_argv(args))}, then "
            f"add --teacher {args.teacher} --teacher-model {DEMO_TEACHER_MODEL}")
        return
    published = [n for n, w in weights.WEIGHTS.items() if w["model"] == args.teacher_model]
    if not published:
        parser.error(f"--distill-layer needs --teacher: no published weight is a --teacher-model "
                     f"{args.teacher_model} ({weights.names_text()} are vit_base / vit_large); "
                     "give a checkpoint's path")
    name = published[0]
    entry = weights.WEIGHTS[name]
    if (args.img_size, args.patch_size) != (entry["img_size"], entry["patch_size"]):
        parser.error(f"--distill-layer needs --teacher: the papers' teacher {name} sees "
                     f"{entry['img_size']}-px images in {entry['patch_size']}-px patches, this run "
                     f"{args.img_size}-px images in {args.patch_size}-px patches; use --img-size "
                     f"{entry['img_size']} --patch-size {entry['patch_size']}, or give --teacher a "
                     "checkpoint at this size (pre-train one: python mae.py --model vit_small "
                     f"--img-size {args.img_size} --patch-size {args.patch_size} and your --data "
                     "flags --out-dir out/teacher)")
    args.teacher = name
    plumbing.print0(f"--distill-layer without --teacher: distilling from the papers' teacher, "
                    f"--teacher {name} --teacher-model {args.teacher_model}: {entry['what']} "
                    f"({entry['licence']}, {entry['url']})")


# The range of every numeric flag (plumbing.check_ranges); the rules between flags follow.
RANGES = {**plumbing.RUN_RANGES, "knn_every": "[0, inf)", "knn_images": "[1, inf)",
          "img_size": "[1, inf)", "patch_size": "[1, inf)", "decoder_dim": "[1, inf)",
          "decoder_depth": "[1, inf)", "decoder_heads": "[1, inf)", "batch_size": "[1, inf)",
          "accum_iter": "[1, inf)", "epochs": "[1, inf)", "save_every": "[1, inf)",
          "synthetic_size": "[1, inf)", "max_images": "[1, inf)", "blr": "(0, inf)",
          "lr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
          "clip_grad": "[0, inf)", "min_crop_scale": "(0, 1]", "student_drop_path": "[0, 1)",
          "student_color_jitter": "[0, inf)", "distill_weight": "(0, inf)"}


def validate(args, parser):
    """Each flag's range (RANGES), then the rules that tie flags together, with a message that
    names the fix."""
    plumbing.check_ranges(parser, args, RANGES)
    plumbing.check_new_run(parser, args)
    hiera = args.model in HIERA_CONFIGS
    depth = model_depth(args.model)
    if hiera and args.recon_layer is not None:
        parser.error("--recon-layer / --no-recon are for ViT students; Hiera's MAE decodes the "
                     "fused stages")
    if hiera and args.teacher is not None and (args.teacher_model not in HIERA_CONFIGS
                                               or args.distill_target == "relation"
                                               or args.teacher_input == "full"):
        parser.error("a Hiera student distils attention or representations (--distill-target "
                     "attn / rep) from a Hiera teacher (--teacher-model hiera_*) that sees the "
                     "same kept mask units (--teacher-input visible)")
    if args.init is not None and args.resume is not None:
        parser.error("--init starts a new run from weights and --resume continues a run: give "
                     "one of them")
    if args.mask_ratio == 0 and args.recon_layer != 0:
        parser.error("--mask-ratio 0 removes no patch, so there is nothing to reconstruct: use a "
                     "ratio in (0, 1) (MAE's: 0.75)")
    if args.recon_layer == 0 and args.teacher is None:
        parser.error("--no-recon / --recon-layer 0 leaves nothing to learn without --teacher")
    if args.recon_layer is not None and not 0 <= args.recon_layer <= depth:
        parser.error(f"--recon-layer {args.recon_layer} is beyond {args.model}'s {depth} blocks "
                     f"(choose 1..{depth})")
    for flag, name, arch, arch_flag in (("--teacher", args.teacher, args.teacher_model,
                                         "--teacher-model"),
                                        ("--init", args.init, args.model, "--model")):
        if name in weights.WEIGHTS and weights.WEIGHTS[name]["model"] != arch:
            parser.error(f"{flag} {name} is a {weights.WEIGHTS[name]['model']}: drop {arch_flag} "
                         f"{arch} (or give {arch_flag} {weights.WEIGHTS[name]['model']})")
    if hiera and args.img_size % 32:
        parser.error(f"--img-size {args.img_size} must be a multiple of 32 for Hiera (stride 4 "
                     "x mask unit 8)")
    if not hiera and args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size "
                     f"{args.patch_size}")
    slots, what = ((args.img_size // 32) ** 2, "mask units") if hiera else \
        ((args.img_size // args.patch_size) ** 2, "patches")
    if not 0 <= args.mask_ratio < 1 or int(slots * (1 - args.mask_ratio)) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} must be in [0, 1) and keep at least one of "
                     f"the {slots} {what}")
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        parser.error(f"--decoder-dim {args.decoder_dim} must be divisible by --decoder-heads "
                     f"{args.decoder_heads} and by 4 (sin-cos position embedding)")
    if args.student_color_jitter > 0 and args.teacher is None:
        parser.error("--student-color-jitter jitters the student's view apart from the "
                     "teacher's (TinyMIM): it needs --teacher")
    if not 0 <= args.warmup_epochs <= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be within 0..--epochs "
                     f"{args.epochs}")
    if args.data not in ("synthetic", "fashion_mnist") and args.data_root is None:
        parser.error(f"--data {args.data} needs --data-root (the folder that holds the data)")
    if args.loader == "device" and args.data not in ("imagefolder", "folder"):
        parser.error("--loader device reads image files: use it with --data imagefolder or "
                     "--data folder")
    if args.max_images is not None and args.loader == "device":
        parser.error("--max-images works with --loader pil")
    if args.loader == "device" and args.student_color_jitter > 0:
        parser.error("--student-color-jitter needs --loader pil (the device loader makes one "
                     "view per image)")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root} is not a folder")


def model_depth(name):
    return sum(HIERA_CONFIGS[name]["stages"]) if name in HIERA_CONFIGS else VIT_CONFIGS[name]["depth"]


def distill_layers(args):
    """(student blocks, teacher blocks) to distil: --distill-layer (none given: the last block)
    and --teacher-layer (none given: the papers' pairing, distill.default_teacher_layer)."""
    depth = model_depth(args.model)
    t_depth = model_depth(args.teacher_model)
    student = args.distill_layer or [depth]
    teacher = args.teacher_layer or [
        distill.default_teacher_layer(s, depth, t_depth, args.distill_target,
                                      hiera=args.model in HIERA_CONFIGS) for s in student]
    return student, teacher


def sample_images(args, count):
    """A few evaluation-transformed images for the reconstruction figure: validation split if
    there is one, else the training split."""
    try:
        dataset = data.build_dataset(args.data, args.data_root, "val",
                                     data.eval_transform(args.img_size), False,
                                     args.synthetic_size, args.img_size)
    except data.DataError:
        dataset = data.build_dataset(args.data, args.data_root, "train",
                                     data.eval_transform(args.img_size), False,
                                     args.synthetic_size, args.img_size)
    samples = (dataset[i] for i in range(min(count, len(dataset))))
    imgs = [s[0] for s in samples if s is not None]
    return torch.stack(imgs) if imgs else torch.empty(0)


def write_figures(args, student, device):
    """The run's pictures (viewers.py draws them): curves.png of log.jsonl, and
    reconstruction.png of 8 validation images when the decoder was trained."""
    import viewers

    written = ["curves.png"] if viewers.write_run_curves(args.out_dir) else []
    imgs = sample_images(args, 8)
    if student.recon_layer and len(imgs):  # no reconstruction when no decoder was trained
        viewers.reconstruction_figure(student, imgs.to(device), args.mask_ratio,
                                      os.path.join(args.out_dir, "reconstruction.png"))
        written.append("reconstruction.png")
    if written:
        plumbing.print0(f"wrote {' and '.join(written)} in {args.out_dir}")


ARCH_ARGS = ("model", "img_size", "patch_size", "decoder_dim", "decoder_depth", "decoder_heads",
             "recon_layer", "teacher_model", "distill_target", "distill_layer", "teacher_layer")


def build_training_module(args, device):
    """The module the loop trains: the MAE, or a DistilledMAE (student, frozen teacher and the
    distillation parts) when --teacher is given. Returns (module, student)."""
    student = build_mae(args.model, img_size=args.img_size, patch_size=args.patch_size,
                        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                        decoder_heads=args.decoder_heads, norm_pix_loss=args.norm_pix_loss,
                        recon_layer=args.recon_layer)
    for block in student.blocks[:-1]:  # TinyMIM: a constant rate, none on the distilled last
        block.drop_path_rate = args.student_drop_path
    if args.teacher is None:
        return student.to(device), student
    teacher = distill.load_teacher(args.teacher, args.teacher_model, img_size=args.img_size,
                                   patch_size=args.patch_size,
                                   q_pool=getattr(student, "q_pool", 2),
                                   trust=args.trust_checkpoint)
    student_layers, teacher_layers = distill_layers(args)
    module = distill.DistilledMAE(student, teacher, student_layers, teacher_layers,
                                  target=args.distill_target, distill_on=args.distill_on,
                                  weight=args.distill_weight, teacher_input=args.teacher_input)
    plumbing.print0(f"distilling {args.distill_target} of student blocks {student_layers} "
                    f"from {args.teacher_model} blocks {teacher_layers}; reconstruction from "
                    f"block {student.recon_layer or 'none'}")
    return module.to(device), student


def train_demo_teacher(args):
    """The synthetic demo's teacher (default_teacher), pre-trained before the student unless its
    folder holds a finished run, which is reused as it is; an interrupted one continues
    (--resume auto). The distillation flags are checked first against both shapes, so that a
    wrong block number does not wait for a teacher."""
    folder = os.path.dirname(args.teacher)
    student = build_mae(args.model, img_size=args.img_size, patch_size=args.patch_size,
                        recon_layer=args.recon_layer)
    teacher_shape = ViT(**VIT_CONFIGS[DEMO_TEACHER_MODEL], img_size=args.img_size,
                        patch_size=args.patch_size)
    student_layers, teacher_layers = distill_layers(args)
    distill.validate_layout(student, teacher_shape, student_layers, teacher_layers,
                            args.distill_target, args.teacher_input)
    if os.path.isfile(args.teacher):
        try:
            ckpt = torch.load(args.teacher, map_location="cpu", weights_only=True, mmap=True)
            stored = ckpt["args"]
            finished = ckpt["epoch"] + 1 >= stored["epochs"]
        except Exception:
            raise distill.DistillError(f"the demo teacher {args.teacher} cannot be read: delete "
                                       f"{folder} and run again (a new one is trained)") from None
        sizes = (stored.get("img_size"), stored.get("patch_size"))
        if sizes != (args.img_size, args.patch_size):
            raise distill.DistillError(
                f"the demo teacher in {folder} saw {sizes[0]}-px images in {sizes[1]}-px patches, "
                f"this run {args.img_size}-px images in {args.patch_size}-px patches: move "
                f"{folder} away (a new teacher is then trained there) or give --teacher")
        if finished:
            plumbing.print0(f"demo teacher: {args.teacher} ({stored['epochs']} epochs), reused")
            return
    argv = demo_teacher_argv(args)
    plumbing.print0(f"pre-training the demo teacher first: python mae.py {' '.join(argv)}")
    train(parse_args(argv + (["--resume", "auto"] if os.path.isfile(args.teacher) else [])))
    plumbing.print0(f"demo teacher ready in {folder}; now the student, distilled from it")


def warm_start(student, path, trust=False):
    """--init: the student's weights from any encoder or encoder + decoder checkpoint (through
    model.load_pretrained, which prints what it loaded); the optimizer and schedule start afresh.
    Says whether the decoder came from the file or starts from its initialisation."""
    report = load_pretrained(student, path, verbose=plumbing.is_main_process(), trust=trust)
    trained = {name for name, p in student.named_parameters() if p.requires_grad}
    decoder = [k for k in trained if k.startswith(DECODER_PREFIXES)]  # not the fixed sin-cos
    fresh = [k for k in decoder if k in report["initialised"]]
    where = ("the decoder starts from its initialisation" if len(fresh) == len(decoder) else
             "the decoder came from the file" if not fresh else
             f"{len(fresh)} of the decoder's {len(decoder)} tensors start from initialisation")
    name = path if isinstance(path, str) else "the state dict"
    plumbing.print0(f"--init {name}: the encoder came from the file; {where}; optimizer and "
                    "schedule start afresh")
    return report


# Parameters exempt from weight decay besides the 1-D ones: none, as the papers' code. Runs
# written before nanoMIM followed it exempted tokens and position embeddings; their
# checkpoints lack "no_decay_names" and resume with that rule, so the optimizer state fits.
NO_DECAY = ()
LEGACY_NO_DECAY = ("token", "pos_embed")


def checkpoint_state(module, student, optimizer, scaler, epoch, step, args, bad_images,
                     no_decay):
    """A plain dict: `model` holds the student MAE alone (FAIR keys, what fine-tuning loads);
    `distill` the head maps / extra blocks, needed only to resume pre-training."""
    state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "args": vars(args),
             "no_decay_names": list(no_decay),
             **bad_images.state_dict()}  # skipped_images, seen_images
    if module is not student:
        state["distill"] = module.distill_state_dict()
    return state


def train(args):
    rank, world_size, device, precision, use_compile = plumbing.start_run(args)
    is_main = rank == 0
    os.makedirs(args.out_dir, exist_ok=True)
    last_path = os.path.join(args.out_dir, "checkpoint.pth")
    log = plumbing.JsonlLog(os.path.join(args.out_dir, "log.jsonl"), enabled=is_main,
                             tensorboard=args.tensorboard)
    monitor = plumbing.knn_monitor(args) if is_main else None

    plumbing.seed_everything(args.seed)
    module, student = build_training_module(args, device)
    if args.init:
        warm_start(student, args.init, args.trust_checkpoint)
    if args.loader == "device":  # workers read bytes; decode + augment on the device
        dataset = data.DeviceLoader(args.data_root, args.batch_size, seed=args.seed,
                                    device=device, img_size=args.img_size,
                                    min_scale=args.min_crop_scale, rank=rank,
                                    world_size=world_size, num_workers=args.num_workers,
                                    interpolation=args.crop_interpolation, data=args.data)
        plumbing.print0(f"--loader device: JPEGs decoded by {data.jpeg_backend()}"
                        + (" (pip install torchcodec: torchvision's decoders are deprecated)"
                           if data.jpeg_backend() == "torchvision" else ""))
        run_loader = dataset  # its workers too live for the run
    else:
        dataset = data.build_dataset(args.data, args.data_root, "train",
                                     data.pretrain_transform(
                                         args.img_size, args.min_crop_scale,
                                         args.crop_interpolation, args.student_color_jitter,
                                         uint8=True),  # normalised on the device, below
                                     args.download, args.synthetic_size, args.img_size)
        dataset = data.evenly_spaced(dataset, args.max_images)
        run_loader = data.Loader(dataset, args.batch_size, args.seed, rank=rank,
                                 world_size=world_size, num_workers=args.num_workers,
                                 pin_memory=device.type == "cuda")  # workers live for the run
    steps_per_epoch, eff_batch, lr = plumbing.steps_and_lr(args, len(dataset), world_size,
                                                           lr=args.lr)
    ckpt = None
    if args.resume:
        ckpt = plumbing.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS)
    no_decay = NO_DECAY if ckpt is None else tuple(ckpt.get("no_decay_names", LEGACY_NO_DECAY))
    optimizer = torch.optim.AdamW(
        plumbing.param_groups(module, args.weight_decay, no_decay_names=no_decay), lr=lr,
        betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = plumbing.grad_scaler(precision, device)
    start_epoch = 0
    step = 0
    bad_images = data.BadImages()
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        if module is not student:
            module.load_distill_state_dict(ckpt["distill"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():  # an fp32/bf16 run saved an empty one
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"] + 1
        step = ckpt["step"]
        bad_images = data.BadImages(ckpt["skipped_images"], ckpt["seen_images"])
        plumbing.print0(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    partial = student.recon_layer < student.depth  # some trainable weights may get no gradient
    model = plumbing.wrap_ddp(plumbing.maybe_compile(module, use_compile), device, partial)

    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    plumbing.print0(f"{args.model} MAE | {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M"
                    f" params | {args.data}: {len(dataset)} images, {args.img_size}px | device "
                    f"{device}, {precision}, compile {use_compile}, "
                    f"{plumbing.processes_text(world_size)} | "
                    f"batch {eff_batch}, lr {lr:.2e}, {total_steps} steps")
    loss_sums = 0
    loss_count = 0
    images_since_log = 0
    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        plumbing.seed_everything(args.seed, epoch, rank)
        loader = run_loader.epoch(epoch, bad_images)
        batches = itertools.islice(loader, steps_per_epoch * args.accum_iter)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main,
                   total=steps_per_epoch * args.accum_iter, leave=False)
        steps_before = step
        for it, (imgs, _) in enumerate(bar):
            if it % args.accum_iter == 0:
                plumbing.set_lr(optimizer, plumbing.cosine_lr(step, total_steps, warmup_steps,
                                                              lr, args.min_lr))
            imgs = imgs.to(device, non_blocking=True)
            if args.loader == "pil":  # the workers' uint8 crops
                imgs = data.normalize(imgs)
            views = {}
            if imgs.ndim == 5:  # (B, 2, C, H, W): [teacher view, student view], TinyMIM
                views["teacher_imgs"], imgs = imgs.unbind(1)
            with plumbing.autocast(device, precision):
                out = model(imgs, args.mask_ratio, **views)
            scaler.scale(out["loss"] / args.accum_iter).backward()
            names = [k for k in out if k.endswith("loss")]  # + recon_loss, distill_loss
            loss_sums = loss_sums + torch.stack([out[k].detach().float() for k in names])
            loss_count += 1
            images_since_log += imgs.shape[0]
            if (it + 1) % args.accum_iter:
                continue
            plumbing.optimizer_step(optimizer, args.clip_grad, scaler)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                means = dict(zip(names, plumbing.all_reduce_mean(loss_sums / loss_count).tolist()))
                plumbing.check_finite(means["loss"], step, last_path)  # a host sync
                rate = images_since_log * world_size / (time.time() - t0)
                log.write(step=step, epoch=epoch + 1, **means, lr=plumbing.current_lr(optimizer),
                          images_per_s=rate, skipped_images=bad_images.skipped)
                bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{rate:.0f}")
                loss_sums = 0
                loss_count = 0
                images_since_log = 0
                t0 = time.time()
        optimizer.zero_grad(set_to_none=True)  # no unfinished accumulation leaks on
        data.check_epoch_read(step - steps_before, epoch, bad_images)
        if loss_count:  # the epoch's last steps not yet logged must be finite too
            plumbing.check_finite(plumbing.all_reduce_mean(loss_sums / loss_count)[0].item(),
                                  step, last_path)
        if is_main:
            knn = plumbing.monitor_epoch(monitor, args, epoch, student, device, log, step)
            ckpt = checkpoint_state(module, student, optimizer, scaler, epoch, step, args,
                                    bad_images, no_decay)
            plumbing.save_checkpoint(ckpt, last_path)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                plumbing.save_checkpoint(ckpt, os.path.join(args.out_dir,
                                                            f"checkpoint-{epoch + 1}.pth"))
            plumbing.print0(f"epoch {epoch + 1}/{args.epochs} done, step {step}{knn}, "
                            f"skipped images {bad_images.skipped}, saved {last_path}")

    if is_main:
        write_figures(args, student, device)
        log.add_pictures(args.out_dir, step)
    plumbing.cleanup_distributed()


def main(argv=None):
    args = parse_args(argv)
    try:
        demo_teacher = os.path.join(demo_teacher_dir(args.out_dir), "checkpoint.pth")
        if args.data == "synthetic" and args.teacher == demo_teacher:
            train_demo_teacher(args)
        train(args)
    except (data.DataError, CheckpointError, distill.DistillError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
