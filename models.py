"""ExtreMA models: a plain ViT pooled by class attention (optional relative position bias for dense transfer), token
masking, the siamese learner, optimizer parameter groups, checkpoints read without running code (files, URLs),
official-checkpoint conversion, the encoder a checkpoint holds, export to timm's ViT layout, class-attention weights
for pictures. Self-contained (torch and einops only): copy this file into your project.

Shapes: B images, N patches, K visible patches per mask, M masks, D channels, P projector outputs.
"""
import hashlib
import math
import os
import pickle
import re
import shutil
import urllib.parse
import urllib.request
from contextlib import suppress
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

ARCHS = {  # name: ViT sizes
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_fixture": dict(embed_dim=64, depth=2, num_heads=4),  # the tiny official fixture; for tests
}


# ============ Position embedding ============


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos table (MAE formula), (grid_h * grid_w, dim) in row-major patch order: the first dim/2
    channels encode the column index, the last dim/2 the row index, each as [sin(pos * w), cos(pos * w)] with
    w_i = 10000^(-i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos):  # (h, w) -> (h*w, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def relative_position_index(grid_h, grid_w):
    """(N, N) int64, N = grid_h * grid_w: the row of a ((2h-1)(2w-1), heads) table holding the bias from
    query patch i to key patch j, by their row and column offsets (BEiT's layout without its 3 cls rows)."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,)
    d_row = rows[:, None] - rows[None, :] + grid_h - 1  # (N, N) in 0..2h-2
    d_col = cols[:, None] - cols[None, :] + grid_w - 1
    return d_row * (2 * grid_w - 1) + d_col


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """Bicubic resize of a (1, h*w, D) table from grid old_grid=(h, w) to new_grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    table = rearrange(pos_embed, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    table = F.interpolate(table.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return rearrange(table, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)


# ============ Masking ============


def num_visible(num_patches, mask_ratio):
    """K, the patches one mask keeps: int(N * (1 - mask_ratio)) as in the paper."""
    return int(num_patches * (1 - mask_ratio))


def check_masks(num_patches, mask_ratio, num_masks, disjoint=True):
    """Raise ValueError when the masks cannot be drawn."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    if num_masks < 1:
        raise ValueError(f"need at least one mask, got {num_masks}")
    k = num_visible(num_patches, mask_ratio)
    if k < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no patch of {num_patches}")
    if disjoint and num_masks * k > num_patches:
        raise ValueError(f"{num_masks} disjoint masks of {k} visible patches do not fit in "
                         f"{num_patches} patches; lower --num-masks or raise --mask-ratio")


def sample_keep(batch_size, num_patches, mask_ratio, num_masks, disjoint=True, device=None):
    """Visible patch indices, int64 (M, B, K). Disjoint: one random permutation per image, mask i keeps
    permutation[K*i : K*(i+1)]; otherwise each mask draws its own permutation."""
    check_masks(num_patches, mask_ratio, num_masks, disjoint)
    k = num_visible(num_patches, mask_ratio)
    if disjoint:
        perm = torch.rand(batch_size, num_patches, device=device).argsort(dim=1)  # (B, N)
        return rearrange(perm[:, :num_masks * k], "b (m k) -> m b k", m=num_masks)
    perm = torch.rand(num_masks, batch_size, num_patches, device=device).argsort(dim=2)  # (M, B, N)
    return perm[..., :k]


def gather_visible(tokens, keep):
    """tokens (B, N, D), keep (M, B, K) -> (M*B, K, D), rows mask-major (row m*B + b)."""
    m, b, _ = keep.shape
    rows = torch.arange(b, device=tokens.device).repeat(m)  # (M*B,)
    return tokens[rows[:, None], keep.reshape(m * b, -1)]


# ============ Vision Transformer ============


def drop_path(x, p, training):
    """Stochastic depth: zero whole residual branches per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels where available).
    rel_pos_grid=(h, w) adds BEiT's relative position bias, for dense transfer (off for pretraining): a learned
    ((2h-1)(2w-1), heads) table, zero at initialisation, gives each head an additive logit for every row and column
    offset between two patches; another input grid gets the table resized bicubically, as the position embedding is."""

    def __init__(self, dim, num_heads, rel_pos_grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = tuple(rel_pos_grid) if rel_pos_grid else None
        if self.rel_pos_grid:
            h, w = self.rel_pos_grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)

    def relative_position_bias(self, grid):
        """Additive attention bias (heads, N, N) for tokens on grid (h, w)."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if tuple(grid) != self.rel_pos_grid:
            h, (new_h, new_w) = self.rel_pos_grid[0], grid
            table = rearrange(table, "(r c) n -> 1 n r c", r=2 * h - 1)
            table = F.interpolate(table, size=(2 * new_h - 1, 2 * new_w - 1), mode="bicubic", align_corners=True)
            table = rearrange(table, "1 n r c -> (r c) n")
            index = relative_position_index(new_h, new_w).to(table.device)
        return rearrange(table[index], "i j n -> n i j")

    def forward(self, x, grid=None):  # x (B, N, D); grid (h, w) of the N tokens, needed with rel_pos_grid
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        bias = None
        if self.rel_pos_grid:
            if grid is None or grid[0] * grid[1] != x.shape[1]:
                raise ValueError(f"the relative position bias needs the token grid of the {x.shape[1]} "
                                 f"tokens (a full image, no masking), got {grid}")
            bias = self.relative_position_bias(grid).to(q.dtype)  # (H, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path, rel_pos_grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, grid=None):
        x = x + drop_path(self.attn(self.norm1(x), grid), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ClassAttention(nn.Module):
    """CaiT class attention: the cls row queries all rows of u = [cls; tokens]. k and v share one matmul (`kv`);
    official checkpoints' separate k, v are concatenated on load."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u):  # u: (B, 1+N, D), row 0 is the cls token
        q = rearrange(self.q(u[:, :1]), "b 1 (h d) -> b h 1 d", h=self.num_heads)
        k, v = rearrange(self.kv(u), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d)
        return self.proj(rearrange(x, "b h 1 d -> b 1 (h d)"))

    def forward_split(self, cls, tokens):
        """The same function of cls (B, 1, D) and tokens (B, N, D) without building u: the cls key's score
        joins the tokens' scores, and the softmax of the one query row is written out."""
        heads = "b n (two h d) -> two b h n d"
        q = rearrange(self.q(cls), "b 1 (h d) -> b h 1 d", h=self.num_heads)
        k_cls, v_cls = rearrange(self.kv(cls), heads, two=2, h=self.num_heads)  # (B, H, 1, d) each
        k, v = rearrange(self.kv(tokens), heads, two=2, h=self.num_heads)  # (B, H, N, d) each
        scores = torch.cat([q @ k_cls.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1)  # (B, H, 1, 1+N)
        attn = (scores * q.shape[-1] ** -0.5).softmax(dim=-1)
        x = attn[..., :1] * v_cls + attn[..., 1:] @ v  # (B, H, 1, d)
        return self.proj(rearrange(x, "b h 1 d -> b 1 (h d)"))

    def attention(self, u):
        """The cls query's softmax weights over the rows of u, (B, H, 1+N), computed explicitly for pictures;
        forward() applies the same weights through SDPA."""
        q = rearrange(self.q(u[:, :1]), "b 1 (h d) -> b h 1 d", h=self.num_heads)
        k = rearrange(self.kv(u), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)[0]
        return (q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5).softmax(dim=-1)[:, :, 0]


class ClassAttentionBlock(nn.Module):
    """Refines the cls token only; the patch tokens pass through unchanged. Layer scale, no drop path.
    split: the attention without the (B, 1+N, D) concatenation (the same function: LayerNorm is per row)."""

    def __init__(self, dim, num_heads, mlp_ratio, layer_scale, split=False):
        super().__init__()
        self.split = split
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, cls, tokens):  # cls (B, 1, D), tokens (B, N, D)
        if self.split:
            attn = self.attn.forward_split(self.norm1(cls), self.norm1(tokens))
        else:
            attn = self.attn(self.norm1(torch.cat([cls, tokens], dim=1)))
        cls = cls + self.gamma_1 * attn
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class VisionTransformer(nn.Module):
    """ViT without a cls token in the self-attention blocks, pooled by class-attention blocks.

    forward(x, keep) -> (tokens, instance) after the final norm: (B, N, D) and (B, D) for full images, (M*B, K, D)
    and (M*B, D) when keep (M, B, K) selects visible patches. Any input whose sides divide by the patch size works:
    the position table is resized on the fly. rel_pos_bias=True gives every block a relative position bias for the
    img_size grid (see Attention; full images only), as BEiT's and CAE's segmentation backbones have. Speed options,
    off by default (official numerics): autocast_residual keeps the residual stream in the autocast dtype (bf16/fp16)
    instead of float32 (no effect outside autocast); split_class_attention drops the [cls; tokens] concatenation in
    class attention (the same function). Memory option, off by default: set_grad_checkpointing().
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, ca_depth=2, layer_scale=0.1, drop_path=0.0, rel_pos_bias=False,
                 autocast_residual=False, split_class_attention=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.autocast_residual, self.grad_checkpointing = autocast_residual, False
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # the patch embedding is a conv with kernel = stride = patch, computed as one matmul over flat patches
        self.patch_embed = nn.Linear(in_chans * patch_size ** 2, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, *self.grid_size)[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        rel_pos_grid = self.grid_size if rel_pos_bias else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, rel_pos_grid) for r in rates)
        self.ca_blocks = nn.ModuleList(ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, layer_scale,
                                                           split_class_attention) for _ in range(ca_depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        # the official conv keeps PyTorch's default bias, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C*p*p
        bound = self.patch_embed.in_features ** -0.5
        nn.init.uniform_(self.patch_embed.bias, -bound, bound)

    def set_grad_checkpointing(self, enable=True):
        """Training forwards keep only each block's input and recompute the block in the backward (timm's name):
        the same results, about a third more encoder compute."""
        self.grad_checkpointing = enable

    def run_block(self, blk, tokens, grid):
        """blk(tokens, grid), checkpointed when grad checkpointing is on, training and autograd records (never in
        evaluation or under no_grad, as the momentum branch runs); the replayed RNG state keeps drop path's masks."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, tokens, grid, use_reentrant=False)
        return blk(tokens, grid)

    def token_grid(self, x):
        """(h, w) patches of an input (B, C, H, W)."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by patch size {self.patch_size}")
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def embed(self, x):
        """(B, C, H, W) -> (B, N, D) patch tokens plus position embedding."""
        grid = self.token_grid(x)
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=self.patch_size, p2=self.patch_size)
        tokens = self.patch_embed(patches) + resize_pos_embed(self.pos_embed, self.grid_size, grid)  # (B, N, D)
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            tokens = tokens.to(torch.get_autocast_dtype(x.device.type))  # the residual adds then stay in it
        return tokens

    def forward_features(self, x, keep=None):
        """Tokens and class-attention output before the final norm."""
        tokens, grid = self.embed(x), self.token_grid(x)
        if keep is not None:
            tokens, grid = gather_visible(tokens, keep), None  # (M*B, K, D): no longer a grid
        for blk in self.blocks:
            tokens = self.run_block(blk, tokens, grid)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (M*B, 1, D): class attention pools the tokens into it
        for blk in self.ca_blocks:
            cls = blk(cls, tokens)
        return tokens, cls[:, 0]

    def forward(self, x, keep=None):
        tokens, instance = self.forward_features(x, keep)
        return self.norm(tokens), self.norm(instance)

    def intermediate_tokens(self, x, layers):
        """Tokens (B, N, D) after each block in `layers` (1-based, e.g. 4, 6, 8, 12), no final norm."""
        tokens, grid, out = self.embed(x), self.token_grid(x), []
        for i, blk in enumerate(self.blocks[:max(layers)], start=1):
            tokens = self.run_block(blk, tokens, grid)
            if i in layers:
                out.append(tokens)
        return out


def default_feature_blocks(depth):
    """Blocks 4, 6, 8, 12 of a 12-block ViT (the paper's dense-transfer features), scaled to other depths."""
    return [max(1, round(depth * b / 12)) for b in (4, 6, 8, 12)]


def rescale_map(dim, factor):
    """Scale a (B, D, h, w) map by a power of two: 2x transposed convs with BatchNorm + GELU between them
    (BEiT / CAE), identity, or max-pooling."""
    if factor < 1:
        return nn.MaxPool2d(round(1 / factor))
    layers = []
    for i in range(round(math.log2(factor))):
        if i:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers) if layers else nn.Identity()


class FeatureMaps(nn.Module):
    """Multi-scale maps for dense transfer: the tokens after four blocks as (B, D, H/s, W/s), s = strides. Takes over
    the encoder and drops what dense tasks never read: the blocks after the last feature block, the class-attention
    blocks, the cls token and the final norm."""

    def __init__(self, encoder, feature_blocks=None, strides=(4, 8, 16, 32)):
        super().__init__()
        self.feature_blocks = list(feature_blocks or default_feature_blocks(len(encoder.blocks)))
        encoder.blocks = encoder.blocks[:max(self.feature_blocks)]
        encoder.ca_blocks, encoder.cls_token, encoder.norm = nn.ModuleList(), None, nn.Identity()
        self.encoder = encoder
        self.necks = nn.ModuleList(rescale_map(encoder.embed_dim, encoder.patch_size / s) for s in strides)

    def forward(self, x):  # (B, 3, H, W)
        blocks = sorted(set(self.feature_blocks))
        tokens = dict(zip(blocks, self.encoder.intermediate_tokens(x, blocks)))  # block -> (B, N, D)
        h = x.shape[-2] // self.encoder.patch_size
        return [neck(rearrange(tokens[block], "b (h w) d -> b d h w", h=h))
                for neck, block in zip(self.necks, self.feature_blocks)]


vit_tiny = partial(VisionTransformer, **ARCHS["vit_tiny"])  # e.g. vit_tiny(img_size=64, patch_size=8)
vit_small = partial(VisionTransformer, **ARCHS["vit_small"])
vit_base = partial(VisionTransformer, **ARCHS["vit_base"])
vit_large = partial(VisionTransformer, **ARCHS["vit_large"])


def init_weights(module):
    """As official: Xavier-uniform Linear weights (the patch embedding's too; a fused k|v weight as two separate
    matrices), zero biases, unit LayerNorm. VisionTransformer then gives the patch embedding PyTorch's conv bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, ClassAttention):
            for half in m.kv.weight.data.chunk(2):
                nn.init.xavier_uniform_(half)


# ============ Heads, loss and the siamese learner ============


def mlp_head(in_dim, hidden_dim, out_dim, num_layers):
    """Linear - LN - GELU - ... - Linear: the projector (3 layers) and predictor (2 layers)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for d_in, d_out in zip(dims, dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU()]
    head = nn.Sequential(*layers[:-2])  # no norm or activation after the last Linear
    init_weights(head)
    return head


def byol_loss(q, k):
    """||q/|q| - k/|k|||^2 = 2 - 2 cos(q, k); q (M*B, P) mask-major, k (B, P); mean over batch and masks."""
    q = rearrange(F.normalize(q.float(), dim=-1), "(m b) p -> m b p", b=k.shape[0])
    k = F.normalize(k.float(), dim=-1)
    return (q - k).pow(2).sum(-1).mean()


def infonce_loss(q, k, temperature):
    """InfoNCE of each mask's prediction against the targets of all processes, scaled by 2T."""
    q = rearrange(F.normalize(q.float(), dim=-1), "(m b) p -> m b p", b=k.shape[0])
    k = F.normalize(k.float(), dim=-1)
    offset = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, k)
        offset = k.shape[0] * dist.get_rank()
        k = torch.cat(gathered)
    logits = torch.einsum("mbp,np->mbn", q, k) / temperature
    labels = torch.arange(q.shape[1], device=q.device) + offset
    loss = F.cross_entropy(rearrange(logits, "m b n -> (m b) n"), labels.repeat(q.shape[0]))
    return loss * 2 * temperature


