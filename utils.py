"""Plumbing shared by the stage scripts: errors, distributed set-up, precision, schedules, optimizer
groups, checkpoints, logs (log.jsonl, TensorBoard, W&B), device-side normalisation and the training and evaluation
loops. Model code lives in models.py, datasets and loaders in data.py."""
import argparse
import copy
import ctypes
import errno
import fcntl
import importlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse
from contextlib import nullcontext, suppress

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# Errors


class DataError(Exception):
    """Bad input data (unreadable image, malformed annotation); reported as a one-line error."""


def fail(message):
    """Stop with a one-line error on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def optional_import(module, package, purpose):
    """importlib.import_module(module), or a one-line error saying that `purpose` needs `package`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{purpose} needs the {package} package: pip install {package}")


def run_main(main):
    """Run a stage's main(); data and configuration errors end in one line, not a traceback.

    Errors raised in DataLoader workers arrive wrapped with the worker's traceback: keep its last line. After a
    main() that returns, the process group is destroyed: a process leaving with its group open can abort its peers.
    """
    try:
        main()
    except KeyboardInterrupt as e:
        fail(str(e) or "interrupted")
    except (DataError, ValueError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fail(re.sub(r"^(\w+\.)*\w+Error: ", "", last))
    finally:
        stop_loader_workers()
        release_output_dirs()
    if distributed():
        dist.destroy_process_group()


def stop_loader_workers():
    """End this process's DataLoader workers now. They ignore the stop signals (data.ignore_stop_signals), so an
    exit on an error or a stop signal, with an epoch's iterator still referenced, would otherwise wait for them
    forever at interpreter exit (multiprocessing terminates daemonic children with SIGTERM, then joins them)."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def exit_with_parent(signum):
    """Have Linux send this process `signum` when its parent dies (prctl PR_SET_PDEATHSIG; nothing elsewhere): a
    torchrun worker then stops as on that signal when torchrun is killed, and a loader worker with its process."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1: PR_SET_PDEATHSIG


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


def add_encoder_args(parser, img_size, branch=None, img_help=None):
    """The flags of every script that builds an encoder: --arch, --img-size, --patch-size, --device, the inputs'
    --in-chans, --mean and --std (input_stats) and, with a default `branch`, --pretrained and --branch."""
    from models import ARCHS
    p = parser
    p.add_argument("--arch", default="vit_base", choices=list(ARCHS))
    p.add_argument("--img-size", type=int, default=img_size, help=img_help)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--in-chans", type=int, default=None,
                   help="input channels (default: 3 for pretraining; later stages: what the --pretrained checkpoint "
                        "records, else 3)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per-channel mean of the inputs in [0, 1] (uint8 / 255, uint16 / 65535, float32 as stored); "
                        "default: what the --pretrained checkpoint records, else ImageNet's for 3 channels")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel standard deviation, as --mean")
    if branch is not None:
        p.add_argument("--pretrained", default=None,
                       help="pretrain.py or official ExtreMA checkpoint: a file, or an http(s):// or file:// URL "
                            "downloaded once into torch.hub's cache (none: random initialisation)")
        p.add_argument("--branch", choices=["online", "momentum"], default=branch,
                       help="the encoder of a pretraining checkpoint to use")


def add_common_args(parser, data_help, output_dir, img_size, batch_size, num_workers, print_freq=20, branch=None,
                    img_help=None):
    """The flags every stage shares, with the same names and meanings; defaults are the stage's protocol.
    With a default `branch`, also --pretrained, --branch and --eval-only (the evaluation stages)."""
    p = parser
    p.add_argument("--data", default="synthetic", help=f"{data_help}, or 'synthetic' (generated, no files)")
    p.add_argument("--output-dir", default=output_dir, help="log.jsonl and checkpoint-last.pth go here")
    add_encoder_args(p, img_size, branch, img_help)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch over all processes")
    p.add_argument("--accum-iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="default: bf16 on GPUs that support it, else none")
    p.add_argument("--num-workers", type=int, default=num_workers, help="data-loading processes per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-freq", type=int, default=print_freq, help="steps between progress lines and loss checks")
    p.add_argument("--save-interval", type=float, default=30,
                   help="minutes between checkpoints written during an epoch (0: only at epoch ends)")
    p.add_argument("--report-to", default="none", metavar="TARGETS",
                   help="also write the curves for tensorboard (<output-dir>/tensorboard), wandb, or both "
                        "(tensorboard,wandb); none: log.jsonl only")
    p.add_argument("--wandb-project", default="extrema", help="W&B project of --report-to wandb")
    p.add_argument("--wandb-name", default=None, help="W&B run name (none: W&B's own)")
    if branch is not None:
        p.add_argument("--eval-only", action="store_true", help="evaluate <output-dir>/checkpoint-last.pth")


def add_grad_checkpointing_arg(parser):
    """--grad-checkpointing, the same in every stage that trains an encoder (the model's set_grad_checkpointing)."""
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="memory: recompute the encoder's blocks in the backward instead of storing their "
                             "activations (the same results; about a third more encoder compute)")


