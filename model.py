"""model.py: the Vision Transformer of nanoMIM and its presets.

Depends on torch alone, so it can be copied into another project as it is; checkpoints.py
reads every checkpoint format into it.

Conventions (shared with FAIR MAE and timm, so checkpoints move freely):
  * tokens are [cls, patch_0, ..., patch_{L-1}], patches in row-major order;
  * state-dict keys: cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.* or fc_norm.*, head.*;
  * block numbers in every public argument are 1-indexed, as in the papers ("block 12" is the
    last block of ViT-Tiny), while `self.blocks` is an ordinary 0-indexed ModuleList.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Position embedding


def sincos_pos_embed(dim, grid_h, grid_w, cls_token=True):
    """Fixed 2-D sin-cos position embedding in the FAIR MAE convention.

    The first half of the channels encodes the column (x), the second half the row (y); each half
    is [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (dim/4)). Computed in
    float64 and returned as float32 of shape (1, [1 +] grid_h * grid_w, dim); the cls row is zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (H, W)

    def encode(pos):  # (H*W,) -> (H*W, dim/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(xs.flatten()), encode(ys.flatten())], dim=1)  # (H*W, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Transformer pieces


class PatchEmbed(nn.Module):
    """Conv patch embedding: (B, C, H, W) -> (B, H/p * W/p, D). Non-overlapping by default
    (the ViT); Hiera's stem is kernel 7, stride 4, padding 3."""

    def __init__(self, patch_size, in_chans, embed_dim, kernel_size=None, padding=0):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size or patch_size,
                              stride=patch_size, padding=padding)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


def relative_position_index(grid_h, grid_w):
    """BEiT's index into a relative-position table for [cls, patches] of a (grid_h, grid_w) grid.

    Patch pairs (i, j) index the (2H-1)(2W-1) offsets (dy, dx) = pos(i) - pos(j); the last three
    entries are cls-to-token (cls as query), token-to-cls and cls-to-cls. Returns (N, N) int64
    with N = 1 + H*W.
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, H*W)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, HW, HW): query minus key
    patch_index = (offsets[0] + grid_h - 1) * (2 * grid_w - 1) + (offsets[1] + grid_w - 1)
    num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
    index = torch.zeros(1 + grid_h * grid_w, 1 + grid_h * grid_w, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = num_offsets  # cls attends to tokens
    index[:, 0] = num_offsets + 1  # tokens attend to cls
    index[0, 0] = num_offsets + 2  # cls to cls
    return index


def attention_logits(q, k):
    """Pre-softmax scaled dot products q k^T / sqrt(head width): (..., Nq, hd), (..., Nk, hd) ->
    (..., Nq, Nk). The explicit attention path, distillation and the analyses all use it."""
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)


def slow_sdpa(q):
    """True where PyTorch's SDPA kernel is slower than the explicit product: bf16 on CPU
    (measured by bench.py, docs/performance.md)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


