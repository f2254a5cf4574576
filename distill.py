"""distill.py: distillation from a large MAE teacher during pre-training.

Three targets, each a plain function that can be copied alone:
  attention_distill_loss       D-MAE, Eq. 5 of 003: MSE(A_t, M A_s) on attention logits, with M a
                               learnable (teacher_heads x student_heads) head mapping;
  representation_distill_loss  Eq. 6 of 003: MSE(X_t, X_s N) with N a learnable d_s x d_t map;
  relation_distill_loss        TinyMIM (004) Eq. 4 and 9: KL(teacher || student) of the Q-K and
                               V-V relations softmax(q k^T / sqrt(d_h)), softmax(v v^T / sqrt(d_h)).

`DistilledMAE` runs one pre-training step: the student MAE on the visible patches, its
reconstruction loss from block `recon_layer`, and the frozen teacher on the same patches (or
the whole image) for the distillation loss. D-MAE: --distill-layer 12. D^2-MAE: --distill-layer
12 --recon-layer 8, the decoder reading block 8 and the distilled attention computed from block
12's output by an extra attention-only block (norm1 + qkv) that is dropped from the exported
backbone; it is used exactly when 0 < recon_layer < distill layer. --no-recon: distillation
alone; with --distill-target relation --teacher-input full --mask-ratio 0 it is TinyMIM.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_pretrained, read_checkpoint
from hiera import Hiera
from model import attention_logits, init_mae_weights
from presets import build_model, preset_facts
from weights import stated_args


class DistillError(ValueError):
    """An impossible distillation set-up (the message names the fix)."""


# ----------------------------------------------------------------------------------------------
# Teacher


def load_teacher(path, model_name, img_size=224, patch_size=16, q_pool=2, trust=False):
    """A frozen teacher (eval mode, no gradients) built as `model_name` and loaded through
    checkpoints.load_pretrained: FAIR MAE encoder-only or _full files, MAE-Lite files, ours,
    plain state dicts, Hiera files. Every encoder key and the ViT's final norm must be present
    with the right shape. A Hiera teacher is built with the student's q_pool (its MAE files have
    no final norm, which attention distillation does not use). A ViT teacher must fit the
    student's images (check_teacher_fits). trust: unpickle the file in full."""
    state, heads = read_checkpoint(path, trust)
    facts = preset_facts(model_name)
    if facts["size_unit"] is None:  # cut into patches: they must be the student's
        check_teacher_fits(state, path, img_size, patch_size)
    teacher = build_model(model_name, img_size=img_size, patch_size=patch_size, q_pool=q_pool,
                          num_classes=0)
    report = load_pretrained(teacher, state, verbose=False, heads=heads, flag="--teacher-model",
                             name=path)
    if not facts["mae_has_norm"]:
        report["initialised"] = [k for k in report["initialised"] if not k.startswith("norm.")]
    if report["initialised"]:  # e.g. no final norm: the teacher would be partly random
        raise DistillError(f"teacher {path} lacks {', '.join(report['initialised'])} of "
                           f"{model_name}; pass the teacher's full encoder checkpoint")
    teacher.requires_grad_(False)
    with torch.no_grad():  # finite weights can still overflow float32 (a damaged file)
        probe = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        if not teacher.eval().forward_features(probe)[0].isfinite().all():
            raise DistillError(f"teacher {path} gives NaN or inf features on a random image: its "
                               "weights are damaged; use another checkpoint of the teacher")
    print(f"teacher {model_name} from {path}: {len(report['loaded'])} tensors loaded, "
          f"{len(report['dropped'])} pre-training-only tensors dropped")
    return teacher


