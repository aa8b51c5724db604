"""Plumbing shared by the stage scripts: errors, distributed set-up, precision, schedules, optimizer
groups, checkpoints, logs and datasets. Model code lives in models.py."""
import argparse
import copy
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# Errors


class DataError(Exception):
    """Bad input data (unreadable image, malformed annotation); reported as a one-line error."""


def fail(message):
    """Stop with a one-line error on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def run_main(main):
    """Run a stage's main(); data and configuration errors end in one line, not a traceback.

    Errors raised in DataLoader workers arrive wrapped with the worker's traceback: keep its last line.
    """
    try:
        main()
    except (DataError, ValueError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fail(re.sub(r"^(\w+\.)*\w+Error: ", "", last))


# ----------------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the layout of the stage's docstring and shows the default of every flag that takes a value,
    unless the flag's help already explains it."""

    def _get_help_string(self, action):
        help = action.help or ""
        takes_value = action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction)
        if "default" in help or action.default in (None, argparse.SUPPRESS) or not takes_value:
            return help
        return f"{help} (default: %(default)s)".lstrip()

    def _format_action(self, action):
        if action.help is None:  # argparse prints nothing after a flag without help, not even its default
            action = copy.copy(action)
            action.help = self._get_help_string(action) or None
        return super()._format_action(action)