class Attention(nn.Module):
    """Multi-head self-attention with two paths.

    The fast path calls F.scaled_dot_product_attention (flash / memory-efficient kernels).
    The explicit path also returns the pre-softmax scaled logits q k^T / sqrt(d_head) of shape
    (B, heads, N, N), which distillation (D-MAE) and the attention analyses need.

    rel_pos_grid=(H, W) adds a learned relative position bias (BEiT / SimMIM, used by the papers
    for fine-tuning): a zero-initialised table of (2H-1)(2W-1)+3 entries per head, added to the
    logits on both paths, for the full sequence [cls, H*W patches] only.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, rel_pos_grid=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if rel_pos_grid is not None:
            h, w = rel_pos_grid
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * h - 1) * (2 * w - 1) + 3, num_heads))
            # Derived from the grid, so not saved: state dicts hold the table alone.
            self.register_buffer("relative_position_index", relative_position_index(h, w),
                                 persistent=False)

    def project_qkv(self, x):
        """(B, N, D) -> q, k, v, each (B, heads, N, head_dim)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, hd)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def rel_pos_bias(self, num_tokens):
        """(heads, N, N) bias from the table, or None without relative positions."""
        if self.relative_position_bias_table is None:
            return None
        index = self.relative_position_index
        if num_tokens != index.shape[0]:
            raise ValueError(f"relative position bias is defined for {index.shape[0]} tokens "
                             f"(cls + full grid), got {num_tokens}: it works on unmasked images")
        # (N, N, h) -> (h, N, N), made contiguous: the GPU's fused SDPA kernels take an additive
        # mask only with stride 1 in its last dimension, else SDPA falls back to its slow math
        # kernel (seen on the H100: "attn_mask's last dimension to have stride 1")
        return self.relative_position_bias_table[index].permute(2, 0, 1).contiguous()

    def forward(self, x, return_logits=False):
        B, N, D = x.shape
        q, k, v = self.project_qkv(x)  # (B, heads, N, hd)
        bias = self.rel_pos_bias(N)
        logits = None
        if return_logits or slow_sdpa(q):
            logits = attention_logits(q, k)  # (B, heads, N, N), pre-softmax
            if bias is not None:
                logits = logits + bias
            out = logits.softmax(dim=-1) @ v  # (B, heads, N, hd)
        else:
            mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)  # additive float mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, N, D)  # heads back into channels
        return self.proj(out), logits if return_logits else None


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, rate, training):
    """Stochastic depth: zero the whole residual branch of a random subset of samples."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep if keep > 0 else x * mask  # rate 1 drops every branch, no 0/0


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path_rate=0.0, rel_pos_grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_grid=rel_pos_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, return_logits=False):
        attn_out, logits = self.attn(self.norm1(x), return_logits)
        x = x + drop_path(attn_out, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, logits


def run_block_list(blocks, x, depth=None, return_blocks=(), return_attn=()):
    """Run blocks 1..depth (all by default) of a ModuleList of blocks returning (x, logits),
    keeping the outputs / attention logits of the 1-indexed blocks asked for (block 0 in
    return_blocks is the input). Returns (x, {block: output}, {block: logits})."""
    depth = len(blocks) if depth is None else depth
    if not 0 <= depth <= len(blocks):
        raise ValueError(f"depth {depth} is outside 0..{len(blocks)}")
    for b in list(return_blocks) + list(return_attn):
        if not (0 if b in return_blocks else 1) <= b <= depth:
            raise ValueError(f"block {b} is outside the blocks run (1..{depth})")
    block_out = {0: x} if 0 in return_blocks else {}
    attn_logits = {}
    for i, block in enumerate(blocks[:depth], start=1):
        x, logits = block(x, return_logits=i in return_attn)
        if i in return_attn:
            attn_logits[i] = logits
        if i in return_blocks:
            block_out[i] = x
    return x, block_out, attn_logits


def init_mae_weights(module):
    """MAE initialisation: xavier_uniform Linear weights, zero biases, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # qkv is initialised as one (3D x D) matrix, as MAE
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Vision Transformer


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class ViT(nn.Module):
    """Vision Transformer with the FAIR MAE / timm layout and state-dict keys.

    global_pool='token': final `norm`, then the cls token (the MAE encoder uses this layout).
    global_pool='avg':   mean of the patch tokens, then `fc_norm` (MAE fine-tuning); no `norm`.
    num_classes=0 gives no head (forward returns the pooled features).
    rel_pos=True adds a relative position bias to every block (fine-tuning; see Attention).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12,
                 num_heads=12, mlp_ratio=4.0, num_classes=0, global_pool="token",
                 drop_path_rate=0.0, rel_pos=False):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        img_h, img_w = _pair(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"image size {img_h}x{img_w} is not divisible by patch {patch_size}")
        self.img_size = (img_h, img_w)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = (img_h // patch_size, img_w // patch_size)  # (rows, columns) of patches
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_features = embed_dim  # width of the pooled features (the head's input)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.rel_pos = rel_pos

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (not trained) as in MAE; a Parameter, not a buffer, so the key matches FAIR/timm.
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, *self.grid), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # linear stochastic depth
        grid = self.grid if rel_pos else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, grid) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        init_mae_weights(self)
        w = self.patch_embed.proj.weight  # the conv seen as a (D, C*p*p) matrix, as MAE
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    # The forward pass in named stages, so MAE and distillation can run it piece by piece.

    def embed(self, imgs):
        """(B, C, H, W) -> patch tokens plus position, (B, L, D); no cls token yet."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, x):
        """(B, L, D) -> (B, 1 + L, D): the cls token (with its position row) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def run_blocks(self, x, depth=None, return_blocks=(), return_attn=()):
        """Run blocks 1..depth (all by default) on a token sequence x of shape (B, N, D).

        return_blocks / return_attn name 1-indexed blocks whose output (B, N, D) or attention
        logits (B, heads, N, N) are wanted (block 0 in return_blocks is the input x itself);
        blocks past `depth` are never run.
        Returns (x, {block: output}, {block: logits}); x is the raw output of block `depth`.
        """
        return run_block_list(self.blocks, x, depth, return_blocks, return_attn)

    def forward_features(self, imgs, *, keep=None, depth=None, return_blocks=(), return_attn=()):
        """Images -> (tokens after block `depth`, {block: output}, {block: logits}). keep (B, K):
        only these patches, in this order (an MAE student's visible ones), after the cls token."""
        x = self.embed(imgs)  # (B, L, D)
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (B, K, D)
        return self.run_blocks(self.prepend_cls(x), depth, return_blocks, return_attn)

    def block_heads(self, layer):
        """Attention heads of 1-indexed block `layer` (the same in every block of a ViT)."""
        return self.num_heads

    def block_width(self, layer):
        """Width of block `layer`'s output."""
        return self.embed_dim

    def layer_representation(self, block_out, layer):
        """The normalised representation of layer L (0..depth) as the papers use it: the input
        norm of block L+1 applied to block L's output (layer 0: the embedded tokens), and after
        the last block the final norm (`fc_norm` for an avg-pool model). block_out as returned
        by run_blocks; returns (B, N, D)."""
        if layer < self.depth:
            return self.blocks[layer].norm1(block_out[layer])
        final_norm = self.norm if self.global_pool == "token" else self.fc_norm
        return final_norm(block_out[layer])

    def forward_head(self, x):
        """(B, 1 + L, D) tokens -> pooled features (B, D) -> logits (B, classes) if a head."""
        if self.global_pool == "avg":
            x = self.fc_norm(x[:, 1:].mean(dim=1))  # mean over patch tokens, cls excluded
        else:
            x = self.norm(x)[:, 0]  # the cls token
        return self.head(x)

    def forward(self, imgs):
        return self.forward_head(self.forward_features(imgs)[0])


# (width, depth, heads) of each preset; MAE and the teachers are built from the same table.
# The papers' ViT-Tiny and ViT-Small have 12 heads; DeiT's (and timm's vit_tiny / vit_small)
# have 3 and 6. The tensors have the same shapes either way, so the head count of a file must be
# known, not guessed from it (see declared_heads).
VIT_CONFIGS = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=12),
               "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
               "vit_small": dict(embed_dim=384, depth=12, num_heads=12),
               "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
               "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
               "vit_large": dict(embed_dim=1024, depth=24, num_heads=16)}


