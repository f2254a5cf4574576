"""mae_model.py: the masked autoencoder of a ViT (FAIR MAE), with patchify and random masking.

The ViT MAE follows FAIR MAE (He et al. 2021, arXiv 2111.06377) step by step, in named
functions: patchify, random_masking, forward_encoder, forward_decoder, forward_loss. Its
state-dict keys are FAIR's (encoder keys at the top level, decoder_*), so our checkpoints load
in FAIR's and timm's code. Depends on model.py and torch alone. hiera_mae.py holds Hiera's
sparse MAE; presets.build_mae builds either by preset name; mae.py trains them.
"""
import torch
import torch.nn as nn

from model import Block, ViT, init_mae_weights, sincos_pos_embed


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
        # what viewers.reconstruction_figure needs: predicted patches, masking noise per image
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


# The pre-training-only modules of MAE and HieraMAE (the decoder side).
DECODER_PREFIXES = ("decoder_", "mask_token", "multi_scale_fusion", "encoder_norm")


def encoder_state_dict(model):
    """The backbone alone (what fine-tuning and timm load): every key but the decoder's."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(DECODER_PREFIXES)}


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