def add_common_args(parser, data_help, output_dir, img_size, batch_size, num_workers, print_freq=20, branch=None,
                    img_help=None):
    """The flags every stage shares, with the same names and meanings; defaults are the stage's protocol.
    With a default `branch`, also --pretrained, --branch and --eval-only (the evaluation stages)."""
    from models import ARCHS
    p = parser
    p.add_argument("--data", default="synthetic", help=f"{data_help}, or 'synthetic' (generated, no files)")
    p.add_argument("--output-dir", default=output_dir, help="log.jsonl and checkpoint-last.pth go here")
    p.add_argument("--arch", default="vit_base", choices=list(ARCHS))
    p.add_argument("--img-size", type=int, default=img_size, help=img_help)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch over all processes")
    p.add_argument("--accum-iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="default: bf16 on GPUs that support it, else none")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=num_workers, help="data-loading processes per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-freq", type=int, default=print_freq, help="steps between progress lines and loss checks")
    if branch is not None:
        p.add_argument("--pretrained", default=None,
                       help="pretrain.py or official ExtreMA checkpoint (none: random initialisation)")
        p.add_argument("--branch", choices=["online", "momentum"], default=branch, help="encoder to evaluate")
        p.add_argument("--eval-only", action="store_true", help="evaluate <output-dir>/checkpoint-last.pth")


def parse_args(parser, argv=None):
    """parser.parse_args(argv), then one-line errors for values of the common flags (and --epochs / --iters
    where a stage has them) that no run can use, before anything is built."""
    args = parser.parse_args(argv)
    for flag in ("img_size", "patch_size", "batch_size", "accum_iter", "print_freq", "epochs", "iters"):
        if getattr(args, flag, 1) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        fail(f"--num-workers must be at least 0, got {args.num_workers}")
    if args.device not in (None, "cuda", "cpu"):
        fail(f"--device must be cuda or cpu, got {args.device!r} (choose GPUs with CUDA_VISIBLE_DEVICES; "
             f"under torchrun each process takes GPU LOCAL_RANK)")
    return args


def make_output_dir(path):
    """Create --output-dir (and its parents) or stop with a one-line error: a file in the way, no permission."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--output-dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --output-dir {path}: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"--output-dir {path} is not writable")


# ----------------------------------------------------------------------------------------------------
# Processes, devices, precision


def init_distributed(device):
    """Set up torch.distributed under torchrun (NCCL on CUDA, gloo on CPU); a plain python run is one
    process. Returns (rank, world_size, torch.device)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA device is visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(tensor):
    """Sum a tensor over processes in place (no-op in one process) and return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_amp(amp, device):
    """--amp default: bf16 on GPUs that support it, else none (float32)."""
    if amp is None:
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return amp


def autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, amp):
    """Loss scaling for fp16 only; a disabled scaler is a pass-through for bf16 and float32."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def check_image_size(args):
    """One-line error unless --img-size divides into patches of --patch-size."""
    if args.img_size % args.patch_size:
        fail(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")


def local_batch_size(batch_size, world_size, accum_iter):
    """Per-process micro-batch of a global --batch-size, or a one-line error when it does not divide."""
    if batch_size < 1 or accum_iter < 1 or batch_size % (world_size * accum_iter):
        fail(f"--batch-size {batch_size} does not divide over {world_size} process(es) x "
             f"--accum-iter {accum_iter}")
    return batch_size // (world_size * accum_iter)


# ----------------------------------------------------------------------------------------------------
# Schedules and optimizer groups


def cosine_schedule(step, total_steps, warmup_steps, base, final=0.0):
    """Linear warm-up from 0, then half-cycle cosine from base to final (per iteration)."""
    if step < warmup_steps:
        return base * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    """Set every group's lr to lr times its lr_scale (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


NO_DECAY_NAMES = ("pos_embed", "cls_token")


def no_weight_decay(name, param):
    """Biases, norm weights, layer-scale vectors (all 1-D), pos_embed and cls_token skip weight decay."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


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
    match = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if match:
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
        lid = layer_id(name, num_layers)
        skip = no_weight_decay(name, p)
        group = groups.setdefault((lid, skip), {
            "params": [], "weight_decay": 0.0 if skip else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - lid), "layer_id": lid})
        group["params"].append(p)
    return list(groups.values())


def adamw(groups, lr, betas, device):
    """AdamW with the fused single-pass kernel where torch has one (CUDA, CPU), else the foreach one."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, then rename over the old one."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load on CPU with a one-line error for a missing or unreadable file."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        fail(f"cannot read checkpoint {path}: {e}")


def keep_copy(path, copy):
    """Give the file at path a second name, copy: a hard link (no second copy on disk), or a copy where the file
    system has no hard links. save_checkpoint later replaces path's file and leaves copy as it is."""
    tmp = f"{copy}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy)


def load_pretrained_encoder(encoder, path, branch, log=print, output_dir=None):
    """--pretrained PATH into a VisionTransformer (ours or official format); None means random init.
    Nothing is read when output_dir holds checkpoint-last.pth: resuming and --eval-only load the whole model."""
    from models import load_encoder
    last = os.path.join(output_dir, "checkpoint-last.pth") if output_dir is not None else None
    if last is not None and os.path.exists(last):
        log(f"the encoder's weights will come from {last}" + (f" (--pretrained {path} is not read)" if path else ""))
        return
    if path is None:
        log("no --pretrained given: the encoder starts from random initialisation")
        return
    try:
        load_encoder(encoder, load_checkpoint(path), branch)
    except ValueError as e:
        fail(f"{path}: {e}")
    log(f"loaded the {branch} encoder from {path}")


def resume_checkpoint(output_dir):
    """checkpoint-last.pth of output_dir, or None to start fresh."""
    path = os.path.join(output_dir, "checkpoint-last.pth")
    return load_checkpoint(path) if os.path.exists(path) else None


def load_resumed(module, state_dict, path):
    """Strict load of a resumed model with a one-line error naming mismatched keys."""
    from models import check_state_dict
    try:
        check_state_dict(module, state_dict, f"checkpoint {path}")
    except ValueError as e:
        fail(str(e))
    module.load_state_dict(state_dict)


def resume(output_dir, model, optimizer, scaler, log=print):
    """Continue from <output_dir>/checkpoint-last.pth when it exists: model, optimizer and loss scaler.
    Returns the checkpoint (its 'epoch' and other entries), or None to start fresh."""
    checkpoint = resume_checkpoint(output_dir)
    if checkpoint is not None:
        path = os.path.join(output_dir, "checkpoint-last.pth")
        load_resumed(model, checkpoint["model"], path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        log(f"resumed from {path} (epoch {checkpoint['epoch']} done)")
    return checkpoint


def log_json(output_dir, record):
    """Append one JSON object per line to <output-dir>/log.jsonl (main process only)."""
    if is_main():
        with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


class Meter:
    """Throughput and ETA for progress lines."""

    def __init__(self, total_steps):
        self.total, self.start = total_steps, time.time()

    def line(self, step, images):
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        return f"{images / max(elapsed, 1e-9):.1f} img/s  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"


# ----------------------------------------------------------------------------------------------------
# Data


def load_rgb(path):
    """Open an image as RGB; an unreadable file raises DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def decode_rgb(path):
    """An image file as a uint8 RGB tensor (3, H, W): torchvision.io for JPEG, PNG, WebP and GIF (about 15% less
    CPU than PIL for a JPEG, and no copy from PIL), else load_rgb; an unreadable file raises DataError naming it."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError:
        return v2.functional.pil_to_tensor(load_rgb(path))


def image_folder(root, transform, loader=load_rgb):
    """ImageFolder with a one-line error for a missing or empty folder; loader: load_rgb (PIL) or decode_rgb."""
    if not os.path.isdir(root):
        fail(f"data folder {root} does not exist")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=loader)
    except FileNotFoundError:
        fail(f"no images found in {root} (expected {root}/<class>/<image>)")


class SyntheticImages(torch.utils.data.Dataset):
    """A small random labelled image set, the same for every run: each image is its class's colour plus
    noise, so there is something to learn. Items are PIL images, so real transforms apply."""

    def __init__(self, size, img_size, num_classes=10, transform=None, seed=0):
        self.size, self.img_size, self.num_classes = size, img_size, num_classes
        self.transform, self.seed = transform, seed
        self.colours = np.random.default_rng(seed).integers(0, 256, (num_classes, 3))

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, index))
        noise = rng.normal(0, 40, (self.img_size, self.img_size, 3))
        img = Image.fromarray(np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8))
        return (self.transform(img) if self.transform else img), label