def target_std(k):
    """Collapse statistic of target projections k (B, P): the mean over dimensions of the batch's standard deviation
    of the L2-normalised vectors, times sqrt(P); about 1 spread over the sphere, 0 collapsed to one point."""
    z = F.normalize(k.detach().float(), dim=-1)
    if len(z) < 2:  # no spread over one vector: NaN, which the logs leave out
        return z.new_tensor(float("nan"))
    return z.std(dim=0).mean() * z.shape[-1] ** 0.5


def momentum_at(epoch, epochs, base=0.996):
    """EMA coefficient at a fractional epoch: cosine from base to 1."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * epoch / epochs)) / 2


class ExtreMA(nn.Module):
    """Online encoder + projector + predictor sees masked x1; momentum encoder + projector sees full x2.
    forward(x1, x2, keep=None) returns the loss (with return_target=True also the target projections k (B, P), e.g.
    for target_std) and leaves the momentum branch alone; call update_momentum(m) once per optimizer step (the
    official code does it before the forward)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, ca_depth=2, layer_scale=0.1, proj_dim=256, proj_hidden_dim=4096, mask_ratio=0.8,
                 num_masks=5, disjoint=True, drop_path=0.0, loss="byol", temperature=1.0, autocast_residual=False,
                 split_class_attention=False):
        super().__init__()
        if loss not in ("byol", "infonce"):
            raise ValueError(f"unknown loss {loss!r}: byol or infonce")
        vit = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                   num_heads=num_heads, mlp_ratio=mlp_ratio, ca_depth=ca_depth, layer_scale=layer_scale,
                   autocast_residual=autocast_residual, split_class_attention=split_class_attention)
        self.encoder = VisionTransformer(**vit, drop_path=drop_path)
        check_masks(self.encoder.num_patches, mask_ratio, num_masks, disjoint)
        self.mask_ratio, self.num_masks, self.disjoint = mask_ratio, num_masks, disjoint
        self.loss_type, self.temperature = loss, temperature
        self.projector = mlp_head(embed_dim, proj_hidden_dim, proj_dim, 3)
        self.predictor = mlp_head(proj_dim, proj_hidden_dim, proj_dim, 2)
        self.momentum_encoder = VisionTransformer(**vit)
        self.momentum_projector = mlp_head(embed_dim, proj_hidden_dim, proj_dim, 3)
        self.momentum_encoder.load_state_dict(self.encoder.state_dict())
        self.momentum_projector.load_state_dict(self.projector.state_dict())
        for p in self.momentum_params():
            p.requires_grad_(False)

    def online_params(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def momentum_params(self):
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, m):
        """target <- m * target + (1 - m) * online, one fused foreach op (m: a number or a 0-d tensor)."""
        torch._foreach_lerp_(self.momentum_params(), self.online_params(), 1.0 - m)

    def sample_keep(self, batch_size, device=None):
        return sample_keep(batch_size, self.encoder.num_patches, self.mask_ratio, self.num_masks, self.disjoint, device)

    def predict(self, x1, keep):
        """Online predictions (M*B, P) for x1 under the masks keep (M, B, K)."""
        _, instance = self.encoder.forward_features(x1, keep)
        return self.predictor(self.projector(self.encoder.norm(instance)))

    @torch.no_grad()
    def target(self, x2):
        """Momentum projections (B, P) of the full x2."""
        _, instance = self.momentum_encoder.forward_features(x2)
        return self.momentum_projector(self.momentum_encoder.norm(instance))

    def forward(self, x1, x2, keep=None, return_target=False):
        if keep is None:
            keep = self.sample_keep(x1.shape[0], x1.device)
        q, k = self.predict(x1, keep), self.target(x2)
        loss = byol_loss(q, k) if self.loss_type == "byol" else infonce_loss(q, k, self.temperature)
        return (loss, k) if return_target else loss