def check_teacher_fits(state, path, img_size, patch_size):
    """A ViT teacher must cut the student's images into the same patches: the same patch size
    (patch_embed) and the same image size (the square grid of its pos_embed, cls first). A
    resized position table would run, but on images at a scale the teacher never saw."""
    weight = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if weight is None or pos is None or weight.ndim != 4 or pos.ndim != 3 \
            or "cls_token" not in state:
        return  # not a ViT's (Hiera's has no cls token): load_pretrained names what it is
    teacher_patch = weight.shape[-1]
    side = math.isqrt(pos.shape[1] - 1)
    teacher_img = side * teacher_patch if side * side == pos.shape[1] - 1 else img_size
    if (teacher_img, teacher_patch) == (img_size, patch_size):
        return
    raise DistillError(f"teacher {path} sees {teacher_img}-px images in {teacher_patch}-px "
                       f"patches but the student {img_size}-px images in {patch_size}-px patches: "
                       f"give the student --img-size {teacher_img} --patch-size {teacher_patch}, "
                       "or distil from a teacher pre-trained at the student's size (mae.py "
                       f"--model vit_small --img-size {img_size} --patch-size {patch_size} "
                       "--out-dir out/teacher, then --teacher out/teacher/checkpoint.pth "
                       "--teacher-model vit_small)")


def default_teacher_layer(student_layer, student_depth, teacher_depth, target="attn",
                          relative_depth=False):
    """The teacher block the papers' code pairs with a student block:
      attention / representations (MAE-Lite): the same block index, 12 -> 12 of ViT-B and of
        ViT-L (the papers' ViT-L rows);
      relations (TinyMIM): block 18 of a 24-block ViT-L for the last block of a 12-block
        student (TinyMIM's `intermediate=18`), else the same index (12 of ViT-B);
      relative_depth (Hiera, MAE-Lite's Hiera distillation): the same relative depth, 12 of
        hiera_tiny_lite -> 24 of hiera_base, so that both blocks see the same stage-4 tokens."""
    if relative_depth:
        return max(1, round(student_layer * teacher_depth / student_depth))
    if target == "relation" and (student_layer, student_depth, teacher_depth) == (12, 12, 24):
        return 18
    return min(student_layer, teacher_depth)


# ----------------------------------------------------------------------------------------------
# The three losses


def attention_distill_loss(student_logits, teacher_logits, head_map, on="logits"):
    """Eq. 5 of 003: MSE(A_t, M A_s), mean over all elements.

    student_logits (B, h_s, N, N), teacher_logits (B, h_t, N, N): pre-softmax q k^T / sqrt(d)
    (Hiera: (B, h, windows, Nq, Nk)); head_map (h_t, h_s) mixes the student's heads into the
    teacher's (a 1x1 conv over heads).
    on="probs" compares softmax probabilities instead of logits.
    """
    if on == "probs":
        student_logits, teacher_logits = student_logits.softmax(-1), teacher_logits.softmax(-1)
    mapped = torch.einsum("ts,bs...->bt...", head_map, student_logits.float())  # (B, h_t, ...)
    return F.mse_loss(mapped, teacher_logits.float())


def representation_distill_loss(student_rep, teacher_rep, rep_map):
    """Eq. 6 of 003: MSE(X_t, X_s N); student_rep (B, N, d_s), teacher_rep (B, N, d_t),
    rep_map N (d_s, d_t)."""
    return F.mse_loss(student_rep.float() @ rep_map, teacher_rep.float())


def relation_kl(student_scores, teacher_scores):
    """KL(teacher || student) of softmax relations, summed over keys, averaged over queries,
    heads and images. Both inputs (B, h, N, N) are pre-softmax; log-softmax keeps it finite."""
    log_s = F.log_softmax(student_scores.float(), dim=-1)
    log_t = F.log_softmax(teacher_scores.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (B, h, N)
    return kl.mean()


def relation_distill_loss(student_qkv, teacher_qkv):
    """TinyMIM Eq. 4 and 9: KL of Q-K plus V-V relations. Each qkv is a tuple of (B, h, N, d_h)
    tensors with the same head count h; the relation scale is 1/sqrt(d_h) of each model."""
    (q_s, k_s, v_s) = student_qkv
    (q_t, k_t, v_t) = teacher_qkv

    qk_s = attention_logits(q_s, k_s)  # (B, h, N, N)
    qk_t = attention_logits(q_t, k_t)
    vv_s = attention_logits(v_s, v_s)
    vv_t = attention_logits(v_t, v_t)
    return relation_kl(qk_s, qk_t) + relation_kl(vv_s, vv_t)


# ----------------------------------------------------------------------------------------------
# Reading features out of a ViT


class AttentionOnly(nn.Module):
    """D^2-MAE's extra block: norm1 + qkv applied to a block's output, only during
    pre-training. Its attention (or relations) is what gets distilled. Initialised as the
    published 13th block, which is built as an MAE block: xavier-uniform qkv, zero bias."""

    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, dim * 3)
        init_mae_weights(self)

    def forward(self, x):
        """(B, N, D) block output -> (B, N, 3D) q, k, v channels."""
        return self.qkv(self.norm1(x))


