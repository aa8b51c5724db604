"""Benchmark of the ExtreMA pretraining step: the real pretrain.train_step (same model, optimizer, precision and
momentum update, the two colourings of each crop on the device included) on random uint8 crops, FLOPs counted by
torch.utils.flop_counter; optionally the input pipeline (--data) and an eager baseline in the official compute
pattern (--baseline), timed in turns with ours so that a shared machine's slow spells hit both alike.

    python bench.py --arch vit_base --img-size 224 --batch-size 256 --amp bf16 --device cuda --steps 20
    python bench.py --arch vit_small --batch-size 16 --amp none --device cpu --steps 5 --warmup-steps 1 --baseline
    python bench.py --data /path/to/imagenet --num-workers 10 ...     # is the loader or the model the bottleneck?
    python bench.py --data 'shards/{0000..0007}.tar' --train-num-samples 2000 --num-workers 2 ...   # over shards
    python bench.py --make-jpegs output/jpegs --count 2000            # ImageNet-sized JPEGs to time the loader on

Every flag of pretrain.py is accepted with its meaning and default (see `python pretrain.py --help`; the speed
options --compile [MODE], --autocast-residual, --split-class-attention, --cuda-graphs and the memory option
--grad-checkpointing among them), except that --data defaults to no input-pipeline measurement. The last line
printed is one JSON object. Peak memory: CUDA's max allocated; on CPU the process's peak resident set during the
last warm-up step (Linux): compare options in separate runs, under MALLOC_MMAP_THRESHOLD_=131072 so that glibc
returns freed tensors and the resident set follows the live ones.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils import flop_counter

import data
import models
import pretrain
import utils

# Dense bf16/fp16 peak TFLOP/s by device-name fragment, first match wins; other cases need --peak-tflops.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="untimed steps before the timed ones, at least 1 (with --compile, compilation happens in "
                        "the first; the last gives the peak memory)")
    p.add_argument("--baseline", action="store_true",
                   help="also time an eager model in the official compute pattern, same sizes and precision")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known for H100/H200/A100 with --amp bf16/fp16)")
    p.add_argument("--data", default=None,
                   help="also time decode + crop through pretrain.py's loader of this --data (a folder, list file, "
                        "shards with --train-num-samples, or 'synthetic')")
    p.add_argument("--data-batches", type=int, default=10, help="loader batches timed after the first")
    p.add_argument("--make-jpegs", default=None, metavar="DIR",
                   help="only write --count JPEGs of 500x375 (quality 90) as DIR/train/<class>/<image>.JPEG")
    p.add_argument("--count", type=int, default=2000, help="images for --make-jpegs")
    bench_args, rest = p.parse_known_args(argv)
    args = pretrain.get_args(rest)  # every pretrain.py flag, same defaults
    vars(args).update(vars(bench_args))
    utils.check_values(args)  # --peak-tflops
    return args


# ============ Measuring ============


def attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return 2 * flop_counter.sdpa_flop_count(query, key, value)


# Model FLOPs of attention whatever the kernel: the CPU flash kernel, unknown to FlopCounterMode, would count 0,
# and the CUDA backward formulas add the kernels' recomputation of QK^T; here the backward is 2x the forward,
# the work of explicit attention, so ours and the baseline count the same.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: attention_backward_flops}


def count_flops(step):
    """Matmul, convolution and attention FLOPs of one call of step() (forward and backward)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device):
    """Allocated CUDA memory in MB (0 on CPU)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def warm_up(step, device, steps, others_mb):
    """Untimed steps (with --compile, compilation happens in the first); returns the peak memory in MB of the
    last one. CUDA: max allocated minus what other models hold (others_mb); CPU: the process's peak resident set
    during it (everything the process holds, the other model's too; where it cannot be reset, since the start)."""
    for _ in range(steps - 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the peak resident set (VmHWM) starts afresh at the current one, where Linux 4.0+ allows it
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    step()
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - others_mb
    try:  # VmHWM of /proc/self/status (Linux), else the max resident set
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and macOS differ in units


def time_interleaved(steps, device, n):
    """Seconds of each of n calls of every step function, taken in turns (a, b, a, b, ...), so that a slow
    spell of a shared machine hits all of them alike."""
    seconds = [[] for _ in steps]
    for _ in range(n):
        for step, times in zip(steps, seconds):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return seconds


def time_loader(loader, device, data_batches):
    """The pretraining input pipeline (decode + shared crop as uint8; the colouring is part of the step) of a
    data.pretraining_loader: wall-clock images/s of batches 2.. (the first includes the workers' start-up) and
    the CPU milliseconds per image that the loading processes spent making the batches (all batches)."""
    batches = min(data_batches + 1, len(loader))
    if batches < 2:
        utils.fail("--data gives fewer than 2 batches per epoch; lower --batch-size")
    it = data.epoch_batches(loader, 0)
    first = next(it)
    cpu_seconds, images = first.cpu_s, len(first.names)
    start = time.perf_counter()
    for _ in range(batches - 1):
        batch = next(it)
        batch.images.to(device, non_blocking=True)
        cpu_seconds, images = cpu_seconds + batch.cpu_s, images + len(batch.names)
    synchronize(device)
    return (images - len(first.names)) / (time.perf_counter() - start), 1000 * cpu_seconds / images


def make_jpegs(root, count, classes=10, seed=0):
    """count ImageNet-sized photos-alike (smooth random shapes plus grain, 500x375, JPEG quality 90) in
    root/train/class_<k>/, about the file size of an ImageNet training image."""
    if count < 1:
        utils.fail(f"--count must be positive, got {count}")
    try:
        os.makedirs(os.path.join(root, "train"), exist_ok=True)
    except OSError as e:
        utils.fail(f"cannot create --make-jpegs {root}/train: {e.strerror or e}")
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, "train", f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        grain = rng.normal(0, 20, (375, 500, 3))
        img = Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"img_{i:06d}.JPEG"), quality=90)
    print(f"wrote {count} JPEGs of 500x375 to {root}/train")