# ============ Optimizer parameter groups: no weight decay for biases and norms, layer-wise lr decay ============


def no_weight_decay(name, param):
    """Biases, norm weights, layer-scale vectors (all 1-D), pos_embed and cls_token skip weight decay."""
    return param.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token")


def param_groups(model, weight_decay):
    """Two AdamW groups: with and without weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_id(name, num_layers):
    """Depth of a parameter for layer-wise lr decay: patch embedding, pos_embed and cls_token are 0,
    block i is i + 1, everything else (norms, heads, decoders) is num_layers + 1."""
    if match := re.search(r"(?:^|\.)blocks\.(\d+)\.", name):
        return int(match.group(1)) + 1
    if re.search(r"(?:^|\.)(patch_embed|pos_embed|cls_token)(\.|$)", name):
        return 0
    return num_layers + 1


def layer_decay_groups(model, weight_decay, layer_decay, num_layers):
    """AdamW groups with lr_scale = layer_decay ** (num_layers + 1 - layer_id), decay off as param_groups."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, skip = layer_id(name, num_layers), no_weight_decay(name, p)
        group = groups.setdefault((lid, skip), {
            "params": [], "weight_decay": 0.0 if skip else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - lid), "layer_id": lid})
        group["params"].append(p)
    return list(groups.values())


