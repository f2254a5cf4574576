"""mae.py: masked-autoencoder pre-training of a ViT, the one pre-training loop of nanoMIM.

    python mae.py                                   # demo: vit_tiny on synthetic shapes, CPU ok
    python mae.py --data imagefolder --data-root /path/to/imagenet --epochs 400 ...   # MAE-Tiny

The model follows FAIR MAE (He et al. 2021) step by step, in named functions: patchify,
random_masking, forward_encoder, forward_decoder, forward_loss. Its state-dict keys are FAIR's
(encoder keys at the top level, decoder_*), so our checkpoints load in FAIR's and timm's code.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import distill
import plumbing
from model import (HIERA_CONFIGS, VIT_CONFIGS, Block, CheckpointError, Hiera, ViT,
                   init_mae_weights, sincos_pos_embed)


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
    p, (h, w) = patch_size, grid
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
        assert self.decoder_pos_embed.shape[1] == num_patches + 1
        # what reconstruction_grid needs: predicted patches and the masking noise per image
        self.recon_patch, self.recon_grid, self.mask_slots = patch_size, self.grid, num_patches

    def forward_encoder(self, imgs, mask_ratio, noise=None, return_blocks=(), return_attn=()):
        """Encode the visible patches. Returns (latent, mask, ids_restore, ids_keep, extras):
        latent (B, 1 + K, D) is the normalised output of block `recon_layer`, cls first (None
        when recon_layer is 0); extras = ({block: output}, {block: attention logits}) for the
        blocks asked for (block 0: the input tokens)."""
        x = self.embed(imgs)  # (B, L, D), position added before masking
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise)
        x = self.prepend_cls(x)  # (B, 1 + K, D)
        depth = max([self.recon_layer, *return_blocks, *return_attn])
        x, block_out, attn_logits = self.run_blocks(x, depth, {self.recon_layer, *return_blocks},
                                                    return_attn)
        latent = self.norm(block_out[self.recon_layer]) if self.recon_layer else None
        return latent, mask, ids_restore, ids_keep, (block_out, attn_logits)

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

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore, _, _ = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


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
        dim, self.norm_pix_loss = self.num_features, norm_pix_loss
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
        = kept, ({block: output}, {block: logits}))."""
        keep = self.random_unit_mask(imgs.shape[0], mask_ratio, noise, imgs.device)
        _, block_out, attn_logits = self.forward_features(
            imgs, keep, return_blocks={*self.fused_blocks, *return_blocks}, return_attn=return_attn)
        latent = 0
        for block, head in zip(self.fused_blocks, self.multi_scale_fusion_heads):
            units = self.unit_layout(block_out[block], block)  # (B, K, u_b, u_b, C_b)
            if not isinstance(head, nn.Identity):
                B, K, u, _, C = units.shape
                units = head(units.reshape(B * K, u, u, C).permute(0, 3, 1, 2))  # (BK, D, u', u')
                units = units.permute(0, 2, 3, 1).reshape(B, K, *units.shape[2:], -1)
            latent = latent + units
        return self.encoder_norm(latent), keep, (block_out, attn_logits)

    def forward_decoder(self, latent, keep):
        """Kept units' latents + mask tokens for removed units -> (B, L, p*p*C) predictions for
        the L patches of the final-stride grid, in raster order."""
        x = self.decoder_embed(latent)  # (B, K, u, u, Dd)
        B, u, Dd = keep.shape[0], self.unit_final, x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, self.num_units, u * u, Dd).clone()
        full[keep] = x.reshape(-1, u * u, Dd)  # kept units, in unit order, into their slots
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

    def forward(self, imgs, mask_ratio=0.6, noise=None):
        latent, keep, _ = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, keep)
        mask = self.removed_patches(keep)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_mae(name, **kwargs):
    """A ViT MAE or a Hiera sparse MAE by preset name (Hiera ignores patch_size/recon_layer)."""
    if name in HIERA_CONFIGS:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("patch_size", "recon_layer")}
        return HieraMAE(**HIERA_CONFIGS[name], **kwargs)
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of "
                         f"{', '.join(list(VIT_CONFIGS) + list(HIERA_CONFIGS))}")
    return MAE(**VIT_CONFIGS[name], **kwargs)