# ============ Baseline: the official compute pattern ============
# Explicit softmax attention, a loop of per-mask gathers, separate q/k/v linears in class attention, the final norm
# over all tokens, per-mask loss loop, per-parameter momentum update, for-loop AdamW, loss.item() and the total
# gradient norm every step. Same parameters and state_dict keys as models.ExtreMA, except class attention's
# attn.kv, here attn.k and attn.v, and the patch embedding, here a conv.


def official_drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = (1 - p) + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x.div(1 - p) * keep.floor_()


class BaselineAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class BaselineBlock(nn.Module):
    def __init__(self, dim, num_heads, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = BaselineAttention(dim, num_heads)
        self.mlp = models.Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def forward(self, x):
        x = x + official_drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + official_drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class BaselineClassAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u):  # (B, 1+N, D)
        b, _, d = u.shape
        q, k, v = (x.reshape(b, -1, self.num_heads, d // self.num_heads).permute(0, 2, 1, 3)
                   for x in (self.q(u[:, :1]), self.k(u), self.v(u)))  # (B, H, 1 or 1+N, D/H)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, 1+N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, 1, d))


class BaselineClassAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = BaselineClassAttention(dim, num_heads)
        self.mlp = models.Mlp(dim, 4 * dim)
        self.gamma_1, self.gamma_2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, cls, tokens):
        u = torch.cat((cls, tokens), dim=1)
        cls = cls + self.gamma_1 * self.attn(self.norm1(u))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class BaselineViT(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, ca_depth, drop_path=0.0):
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", models.sincos_pos_embed(embed_dim, grid, grid)[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(BaselineBlock(embed_dim, num_heads, r) for r in rates)
        self.ca_blocks = nn.ModuleList(BaselineClassAttentionBlock(embed_dim, num_heads) for _ in range(ca_depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x, masks=None):
        """Normed instance representation (M*B, D), or (B, D) without masks."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        if masks is not None:
            x = torch.cat([torch.gather(x, 1, mask[:, :, None].repeat(1, 1, x.shape[2])) for mask in masks])
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x)
        for blk in self.ca_blocks:
            cls = blk(cls, x)
        return self.norm(torch.cat((cls, x), dim=1))[:, 0]


class BaselineExtreMA(nn.Module):
    def __init__(self, args):
        super().__init__()
        arch = models.ARCHS[args.arch]
        vit = dict(img_size=args.img_size, patch_size=args.patch_size, ca_depth=args.ca_depth, **arch)
        dim, hidden, out = arch["embed_dim"], args.proj_hidden_dim, args.proj_dim
        self.num_patches, self.patch_size = (args.img_size // args.patch_size) ** 2, args.patch_size
        self.mask_ratio, self.num_masks, self.disjoint = args.mask_ratio, args.num_masks, args.disjoint
        self.encoder = BaselineViT(**vit, drop_path=args.drop_path)
        self.projector = models.mlp_head(dim, hidden, out, 3)
        self.predictor = models.mlp_head(out, hidden, out, 2)
        self.momentum_encoder = BaselineViT(**vit)
        self.momentum_projector = models.mlp_head(dim, hidden, out, 3)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)

    def load_ours(self, state_dict):
        """Load a models.ExtreMA state_dict (k|v split back into k and v, the patch embedding as a conv)."""
        state = {}
        for key, value in state_dict.items():
            if ".attn.kv." in key:
                state[key.replace(".kv.", ".k.")], state[key.replace(".kv.", ".v.")] = value.chunk(2)
            elif key.endswith("patch_embed.weight"):  # a linear over flat patches here, a conv there
                state[key] = value.reshape(value.shape[0], 3, self.patch_size, self.patch_size)
            else:
                state[key] = value
        self.load_state_dict(state)
        return self

    @torch.no_grad()
    def update_momentum(self, m):
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        for p_b, p_m in zip(online, target):
            p_m.data = p_m.data * m + p_b.data * (1.0 - m)

    def generate_masks(self, x):
        k = models.num_visible(self.num_patches, self.mask_ratio)
        if self.disjoint:
            order = torch.rand(x.shape[0], self.num_patches, device=x.device).argsort(dim=1)
            return [order[:, k * i:k * (i + 1)] for i in range(self.num_masks)]
        return [torch.rand(x.shape[0], self.num_patches, device=x.device).argsort(dim=1)[:, :k]
                for _ in range(self.num_masks)]

    def forward(self, x1, x2, keep=None):
        masks = self.generate_masks(x1) if keep is None else keep
        q = self.predictor(self.projector(self.encoder(x1, masks)))
        with torch.no_grad():
            k = self.momentum_projector(self.momentum_encoder(x2))
        loss = 0.0
        for q_mask in torch.chunk(q, len(masks)):  # both normalised per mask, as the official byol_loss
            loss = loss + ((F.normalize(q_mask.float(), dim=1) - F.normalize(k.float(), dim=1)) ** 2).sum(-1).mean()
        return loss / len(masks)


def baseline_step(model, optimizer, scaler, micro_batches, lr, momentum, amp, color_aug):
    """The official training iteration: lr per group, momentum step, forward and loss.item() (logged every
    step), backward per micro-batch, then unscale, the total gradient norm (computed every step for the log,
    no clipping) and the optimizer step. Its views come from the same device colouring as ours (the official
    code coloured on the CPU), so that the two steps differ by the model only."""
    device = micro_batches[0].device
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.update_momentum(momentum)
    for images in micro_batches:
        x1, x2 = pretrain.two_views(images, color_aug)
        with utils.autocast(device, amp):
            loss = model(x1, x2)
        loss.item()
        scaler.scale(loss / len(micro_batches)).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch.norm(torch.stack([torch.norm(g.detach(), 2.0) for g in grads]), 2.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# ============ Preparing and timing the two ============


def prepare_ours(learner, args, device, amp, micro_batches, lr, momentum):
    """pretrain.py's optimizer (or --cuda-graphs updates), loss scaler and training step; its FLOPs counted in one
    eager step (also the first untimed one), then (with --compile) compilation and the warm-up steps."""
    optimizer = utils.adamw(models.param_groups(learner, args.weight_decay), lr=0.0, betas=(0.9, 0.95),
                            device=device)
    updates = pretrain.step_updates(args, learner, optimizer, device, amp)
    scaler = utils.grad_scaler(device, amp)

    def step():
        pretrain.train_step(learner, updates, scaler, micro_batches, lr, momentum, amp, args.color_aug)

    learner.encoder.set_grad_checkpointing(False)  # the model's FLOPs (MFU's): without the recomputation
    flops = count_flops(step) / args.batch_size
    learner.encoder.set_grad_checkpointing(args.grad_checkpointing)
    if args.compile:
        pretrain.compile_model(learner, args.compile)
    return {"impl": "ours", "step": step, "flops_per_image": flops,
            "peak_mem_mb": warm_up(step, device, args.warmup_steps, 0.0)}


def prepare_baseline(state_dict, args, device, amp, micro_batches, lr, momentum, others_mb):
    """The official pattern from the same initial weights, eager, with for-loop AdamW (the official code's
    PyTorch 1.x default); others_mb: CUDA memory held by the other model."""
    baseline = BaselineExtreMA(args).load_ours(state_dict).to(device)
    optimizer = torch.optim.AdamW(models.param_groups(baseline, args.weight_decay), lr=0.0, betas=(0.9, 0.95),
                                  foreach=False, fused=False)
    scaler = utils.grad_scaler(device, amp)

    def step():
        baseline_step(baseline, optimizer, scaler, micro_batches, lr, momentum, amp, args.color_aug)

    return {"impl": "baseline", "step": step, "flops_per_image": count_flops(step) / args.batch_size,
            "peak_mem_mb": warm_up(step, device, args.warmup_steps, others_mb)}  # FLOPs from the first eager step


def main(argv=None):
    args = get_args(argv)
    if args.make_jpegs is not None:
        return make_jpegs(args.make_jpegs, args.count)
    pretrain.check_args(args)
    if min(args.steps, args.warmup_steps, args.data_batches) < 1:
        utils.fail("--steps, --warmup-steps and --data-batches must be at least 1")
    _, _, device = utils.init_distributed(args.device)
    amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, 1, args.accum_iter)
    if args.data is not None:  # built first: a bad --data stops before the timing
        if args.data == "synthetic":  # enough images for the timed batches
            args.synthetic_size = max(args.synthetic_size, local_batch * (args.data_batches + 1))
        loader, _ = data.pretraining_loader(args, pretrain.crop_transform(args.img_size, args.crop_min), local_batch,
                                            device)
    utils.set_seed(args.seed)
    micro_batches = [torch.randint(0, 256, (local_batch, 3, args.img_size, args.img_size), dtype=torch.uint8,
                                   device=device) for _ in range(args.accum_iter)]  # crops, as the loader's
    lr = args.blr * args.batch_size / 256
    momentum = models.momentum_at(0, args.epochs, args.ema)

    inputs_mb = memory_mb(device)
    learner = pretrain.build_model(args).to(device)
    initial_state = {k: v.cpu().clone() for k, v in learner.state_dict().items()} if args.baseline else None
    results = [prepare_ours(learner, args, device, amp, micro_batches, lr, momentum)]
    if args.baseline:
        results.append(prepare_baseline(initial_state, args, device, amp, micro_batches, lr, momentum,
                                        memory_mb(device) - inputs_mb))
    timings = time_interleaved([r.pop("step") for r in results], device, args.steps)

    grid = args.img_size // args.patch_size
    visible = models.num_visible(grid * grid, args.mask_ratio)
    hardware = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    options = [name for name in ("autocast_residual", "split_class_attention", "cuda_graphs", "grad_checkpointing")
               if getattr(args, name)]
    print(f"ExtreMA pretraining step | {args.arch} {args.img_size}/{args.patch_size} | batch {args.batch_size} "
          f"({local_batch} x {args.accum_iter}) | {args.num_masks} masks x {visible} of {grid * grid} patches | "
          f"amp {amp} | compile {args.compile or 'off'} | options {' '.join(options) or 'none'} | "
          f"{device} ({hardware}) | {args.warmup_steps} warm-up + {args.steps} timed steps")
    mem = "peak MB (CUDA max allocated)" if device.type == "cuda" else "peak MB (process peak RSS in the step)"
    print(f"{'impl':<10}{'step ms':>10}{'(min-max)':>16}{'images/s':>11}{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}"
          f"  {mem}")
    peak = args.peak_tflops  # for MFU; known for some GPUs at bf16/fp16
    if peak is None and device.type == "cuda" and amp in ("bf16", "fp16"):
        peak = next((p for fragment, p in PEAK_TFLOPS if fragment in hardware), None)
    for r, seconds in zip(results, timings):
        r.update(step_ms=1000 * sum(seconds) / len(seconds), min_step_ms=1000 * min(seconds),
                 max_step_ms=1000 * max(seconds))
        r["images_per_s"] = 1000 * args.batch_size / r["step_ms"]
        r["tflops"] = r["flops_per_image"] * r["images_per_s"] / 1e12
        if peak:
            r["mfu"] = r["tflops"] / peak
        mfu = f"{100 * r['mfu']:.1f}%" if peak else "-"
        spread = f"({r['min_step_ms']:.1f}-{r['max_step_ms']:.1f})"
        print(f"{r['impl']:<10}{r['step_ms']:>10.1f}{spread:>16}{r['images_per_s']:>11.2f}"
              f"{r['flops_per_image'] / 1e9:>11.2f}{r['tflops']:>9.3f}{mfu:>7}  {r['peak_mem_mb']:.0f}")
    ours = results[0]
    summary = {k: ours[k] for k in ("images_per_s", "step_ms", "min_step_ms", "max_step_ms", "peak_mem_mb", "tflops",
                                    "flops_per_image", "mfu") if k in ours}
    if args.baseline:
        base = results[1]
        summary.update({f"baseline_{k}": base[k] for k in ("images_per_s", "step_ms", "flops_per_image")},
                       speedup=ours["images_per_s"] / base["images_per_s"],
                       speedup_median_pair=statistics.median(b / o for o, b in zip(*timings)))
        print(f"speedup ours/baseline: {summary['speedup']:.2f}x (mean step times), "
              f"{summary['speedup_median_pair']:.2f}x (median of the {args.steps} in-turn pairs)")
    if args.data is not None:
        loader_rate, cpu_ms = time_loader(loader, device, args.data_batches)
        bottleneck = "loader" if loader_rate < ours["images_per_s"] else "step"
        summary.update(loader_images_per_s=loader_rate, loader_cpu_ms_per_image=cpu_ms,
                       loader_images_per_s_per_worker=1000 / cpu_ms,
                       workers_needed=math.ceil(ours["images_per_s"] * cpu_ms / 1000), bottleneck=bottleneck)
        print(f"input pipeline ({args.data}, {args.num_workers} workers): {loader_rate:.1f} images/s vs step "
              f"{ours['images_per_s']:.1f} images/s -> the {bottleneck} is the bottleneck; {cpu_ms:.2f} CPU ms per "
              f"image, i.e. {1000 / cpu_ms:.0f} images/s per busy worker: the step needs about "
              f"{summary['workers_needed']} workers per process")
    summary.update(arch=args.arch, img_size=args.img_size, batch_size=args.batch_size, amp=amp,
                   device=f"{device} ({hardware})", torch=torch.__version__, compile=args.compile or "off",
                   options=options)
    print(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) and "flops_per_image" not in k else v
                      for k, v in summary.items()}))
    return summary


if __name__ == "__main__":
    utils.run_main(main)