def normalize(images):
    """Images of values 0..255 (uint8 or float), (..., 3, H, W) on any device -> float32 normalised with the
    ImageNet statistics. The loaders ship uint8 (a quarter of the bytes of float32) and this runs where the
    batch lands, without a host synchronisation."""
    stats = torch.tensor((IMAGENET_MEAN, IMAGENET_STD)).mul_(255).to(images.device, non_blocking=True)
    mean, std = stats[:, :, None, None].unbind()  # (3, 1, 1) each
    return (images.float() - mean) / std


def to_device(batch, device):
    """A batch (inputs, targets) on device, uint8 images (B, 3, H, W) normalised there into float32 (other
    inputs as they are)."""
    images, targets = batch
    images = images.to(device, non_blocking=True)
    return normalize(images) if images.dtype == torch.uint8 else images, targets.to(device, non_blocking=True)


def eval_transform(img_size, interpolation=v2.InterpolationMode.BICUBIC):
    """Resize(256/224 of the crop) + CenterCrop, the ImageNet evaluation protocol: bicubic as timm's fine-tuning
    pipeline, bilinear (torchvision's default) for the official linear probe; uint8 (3, H, W) for to_device."""
    return v2.Compose([v2.Resize(int(img_size * 256 / 224), interpolation=interpolation),
                       v2.CenterCrop(img_size), v2.PILToTensor()])


