"""hiera.py: Hiera (Ryali et al. 2023) for 2-D images, hand-written, with the official
checkpoints' key names, so that official and timm Hiera weights load as they are.

The one idea to understand is the token order (unroll_order): the offsets inside each 2x2 cell
are moved outwards, three times, so that the mask unit varies fastest. Pooling a stage transition
is then a reshape and a max, a window of mask-unit attention is every `windows`-th token, and
deleting the tokens of removed units (the sparse MAE in mae.py) keeps every unit whole.

The interface is the ViT's (model.py): forward_features(imgs, keep=..., depth=..., return_blocks=
..., return_attn=...), block_heads(layer), block_width(layer), layer_representation(block_out,
layer), with blocks 1-indexed; so distillation and the analyses ask the model, not its type.
Depends on torch and model.py's transformer pieces.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Mlp, PatchEmbed, _pair, attention_logits, drop_path, run_block_list, slow_sdpa

def unroll_order(grid, steps):
    """Hiera's token order as raster indices into a (H, W) grid.

    Each of `steps` unroll steps splits every position into (coarse position, offset in a 2x2
    cell) and moves the offsets outwards, so the order is [offsets of step 1, of step 2, ...,
    coarse raster position]: the coarsest grid (the mask units) varies fastest. Max-pooling the
    first step's 4 offsets is then a reshape, and tokens of one mask unit are 1 / units apart.
    Returns (H*W,) int64.
    """
    order = torch.arange(grid[0] * grid[1]).view(1, *grid)  # (cells, h, w)
    for _ in range(steps):
        n, h, w = order.shape
        order = order.view(n, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3)  # (n, 2, 2, h/2, w/2)
        order = order.reshape(n * 4, h // 2, w // 2)
    return order.flatten()


def max_pool_tokens(x, stride):
    """(B, N, C) in unrolled order -> (B, N / stride, C): max over the outermost offsets."""
    B, N, C = x.shape
    return x.view(B, stride, N // stride, C).max(dim=1).values


class MaskUnitAttention(nn.Module):
    """Hiera's attention: within each mask unit (window) in the early stages, global later; the
    queries are max-pooled by q_stride at a stage transition. qkv maps dim -> 3 * dim_out."""

    def __init__(self, dim, dim_out, heads, q_stride=1, window_size=0, use_mask_unit_attn=False):
        super().__init__()
        self.dim_out = dim_out
        self.heads = heads
        self.q_stride = q_stride
        self.head_dim = dim_out // heads
        self.window_size = window_size
        self.use_mask_unit_attn = use_mask_unit_attn
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x, return_logits=False):
        """(B, N, dim) -> ((B, N / q_stride, dim_out), logits (B, heads, windows, Nq, Nk)|None)."""
        B, N, _ = x.shape
        windows = N // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        # token n sits in window n % windows (the unrolled order puts units fastest)
        qkv = self.qkv(x).reshape(B, -1, windows, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 2, 1, 5).unbind(0)  # each (B, heads, windows, N/w, hd)
        if self.q_stride > 1:
            q = q.view(B, self.heads, windows, self.q_stride, -1, self.head_dim).max(dim=3).values
        logits = None
        if return_logits or slow_sdpa(q):
            logits = attention_logits(q, k)  # (B, heads, windows, Nq, Nk)
            out = logits.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 3).reshape(B, -1, self.dim_out)  # (B, N', windows, heads, hd)
        return self.proj(out), logits if return_logits else None


class HieraBlock(nn.Module):
    """Pre-norm block; where the width changes, the residual is proj(norm1(x)), max-pooled."""

    def __init__(self, dim, dim_out, heads, mlp_ratio=4.0, drop_path_rate=0.0, q_stride=1,
                 window_size=0, use_mask_unit_attn=False):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskUnitAttention(dim, dim_out, heads, q_stride, window_size,
                                      use_mask_unit_attn)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x, return_logits=False):
        x_norm = self.norm1(x)
        if self.dim != self.dim_out:
            x = max_pool_tokens(self.proj(x_norm), self.attn.q_stride)
        attn_out, logits = self.attn(x_norm, return_logits)
        x = x + drop_path(attn_out, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, logits


class HieraHead(nn.Module):
    """`head.projection`, as the official checkpoints name it (logits, no softmax at eval)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.projection = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.projection(x)