def encoder_state_dict(model):
    """The backbone alone (what fine-tuning and timm load): every key but the decoder's."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("decoder_", "mask_token", "multi_scale_fusion", "encoder_norm"))}


@torch.no_grad()
def reconstruction_grid(model, imgs, mask_ratio, path, seed=0):
    """Save a PNG: originals / masked inputs / reconstructions (visible patches pasted back), one
    column per image. With norm-pix loss the model predicts each patch normalised by its own
    mean and std, so the reconstruction is drawn with the true patch's statistics."""
    from PIL import Image

    model.eval()
    noise = torch.rand(imgs.shape[0], model.mask_slots,
                       generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    _, pred, mask = model(imgs, mask_ratio, noise)
    pred = pred.float()
    if model.norm_pix_loss:
        target = patchify(imgs, model.recon_patch)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    p, grid = model.recon_patch, model.recon_grid
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3), p, grid)  # 1 = removed
    recon = unpatchify(pred, p, grid)
    rows = [imgs, imgs * (1 - pixel_mask), imgs * (1 - pixel_mask) + recon * pixel_mask]
    rows = [data.denormalize(r) for r in rows]  # each (B, 3, H, W) in [0, 1]
    grid_img = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 3H, B*W)
    array = (grid_img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    scale = max(1, 96 // imgs.shape[-1])  # small demo images are enlarged to be seen
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    model.train()


# ----------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="MAE pre-training of a ViT (nanoMIM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_tiny", choices=list(VIT_CONFIGS) + list(HIERA_CONFIGS),
                   help="encoder (hiera_*: Hiera's sparse MAE)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size in pixels (default 224; synthetic: 32, Hiera 64)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch size in pixels (default 16; 4 for --data synthetic)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches (Hiera: mask units) removed (default per model: "
                        "ViT 0.75, hiera_tiny_lite 0.4 as MAE-Lite, other Hiera 0.6)")
    p.add_argument("--recon-layer", type=int, default=None,
                   help="encoder block (1-indexed) whose normalised output the decoder reads "
                        "(default: the last block)")
    p.add_argument("--decoder-dim", type=int, default=None,
                   help="decoder width (default per model: vit_tiny / hiera_tiny_lite 96, "
                        "vit_small 192, larger models 512)")
    p.add_argument("--decoder-depth", type=int, default=None,
                   help="decoder blocks (default per model: 1 for the lightweight models, 8)")
    p.add_argument("--decoder-heads", type=int, default=None,
                   help="decoder heads (default per model: 3, vit_small 6, larger models 16)")
    p.add_argument("--student-drop-path", type=float, default=0.0,
                   help="stochastic depth, the same rate on every encoder block but the last "
                        "(TinyMIM's student: 0.1)")
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="regress raw (normalised-image) pixels instead of per-patch normalised")
    g = p.add_argument_group("distillation from a teacher (see distill.py)")
    g.add_argument("--teacher", default=None,
                   help="teacher checkpoint (FAIR MAE, MAE-Lite, ours); enables distillation")
    g.add_argument("--teacher-model", default=None,
                   choices=list(VIT_CONFIGS) + list(HIERA_CONFIGS),
                   help="teacher architecture (default vit_base; hiera_base for a Hiera student)")
    g.add_argument("--distill-target", default="attn", choices=["attn", "rep", "relation"],
                   help="attention maps (D-MAE), representations, or TinyMIM Q-K/V-V relations")
    g.add_argument("--distill-on", default="logits", choices=["logits", "probs"],
                   help="attention target: pre-softmax logits (published) or probabilities")
    g.add_argument("--distill-layer", default=None,
                   help="student blocks to distil, 1-indexed, comma-separated (e.g. 12 or 6,12)")
    g.add_argument("--teacher-layer", default=None,
                   help="matching teacher blocks (default: the papers' pairing: the same "
                        "index, TinyMIM's 18 of vit_large for relations, Hiera the same "
                        "relative depth)")
    g.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distill loss")
    g.add_argument("--teacher-input", default="visible", choices=["visible", "full"],
                   help="teacher sees the student's visible patches, or the whole image "
                        "(TinyMIM; then only the visible tokens are compared)")
    g.add_argument("--no-recon", action="store_true",
                   help="no reconstruction loss: distillation alone (same as --recon-layer 0)")
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (imagefolder: the folder "
                   "holding train/<class>/...)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--loader", default="pil", choices=["pil", "device"],
                   help="pil: PIL decode + augment in workers; device: workers read bytes, JPEGs "
                        "decoded in batches (nvJPEG on CUDA) and augmented on the device "
                        "(--data imagefolder)")
    p.add_argument("--min-crop-scale", type=float, default=None,
                   help="smallest RandomResizedCrop area (default per model: 0.08 for vit_tiny, "
                        "vit_small, hiera_tiny_lite as MAE-Lite; 0.2 for larger models, FAIR)")
    p.add_argument("--crop-interpolation", default=None, choices=list(data.INTERPOLATIONS),
                   help="RandomResizedCrop interpolation; random = bilinear or bicubic per image "
                        "(default per model: random as MAE-Lite, bicubic for larger models)")
    p.add_argument("--student-color-jitter", type=float, default=0.0,
                   help="ColorJitter(j, j, j) on the student's view only; the teacher sees the "
                        "same crop and flip without it (TinyMIM: 0.4)")
    p.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per GPU per step (default 256; 64 for --data synthetic)")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="gradient accumulation steps (effective batch = batch * accum * GPUs)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default 400; 8 for --data synthetic)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warmup epochs (default 40; 1 for --data synthetic)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay, on every parameter but biases and norms (as the "
                        "papers' code: cls and mask tokens are decayed)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (default and 0: no clipping)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loading processes per GPU (default: min(8, CPU cores))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on for CUDA)")
    p.add_argument("--out-dir", default="out/mae", help="where checkpoints, log and PNG go")
    p.add_argument("--resume", default=None, help="checkpoint to continue from exactly")
    p.add_argument("--save-every", type=int, default=20,
                   help="also keep checkpoint-<epoch>.pth every this many epochs")
    p.add_argument("--log-every", type=int, default=20, help="log every this many steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


# The papers' pre-training settings per model, used for every flag left unset: MAE-Lite's for the
# lightweight students (mae_lite_exp.py / models_mae.py: crop scale 0.08 with a random
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
                            mask_ratio=0.4),
    "hiera_tiny": dict(LARGE, mask_ratio=0.6),
    "hiera_small": dict(LARGE, mask_ratio=0.6),
    "hiera_base": dict(LARGE, mask_ratio=0.6),
}