def parse_args(parser, argv=None):
    """parser.parse_args(argv), then one-line errors for values of the common flags (and --epochs, --iters,
    --monitor-every, --monitor-per-class where a stage has them) that no run can use, before anything is built."""
    args = parser.parse_args(argv)
    for flag in ("img_size", "patch_size", "batch_size", "accum_iter", "print_freq", "epochs", "iters",
                 "monitor_every", "monitor_per_class"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if getattr(args, "num_workers", 0) < 0:
        fail(f"--num-workers must be at least 0, got {args.num_workers}")
    for target in report_targets(getattr(args, "report_to", "none")):  # a missing package stops the run here
        optional_import(*REPORT_PACKAGES[target], f"--report-to {target}")
    if args.device not in (None, "cuda", "cpu"):
        fail(f"--device must be cuda or cpu, got {args.device!r} (choose GPUs with CUDA_VISIBLE_DEVICES; "
             f"under torchrun each process takes GPU LOCAL_RANK)")
    check_values(args)
    return args


def positive(v):
    return v > 0


def not_negative(v):
    return v >= 0


# the numeric flags of any script whose values must lie in a range: flag -> (test, the range in words)
VALUE_RANGES = {
    **{flag: (positive, "positive") for flag in ("blr", "lr", "temperature", "knn_temperature", "peak_tflops",
                                                 "predictor_lr_scale", "clip_grad")},
    **{flag: (not_negative, "at least 0") for flag in ("warmup_epochs", "warmup_iters", "min_lr", "weight_decay",
                                                       "color_jitter", "mixup", "cutmix")},
    "smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"), "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "reprob": (lambda v: 0 <= v <= 1, "in [0, 1]"), "ema": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "crop_min": (lambda v: 0 < v <= 1, "in (0, 1]"), "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "label_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_values(args):
    """A one-line error for a flag of VALUE_RANGES (where the script has it and it is set) out of its range."""
    for flag, (test, words) in VALUE_RANGES.items():
        value = getattr(args, flag, None)
        if value is not None and not test(value):
            fail(f"--{flag.replace('_', '-')} must be {words}, got {value}")


OUTPUT_DIR_LOCKS = {}  # real path -> the open folder this process holds the lock on


def make_output_dir(path):
    """Create --output-dir (and its parents) or stop with a one-line error: a file in the way, no permission.

    The writing process (RANK 0) then holds an advisory lock on the folder (flock on the folder itself) until it
    exits or release_output_dirs(), so a second run on the same folder stops in one line instead of mixing its
    checkpoints and log lines with the first's. Where the file system has no such locks, nothing is locked."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--output-dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --output-dir {path}: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"--output-dir {path} is not writable")
    real = os.path.realpath(path)
    if int(os.environ.get("RANK", 0)) != 0 or real in OUTPUT_DIR_LOCKS:
        return
    fd = os.open(real, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            fail(f"--output-dir {path} is in use by another run (one run per folder: wait for it to end, or give "
                 f"another --output-dir)")
        return  # no advisory locks on this file system
    OUTPUT_DIR_LOCKS[real] = fd


def release_output_dirs():
    """Let go of the output folders this process holds (run_main does, however a run ends)."""
    while OUTPUT_DIR_LOCKS:
        os.close(OUTPUT_DIR_LOCKS.popitem()[1])


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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: a killed torchrun (SIGUSR1 too) stops the run as SIGTERM
        exit_with_parent(signal.SIGTERM)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def distributed():
    """Whether this process is one of a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank_world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def is_main():
    return rank_world()[0] == 0


def all_reduce_sum(tensor):
    """Sum a tensor over processes in place (no-op in one process) and return it."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed, rank, epoch, step):
    """Seed Python, NumPy and torch from (seed, rank, epoch, step) before a step fetches its batch: its masks,
    drop-path and main-process augmentations are then the same whether or not the run was resumed."""
    set_seed(int(np.random.SeedSequence([seed % 2**64, rank, epoch, step]).generate_state(1)[0]))


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
    """Set every group's lr to lr times its lr_scale (layer-wise decay; 1 when absent), in place where the lr
    is a tensor (CUDA graphs read it from a fixed address)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        else:
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


def check_finite(state, path):
    """One-line error, before anything is written to path, when a floating-point tensor of the weights or the
    optimizer state (state['model'], state['optimizer'], state['state_dict']) is NaN or infinite: a diverged
    run must never replace the last good checkpoint."""
    tensors = {}

    def collect(name, value):
        if torch.is_tensor(value) and value.is_floating_point():
            tensors[name] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{name}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                collect(f"{name}.{i}", item)

    for key in ("model", "optimizer", "state_dict"):
        collect(key, state.get(key))
    if not tensors:
        return
    finite = torch.stack([t.detach().isfinite().all() for t in tensors.values()]).cpu()  # one synchronisation
    if not finite.all():
        first = list(tensors)[int((~finite).nonzero()[0])]
        kept = "; the previous checkpoint is kept" if os.path.isfile(path) else ""
        fail(f"not writing {path}: {int((~finite).sum())} tensor(s) hold NaN or infinite values, e.g. {first} (the "
             f"run diverged: lower the learning rate){kept}")


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, then rename over the old one. Non-finite weights
    or optimizer state are refused before writing (check_finite). A failed write (full disk, quota, file size
    limit) ends in a one-line error naming the file and the cause; the temporary file is removed and the previous
    checkpoint stays as it was."""
    check_finite(state, path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:  # a Python file object: torch.save's failure then carries the OSError
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        kept = "; the previous checkpoint is kept" if os.path.isfile(path) else ""
        fail(f"cannot write {path}: {cause.strerror if cause is not None and cause.strerror else e}{kept}")


def download_once(url):
    """The local copy of an http(s):// or file:// checkpoint in torch.hub's cache (<TORCH_HOME>/hub/checkpoints,
    where torch.hub.load_state_dict_from_url keeps its files), downloaded on first use only; a failed download
    ends in one line and leaves no partial file. Under torchrun the first process of each node downloads while
    the others wait at a barrier."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        fail(f"--pretrained {url} names no file")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if distributed() and not first_on_node:
        dist.barrier()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading {url} to {path}")
        try:
            torch.hub.download_url_to_file(url, path, progress=is_main())
        except Exception as e:  # URLError, HTTPError, OSError: no network, a wrong address, a full disk
            fail(f"cannot download {url}: {' '.join(str(e).split())}")
    if distributed() and first_on_node:
        dist.barrier()
    return path