def make_loader(dataset, batch_size, train, num_workers, seed, device, collate_fn=None):
    """Per-process DataLoader.

    train: a shuffling DistributedSampler that drops the last partial batch (also in one process, so the
    order depends only on seed and epoch: call loader.sampler.set_epoch(epoch) each epoch).
    Otherwise every process takes the indices rank, rank + world, ...: each item is seen exactly once
    over all processes, with no padding, so evaluation sums are exact.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if train:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=True)
    else:
        sampler = range(rank, len(dataset), world)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0, collate_fn=collate_fn)


# ----------------------------------------------------------------------------------------------------
# Training steps and classification evaluation (linear probe, fine-tuning)


def accumulate_step(model, optimizer, scaler, micro_batches, loss_fn, device, amp):
    """One optimizer step over micro-batches (lists of arguments on the device): loss_fn(*micro_batch) under
    autocast.

    The same update as one large batch for a loss that is a mean over images: each micro-batch's loss is
    divided by their number, and a DDP model all-reduces gradients only on the last one.
    Returns the mean loss as a device tensor (no host synchronisation).
    """
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext():
            with autocast(device, amp):
                loss = loss_fn(*batch)
            scaler.scale(loss / len(micro_batches)).backward()
        total = total + loss.detach()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)


def train_one_epoch(loss_fn, model, loader, optimizer, scaler, epoch, args, device, log=print):
    """One epoch of optimizer steps of args.accum_iter micro-batches each; returns (mean loss, last lr).

    loss_fn(images, targets) -> scalar loss through `model` (DDP-wrapped or not), with the loader's uint8
    images normalised on the device (to_device). The lr follows the
    per-iteration warm-up + cosine schedule from args.lr to args.min_lr (0 where a stage has no --min-lr) over
    args.epochs, scaled by each group's lr_scale.
    Uses args.accum_iter, epochs, warmup_epochs, lr, min_lr, amp, print_freq, batch_size.
    """
    steps = len(loader) // args.accum_iter
    if steps == 0:
        fail(f"{len(loader.sampler)} training images per process make no full step of --batch-size "
             f"{args.batch_size} with --accum-iter {args.accum_iter}")
    meter, sums = Meter(steps), torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps
    batches = iter(loader)
    for step in range(steps):
        lr = cosine_schedule(epoch + step / steps, args.epochs, args.warmup_epochs, args.lr,
                             getattr(args, "min_lr", 0.0))
        set_lr(optimizer, lr)
        micro_batches = [to_device(next(batches), device) for _ in range(args.accum_iter)]
        loss = accumulate_step(model, optimizer, scaler, micro_batches, loss_fn, device, args.amp)
        sums += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
        if (step + 1) % args.print_freq == 0:
            value = loss.item()
            if not math.isfinite(value):
                fail(f"loss is {value} at epoch {epoch} step {step + 1}; stopping")
            log(f"epoch {epoch} [{step + 1}/{steps}] loss {value:.4f} lr {lr:.3e} "
                f"{meter.line(step + 1, (step + 1) * args.batch_size)}")
    loss_sum, count = all_reduce_sum(sums).tolist()
    if not math.isfinite(loss_sum):
        fail(f"training loss is {loss_sum / count} in epoch {epoch}; stopping")
    return loss_sum / count, lr


def classification_datasets(data, img_size, train_transform, val_transform, num_classes=None, synthetic_size=256):
    """(train set, val set, number of classes).

    data "synthetic": SyntheticImages items 0..synthetic_size-1 for training and the next synthetic_size // 4
    (at least 1) of the same set for validation, num_classes default 10. Otherwise ImageFolder
    DATA/train and DATA/val, which must hold the same classes.
    """
    if data == "synthetic":
        if synthetic_size < 1:
            fail(f"--synthetic-size must be positive, got {synthetic_size}")
        num_classes = num_classes or 10
        num_val = max(1, synthetic_size // 4)
        train = SyntheticImages(synthetic_size, img_size, num_classes, train_transform)
        val = torch.utils.data.Subset(SyntheticImages(synthetic_size + num_val, img_size, num_classes, val_transform),
                                      range(synthetic_size, synthetic_size + num_val))
        return train, val, num_classes
    if not os.path.isdir(data):
        fail(f"data folder {data} does not exist")
    train = image_folder(os.path.join(data, "train"), train_transform)
    val = image_folder(os.path.join(data, "val"), val_transform)
    if train.classes != val.classes:
        fail(f"{data}/train and {data}/val hold different classes ({len(train.classes)} vs {len(val.classes)})")
    if num_classes not in (None, len(train.classes)):
        fail(f"--num-classes {num_classes} but {data}/train holds {len(train.classes)} classes")
    return train, val, len(train.classes)


def accuracy_counts(logits, targets):
    """Top-1 and top-5 hits in a batch: logits (B, C), integer targets (B,) -> float64 (2,)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
    hits = top == targets[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


@torch.no_grad()
def evaluate(model_fn, loader, device, amp):
    """(top-1 %, top-5 %, mean cross-entropy) of model_fn(images) -> logits over a whole evaluation set of
    uint8 images, normalised on the device (to_device).

    Each process counts its share (make_loader(train=False) gives every image to exactly one process) and
    the sums are added over processes, so the result is exact however the set divides.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for batch in loader:
        images, targets = to_device(batch, device)
        with autocast(device, amp):
            logits = model_fn(images).float()  # (B, C)
        sums[:2] += accuracy_counts(logits, targets)
        sums[2] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[3] += len(targets)
    top1, top5, loss, count = all_reduce_sum(sums).tolist()
    return 100 * top1 / count, 100 * top5 / count, loss / count


def fit_classifier(model, trained, loss_fn, train_loader, val_loader, optimizer, scaler, args, device, log=print,
                   before_eval=None, **record):
    """The epoch loop of linprobe.py and finetune.py: resume, then --eval-only or, per epoch, train,
    evaluate, log and save <output-dir>/checkpoint-last.pth.

    model: the whole classifier (evaluated and saved); trained: its DDP-wrapped trained part, which loss_fn
    calls; before_eval: run before each evaluation; record: extra entries for every log line.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    checkpoint = resume(args.output_dir, model, optimizer, scaler, log)
    start_epoch, best_acc1 = (checkpoint["epoch"] + 1, checkpoint["best_acc1"]) if checkpoint else (0, 0.0)
    if args.eval_only:
        if checkpoint is None:
            fail(f"--eval-only needs a trained model: {path} does not exist")
        model.eval()
        acc1, acc5, val_loss = evaluate(model, val_loader, device, args.amp)
        log(f"evaluation of {path}: acc1 {acc1:.2f} acc5 {acc5:.2f} on {len(val_loader.dataset)} images")
        log_json(args.output_dir, dict(epoch=checkpoint["epoch"], eval_only=True, acc1=acc1, acc5=acc5,
                                       val_loss=val_loss))
        return
    for epoch in range(start_epoch, args.epochs):
        set_seed(args.seed + rank + epoch * 1000)  # a resumed run replays the same epoch
        train_loader.sampler.set_epoch(epoch)
        model.train()
        train_loss, lr = train_one_epoch(loss_fn, trained, train_loader, optimizer, scaler, epoch, args, device, log)
        model.eval()
        if before_eval is not None:
            before_eval()
        acc1, acc5, val_loss = evaluate(model, val_loader, device, args.amp)
        best_acc1 = max(best_acc1, acc1)
        log(f"epoch {epoch}: train loss {train_loss:.4f} acc1 {acc1:.2f} acc5 {acc5:.2f} (best {best_acc1:.2f})")
        log_json(args.output_dir, dict(epoch=epoch, train_loss=train_loss, lr=lr, acc1=acc1, acc5=acc5,
                                       val_loss=val_loss, best_acc1=best_acc1, **record))
        if rank == 0:
            save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), epoch=epoch, best_acc1=best_acc1, args=vars(args)), path)