def vit_tiny(**kwargs):
    """The papers' ViT-Tiny: 192 wide, 12 blocks, 12 heads of width 16 (DeiT's has 3)."""
    return ViT(**VIT_CONFIGS["vit_tiny"], **kwargs)


def deit_tiny(**kwargs):
    """DeiT's ViT-Tiny (timm's vit_tiny_patch16_224): as vit_tiny but 3 heads of width 64."""
    return ViT(**VIT_CONFIGS["deit_tiny"], **kwargs)


def vit_small(**kwargs):
    return ViT(**VIT_CONFIGS["vit_small"], **kwargs)


def deit_small(**kwargs):
    """DeiT's ViT-Small (timm's vit_small_patch16_224): 6 heads of width 64."""
    return ViT(**VIT_CONFIGS["deit_small"], **kwargs)


def vit_base(**kwargs):
    return ViT(**VIT_CONFIGS["vit_base"], **kwargs)


def vit_large(**kwargs):
    return ViT(**VIT_CONFIGS["vit_large"], **kwargs)


PRESETS = {"vit_tiny": vit_tiny, "deit_tiny": deit_tiny, "vit_small": vit_small,
           "deit_small": deit_small, "vit_base": vit_base, "vit_large": vit_large}


def build_model(name, **kwargs):
    """A ViT preset by name (presets.build_model also knows hiera.py's presets)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**kwargs)