# ============ Checkpoints ============


def read_checkpoint(path):
    """torch.load(weights_only=True) on CPU: a checkpoint may hold tensors, dicts, lists, tuples, numbers and
    strings only (ours and the official ones do), so reading one never runs code from it. Anything else, or a file
    that is not a checkpoint, raises ValueError with a one-line reason naming what the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class or function the pickle names
        if found:
            raise ValueError(f"it holds {found[1]}, and a checkpoint may hold only tensors, dicts, lists, numbers "
                             f"and strings (nothing in it was run)") from None
        with open(path, "rb") as f:
            start = f.read(16).decode("latin-1")
        raise ValueError(f"not a checkpoint (starts with {start!r})" if start else "the file is empty") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(" ".join(str(e).split()) or type(e).__name__) from None


def cached_file(url):
    """Where download keeps an http(s):// URL: NAME-<8 hex digits of the URL's SHA-256>.EXT in torch.hub's cache
    (<TORCH_HOME>/hub/checkpoints), one file per URL, so files of the same name from two places stay apart."""
    stem, ext = os.path.splitext(os.path.basename(urllib.parse.urlparse(url).path))
    key = hashlib.sha256(url.encode()).hexdigest()[:8]
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{stem}-{key}{ext}")


def download(url, log=print):
    """The local copy of an http(s):// checkpoint (cached_file), downloaded on first use only; delete it to download
    again. A download enters the cache only complete and readable as a checkpoint (read_checkpoint). The bytes go
    to an unnamed file in the cache folder (O_TMPFILE), named once complete, so no exit, kill -9 included, leaves a
    partial file; where the file system has none, to NAME.<pid>.partial, removed on errors."""
    if not os.path.basename(urllib.parse.urlparse(url).path):
        raise ValueError(f"--pretrained {url} names no file")
    path = cached_file(url)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if log is not None:
        log(f"downloading {url} to {path} (delete that file to download it again)")
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fd, partial = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o644, dir_fd=folder), None
    except (AttributeError, OSError):  # no O_TMPFILE on this system or file system
        partial = f"{path}.{os.getpid()}.partial"
        fd = os.open(partial, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    tmp = partial or f"/proc/self/fd/{fd}"
    try:
        try:
            with urllib.request.urlopen(url) as response, open(fd, "wb", closefd=False) as f:
                shutil.copyfileobj(response, f)
        except Exception as e:  # URLError, HTTPError, OSError: no network, a wrong address, a full disk
            raise ValueError(f"cannot download {url}: {' '.join(str(e).split())}") from None
        try:
            read_checkpoint(tmp)
        except ValueError as e:
            raise ValueError(f"cannot use {url}: {e}; nothing was cached") from None
        if partial:
            os.replace(partial, path)
        else:  # dst_dir_fd: linkat, which follows tmp's link to the unnamed file
            with suppress(FileExistsError):  # another job cached the same URL meanwhile
                os.link(tmp, os.path.basename(path), dst_dir_fd=folder)
    finally:
        os.close(fd)
        os.close(folder)
        if partial and os.path.exists(partial):
            os.remove(partial)
    return path


def load_checkpoint(path, log=print):
    """A checkpoint file or URL, read without running code from it (read_checkpoint): a file:// URL in place, an
    http(s):// one from torch.hub's cache, downloaded there the first time (download). ValueError in one line
    for a missing, unreadable or refused file."""
    if path.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(path).path)
    elif re.match(r"https?://", path):
        path = download(path, log)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        return read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def convert_official_state_dict(state_dict):
    """Official ExtreMA keys (`module.base_encoder.*`, ...) -> keys of ExtreMA here: base_encoder -> encoder,
    base_encoder.head -> projector, momentum_encoder.head -> momentum_projector, blocks_token -> ca_blocks with
    attn.k and attn.v concatenated into attn.kv, patch_embed.proj -> patch_embed (the conv weight (D, C, p, p)
    flattened to a linear one (D, C*p*p))."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        branch, _, rest = key.partition(".")
        ours = {"base_encoder": "", "momentum_encoder": "momentum_"}.get(branch)  # our branch's prefix
        if branch == "predictor":
            out[key] = value
        elif ours is None:
            raise ValueError(f"not an official ExtreMA key: {key}")
        elif rest.startswith("head."):
            out[ours + "projector." + rest[5:]] = value
        else:
            rest = rest.replace("blocks_token.", "ca_blocks.").replace("patch_embed.proj.", "patch_embed.")
            out[ours + "encoder." + rest] = value.flatten(1) if rest == "patch_embed.weight" else value
    for key in [k for k in out if ".attn.k." in k]:
        out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([out.pop(key), out.pop(key.replace(".k.", ".v."))])
    return out


