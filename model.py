"""model.py: the Vision Transformer of nanoMIM, its presets and its checkpoint loader.

Depends on torch alone, so it can be copied into another project as it is.

Conventions (shared with FAIR MAE and timm, so checkpoints move freely):
  * tokens are [cls, patch_0, ..., patch_{L-1}], patches in row-major order;
  * state-dict keys: cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.* or fc_norm.*, head.*;
  * block numbers in every public argument are 1-indexed, as in the papers ("block 12" is the
    last block of ViT-Tiny), while `self.blocks` is an ordinary 0-indexed ModuleList.
"""
import argparse
import json
import math
import os
import pickle
import re

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
    """True where SDPA is slower than the explicit product: bf16 on CPU (bench.py measured the
    vit_tiny MAE step at 81 images/s with SDPA vs 194 with the explicit path, 2-core CPU)."""
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
    """A ViT preset by name, or a Hiera preset (hiera.py, imported only for these; they take
    img_size, num_classes, drop_path_rate, q_pool, mask_unit_size)."""
    if name.startswith("hiera"):
        from hiera import build_hiera

        return build_hiera(name, **kwargs)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)} or a "
                         "hiera_* preset")
    return PRESETS[name](**kwargs)


# ----------------------------------------------------------------------------------------------
# Loading checkpoints from anywhere: ours, FAIR MAE, MAE-Lite, timm, DDP / torch.compile wrappers


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
    """Load a checkpoint into `model` (a ViT, a Hiera, or a module built on one) and report.

    Accepts our checkpoints, FAIR MAE files ({"model": ...}, encoder-only or with the decoder),
    MAE-Lite files (module.model. / module.base_encoder.), DDP / compile prefixes and plain state
    dicts, official Hiera files ({"model_state": ...}), .safetensors files (timm's hub). Resizes
    pos_embed to the model's grid. Keys the model lacks (decoder, heads of another task) are dropped; model keys the file lacks outside the encoder (head, fc_norm, decoder) keep
    their fresh initialisation. Refuses, with CheckpointError, a file whose encoder keys are
    missing or of another shape: a silently random backbone is never returned.

    MAE-Lite's D^2-MAE files (a 13th block of norm1 + attn.qkv alone) load into a 12-block ViT:
    that extra attention-only block of pre-training is dropped and listed under "extra_block".

    trust: unpickle the file in full (--trust-checkpoint); otherwise only tensors, containers
    and SAFE_GLOBALS. heads: (count, source) declared for a state dict passed in (a file says its
    own, see declared_heads); a ViT file declaring another count than the model is refused.
    flag: the command-line flag that picks this model (--model, --teacher-model, --model-a),
    named in the messages. name: what the messages call a state dict passed in (its file).

    Returns {"loaded": [...], "dropped": [...], "initialised": [...], "resized": [...],
    "extra_block": [...]}.
    """
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
        if key == "pos_embed" and value.shape != target.shape and value.shape[-1] == target.shape[-1]:
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
        raise CheckpointError(f"{name} holds NaN or inf in {len(broken)} tensors (e.g. {broken[0]}): "
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
    note = (f" ({'.'.join(extra[0].split('.')[:2])}.* is D^2-MAE's extra attention-only block, used "
            "only in pre-training)" if extra else "")
    return (f"loaded {len(report['loaded'])} tensors from {name}; "
            f"resized: {show(report['resized'])}; dropped: {show(report['dropped'])}; "
            f"newly initialised: {show(report['initialised'])}{note}")