def fill_defaults(args):
    """Unset flags take the model's paper defaults (PRETRAIN_DEFAULTS), then the sizes that
    depend on the data: the synthetic demo is small enough for a laptop CPU."""
    taken = plumbing.inherit_resumed_args(args)
    if taken:
        plumbing.print0(f"--resume: {', '.join(taken)} taken from the checkpoint's run")
    demo, hiera = args.data == "synthetic", args.model in HIERA_CONFIGS
    for name, value in PRETRAIN_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.teacher_model is None:
        args.teacher_model = "hiera_base" if hiera else "vit_base"
    for name, real, small in (("img_size", 224, 64 if hiera else 32), ("patch_size", 16, 4),
                              ("batch_size", 256, 64),
                              ("epochs", 400, 8), ("warmup_epochs", 40, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if demo else real)
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1)
    return args


def validate(args, parser):
    """Every flag checked against the model and the data, with a message that names the fix."""
    if args.model in HIERA_CONFIGS:
        return validate_hiera(args, parser)
    depth = VIT_CONFIGS[args.model]["depth"]
    if args.no_recon:
        args.recon_layer = 0
    if args.recon_layer == 0 and args.teacher is None:
        parser.error("--no-recon / --recon-layer 0 leaves nothing to learn without --teacher")
    if args.recon_layer is not None and not 0 <= args.recon_layer <= depth:
        parser.error(f"--recon-layer {args.recon_layer} is beyond {args.model}'s {depth} blocks "
                     f"(choose 1..{depth})")
    parse_distill_layers(args, parser, depth)
    if args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size "
                     f"{args.patch_size}")
    num_patches = (args.img_size // args.patch_size) ** 2
    if not 0 <= args.mask_ratio < 1 or int(num_patches * (1 - args.mask_ratio)) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} must be in [0, 1) and keep at least one of "
                     f"the {num_patches} patches")
    validate_common(args, parser)