def split_heads(qkv, heads):
    """(B, N, 3D) output of a qkv Linear -> q, k, v each (B, heads, N, D / heads)."""
    B, N, three_d = qkv.shape
    qkv = qkv.reshape(B, N, 3, heads, three_d // 3 // heads).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


# ----------------------------------------------------------------------------------------------
# The distillation step


class DistilledMAE(nn.Module):
    """Student MAE + frozen teacher + the learnable distillation parts, one of each per distilled
    student block L (keys str(L)): head_maps M (attention), rep_maps N (representations), and
    extra_blocks, D^2-MAE's attention-only blocks. The parts are saved with the pre-training
    checkpoint (distill_state_dict), never with the exported backbone.

    The layout is decided once: block L is "decoupled" (D^2-MAE) when 0 < recon_layer < L; its
    attention (or relations) then comes from an extra block on block L's output, else from
    inside block L (D-MAE, TinyMIM).

    forward(imgs, mask_ratio) returns the student's dict (see mae_model.MAE.forward) with
    loss = recon + weight * distill, recon_loss and distill_loss.
    """

    def __init__(self, student, teacher, student_layers, teacher_layers, target="attn",
                 distill_on="logits", weight=1.0, teacher_input="visible"):
        super().__init__()
        validate_layout(student, teacher, student_layers, teacher_layers, target, teacher_input)
        self.student = student
        self.teacher = teacher
        self.target = target
        self.distill_on = distill_on
        self.weight = weight
        self.teacher_input = teacher_input
        self.layers = list(zip(student_layers, teacher_layers))
        self.decoupled = {s for s in student_layers
                          if target in ("attn", "relation") and 0 < student.recon_layer < s}
        self.head_maps = nn.ParameterDict()  # {L: M (teacher_heads, student_heads)}
        self.rep_maps = nn.ParameterDict()  # {L: N (d_s, d_t)}
        self.extra_blocks = nn.ModuleDict()  # {L: AttentionOnly}, D^2-MAE
        for s_layer, t_layer in self.layers:
            if target == "attn":
                head_map = torch.empty(teacher.block_heads(t_layer), student.block_heads(s_layer))
                nn.init.kaiming_uniform_(head_map, a=math.sqrt(5))  # nn.Conv2d's default init
                self.head_maps[str(s_layer)] = nn.Parameter(head_map)
            if target == "rep":
                rep_map = torch.empty(teacher.block_width(t_layer), student.block_width(s_layer))
                nn.init.kaiming_uniform_(rep_map, a=math.sqrt(5))  # nn.Linear's default init
                self.rep_maps[str(s_layer)] = nn.Parameter(rep_map.t().contiguous())
            if s_layer in self.decoupled:
                self.extra_blocks[str(s_layer)] = AttentionOnly(student.embed_dim)
        if student.recon_layer == 0:  # distillation alone: the decoder is not used, so not trained
            for name, p in student.named_parameters():
                if name.startswith(("decoder_", "mask_token")):
                    p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher is always in eval mode
        return self

    def student_requests(self):
        """Which block outputs and attention logits the student must return."""
        blocks = set()
        attn = set()
        for s_layer, _ in self.layers:
            if self.target == "rep" or s_layer in self.decoupled:
                blocks.add(s_layer)  # block L's output
            elif self.target == "attn":
                attn.add(s_layer)  # the logits inside block L
            else:
                blocks.add(s_layer - 1)  # block L's input, for its q, k, v
        return blocks, attn

    def teacher_features(self, imgs, keep):
        """Run the teacher (no grad) on what the student kept (keep: the visible patches (B, K)
        of a ViT, the kept mask units (B, units) of a Hiera), or with --teacher-input full on the
        whole image, then pick the visible tokens. Returns {teacher_layer: feature}."""
        teacher = self.teacher
        t_layers = [t for _, t in self.layers]
        full = self.teacher_input == "full"
        if self.target == "attn":
            blocks = ()
            attn = t_layers
        else:  # representations: block outputs; relations: block inputs, for their q, k, v
            blocks = [t - 1 if self.target == "relation" else t for t in t_layers]
            attn = ()
        _, block_out, attn_logits = teacher.forward_features(
            imgs, keep=None if full else keep, depth=max(t_layers), return_blocks=blocks,
            return_attn=attn)
        index = None
        if full:  # the visible tokens: cls and 1 + ids_keep
            index = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)  # (B, 1 + K)
        feats = {}
        for t in t_layers:
            if self.target == "attn":
                feats[t] = pick_tokens(attn_logits[t], index, dims=(2, 3))
            elif self.target == "rep":
                feats[t] = pick_tokens(teacher.layer_representation(block_out, t), index, (1,))
            else:
                block = teacher.blocks[t - 1]
                qkv = pick_tokens(block.attn.qkv(block.norm1(block_out[t - 1])), index, (1,))
                feats[t] = split_heads(qkv, teacher.block_heads(t))
        return feats

    def student_qkv(self, s_layer, block_out):
        """(B, N, 3D) qkv projection that student layer L is distilled through: the extra
        attention-only block on block L's output (D^2-MAE), else block L's own on its input."""
        if s_layer in self.decoupled:
            return self.extra_blocks[str(s_layer)](block_out[s_layer])
        block = self.student.blocks[s_layer - 1]
        return block.attn.qkv(block.norm1(block_out[s_layer - 1]))

    def distill_loss(self, block_out, attn_logits, teacher_feats):
        """Sum over the distilled layers of the chosen target's loss, as the papers' code
        (MAE-Lite adds each layer's MSE; `--distill-layer 1,...,12` weighs 12 layers 12 times)."""
        total = 0.0
        for s_layer, t_layer in self.layers:
            target = teacher_feats[t_layer]
            key = str(s_layer)
            if self.target == "rep":
                rep = self.student.layer_representation(block_out, s_layer)
                loss = representation_distill_loss(rep, target, self.rep_maps[key])
            elif self.target == "attn":
                if s_layer in self.decoupled:  # from the extra block (D^2-MAE)
                    q, k, _ = split_heads(self.student_qkv(s_layer, block_out),
                                          self.student.block_heads(s_layer))
                    logits = attention_logits(q, k)
                else:  # inside block L (D-MAE)
                    logits = attn_logits[s_layer]
                loss = attention_distill_loss(logits, target, self.head_maps[key],
                                              self.distill_on)
            else:  # relations with the teacher's head count (TinyMIM's head alignment)
                qkv = split_heads(self.student_qkv(s_layer, block_out),
                                  self.teacher.block_heads(t_layer))
                loss = relation_distill_loss(qkv, target)
            total = total + loss
        return total

    def forward(self, imgs, mask_ratio=0.75, noise=None, teacher_imgs=None):
        """teacher_imgs: the teacher's view of the same crop (TinyMIM: without the student's
        colour jitter); None: the student's images."""
        blocks, attn = self.student_requests()
        out = self.student(imgs, mask_ratio, noise, return_blocks=blocks, return_attn=attn)
        with torch.no_grad():
            teacher_feats = self.teacher_features(imgs if teacher_imgs is None else teacher_imgs,
                                                  out["keep"])
        distill_loss = self.distill_loss(out["blocks"], out["attn"], teacher_feats)
        return dict(out, loss=out["loss"] + self.weight * distill_loss, recon_loss=out["loss"],
                    distill_loss=distill_loss)

    def distill_state_dict(self):
        """The learnable distillation parts ("head_maps.12", "extra_blocks.12.qkv.weight", ...)."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("head_maps.", "rep_maps.", "extra_blocks."))}

    def load_distill_state_dict(self, state):
        """Load distill_state_dict() (an earlier checkpoint's: after
        plumbing.upgrade_checkpoint, which loop.load_checkpoint applies)."""
        renamed = dict(state)
        expected = self.distill_state_dict().keys()
        if set(renamed) != set(expected):
            raise DistillError(f"the checkpoint's distillation parts ({', '.join(sorted(renamed))}"
                               f") are not this layout's ({', '.join(sorted(expected))}); resume "
                               "with the flags of the run that wrote it")
        self.load_state_dict(renamed, strict=False)


def pick_tokens(x, index, dims):
    """Gather the tokens `index` (B, K') along each of `dims` of x; index None keeps all."""
    if index is None:
        return x
    for dim in dims:
        shape = list(x.shape)
        shape[dim] = index.shape[1]
        view = [index.shape[0]] + [index.shape[1] if d == dim else 1 for d in range(1, x.ndim)]
        x = torch.gather(x, dim, index.view(view).expand(shape))
    return x


def validate_hiera_layout(student, teacher, student_layers, teacher_layers, target):
    """A Hiera pair: the distilled blocks must see the same tokens (count and windows); checked
    with one forward pass of a blank image under a fixed keep-mask."""
    if target not in ("attn", "rep"):
        raise DistillError("a Hiera student distils attention or representations "
                           "(--distill-target attn or rep), not TinyMIM relations")
    if teacher.img_size != student.img_size or teacher.mask_grid != student.mask_grid:
        raise DistillError("teacher and student Hiera need the same --img-size and mask units")
    imgs = torch.zeros(1, 3, *student.img_size)
    keep = student.random_unit_mask(1, 0.5)
    with torch.no_grad():
        _, s_out, _ = student.forward_features(imgs, keep=keep, depth=max(student_layers),
                                               return_blocks=student_layers)
        _, t_out, _ = teacher.forward_features(imgs, keep=keep, depth=max(teacher_layers),
                                               return_blocks=teacher_layers)
    for s, t in zip(student_layers, teacher_layers):
        s_tok = s_out[s].shape[1]
        t_tok = t_out[t].shape[1]
        s_win = student.blocks[s - 1].attn.use_mask_unit_attn
        if s_tok != t_tok or s_win != teacher.blocks[t - 1].attn.use_mask_unit_attn:
            raise DistillError(f"student block {s} ({s_tok} tokens) and teacher block {t} "
                               f"({t_tok} tokens) do not attend over the same tokens; pick "
                               "blocks of the same stage (e.g. the last blocks)")


def check_flags(parser, args, facts):
    """mae.py's distillation flags, before anything is read or downloaded: what the student's
    family distils from which teacher (facts: presets.preset_facts of the student), flags that
    need a teacher, and a published --teacher's image and patch size. One line each, naming
    the fix (parser.error)."""
    teacher_family = preset_facts(args.teacher_model)["family"]
    if args.teacher is not None and (teacher_family != facts["family"]
                                     or args.distill_target not in facts["distill_targets"]
                                     or args.teacher_input not in facts["teacher_inputs"]):
        what = {"attn": "attention", "rep": "representations", "relation": "relations"}
        parser.error(f"a {facts['title']} student distils "
                     f"{' or '.join(what[t] for t in facts['distill_targets'])} (--distill-target "
                     f"{' / '.join(facts['distill_targets'])}) from a {facts['title']} teacher "
                     f"(--teacher-model {facts['family']}_*) that sees --teacher-input "
                     f"{' / '.join(facts['teacher_inputs'])}")
    unused = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in
              ("distill_target", "distill_on", "distill_weight", "teacher_input", "teacher_model")
              if getattr(args, k) != parser.get_default(k)]
    if args.teacher is None and unused:
        parser.error(f"{', '.join(unused)} shape distillation, and this run has no teacher: add "
                     "--distill-layer 12 (the default teacher) or --teacher FILE, or drop them")
    if args.distill_on == "probs" and args.distill_target != "attn":
        parser.error(f"--distill-on probs compares attention maps: it needs --distill-target attn, "
                     f"not {args.distill_target}")
    for flag, blocks in (("--distill-layer", args.distill_layer),
                         ("--teacher-layer", args.teacher_layer)):
        if blocks and len(set(blocks)) != len(blocks):
            parser.error(f"{flag} {','.join(map(str, blocks))} names a block twice: name each once")
    stated = stated_args(args.teacher) if args.teacher else {}  # a published name's
    if stated and stated["model"] != args.teacher_model:
        parser.error(f"--teacher {args.teacher} is a {stated['model']}: drop --teacher-model "
                     f"{args.teacher_model} (or give --teacher-model {stated['model']})")
    if stated and (stated["img_size"], stated["patch_size"]) != (args.img_size, args.patch_size):
        parser.error(f"--teacher {args.teacher} sees {stated['img_size']}-px images in "
                     f"{stated['patch_size']}-px patches: give the student --img-size "
                     f"{stated['img_size']} --patch-size {stated['patch_size']}, or a teacher "
                     "pre-trained at the student's size (--teacher FILE)")
    if args.student_color_jitter > 0 and args.teacher is None:
        parser.error("--student-color-jitter jitters the student's view apart from the "
                     "teacher's (TinyMIM): it needs --teacher")


