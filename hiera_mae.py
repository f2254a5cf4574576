"""hiera_mae.py: Hiera's sparse masked autoencoder (Ryali et al. 2023, arXiv 2306.00989).

The encoder is hiera.py's Hiera, which here sees only the kept mask units; the loss is the ViT
MAE's (mae_model.py). Official key names, so official Hiera MAE checkpoints load.
"""
import torch
import torch.nn as nn

from hiera import Hiera
from mae_model import MAE
from model import Block, init_mae_weights


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