def model_state_dict(checkpoint):
    """The model weights of a checkpoint in this file's naming: its 'model' (pretrain.py, finetune.py) or its
    converted 'state_dict' (official), or a bare state_dict of either."""
    sd = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    if any(k.removeprefix("module.").startswith("base_encoder.") for k in sd):
        sd = convert_official_state_dict(sd)
    return sd


def saved_args(checkpoint):
    """The flags a checkpoint of ours records as a dict (saved as a dict or an argparse.Namespace); {} for others."""
    args = checkpoint.get("args") or {}
    return args if isinstance(args, dict) else vars(args)


def checkpoint_inputs(checkpoint):
    """(in_chans, mean, std) that a checkpoint records (its own keys, else its args); one that records no
    in_chans (official, or of ours before they were recorded) holds an RGB model; mean, std: None when absent."""
    args = saved_args(checkpoint)
    in_chans, mean, std = (checkpoint.get(key, args.get(key)) for key in ("in_chans", "mean", "std"))
    return in_chans or 3, mean, std


def encoder_config(checkpoint):
    """The encoder a checkpoint (ours, official, or either's bare state_dict) holds, read from its weights:
    {'arch', 'img_size', 'patch_size', 'in_chans', 'ca_depth', 'rel_pos_bias', 'mean', 'std'}. arch: the ARCHS entry
    of its width and depth (the recorded name where several fit: heads are not in the shapes); img_size: the side of
    its position table's grid; mean, std: None when not recorded."""
    online = any(k.startswith("encoder.") for k in model_state_dict(checkpoint))
    sd = encoder_state_dict(checkpoint, "online" if online else "momentum")  # both branches: one architecture
    if "patch_embed.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("its encoder has no patch embedding or position table: not an ExtreMA encoder")
    in_chans, mean, std = checkpoint_inputs(checkpoint)
    dim, inputs = sd["patch_embed.weight"].shape
    patch = math.isqrt(inputs // in_chans)
    if in_chans * patch * patch != inputs:
        raise ValueError(f"a patch embedding over {inputs} inputs is not {in_chans} channel(s) of square patches")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    fits = [name for name, sizes in ARCHS.items() if (sizes["embed_dim"], sizes["depth"]) == (dim, depth)]
    if not fits:
        raise ValueError(f"its encoder ({dim} wide, {depth} blocks) is none of models.ARCHS ({', '.join(ARCHS)})")
    named = checkpoint.get("arch", saved_args(checkpoint).get("arch"))
    side = math.isqrt(sd["pos_embed"].shape[1])
    return dict(arch=named if named in fits else fits[0], img_size=side * patch, patch_size=patch, in_chans=in_chans,
                ca_depth=len({k.split(".")[1] for k in sd if k.startswith("ca_blocks.")}),
                rel_pos_bias=any(k.endswith(".relative_position_bias_table") for k in sd), mean=mean, std=std)


def pretrained_encoder(checkpoint, branch="momentum"):
    """The VisionTransformer of one branch of a checkpoint in evaluation mode, its architecture read from the
    checkpoint (encoder_config) and its weights loaded: tokens, instance = encoder(images) at any image size."""
    config = encoder_config(checkpoint)
    arch = config.pop("arch")
    del config["mean"], config["std"]
    encoder = VisionTransformer(**ARCHS[arch], **config)
    load_encoder(encoder, checkpoint, branch)
    return encoder.eval()


def encoder_state_dict(checkpoint, branch="momentum"):
    """The encoder weights of one branch from a pretrain.py checkpoint ({'model': ...}), an official
    one ({'state_dict': ...}) or a bare state_dict of either."""
    if branch not in ("online", "momentum"):
        raise ValueError(f"branch must be online or momentum, got {branch!r}")
    sd = model_state_dict(checkpoint)
    prefix = "encoder." if branch == "online" else "momentum_encoder."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"checkpoint has no {branch} encoder weights (no keys starting with {prefix!r})")
    return out