def validate_layout(student, teacher, student_layers, teacher_layers, target, teacher_input):
    """Every distillation flag checked against both models, with a message naming the fix."""
    if type(student.blocks[0]) is not type(teacher.blocks[0]):  # a ViT's tokens, or Hiera's
        raise DistillError("a Hiera student needs a Hiera teacher (--teacher-model hiera_*) and a "
                           "ViT student a ViT teacher: a ViT's tokens do not match Hiera's "
                           "mask-unit tokens")
    if len(student_layers) != len(teacher_layers):
        raise DistillError(f"--teacher-layer names {len(teacher_layers)} blocks but "
                           f"--distill-layer {len(student_layers)}; give one teacher block each")
    for flag, layers, model, who in (("--distill-layer", student_layers, student, "student"),
                                     ("--teacher-layer", teacher_layers, teacher, "teacher")):
        for n in layers:
            if not 1 <= n <= model.depth:
                where = "is beyond" if n > model.depth else "is not a block of"
                raise DistillError(f"{flag} {n} {where} the {who}'s {model.depth} blocks "
                                   f"(choose 1..{model.depth})")
    if isinstance(student, Hiera):  # its MAE decodes the fused stages: every block trains
        return validate_hiera_layout(student, teacher, student_layers, teacher_layers, target)
    deepest = max(student.recon_layer, *student_layers)
    if deepest < student.depth:
        raise DistillError(f"blocks {deepest + 1}..{student.depth} would receive no gradient: "
                           f"reconstruct from or distil block {student.depth}")
    if teacher.grid != student.grid:
        raise DistillError(f"teacher patch grid {teacher.grid} differs from the student's "
                           f"{student.grid}; build the teacher with the same --img-size and patch")
    if target == "relation" and student.embed_dim % teacher.num_heads:
        raise DistillError(f"relation distillation splits the student's {student.embed_dim} "
                           f"channels into the teacher's {teacher.num_heads} heads; they must "
                           "divide evenly")
    if teacher_input not in ("visible", "full"):
        raise DistillError(f"--teacher-input must be 'visible' or 'full', got {teacher_input!r}")