def load_checkpoint(path):
    """torch.load on CPU with a one-line error for a missing or unreadable file; an http(s):// or file:// URL is
    read from torch.hub's cache, downloaded there the first time (download_once)."""
    if re.match(r"(https?|file)://", path):
        path = download_once(path)
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
        note = load_encoder(encoder, load_checkpoint(path), branch)
    except ValueError as e:
        fail(f"{path}: {e}")
    log(f"loaded the {branch} encoder from {path}" + (f"; {note}" if note else ""))


MIN_STD = 1e-6  # a smaller per-channel std (in [0, 1] units) would blow a nearly constant channel up to noise


def check_stats(in_chans, mean, std):
    """One-line error unless mean and std hold in_chans finite values each and every std is at least MIN_STD."""
    if in_chans < 1:
        fail(f"--in-chans must be at least 1, got {in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        fail(f"--mean and --std need {in_chans} value(s) each (one per input channel), got {len(mean)} and {len(std)}")
    for channel, (m, s) in enumerate(zip(mean, std)):
        if not math.isfinite(m):
            fail(f"--mean of channel {channel} must be finite, got {m}")
        if not (math.isfinite(s) and s >= MIN_STD):
            fail(f"--std of channel {channel} must be finite and at least {MIN_STD:g}, got {s}")


def input_stats(args, log=print, channels=None):
    """Set args.in_chans, args.mean and args.std of a stage that reads an encoder: what the --pretrained checkpoint
    records (models.checkpoint_inputs; an RGB one that records no statistics has ImageNet's), else the flags, else
    3 channels and ImageNet's statistics.

    A flag that contradicts the checkpoint is refused in one line, except --in-chans C with an RGB checkpoint:
    its patch embedding is adapted on load (models.adapt_input_channels) and --mean, --std must then be given.
    channels: the channel counts the stage's data pipeline handles (None: any), others refused in one line."""
    from models import checkpoint_inputs
    in_chans, mean, std = args.in_chans or 3, None, None
    if args.pretrained is not None:
        in_chans, mean, std = checkpoint_inputs(load_checkpoint(args.pretrained))
        if in_chans == 3 and mean is None:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        if args.in_chans not in (None, in_chans):
            if in_chans != 3:
                fail(f"--in-chans {args.in_chans} contradicts {args.pretrained}, which holds {in_chans} channel(s)")
            in_chans, mean, std = args.in_chans, None, None  # adapted on load: the statistics are the data's
        for flag, given, recorded in (("--mean", args.mean, mean), ("--std", args.std, std)):
            if given is not None and recorded is not None and [float(v) for v in given] != list(recorded):
                fail(f"{flag} {' '.join(map(str, given))} contradicts {args.pretrained}, which records "
                     f"{' '.join(f'{v:g}' for v in recorded)}")
    mean = args.mean if mean is None else mean
    std = args.std if std is None else std
    if mean is None and std is None and in_chans == 3:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if mean is None or std is None:
        fail(f"{in_chans} input channel(s) need --mean and --std ({in_chans} values each)")
    check_stats(in_chans, mean, std)
    if channels is not None and in_chans not in channels:
        fail(f"this stage's data pipeline reads {' or '.join(map(str, channels))}-channel images, not {in_chans} "
             f"channel(s)")
    args.in_chans, args.mean, args.std = in_chans, [float(v) for v in mean], [float(v) for v in std]
    if in_chans != 3 or args.mean != list(IMAGENET_MEAN):
        log(f"inputs: {in_chans} channel(s), mean {' '.join(f'{v:.4f}' for v in args.mean)}, "
            f"std {' '.join(f'{v:.4f}' for v in args.std)}")


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


# shape the encoder (the grid sizes pos_embed, the channels the patch embedding): fixed on resume
ARCH_FLAGS = ("arch", "patch_size", "img_size", "in_chans")
# how a run executes, not what it computes: free to change on resume
RUN_FLAGS = ("output_dir", "device", "num_workers", "print_freq", "save_interval", "save_every", "eval_only",
             "compile", "report_to", "wandb_project", "wandb_name", "grad_checkpointing")


def check_resumed_args(saved, args, fixed, path, log=print):
    """A resumed run may not change the flags in `fixed` (the architecture: a one-line error naming them); any
    other change of a training flag (--epochs, --blr, --batch-size, ...) is taken, with a one-line warning."""
    now = vars(args)
    changed = [k for k in saved if k in now and saved[k] != now[k] and k not in RUN_FLAGS
               and not (k == "lr" and "blr" in now)]  # lr follows from --blr in linprobe and finetune
    flag = lambda k: "--" + k.replace("_", "-")
    refused = [k for k in changed if k in fixed]
    if refused:
        fail(f"{path} was trained with {', '.join(f'{flag(k)} {saved[k]}' for k in refused)}, not "
             f"{', '.join(f'{flag(k)} {now[k]}' for k in refused)}: give the same flags or another --output-dir")
    if changed:
        log(f"warning: resuming {path} with changed flags: "
            + ", ".join(f"{flag(k)} {saved[k]} -> {now[k]}" for k in changed))


def epoch_state(model, optimizer, scaler, args, epoch, step, **extra):
    """The checkpoint of an epoch-based run that has done `step` steps of epoch `epoch` (at the end of epoch e:
    epoch e + 1, step 0). Its 'epoch' is the last finished epoch (-1 before the first): resume_position's reading."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch - 1, "step": step, "args": vars(args), **extra}


def resume_position(checkpoint):
    """(epoch, step) where a run continues from an epoch_state checkpoint (None: a fresh run): the first epoch not
    finished and the steps already done in it."""
    return (0, 0) if checkpoint is None else (checkpoint["epoch"] + 1, checkpoint.get("step", 0))


def json_object(line):
    """The JSON object a log line holds, or None (blank, cut short, not an object)."""
    with suppress(json.JSONDecodeError):
        value = json.loads(line)
        return value if isinstance(value, dict) else None


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
REQUEUE_STATUS = 143  # 128 + SIGTERM: what a job ended by SIGTERM reports, so schedulers and scripts requeue on it


class Checkpointer:
    """checkpoint-last.pth and log.jsonl of a run, consistent whatever the moment of a kill, plus the checkpoints
    between epoch ends that stop signals and --save-interval ask for. Every process creates one and calls it.

    save(state, record): rank 0 writes the checkpoint with `record` (the log line it completes) inside, then
    appends the line; resume() puts back a line lost to a kill between the two and drops lines past the
    checkpoint, so the log of a resumed run never repeats or skips a line.
    boundary(...) before each optimizer step: writes a checkpoint when --save-interval minutes have passed since
    the last one, or after SIGTERM, SIGUSR1 (schedulers' notice of preemption or of the time limit) or SIGINT;
    after a signal it then says so in one line and exits with REQUEUE_STATUS; the same command resumes. A
    second Ctrl-C stops at once.
    """

    def __init__(self, args, key="epoch", log=print):
        self.output_dir, self.key, self.log = args.output_dir, key, log
        self.path = os.path.join(args.output_dir, "checkpoint-last.pth")
        if args.save_interval < 0:
            fail(f"--save-interval must be 0 (only at epoch ends) or positive minutes, got {args.save_interval}")
        self.interval = args.save_interval * 60
        self.eval_only = getattr(args, "eval_only", False)
        self.log_path = os.path.join(args.output_dir, "log.jsonl")
        if is_main() and (os.path.isdir(self.log_path) or (os.path.exists(self.log_path)
                                                             and not os.access(self.log_path, os.W_OK))):
            fail(f"{self.log_path} is {'a folder' if os.path.isdir(self.log_path) else 'not writable'}: move it "
                 f"away or give another --output-dir")
        self.record = self.sums = self.signal = self.pending = None
        self.last_save, self.fresh = time.monotonic(), False
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signal.signal(getattr(signal, name), self.on_signal)
        many = rank_world()[1] > 1
        self.group = dist.new_group(backend="gloo") if many else None  # flags travel on the CPU

    def on_signal(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            held = (f"{self.path} holds the last saved state" if os.path.isfile(self.path)
                    else "no checkpoint was written")
            raise KeyboardInterrupt(f"interrupted by a second Ctrl-C; {held}")
        self.signal = signal.Signals(signum).name

    def local_flags(self):
        due = self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        return torch.tensor([self.signal is not None, due], dtype=torch.float32)

    def resume(self, model, optimizer, scaler, args, fixed=ARCH_FLAGS):
        """Continue from checkpoint-last.pth when it exists: refuse changed `fixed` flags, load model, optimizer
        and loss scaler, and make log.jsonl end with the checkpoint's line. Returns the checkpoint, or None."""
        checkpoint = resume_checkpoint(self.output_dir)
        if checkpoint is None:
            if not self.eval_only:
                self.set_aside_log()
            return None
        if not isinstance(checkpoint, dict):
            fail(f"{self.path} is not a checkpoint of this stage (not a dict): move it away or give another "
                 f"--output-dir")
        missing = [k for k in ("model", "optimizer", "scaler", self.key) if k not in checkpoint]
        if missing:
            fail(f"{self.path} is not a checkpoint of this stage (no {', '.join(missing)}): move it away or give "
                 f"another --output-dir")
        check_resumed_args(checkpoint.get("args", {}), args, fixed, self.path, self.log)
        load_resumed(model, checkpoint["model"], self.path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        self.record = checkpoint.get("log")
        if "sums_per_process" in checkpoint:  # per process: right for any number of processes now
            self.sums = checkpoint["sums_per_process"] * rank_world()[1]
        else:  # written before sums_per_process: the total over that run's processes
            self.sums = checkpoint.get("sums")
        if "log" in checkpoint and is_main():  # checkpoints written before this format leave the log alone
            self.sync_log(checkpoint["log"])
        if self.key == "iter":
            where = f"iteration {checkpoint['iter']}"
        elif checkpoint.get("step") or checkpoint["epoch"] < 0:
            where = f"epoch {checkpoint['epoch'] + 1} step {checkpoint['step']}"
        else:
            where = f"epoch {checkpoint['epoch']} done"
        self.log(f"resumed from {self.path} ({where})")
        return checkpoint

    def set_aside_log(self):
        """A fresh run (no checkpoint-last.pth) over an old log.jsonl: keep it as log.jsonl.<n>, say so, start anew."""
        if not is_main() or not os.path.isfile(self.log_path):
            return
        n = 1
        while os.path.lexists(f"{self.log_path}.{n}"):
            n += 1
        os.replace(self.log_path, f"{self.log_path}.{n}")
        self.log(f"{self.log_path} without {self.path} is an earlier run's: kept as log.jsonl.{n}; this run starts "
                 f"a fresh log")

    def sync_log(self, record):
        """Drop log lines past `record` (the checkpoint's last line, None before the first), and append it
        when a kill came between the checkpoint and its line. Blank lines and lines that are not JSON (a line cut
        short by a kill or a full disk) are dropped, with a one-line warning."""
        path = self.log_path
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
        records = [json_object(line) for line in lines]
        bad = [str(number) for number, r in enumerate(records, 1) if r is None]
        if bad:
            self.log(f"warning: {path}: dropped line(s) {', '.join(bad)}, blank or not a JSON object (cut short by "
                     f"a kill?)")
        done = -1 if record is None else record[self.key]
        kept = [(line, r) for line, r in zip(lines, records) if r is not None and r.get(self.key, -1) <= done]
        if record is not None and record not in [r for _, r in kept]:
            kept.append((json.dumps(record), record))
        kept = [line for line, _ in kept]
        if kept != lines:
            with open(f"{path}.tmp", "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(f"{path}.tmp", path)

    def partial_sums(self, zeros):
        """Running sums (losses, steps) of a part-done epoch or block saved by boundary(), in rank 0 (the
        others start from zero as their shares are in them), once; else `zeros`. Saved per process and multiplied
        by the number of processes now, they are right when a run resumes on another number of processes."""
        sums, self.sums = self.sums, None
        return zeros if sums is None or not is_main() else sums.to(zeros.device, zeros.dtype)

    def save(self, state, record=None):
        """Every process: rank 0 writes the checkpoint, then appends `record` (None between epoch ends)."""
        if record is not None:
            self.record = record
        if not is_main():
            check_finite(state, self.path)  # in every process, so that all stop on the same step
        else:
            save_checkpoint({**state, "log": self.record}, self.path)
            if record is not None:
                log_json(self.output_dir, record)
        self.last_save, self.fresh = time.monotonic(), True

    def boundary(self, state_fn, sums, where):
        """Before an optimizer step, in every process: save state_fn() (the checkpoint of this position) with the
        running `sums` (summed over processes, divided by their number) when it is due, unless a loss in them is
        not finite (then stop in one line); after a stop signal, exit with REQUEUE_STATUS.

        The processes act on the same step: their flags are summed on the CPU (gloo), asynchronously, and
        read at the next boundary, so no step waits for the accelerator or for another process's clock."""
        if self.group is None:
            stop, due = self.local_flags().tolist()
        else:  # the flags posted at the previous boundary
            stop, due = 0, 0
            if self.pending is not None:
                self.pending.wait()
                stop, due = self.flags.tolist()
        if (stop or due) and not self.fresh:
            total = all_reduce_sum(sums.clone()).cpu()
            if not total.isfinite().all():  # the weights after a non-finite loss are not worth keeping
                fail(f"non-finite loss before {where}: not writing {self.path}"
                     + ("; the previous checkpoint is kept" if os.path.isfile(self.path) else ""))
            self.save({**state_fn(), "sums_per_process": total / rank_world()[1]})
        if stop:
            self.log(f"{self.signal or 'a stop signal in another process'}: saved {self.path} at {where}; "
                     f"exiting with status {REQUEUE_STATUS} (requeue and rerun the same command to resume)")
            if self.group is not None:
                dist.barrier(group=self.group)  # no process exits (and makes a launcher kill the rest) before the write
                dist.destroy_process_group()
            raise SystemExit(REQUEUE_STATUS)
        self.fresh = False
        if self.group is not None:
            self.flags = self.local_flags()
            self.pending = dist.all_reduce(self.flags, group=self.group, async_op=True)


def log_json(output_dir, record):
    """Append one JSON object per line to <output-dir>/log.jsonl (main process only)."""
    if is_main():
        path = os.path.join(output_dir, "log.jsonl")
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            fail(f"cannot write {path}: {e.strerror or e}")


REPORT_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def report_targets(report_to):
    """The writers that --report-to names (none, tensorboard, wandb, tensorboard,wandb), or a one-line error."""
    targets = [] if report_to == "none" else report_to.split(",")
    if any(t not in REPORT_PACKAGES for t in targets) or len(set(targets)) < len(targets):
        fail(f"--report-to takes none, tensorboard, wandb or tensorboard,wandb, got {report_to!r}")
    return targets


class Reporter:
    """The curves of a run for TensorBoard (event files in <output-dir>/tensorboard) and Weights & Biases, as
    --report-to asks; written by the main process only, against the optimizer step (step n: after n optimizer
    steps), so a run resumed after `start_step` steps continues its curves. TensorBoard hides what an earlier run
    wrote past start_step (a killed run's steps after the checkpoint; everything when start_step is 0); W&B resumes
    the run whose id <output-dir>/wandb-run-id keeps, its files under <output-dir>/wandb (or $WANDB_DIR). The
    packages are imported here only (parse_args checked them).
    """

    def __init__(self, args, start_step=0):
        targets = report_targets(args.report_to) if is_main() else []
        self.tensorboard = self.wandb = None
        if "tensorboard" in targets:
            tensorboard = optional_import(*REPORT_PACKAGES["tensorboard"], "--report-to tensorboard")
            self.tensorboard = tensorboard.SummaryWriter(os.path.join(args.output_dir, "tensorboard"),
                                                         purge_step=start_step + 1 if start_step else 0)
        if "wandb" in targets:
            wandb = optional_import(*REPORT_PACKAGES["wandb"], "--report-to wandb")
            id_path, run_id = os.path.join(args.output_dir, "wandb-run-id"), None
            if start_step > 0 and os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            try:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_name, id=run_id, resume="allow",
                                        config=vars(args), dir=os.environ.get("WANDB_DIR", args.output_dir))
            except wandb.errors.Error as e:  # not logged in, no network: one line
                fail(f"--report-to wandb: {str(e).strip().splitlines()[-1]} (WANDB_MODE=offline logs offline)")
            with open(id_path, "w") as f:
                f.write(self.wandb.id + "\n")

    def scalars(self, step, values):
        """Write {tag: number or one-element tensor} at optimizer step `step`; None values are left out. A
        device tensor is read here, so call this where the loss is read (print steps, evaluations)."""
        if self.tensorboard is None and self.wandb is None:
            return
        values = {tag: float(v) for tag, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class Meter:
    """Throughput and ETA for progress lines."""

    def __init__(self, total_steps):
        self.total, self.start = total_steps, time.time()

    def rate(self, images):
        """Images per second since the start."""
        return images / max(time.time() - self.start, 1e-9)

    def line(self, step, images):
        eta = (time.time() - self.start) / max(step, 1) * (self.total - step)
        return f"{self.rate(images):.1f} img/s  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"


# ----------------------------------------------------------------------------------------------------
# Batches on the device


FULL_SCALE = {torch.uint8: 255, torch.uint16: 65535}  # the value that maps to 1; floating point: 1 (as stored)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Images (..., C, H, W) on any device -> float32 (x / s - mean) / std per channel, s the dtype's full scale:
    uint8 / 255, uint16 / 65535, floating point as stored. The loaders ship the decoded dtype (uint8 is a
    quarter of the bytes of float32) and this runs where the batch lands, without a host synchronisation."""
    if images.dtype not in FULL_SCALE and not images.is_floating_point():
        raise ValueError(f"images of dtype {images.dtype}: expected uint8, uint16 or floating point")
    if not len(mean) == len(std) == images.shape[-3]:
        raise ValueError(f"{len(mean)} mean and {len(std)} std values for images of {images.shape[-3]} channels")
    scale = FULL_SCALE.get(images.dtype, 1)
    stats = torch.tensor((mean, std), dtype=torch.float32).mul_(scale).to(images.device, non_blocking=True)
    mean, std = stats[:, :, None, None].unbind()  # (C, 1, 1) each
    return (images.float() - mean) / std


def to_device(batch, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A batch (inputs, targets) on device, images (B, C, H, W) of any stored dtype (uint8, uint16, float32)
    normalised there into float32 (other inputs as they are)."""
    images, targets = batch
    images = images.to(device, non_blocking=True)
    return normalize(images, mean, std) if images.ndim == 4 else images, targets.to(device, non_blocking=True)


def epoch_batches(loader, epoch, skip_batches=0):
    """The batches of one epoch of a make_loader(train=True) loader, from batch `skip_batches` on (over shards,
    data.ShardBatches makes the batches and skips them)."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        loader.dataset.set_epoch(epoch, skip_batches)
    else:
        loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    return iter(loader)


# ----------------------------------------------------------------------------------------------------
# Training steps and classification evaluation (linear probe, fine-tuning)


def accumulate_step(model, optimizer, scaler, micro_batches, loss_fn, device, amp, clip_grad=None):
    """One optimizer step over micro-batches (lists of arguments on the device): loss_fn(*micro_batch) under
    autocast, then the gradients' total norm, clipped to clip_grad (None: not clipped), then the step.

    The same update as one large batch for a loss that is a mean over images: each micro-batch's loss is
    divided by their number, and a DDP model all-reduces gradients only on the last one.
    Returns the mean loss and the gradient norm before clipping (under fp16 of the unscaled gradients; not finite
    where the scaler skips the step), as device tensors (no host synchronisation).
    """
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext():
            with autocast(device, amp):
                loss = loss_fn(*batch)
            scaler.scale(loss / len(micro_batches)).backward()
        total = total + loss.detach()
    scaler.unscale_(optimizer)  # fp16: the gradients' true values (a no-op for a disabled scaler)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip_grad is None else clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches), grad_norm


def finite_and_count(x):
    """(x, 1) for a finite scalar tensor x, else (0, 0): summed over steps, the mean of the finite values."""
    finite = x.isfinite()
    return torch.stack([torch.where(finite, x, 0.0), finite.to(x.dtype)])


def train_one_epoch(loss_fn, model, loader, optimizer, scaler, epoch, args, device, checkpointer, state_fn,
                    start_step=0, log=print, reporter=None):
    """One epoch of optimizer steps of args.accum_iter micro-batches each, from step start_step on (resumed
    mid-epoch); returns (mean loss, last lr, mean gradient norm before clipping of the steps taken).

    loss_fn(images, targets) -> scalar loss through `model` (DDP-wrapped or not), with the loader's images
    normalised on the device with args.mean, args.std (to_device). The lr follows the
    per-iteration warm-up + cosine schedule from args.lr to args.min_lr (0 where a stage has no --min-lr) over
    args.epochs, scaled by each group's lr_scale. Before each step, checkpointer.boundary may save
    state_fn(step); at print steps, `reporter` writes the loss, lr and gradient norm. Uses args.accum_iter, epochs,
    warmup_epochs, lr, min_lr, clip_grad (None where a stage has no --clip-grad), amp, print_freq, batch_size, seed,
    mean, std.
    """
    rank = rank_world()[0]
    steps = len(loader) // args.accum_iter
    if steps == 0:
        fail(f"{len(loader.sampler)} training images per process make no full step of --batch-size "
             f"{args.batch_size} with --accum-iter {args.accum_iter}")
    meter = Meter(steps - start_step)
    # loss sum, steps, sum and count of the finite gradient norms
    sums = checkpointer.partial_sums(torch.zeros(4, dtype=torch.float64, device=device))
    batches = epoch_batches(loader, epoch, start_step * args.accum_iter)
    for step in range(start_step, steps):
        checkpointer.boundary(lambda: state_fn(step), sums, f"epoch {epoch} step {step}/{steps}")
        seed_step(args.seed, rank, epoch, step)
        lr = cosine_schedule(epoch + step / steps, args.epochs, args.warmup_epochs, args.lr,
                             getattr(args, "min_lr", 0.0))
        set_lr(optimizer, lr)
        micro_batches = [to_device(next(batches), device, args.mean, args.std) for _ in range(args.accum_iter)]
        loss, grad_norm = accumulate_step(model, optimizer, scaler, micro_batches, loss_fn, device, args.amp,
                                          getattr(args, "clip_grad", None))
        sums += torch.cat([torch.stack([loss.double(), torch.ones_like(sums[0])]),
                           finite_and_count(grad_norm.double())])
        if (step + 1) % args.print_freq == 0:
            value, norm = torch.stack([loss.float(), grad_norm.float()]).tolist()
            if not math.isfinite(value):
                fail(f"loss is {value} at epoch {epoch} step {step + 1}; stopping")
            log(f"epoch {epoch} [{step + 1}/{steps}] loss {value:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
                f"{meter.line(step + 1 - start_step, (step + 1 - start_step) * args.batch_size)}")
            if reporter is not None:
                reporter.scalars(epoch * steps + step + 1,
                                 {"train/loss": value, "train/lr": lr, "train/grad_norm": norm})
    loss_sum, count, norm_sum, norm_count = all_reduce_sum(sums).tolist()
    if not math.isfinite(loss_sum):
        fail(f"training loss is {loss_sum / count} in epoch {epoch}; stopping")
    return loss_sum / count, lr, norm_sum / norm_count if norm_count else None


def accuracy_counts(logits, targets):
    """Top-1 and top-5 hits in a batch: logits (B, C), integer targets (B,) -> float64 (2,)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
    hits = top == targets[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


@torch.no_grad()
def evaluate(model_fn, loader, device, amp, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(top-1 %, top-5 %, mean cross-entropy) of model_fn(images) -> logits over a whole evaluation set of
    images normalised on the device with mean, std (to_device).

    Each process counts its share (make_loader(train=False) gives every image to exactly one process) and
    the sums are added over processes, so the result is exact however the set divides.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for batch in loader:
        images, targets = to_device(batch, device, mean, std)
        with autocast(device, amp):
            logits = model_fn(images).float()  # (B, C)
        sums[:2] += accuracy_counts(logits, targets)
        sums[2] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[3] += len(targets)
    top1, top5, loss, count = all_reduce_sum(sums).tolist()
    return 100 * top1 / count, 100 * top5 / count, loss / count


def fit_classifier(model, trained, loss_fn, train_loader, val_loader, optimizer, scaler, args, device, log=print,
                   before_eval=None, fixed=ARCH_FLAGS, **record):
    """The epoch loop of linprobe.py and finetune.py: resume, then --eval-only or, per epoch, train, evaluate,
    save <output-dir>/checkpoint-last.pth and log (Checkpointer: in this order, also mid-epoch when asked).

    model: the whole classifier (evaluated and saved); trained: its DDP-wrapped trained part, which loss_fn
    calls; before_eval: run before each evaluation; fixed: flags a resumed run may not change; record: extra
    entries for every log line.
    """
    checkpointer = Checkpointer(args, log=log)
    checkpoint = checkpointer.resume(model, optimizer, scaler, args, fixed)
    start_epoch, start_step = resume_position(checkpoint)
    best_acc1 = 0.0 if checkpoint is None else checkpoint["best_acc1"]
    if args.eval_only:
        if checkpoint is None:
            fail(f"--eval-only needs a trained model: {checkpointer.path} does not exist")
        model.eval()
        acc1, acc5, val_loss = evaluate(model, val_loader, device, args.amp, args.mean, args.std)
        log(f"evaluation of {checkpointer.path}: acc1 {acc1:.2f} acc5 {acc5:.2f} on {len(val_loader.dataset)} images")
        log_json(args.output_dir, dict(epoch=checkpoint["epoch"], eval_only=True, acc1=acc1, acc5=acc5,
                                       val_loss=val_loss))
        return

    def state(epoch, step):
        return epoch_state(model, optimizer, scaler, args, epoch, step, best_acc1=best_acc1)

    steps = len(train_loader) // args.accum_iter
    reporter = Reporter(args, start_epoch * steps + start_step)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        train_loss, lr, grad_norm = train_one_epoch(loss_fn, trained, train_loader, optimizer, scaler, epoch, args,
                                                    device, checkpointer, lambda step: state(epoch, step),
                                                    start_step if epoch == start_epoch else 0, log, reporter)
        model.eval()
        if before_eval is not None:
            before_eval()
        acc1, acc5, val_loss = evaluate(model, val_loader, device, args.amp, args.mean, args.std)
        best_acc1 = max(best_acc1, acc1)
        log(f"epoch {epoch}: train loss {train_loss:.4f} acc1 {acc1:.2f} acc5 {acc5:.2f} (best {best_acc1:.2f})")
        checkpointer.save(state(epoch + 1, 0), dict(epoch=epoch, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                                                    acc1=acc1, acc5=acc5, val_loss=val_loss, best_acc1=best_acc1,
                                                    **record))
        reporter.scalars((epoch + 1) * steps, {"epoch/loss": train_loss, "eval/acc1": acc1, "eval/acc5": acc5,
                                               "eval/loss": val_loss})
    reporter.close()


# ----------------------------------------------------------------------------------------------------
# k-nearest-neighbour evaluation of frozen features (linprobe.py --knn, pretrain.py --monitor)


def all_gather_rows(x):
    """Concatenate the (n_r, ...) tensors of all processes along dim 0, in rank order (n_r may differ)."""
    if rank_world()[1] == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = x.new_zeros((max(sizes),) + x.shape[1:])
    padded[:x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)])


@torch.no_grad()
def extract_features(feature_fn, loader, device, amp, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """L2-normalised float32 features (n, D) and labels (n,) of this process's share of an evaluation loader,
    its images normalised with mean, std."""
    features, labels = [], []
    for batch in loader:
        images, targets = to_device(batch, device, mean, std)
        with autocast(device, amp):
            out = feature_fn(images)
        features.append(F.normalize(out.float(), dim=-1))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_counts(train_features, train_labels, features, labels, num_classes, ks, temperature=0.07, chunk=256):
    """Weighted k-NN classification (DINO's): the k most cosine-similar training images vote for their class
    with weight exp(similarity / temperature). All features L2-normalised.

    Returns float64 (len(ks), 2): top-1 and top-5 hits for each k. The similarities are computed for chunks
    of `chunk` query images at a time, so memory stays at chunk x len(train_features).
    """
    if max(ks) > len(train_features):
        raise ValueError(f"k = {max(ks)} nearest neighbours asked for, but the training set holds only "
                         f"{len(train_features)} images")
    hits = torch.zeros(len(ks), 2, dtype=torch.float64, device=features.device)
    for start in range(0, len(features), chunk):
        similarity = features[start:start + chunk] @ train_features.T  # (c, N_train)
        top_similarity, top_index = similarity.topk(max(ks), dim=1)  # (c, k_max), most similar first
        weights, votes = (top_similarity / temperature).exp(), train_labels[top_index]
        for i, k in enumerate(ks):
            scores = weights.new_zeros(len(weights), num_classes).scatter_add_(1, votes[:, :k], weights[:, :k])
            hits[i] += accuracy_counts(scores, labels[start:start + chunk])
    return hits


def knn_evaluate(feature_fn, train_loader, val_loader, num_classes, device, amp, ks=(10, 20, 100, 200),
                 temperature=0.07, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """{k: (top-1 %, top-5 %)} of the weighted k-NN classifier on frozen features feature_fn(images) -> (B, D).

    Both loaders come from make_loader(train=False): every process extracts its share, the training
    features of all processes are gathered, and each validation image is counted once, so the result is the
    one-process result however the sets divide. The images are normalised with mean, std.
    """
    train_features, train_labels = extract_features(feature_fn, train_loader, device, amp, mean, std)
    train_features, train_labels = all_gather_rows(train_features), all_gather_rows(train_labels)
    features, labels = extract_features(feature_fn, val_loader, device, amp, mean, std)
    hits = all_reduce_sum(knn_counts(train_features, train_labels, features, labels, num_classes, ks, temperature))
    count = all_reduce_sum(torch.tensor(float(len(labels)), dtype=torch.float64, device=device)).item()
    return {k: (100 * top1 / count, 100 * top5 / count) for k, (top1, top5) in zip(ks, hits.tolist())}