def check_state_dict(module, state_dict, what="checkpoint"):
    """Raise ValueError naming missing, unexpected and mis-shaped keys (load_state_dict's are multi-line)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    if problems:
        raise ValueError(f"{what} does not fit the model ({'; '.join(problems)})")


def adapt_input_channels(weight, in_chans):
    """An RGB patch embedding's weight (D, 3*p*p) in (c p1 p2) order -> (D, in_chans*p*p) as timm's adapt_input_conv:
    one channel gets the sum over R, G, B (a grey image gives the tokens the RGB model gives it in three channels);
    more repeat R, G, B cyclically, scaled by 3 / in_chans so a constant input's response stays the same."""
    rgb = rearrange(weight, "d (c pp) -> d c pp", c=3)
    if in_chans == 1:
        adapted = rgb.sum(dim=1, keepdim=True)
    else:
        adapted = rgb.repeat(1, math.ceil(in_chans / 3), 1)[:, :in_chans] * (3 / in_chans)
    return rearrange(adapted, "d c pp -> d (c pp)")


def load_encoder(encoder, checkpoint, branch="momentum"):
    """Load one branch of a checkpoint into a VisionTransformer, resizing the position table to its grid. Relative
    position bias tables the checkpoint lacks (pretraining has none) start at zero; an RGB patch embedding going into
    an encoder of other in_chans is adapted (adapt_input_channels). Returns a one-line note of that, or None."""
    sd = encoder_state_dict(checkpoint, branch)
    note = None
    weight = sd.get("patch_embed.weight")
    if weight is not None and weight.shape[1] != encoder.patch_embed.in_features:
        recorded = checkpoint_inputs(checkpoint)[0]
        patch = math.isqrt(weight.shape[1] // recorded)
        if recorded * patch * patch == weight.shape[1] and patch != encoder.patch_size:
            raise ValueError(f"patch size {patch} in the checkpoint, {encoder.patch_size} given")
        chans = weight.shape[1] / encoder.patch_size ** 2
        if chans != 3:
            raise ValueError(f"the checkpoint's patch embedding takes {chans:g} channels of {encoder.patch_size}-px "
                             f"patches, the model {encoder.in_chans}; only an RGB one can be adapted")
        sd["patch_embed.weight"] = adapt_input_channels(weight, encoder.in_chans)
        note = (f"the checkpoint's RGB patch embedding was adapted to {encoder.in_chans} channel(s) "
                + ("(summed over R, G, B)" if encoder.in_chans == 1 else "(R, G, B repeated, scaled by 3 / C)"))
    for key, value in encoder.state_dict().items():
        if key.endswith(".relative_position_bias_table"):
            sd.setdefault(key, torch.zeros_like(value))
    if "pos_embed" in sd and sd["pos_embed"].shape != encoder.pos_embed.shape:
        n = sd["pos_embed"].shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot resize a non-square position table of {n} patches")
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (side, side), encoder.grid_size)
    check_state_dict(encoder, sd, f"{branch} encoder in checkpoint")
    encoder.load_state_dict(sd)
    return note