def validate_hiera(args, parser):
    """Hiera's sparse MAE: whole mask units (32 px with the default unit of 8 tokens)."""
    if args.recon_layer is not None or args.no_recon:
        parser.error("--recon-layer / --no-recon are for ViT students; Hiera's MAE decodes the "
                     "fused stages")
    if args.teacher is not None and (args.teacher_model not in HIERA_CONFIGS
                                     or args.distill_target == "relation"):
        parser.error("a Hiera student distils attention or representations (--distill-target "
                     "attn / rep) from a Hiera teacher (--teacher-model hiera_*) whose blocks see "
                     "the same tokens")
    parse_distill_layers(args, parser, model_depth(args.model))
    if args.img_size % 32:
        parser.error(f"--img-size {args.img_size} must be a multiple of 32 for Hiera (stride 4 "
                     "x mask unit 8)")
    units = (args.img_size // 32) ** 2
    if not 0 <= args.mask_ratio < 1 or int(units * (1 - args.mask_ratio)) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} must be in [0, 1) and keep at least one of "
                     f"the {units} mask units")
    validate_common(args, parser)


def model_depth(name):
    return sum(HIERA_CONFIGS[name]["stages"]) if name in HIERA_CONFIGS else VIT_CONFIGS[name]["depth"]


def parse_distill_layers(args, parser, depth):
    """--distill-layer (default: the last block) and --teacher-layer (default: the papers'
    pairing, distill.default_teacher_layer)."""
    if args.teacher is None and (args.distill_layer or args.teacher_layer):
        parser.error("--distill-layer / --teacher-layer need a --teacher checkpoint")
    if args.teacher is None:
        return
    t_depth = model_depth(args.teacher_model)
    args.distill_layer = parse_layers(args.distill_layer or str(depth), "--distill-layer", parser)
    args.teacher_layer = parse_layers(
        args.teacher_layer or ",".join(
            str(distill.default_teacher_layer(s, depth, t_depth, args.distill_target,
                                              hiera=args.model in HIERA_CONFIGS))
            for s in args.distill_layer), "--teacher-layer", parser)


def validate_common(args, parser):
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        parser.error(f"--decoder-dim {args.decoder_dim} must be divisible by --decoder-heads "
                     f"{args.decoder_heads} and by 4 (sin-cos position embedding)")
    for name in ("batch_size", "accum_iter", "epochs", "decoder_depth", "decoder_heads",
                 "save_every", "log_every", "synthetic_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.min_crop_scale <= 1:
        parser.error(f"--min-crop-scale {args.min_crop_scale} must be in (0, 1]")
    if not 0 <= args.student_drop_path < 1:
        parser.error(f"--student-drop-path {args.student_drop_path} must be in [0, 1)")
    if args.student_color_jitter < 0:
        parser.error(f"--student-color-jitter {args.student_color_jitter} must be at least 0")
    if args.clip_grad is not None and args.clip_grad < 0:
        parser.error(f"--clip-grad {args.clip_grad} must be at least 0 (0: no clipping)")
    if args.student_color_jitter > 0 and args.teacher is None:
        parser.error("--student-color-jitter jitters the student's view apart from the "
                     "teacher's (TinyMIM): it needs --teacher")
    if not 0 <= args.warmup_epochs <= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be within 0..--epochs "
                     f"{args.epochs}")
    if args.data not in ("synthetic", "fashion_mnist") and args.data_root is None:
        parser.error(f"--data {args.data} needs --data-root (the folder that holds the data)")
    if args.loader == "device" and args.data != "imagefolder":
        parser.error("--loader device reads image files: use it with --data imagefolder")
    if args.loader == "device" and args.student_color_jitter > 0:
        parser.error("--student-color-jitter needs --loader pil (the device loader makes one "
                     "view per image)")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root} is not a folder")


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
    return torch.stack([s[0] for s in samples if s is not None])