class Hiera(nn.Module):
    """Hiera for 2-D images: a 7x7 stride-4 conv stem, a learned position embedding, four stages
    whose width and heads double while q-pooling halves the resolution (the first q_pool
    transitions), mask-unit attention in the stages flagged by mask_unit_attn (switching one
    block late, as the reference), mean pooling -> norm -> head.

    Tokens live in Hiera's unrolled order (unroll_order) from the stem on; `mask` (B, units) with
    True = keep deletes the tokens of removed mask units (sparse MAE). Blocks are 1-indexed in the
    arguments, as for the ViT; attention logits have shape (B, heads, windows, Nq, Nk).
    """

    ENCODER_PREFIXES = ("pos_embed", "patch_embed.", "blocks.")

    def __init__(self, img_size=224, in_chans=3, embed_dim=96, num_heads=1, num_classes=1000,
                 stages=(2, 3, 16, 3), q_pool=3, mask_unit_size=8,
                 mask_unit_attn=(True, True, False, False), dim_mul=2.0, head_mul=2.0,
                 mlp_ratio=4.0, drop_path_rate=0.0, head_init_scale=0.001):
        super().__init__()
        img_h, img_w = _pair(img_size)
        self.grid = (img_h // 4, img_w // 4)  # tokens after the stride-4 stem
        unroll_steps = len(stages) - 1
        if not 0 <= q_pool <= unroll_steps:
            raise ValueError(f"q_pool {q_pool} must be within 0..{unroll_steps}")
        if mask_unit_size % 2 ** unroll_steps or any(g % mask_unit_size for g in self.grid):
            raise ValueError(f"image {img_h}x{img_w} gives a {self.grid} token grid: it must be "
                             f"divisible by the mask unit {mask_unit_size}, itself divisible by "
                             f"{2 ** unroll_steps} (use a multiple of {4 * mask_unit_size} px)")
        self.img_size = (img_h, img_w)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.mask_unit_size = mask_unit_size
        self.q_pool = q_pool
        self.unroll_steps = unroll_steps
        self.mask_grid = (self.grid[0] // mask_unit_size, self.grid[1] // mask_unit_size)
        self.num_units = self.mask_grid[0] * self.mask_grid[1]
        self.stage_ends = [sum(stages[:i + 1]) for i in range(len(stages))]  # 1-indexed blocks
        self.depth = sum(stages)
        self.patch_embed = PatchEmbed(4, in_chans, embed_dim, kernel_size=7, padding=3)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.register_buffer("unroll_index", unroll_order(self.grid, unroll_steps),
                             persistent=False)

        rates = torch.linspace(0, drop_path_rate, self.depth).tolist()
        window = mask_unit_size ** 2
        stage = 0
        dim = embed_dim
        self.blocks = nn.ModuleList()
        for i in range(1, self.depth + 1):
            dim_out = dim  # attention type lags one block
            use_mask_unit = mask_unit_attn[stage]
            pool = i - 1 in self.stage_ends and stage < q_pool  # first block of a pooled stage
            if i - 1 in self.stage_ends:
                dim_out, num_heads, stage = int(dim * dim_mul), int(num_heads * head_mul), stage + 1
                if pool:
                    window //= 4
            self.blocks.append(HieraBlock(dim, dim_out, num_heads, mlp_ratio, rates[i - 1],
                                          4 if pool else 1, window, use_mask_unit))
            dim = dim_out
        self.num_features = self.embed_dim = dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = HieraHead(dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():  # the reference init: trunc-normal 0.02, biases 0.02
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.02)
        if num_classes > 0:
            self.head.projection.weight.data.mul_(head_init_scale)
            self.head.projection.bias.data.mul_(head_init_scale)

    def pools_before(self, block):
        """How many q-poolings blocks 1..block have applied (block e + 1 pools after stage end
        e)."""
        return sum(1 for end in self.stage_ends[:self.q_pool] if end < block)

    def random_unit_mask(self, batch, mask_ratio, noise=None, device=None):
        """(B, units) bool, True = keep: int(units * (1 - ratio)) units kept per image, chosen by
        sorting uniform noise (as MAE; note Hiera's True means *keep*, MAE's 1 means removed)."""
        keep = int(self.num_units * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch, self.num_units, device=device)
        ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # rank of each unit's noise
        return ranks < keep

    def embed(self, imgs, keep=None):
        """(B, C, H, W) -> (B, N, D) tokens in unrolled order. With a keep-mask (B, units), True =
        kept, the pixels of removed units are zeroed before the (overlapping) conv, so nothing
        leaks into the kept tokens, and the removed units' tokens are deleted: N = kept units *
        unit tokens."""
        if keep is not None:
            pixel_keep = keep.view(-1, 1, *self.mask_grid).to(imgs.dtype)  # (B, 1, mh, mw)
            imgs = imgs * F.interpolate(pixel_keep, size=imgs.shape[2:], mode="nearest")
        x = self.patch_embed(imgs) + self.pos_embed  # (B, H*W, D), raster order
        x = x[:, self.unroll_index]  # unrolled order: position n is in mask unit n % units
        if keep is not None:
            B, N, D = x.shape
            token_keep = keep.repeat(1, N // self.num_units)  # (B, N), unit n % units
            x = x[token_keep].view(B, -1, D)
        return x

    def run_blocks(self, x, depth=None, return_blocks=(), return_attn=()):
        """Blocks 1..depth on unrolled tokens; returns (x, {block: output}, {block: logits})."""
        return run_block_list(self.blocks, x, depth, return_blocks, return_attn)

    def forward_features(self, imgs, *, keep=None, depth=None, return_blocks=(), return_attn=()):
        """Images -> (tokens after block `depth`, {block: output}, {block: logits}), as the ViT's;
        keep (B, units) bool: only the kept mask units (the sparse MAE's)."""
        return self.run_blocks(self.embed(imgs, keep), depth, return_blocks, return_attn)

    def block_heads(self, layer):
        """Attention heads of 1-indexed block `layer` (they double at every stage)."""
        return self.blocks[layer - 1].attn.heads

    def block_width(self, layer):
        """Width of block `layer`'s output."""
        return self.blocks[layer - 1].dim_out

    def layer_representation(self, block_out, layer):
        """The representation of layer L that distillation compares: block L's raw output."""
        return block_out[layer]

    def unit_layout(self, x, block):
        """Output of `block` (B, N, C), any number of kept units K -> (B, K, u, u, C): each kept
        unit's tokens on its own u x u grid (u = mask_unit_size / 2^poolings), units in order."""
        pools = self.pools_before(block)  # q-poolings applied by blocks 1..block
        u = self.mask_unit_size // 2 ** pools
        B, N, C = x.shape
        within = unroll_order((u, u), self.unroll_steps - pools)  # offset slot -> raster in unit
        x = x.view(B, u * u, N // (u * u), C).transpose(1, 2)  # (B, K, offsets, C)
        x = x[:, :, torch.argsort(within.to(x.device))]  # offsets -> raster inside the unit
        return x.reshape(B, N // (u * u), u, u, C)

    def to_raster(self, x, block):
        """Output of `block` for the whole image -> (B, H', W', C) in spatial order."""
        units = self.unit_layout(x, block)  # (B, mh * mw, u, u, C)
        B, _, u, _, C = units.shape
        mh, mw = self.mask_grid
        x = units.view(B, mh, mw, u, u, C).permute(0, 1, 3, 2, 4, 5)  # (B, mh, u, mw, u, C)
        return x.reshape(B, mh * u, mw * u, C)

    def forward_head(self, x):
        return self.head(self.norm(x.mean(dim=1)))

    def forward(self, imgs):
        return self.forward_head(self.forward_features(imgs)[0])


# (width, heads, blocks per stage) of each preset.
HIERA_CONFIGS = {"hiera_tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
                 # the papers' lightweight Hiera-Tiny (003): hiera_tiny at width 46, ~6.5M
                 "hiera_tiny_lite": dict(embed_dim=46, num_heads=1, stages=(1, 2, 7, 2)),
                 "hiera_small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
                 "hiera_base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3))}


def build_hiera(name, **kwargs):
    if name not in HIERA_CONFIGS:
        raise ValueError(f"unknown Hiera {name!r}: choose one of {', '.join(HIERA_CONFIGS)}")
    return Hiera(**HIERA_CONFIGS[name], **kwargs)