def load_pretraining(learner, checkpoint):
    """A whole pretraining checkpoint (ours or official) into an ExtreMA learner, to continue pretraining from it:
    both encoders through load_encoder, the projectors and the predictor as they are. Returns load_encoder's note."""
    note = load_encoder(learner.encoder, checkpoint, "online")
    load_encoder(learner.momentum_encoder, checkpoint, "momentum")
    sd = model_state_dict(checkpoint)
    for name in ("projector", "momentum_projector", "predictor"):
        head = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        check_state_dict(getattr(learner, name), head, f"{name} in checkpoint")
        getattr(learner, name).load_state_dict(head)
    return note


# ============ Export to timm's ViT layout, and class attention for pictures ============

# the parameters of a timm ViT block (no layer scale), named as ours
TIMM_BLOCK_KEY = re.compile(r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
FINETUNED_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


def _module_name(key, prefix):
    """A module named once per block for messages: 'encoder.ca_blocks.0.attn.q.weight' -> 'encoder.ca_blocks.0',
    'encoder.norm.weight' -> 'encoder.norm', 'projector.0.weight' -> 'projector'."""
    if not key.startswith(prefix):
        return key.split(".")[0]
    parts = key[len(prefix):].split(".")
    end = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)
    return prefix + ".".join(parts[:end])