def parse_layers(text, flag, parser):
    """'6,12' -> [6, 12]."""
    if isinstance(text, list):  # already parsed (resumed args)
        return text
    try:
        return [int(part) for part in str(text).split(",")]
    except ValueError:
        parser.error(f"{flag} {text!r} must be block numbers separated by commas, e.g. 12 or 6,12")


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
    teacher = distill.load_teacher(args.teacher, args.teacher_model, args.img_size,
                                   args.patch_size, getattr(student, "q_pool", 2))
    module = distill.DistilledMAE(student, teacher, args.distill_layer, args.teacher_layer,
                                  args.distill_target, args.distill_on, args.distill_weight,
                                  args.teacher_input)
    plumbing.print0(f"distilling {args.distill_target} of student blocks {args.distill_layer} "
                    f"from {args.teacher_model} blocks {args.teacher_layer}; reconstruction from "
                    f"block {student.recon_layer or 'none'}")
    return module.to(device), student


def step_losses(model, imgs, mask_ratio, distilling):
    """(total, reconstruction, distillation) losses of one batch. imgs is (B, C, H, W), or
    (B, 2, C, H, W) = [teacher view, student view] with --student-color-jitter."""
    teacher_imgs = None
    if imgs.ndim == 5:
        teacher_imgs, imgs = imgs.unbind(1)
    if distilling:
        return model(imgs, mask_ratio, teacher_imgs=teacher_imgs)
    loss = model(imgs, mask_ratio)[0]
    return loss, loss, torch.zeros_like(loss)


# Parameters exempt from weight decay besides the 1-D ones: none, as the papers' code. Runs
# written before nanoMIM followed it exempted tokens and position embeddings; their
# checkpoints lack "no_decay_names" and resume with that rule, so the optimizer state fits.
NO_DECAY = ()
LEGACY_NO_DECAY = ("token", "pos_embed")


def checkpoint_state(module, student, optimizer, epoch, step, args, counts, no_decay):
    """A plain dict: `model` holds the student MAE alone (FAIR keys, what fine-tuning loads);
    `distill` the head maps / extra blocks, needed only to resume pre-training."""
    state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "step": step, "args": vars(args), "no_decay_names": list(no_decay),
             **counts}  # counts: skipped / seen images
    if module is not student:
        state["distill"] = module.distiller.state_dict()
    return state


def train(args):
    rank, world_size, device = plumbing.setup_distributed()
    is_main, distilling = rank == 0, args.teacher is not None
    precision = plumbing.resolve_precision(args.precision, device)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    os.makedirs(args.out_dir, exist_ok=True)
    last_path = os.path.join(args.out_dir, "checkpoint.pth")
    log = plumbing.JsonlLog(os.path.join(args.out_dir, "log.jsonl"), enabled=is_main)

    plumbing.seed_everything(args.seed)
    module, student = build_training_module(args, device)
    if args.loader == "device":  # workers read bytes; decode + augment on the device
        dataset = data.DeviceLoader(args.data_root, args.batch_size, args.seed, device,
                                    args.img_size, args.min_crop_scale, rank, world_size,
                                    args.num_workers, interpolation=args.crop_interpolation)
    else:
        dataset = data.build_dataset(args.data, args.data_root, "train",
                                     data.pretrain_transform(
                                         args.img_size, args.min_crop_scale,
                                         args.crop_interpolation, args.student_color_jitter),
                                     args.download, args.synthetic_size, args.img_size)
    steps_per_epoch = len(dataset) // world_size // args.batch_size // args.accum_iter
    if steps_per_epoch < 1:
        raise data.DataError(f"{len(dataset)} images are fewer than one step needs "
                             f"({args.batch_size * args.accum_iter * world_size}); lower "
                             "--batch-size or --accum-iter")
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    ckpt = None
    if args.resume:
        ckpt = plumbing.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS)
    no_decay = NO_DECAY if ckpt is None else tuple(ckpt.get("no_decay_names", LEGACY_NO_DECAY))
    optimizer = torch.optim.AdamW(
        plumbing.param_groups(module, args.weight_decay, no_decay_names=no_decay), lr=lr,
        betas=(0.9, 0.95), fused=device.type == "cuda")
    start_epoch, step, counts = 0, 0, {"skipped_images": 0, "seen_images": 0}
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        if distilling:
            module.distiller.load_state_dict(ckpt["distill"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        counts = {k: ckpt[k] for k in counts}
        plumbing.print0(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    partial = student.recon_layer < student.depth  # some trainable weights may get no gradient
    model = plumbing.wrap_ddp(plumbing.maybe_compile(module, use_compile), device, partial)

    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    plumbing.print0(f"{args.model} MAE | {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M"
                    f" params | {args.data}: {len(dataset)} images, {args.img_size}px | device "
                    f"{device}, {precision}, compile {use_compile}, {world_size} process(es) | "
                    f"batch {eff_batch}, lr {lr:.2e}, {total_steps} steps")
    loss_sums = torch.zeros(3, device=device)  # total, reconstruction, distillation
    loss_count, images_since_log, t0 = 0, 0, time.time()
    for epoch in range(start_epoch, args.epochs):
        plumbing.seed_everything(args.seed, epoch, rank)
        loader = dataset.epoch(epoch) if args.loader == "device" else data.make_loader(
            dataset, args.batch_size, epoch, args.seed, rank, world_size, args.num_workers,
            pin_memory=device.type == "cuda")
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main,
                   total=steps_per_epoch * args.accum_iter, leave=False)
        for it, imgs, _ in data.good_batches(bar, steps_per_epoch * args.accum_iter,
                                             args.batch_size, counts):
            if it % args.accum_iter == 0:
                plumbing.set_lr(optimizer, plumbing.cosine_lr(step, total_steps, warmup_steps,
                                                              lr, args.min_lr))
            imgs = imgs.to(device, non_blocking=True)
            with plumbing.autocast(device, precision):
                losses = step_losses(model, imgs, args.mask_ratio, distilling)
            (losses[0] / args.accum_iter).backward()
            loss_sums += torch.stack([l.detach().float() for l in losses])
            loss_count, images_since_log = loss_count + 1, images_since_log + imgs.shape[0]
            if (it + 1) % args.accum_iter:
                continue
            plumbing.optimizer_step(optimizer, args.clip_grad)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                means = plumbing.all_reduce_mean(loss_sums / loss_count).tolist()  # host sync
                plumbing.check_finite(means[0], step, last_path)
                rate = images_since_log * world_size / (time.time() - t0)
                extra = {"recon_loss": means[1], "distill_loss": means[2]} if distilling else {}
                log.write(step=step, epoch=epoch + 1, loss=means[0], **extra,
                          lr=plumbing.current_lr(optimizer),
                          images_per_s=rate, skipped_images=counts["skipped_images"])
                bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{rate:.0f}")
                loss_sums.zero_()
                loss_count, images_since_log, t0 = 0, 0, time.time()
        if loss_count:  # the epoch's last steps not yet logged must be finite too
            plumbing.check_finite(plumbing.all_reduce_mean(loss_sums / loss_count)[0].item(),
                                  step, last_path)
        if is_main:
            ckpt = checkpoint_state(module, student, optimizer, epoch, step, args, counts,
                                    no_decay)
            plumbing.save_checkpoint(ckpt, last_path)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                plumbing.save_checkpoint(ckpt, os.path.join(args.out_dir,
                                                            f"checkpoint-{epoch + 1}.pth"))
            plumbing.print0(f"epoch {epoch + 1}/{args.epochs} done, step {step}, "
                            f"skipped images {counts['skipped_images']}, saved {last_path}")

    if is_main and student.recon_layer:  # no figure when the decoder was not trained
        png = os.path.join(args.out_dir, "reconstruction.png")
        reconstruction_grid(student, sample_images(args, 8).to(device), args.mask_ratio, png)
        plumbing.print0(f"wrote {png}")
    plumbing.cleanup_distributed()


def main(argv=None):
    parser = get_parser()
    args = fill_defaults(parser.parse_args(argv))
    validate(args, parser)
    try:
        train(args)
    except (data.DataError, CheckpointError, distill.DistillError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