def timm_state_dict(checkpoint, branch="momentum", in_chans=None):
    """One encoder of a pretrain.py, finetune.py or official checkpoint as the state_dict of timm's
    VisionTransformer(class_token=False, no_embed_class=True, global_pool="avg", fc_norm=True): the fine-tuning
    layout, mean of the patch tokens -> fc_norm -> head (arguments: timm_vit_kwargs).

    The patch embedding becomes a conv weight (D, C, p, p) again, the position table (at its grid) timm's pos_embed
    without a class entry (1, N, D), and the blocks keep their names. A fine-tuned model brings its fc_norm and head
    (it holds one encoder: branch does not apply); a pretrained one gets a new fc_norm (weight 1, bias 0: where
    finetune.py starts) and no head. Returns (state_dict, left_out): what timm's layout cannot hold (a pretrained
    encoder's cls token, class-attention blocks and final norm; its projector and predictor). in_chans: the encoder's
    input channels, default the checkpoint's (checkpoint_inputs), so that timm_vit_kwargs gives timm's in_chans.
    """
    in_chans = in_chans or checkpoint_inputs(checkpoint)[0]
    sd = model_state_dict(checkpoint)
    finetuned = "fc_norm.weight" in sd  # finetune.py: encoder.*, fc_norm.*, head.*
    branch = "online" if finetuned else branch
    prefix = "encoder." if branch == "online" else "momentum_encoder."
    out, used = {}, set()
    for key, value in encoder_state_dict(sd, branch).items():
        if key == "patch_embed.weight":  # (D, C*p*p) in (c p1 p2) order, as the conv's flattened weight
            p = math.isqrt(value.shape[1] // in_chans)
            if in_chans * p * p != value.shape[1]:
                raise ValueError(f"a patch embedding over {value.shape[1]} inputs is not {in_chans} channels "
                                 f"of square patches")
            out["patch_embed.proj.weight"] = rearrange(value, "d (c p1 p2) -> d c p1 p2", c=in_chans, p1=p, p2=p)
        elif key == "patch_embed.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "pos_embed" or TIMM_BLOCK_KEY.fullmatch(key):
            out[key] = value
        elif key.startswith("blocks."):
            raise ValueError(f"timm's ViT block has no place for {key}: its tokens would differ from ours")
        else:
            continue
        used.add(prefix + key)
    if finetuned:
        head = {k: sd[k] for k in FINETUNED_KEYS if k in sd}
        out.update(head)
        used.update(head)
    else:
        dim = out["patch_embed.proj.weight"].shape[0]
        out["fc_norm.weight"], out["fc_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    other = (("momentum_encoder.", "momentum_projector.") if branch == "online"
             else ("encoder.", "projector.", "predictor."))  # the other branch's weights: not this encoder's
    left_out = sorted({_module_name(k, prefix) for k in sd if k not in used and not k.startswith(other)})
    return out, left_out


def timm_vit_kwargs(state_dict, arch):
    """Arguments of timm's VisionTransformer, or of timm.create_model("vit_base_patch16_224", **kwargs) (every
    size is given), that hold a timm_state_dict of an `arch` encoder; ValueError if its sizes are not arch's."""
    dim, in_chans, p, _ = state_dict["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    sizes = ARCHS[arch]
    if (dim, depth) != (sizes["embed_dim"], sizes["depth"]):
        raise ValueError(f"the encoder is {dim} wide and {depth} blocks deep, not {arch} "
                         f"({sizes['embed_dim']} wide, {sizes['depth']} deep)")
    n = state_dict["pos_embed"].shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a non-square position table of {n} patches has no timm image size")
    head = state_dict.get("head.weight")
    return dict(img_size=side * p, patch_size=p, in_chans=in_chans, embed_dim=dim, depth=depth,
                num_heads=sizes["num_heads"], mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                class_token=False, no_embed_class=True, global_pool="avg", fc_norm=True,
                num_classes=0 if head is None else head.shape[0])


def from_timm_state_dict(state_dict):
    """The inverse of timm_state_dict, exact: timm's keys -> finetune.py's model keys (encoder.*, fc_norm.*, head.*).
    The encoder.* part loads into a VisionTransformer with strict=False (it has no cls token, class-attention blocks
    or final norm). A timm model with parts of its own (a class token, a final norm, layer scale) is refused."""
    out = {}
    for key, value in state_dict.items():
        if key == "patch_embed.proj.weight":
            out["encoder.patch_embed.weight"] = value.flatten(1)  # (D, C, p, p) -> (D, C*p*p)
        elif key == "patch_embed.proj.bias":
            out["encoder.patch_embed.bias"] = value
        elif key == "pos_embed" or TIMM_BLOCK_KEY.fullmatch(key):
            out["encoder." + key] = value
        elif key in FINETUNED_KEYS:
            out[key] = value
        else:
            raise ValueError(f"timm key {key} has no place here (no class token, final norm or layer scale)")
    return out


def last_class_attention(encoder, x):
    """Patch tokens after the final norm (B, N, D) and the last class-attention block's attention weights
    from the cls query to [cls; patches] (B, H, 1+N; rows sum to 1, column 0 is the cls token itself) for full
    images x (B, C, H, W). The weights are computed explicitly; forward() is untouched."""
    if not len(encoder.ca_blocks):
        raise ValueError("the encoder has no class-attention blocks (a fine-tuned or dense-transfer encoder?)")
    tokens = encoder.intermediate_tokens(x, [len(encoder.blocks)])[-1]  # (B, N, D)
    cls = encoder.cls_token.expand(tokens.shape[0], -1, -1)
    for blk in encoder.ca_blocks[:-1]:
        cls = blk(cls, tokens)
    last = encoder.ca_blocks[-1]
    return encoder.norm(tokens), last.attn.attention(last.norm1(torch.cat([cls, tokens], dim=1)))
