"""The job around the stages, none of their method: errors, flags, processes, precision, lr schedules, atomic
checkpoints, and `Run`, the one object a stage's loop talks to (resume, saves on signals, running means, progress
lines, log.jsonl, TensorBoard, W&B). Loops are in the stages, model code in models.py, inputs and data in data.py."""
import argparse
import copy
import ctypes
import errno
import fcntl
import importlib
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import random
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext, suppress

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import models

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_HELP = "input side (default: the --pretrained checkpoint's, else 224)"


# ============ Errors ============


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
    """Run a stage's main(); data and configuration errors end in one line, not a traceback (of an error in a
    loader worker, its last line). Then the process group is destroyed: left open, it can abort the peers."""
    try:
        main()
    except KeyboardInterrupt as e:
        fail(str(e) or "interrupted")
    except (DataError, ValueError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fail(re.sub(r"^(\w+\.)*\w+Error: ", "", last))
    finally:
        # end the DataLoader workers now: they ignore stop signals (data.ignore_stop_signals), so an exit with an
        # epoch's iterator still referenced would wait for them forever (SIGTERM, then join, at exit)
        for worker in multiprocessing.active_children():
            worker.kill()
            worker.join()
        release_output_dirs()
    if distributed():
        dist.destroy_process_group()


def exit_with_parent(signum):
    """Have Linux send this process `signum` when its parent dies (prctl PR_SET_PDEATHSIG; nothing elsewhere): a
    torchrun worker then stops as on that signal when torchrun is killed, and a loader worker with its process."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # 1: PR_SET_PDEATHSIG


# ============ Command line ============


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the stage docstring's layout and shows each value flag's default unless its help explains it."""

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
    --in-chans, --mean and --std (data.encoder_inputs) and, with a default `branch`, --pretrained and --branch."""
    p = parser
    reads = branch is not None  # a stage that reads an encoder: its architecture comes from --pretrained
    p.add_argument("--arch", default=None if reads else "vit_base", choices=list(models.ARCHS),
                   help="default: the --pretrained checkpoint's, else vit_base" if reads else None)
    p.add_argument("--img-size", type=int, default=img_size, help=img_help)
    p.add_argument("--patch-size", type=int, default=None if reads else 16,
                   help="default: the --pretrained checkpoint's, else 16" if reads else None)
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


def add_grad_checkpointing_arg(parser):  # the same in every stage that trains an encoder
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


# numeric flags of any script -> (test of their value, the range in words); NaN and infinity fail every test
positive, not_negative = (lambda v: 0 < v < math.inf), (lambda v: 0 <= v < math.inf)
VALUE_RANGES = {
    **dict.fromkeys(("blr", "lr", "temperature", "knn_temperature", "peak_tflops", "predictor_lr_scale", "clip_grad"),
                    (positive, "positive")),
    **dict.fromkeys(("warmup_epochs", "warmup_iters", "min_lr", "weight_decay", "color_jitter", "mixup", "cutmix",
                     "save_interval"), (not_negative, "at least 0")),
    **dict.fromkeys(("smoothing", "drop_path"), (lambda v: 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(("reprob", "ema"), (lambda v: 0 <= v <= 1, "in [0, 1]")),
    **dict.fromkeys(("crop_min", "layer_decay", "label_fraction"), (lambda v: 0 < v <= 1, "in (0, 1]")),
}


def check_values(args):
    """A one-line error for a flag of VALUE_RANGES (where the script has it and it is set) out of its range."""
    for flag, (test, words) in VALUE_RANGES.items():
        value = getattr(args, flag, None)
        if value is not None and not test(value):
            fail(f"--{flag.replace('_', '-')} must be {words}, got {value}")


OUTPUT_DIR_LOCKS = {}  # real path -> the open folder this process holds the lock on


def make_output_dir(path):
    """Create --output-dir or stop in one line (a file in the way, no permission). RANK 0 then holds a flock on
    the folder until it exits, so a second run on it stops in one line instead of mixing its files with the first's
    (where the file system has no such locks, nothing is locked)."""
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


# ============ Processes, devices, precision ============


def init_distributed(device):
    """(rank, world_size, torch.device), torch.distributed set up under torchrun (NCCL on CUDA, gloo on CPU)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA device is visible")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: a killed torchrun (SIGUSR1 too) stops the run as SIGTERM
        exit_with_parent(signal.SIGTERM)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def distributed():  # whether this process is one of a torch.distributed process group
    return dist.is_available() and dist.is_initialized()


def rank_world():  # (rank, world size) of this process: (0, 1) outside torchrun
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def is_main():
    return rank_world()[0] == 0


def all_reduce_sum(tensor):  # summed over processes in place (nothing in one process), returned
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def no_sync(model, skip):
    """model.no_sync() for a DDP model when `skip` (a micro-batch before the last: no all-reduce yet), else nothing."""
    return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else nullcontext()


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed, rank, epoch, step):
    """Seed Python, NumPy and torch from (seed, rank, epoch, step) before a step fetches its batch: its masks,
    drop-path and main-process augmentations are then the same whether or not the run was resumed."""
    set_seed(int(np.random.SeedSequence([seed % 2**64, rank, epoch, step]).generate_state(1)[0]))


def resolve_amp(amp, device):  # --amp's default: bf16 on GPUs that support it, else none (float32)
    return amp or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none")


def autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, amp):
    """Loss scaling for fp16 only; a disabled scaler is a pass-through for bf16 and float32."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def local_batch_size(batch_size, world_size, accum_iter):
    """Per-process micro-batch of a global --batch-size, or a one-line error when it does not divide."""
    if batch_size < 1 or accum_iter < 1 or batch_size % (world_size * accum_iter):
        fail(f"--batch-size {batch_size} does not divide over {world_size} process(es) x --accum-iter {accum_iter}")
    return batch_size // (world_size * accum_iter)


def steps_per_epoch(loader, args):  # optimizer steps of --accum-iter micro-batches per epoch, or one line
    steps = len(loader) // args.accum_iter
    if steps == 0:
        fail(f"{len(loader.sampler)} training images per process make no full step of --batch-size "
             f"{args.batch_size} with --accum-iter {args.accum_iter}")
    return steps


# ============ Schedules and optimizer groups ============


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


def adamw(groups, lr, betas, device):
    """AdamW with the fused single-pass kernel where torch has one (CUDA, CPU), else the foreach one."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)


# ============ Checkpoints and logs ============


def check_finite(state, path):
    """One-line error, before anything is written to path, when a floating-point tensor of the weights or the
    optimizer state is NaN or infinite: a diverged run must never replace the last good checkpoint."""
    def tensors(name, value):  # (name, tensor) of every floating-point tensor in nested dicts and lists
        if isinstance(value, (dict, list, tuple)):
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                yield from tensors(f"{name}.{key}", item)
        elif torch.is_tensor(value) and value.is_floating_point():
            yield name, value

    found = dict(item for key in ("model", "optimizer", "state_dict") for item in tensors(key, state.get(key)))
    finite = torch.stack([t.detach().isfinite().all() for t in found.values()]).cpu() if found else torch.ones(1)
    if not finite.all():  # one synchronisation
        kept = "; the previous checkpoint is kept" if os.path.isfile(path) else ""
        fail(f"not writing {path}: {int((~finite).sum())} tensor(s) hold NaN or infinite values, e.g. "
             f"{list(found)[int((~finite).nonzero()[0])]} (the run diverged: lower the learning rate){kept}")


def save_checkpoint(state, path):
    """Write atomically (a temporary file, then a rename over the old one), never non-finite state (check_finite);
    a failed write (full disk, quota) ends in one line naming the cause, and the previous checkpoint stays."""
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


def load_checkpoint(path):
    """models.load_checkpoint (a file or URL, read without running code from it) with a one-line error. Under
    torchrun the first process of each node downloads a URL while the others wait at a barrier."""
    download = re.match(r"https?://", path) and not os.path.exists(models.cached_file(path))
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if download and distributed() and not first_on_node:
        dist.barrier()
    try:
        checkpoint = models.load_checkpoint(path, log=print if is_main() else None)
    except ValueError as e:
        fail(e)
    if download and distributed() and first_on_node:
        dist.barrier()
    return checkpoint


# shape the encoder (the grid sizes pos_embed, the channels the patch embedding) and its inputs: fixed on resume
ARCH_FLAGS = ("arch", "patch_size", "img_size", "in_chans", "mean", "std")  # the model learned on these inputs
# how a run executes, not what it computes: free to change on resume
RUN_FLAGS = ("output_dir", "device", "num_workers", "print_freq", "save_interval", "save_every", "eval_only",
             "compile", "report_to", "wandb_project", "wandb_name", "grad_checkpointing")


def check_resumed_args(saved, args, fixed, path, log=print):
    """A resumed run may not change the flags in `fixed` (one line naming them); other training flags' changes
    (--epochs, --blr, ...) are taken, with a one-line warning."""
    now = vars(args)
    for k in fixed:  # a fixed flag left unset (--norm-stats auto's statistics) takes the run's value
        if now.get(k, 0) is None and k in saved:
            now[k] = saved[k]
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


def json_object(line):  # the JSON object a log line holds, or None (blank, cut short, not an object)
    with suppress(json.JSONDecodeError):
        value = json.loads(line)
        return value if isinstance(value, dict) else None


def log_json(output_dir, record):  # one JSON object per line of <output-dir>/log.jsonl, by the main process
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
    """The curves of a run for TensorBoard (<output-dir>/tensorboard) and W&B, as --report-to asks, written by the
    main process against the optimizer step, so a run resumed after `start_step` steps continues its curves:
    TensorBoard hides what a killed run wrote past start_step; W&B resumes the run id in <output-dir>/wandb-run-id."""

    def __init__(self, args, start_step=0):
        targets = report_targets(args.report_to) if is_main() else []
        self.tensorboard = self.wandb = None
        if "tensorboard" in targets:
            tensorboard = optional_import(*REPORT_PACKAGES["tensorboard"], "--report-to tensorboard")
            self.tensorboard = tensorboard.SummaryWriter(os.path.join(args.output_dir, "tensorboard"),
                                                         purge_step=start_step + 1 if start_step else 0)
        if "wandb" in targets:
            wandb = optional_import(*REPORT_PACKAGES["wandb"], "--report-to wandb")
            id_path = os.path.join(args.output_dir, "wandb-run-id")
            run_id = pathlib.Path(id_path).read_text().strip() if start_step > 0 and os.path.exists(id_path) else None
            try:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_name, id=run_id, resume="allow",
                                        config=vars(args), dir=os.environ.get("WANDB_DIR", args.output_dir))
            except wandb.errors.Error as e:  # not logged in, no network: one line
                fail(f"--report-to wandb: {str(e).strip().splitlines()[-1]} (WANDB_MODE=offline logs offline)")
            pathlib.Path(id_path).write_text(self.wandb.id + "\n")

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


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
REQUEUE_STATUS = 143  # 128 + SIGTERM: what a job ended by SIGTERM reports, so schedulers and scripts requeue on it
VALUE_FORMATS = {"lr": ".3e", "momentum": ".5f"}  # progress-line formats; other values ".4f"


class Run:
    """The job around a stage's training loop, one in every process:

        run = utils.Run(args, steps_per_epoch, log)      # key="iter": steps are iterations, epoch 0
        checkpoint = run.resume(model, optimizer, scaler, fixed_flags)   # None: a fresh run
        for epoch in range(run.start_epoch, args.epochs):
            for step in run.steps(epoch, first):        # saves (and exits) between steps when asked
                ...                                     # forward, backward, optimizer step
                run.log_step(loss=loss, lr=lr, grad_norm=grad_norm)   # tensors stay on the device
            record = {"epoch": epoch, **run.end_epoch()}   # means over the epoch's steps and processes
            run.save(epoch + 1, 0, record)              # checkpoint-last.pth, then its log line and curves

    A checkpoint holds model, optimizer, scaler, args, position, `run.extra`, a part-done epoch's running sums
    and the log line it completes: a resumed run's log never repeats or skips a line. After SIGTERM, SIGUSR1 (a
    scheduler's notice) or SIGINT the run saves before its next step and exits with REQUEUE_STATUS, to resume
    with the same command (a second Ctrl-C stops at once). --save-interval also saves between steps."""

    def __init__(self, args, steps_per_epoch, log=print, key="epoch", stage=None):
        self.args, self.steps_per_epoch, self.log, self.key, self.stage = args, steps_per_epoch, log, key, stage
        self.output_dir = args.output_dir
        self.path, self.log_path = (os.path.join(args.output_dir, f) for f in ("checkpoint-last.pth", "log.jsonl"))
        if not args.save_interval >= 0:  # parse_args refuses it; a Run built in code too
            fail(f"--save-interval must be 0 (only at epoch ends) or positive minutes, got {args.save_interval}")
        if is_main() and (os.path.isdir(self.log_path) or (os.path.exists(self.log_path)
                                                             and not os.access(self.log_path, os.W_OK))):
            fail(f"{self.log_path} is {'a folder' if os.path.isdir(self.log_path) else 'not writable'}: move it "
                 f"away or give another --output-dir")
        self.extra, self.saved_sums, self.counted, self.numbers, self.epoch_curves = {"stage": stage}, {}, set(), {}, {}
        self.record = self.signal = self.pending = self.reporter = self.resumed_at = None
        self.start_epoch, self.start_step, self.last_save, self.fresh = 0, 0, time.monotonic(), False
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signal.signal(getattr(signal, name), self.on_signal)
        self.group = dist.new_group(backend="gloo") if rank_world()[1] > 1 else None  # flags travel on the CPU

    def on_signal(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            held = (f"{self.path} holds the last saved state" if os.path.isfile(self.path)
                    else "no checkpoint was written")
            raise KeyboardInterrupt(f"interrupted by a second Ctrl-C; {held}")
        self.signal = signal.Signals(signum).name

    # ---- resuming and saving

    def resume(self, model, optimizer, scaler, fixed=ARCH_FLAGS):
        """Continue from checkpoint-last.pth when it exists (refusing changed `fixed` flags, log.jsonl made to end
        with its line), else set an earlier run's files aside. Returns the checkpoint, or None."""
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device = next(model.parameters()).device
        checkpoint = load_checkpoint(self.path) if os.path.exists(self.path) else None
        if checkpoint is None and not getattr(self.args, "eval_only", False):
            self.set_aside()
        if checkpoint is not None:
            self.check(checkpoint)
            check_resumed_args(checkpoint.get("args", {}), self.args, fixed, self.path, self.log)
            try:
                models.check_state_dict(model, checkpoint["model"], f"checkpoint {self.path}")
            except ValueError as e:
                fail(e)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            self.record = checkpoint.get("log")
            sums = checkpoint.get("sums_per_process")
            if isinstance(sums, dict):  # rank 0 carries those of every process
                self.saved_sums = {k: v * rank_world()[1] * is_main() for k, v in sums.items()}
            if "log" in checkpoint and is_main():  # checkpoints written before this format leave the log alone
                self.sync_log(checkpoint["log"])
            if self.key == "iter":
                self.start_step = checkpoint["iter"]
                where = f"iteration {self.start_step}"
            else:
                self.start_epoch, self.start_step = checkpoint["epoch"] + 1, checkpoint.get("step", 0)
                where = (f"epoch {self.start_epoch} step {self.start_step}" if self.start_step or self.start_epoch == 0
                         else f"epoch {checkpoint['epoch']} done")
            self.resumed_at = (self.start_epoch, self.start_step)
            self.log(f"resumed from {self.path} ({where})")
        self.reporter = Reporter(self.args, self.global_step(self.start_epoch, self.start_step))
        return checkpoint

    def check(self, checkpoint):
        """A one-line error for a checkpoint-last.pth that another stage (or something else) wrote."""
        if not isinstance(checkpoint, dict):
            fail(f"{self.path} is not a checkpoint of this stage (not a dict): move it away or give another "
                 f"--output-dir")
        written_by = checkpoint.get("stage")
        if written_by is None and set(checkpoint.get("args", {})) - set(vars(self.args)):
            written_by = "another stage"  # written before checkpoints named their stage: flags not of this one
        if written_by not in (None, self.stage):
            fail(f"{self.path} is {written_by}'s checkpoint, not {self.stage}'s: give another --output-dir"
                 + (" (pass it as --pretrained to start from its encoder)" if written_by == "pretrain.py" else ""))
        missing = [k for k in ("model", "optimizer", "scaler", self.key) if k not in checkpoint]
        if missing:
            fail(f"{self.path} is not a checkpoint of this stage (no {', '.join(missing)}): move it away or give "
                 f"another --output-dir")

    def save(self, epoch, step, record=None, curves=None):
        """Every process: rank 0 writes the checkpoint of `step` steps done in `epoch` (epoch e's end: e + 1, 0;
        its 'epoch' is the last finished one) with `record` (the epoch's log line), then the line and the curves."""
        position = {"iter": step} if self.key == "iter" else {"epoch": epoch - 1, "step": step}
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "args": vars(self.args), **position, **self.extra}
        self.record = record or self.record
        if not is_main():
            check_finite(state, self.path)  # in every process, so that all stop on the same step
        else:
            save_checkpoint({**state, "log": self.record}, self.path)
            if record is not None:
                log_json(self.output_dir, record)
        if record is not None:
            self.reporter.scalars(self.global_step(epoch, step), {**self.epoch_curves, **(curves or {})})
        self.last_save, self.fresh = time.monotonic(), True

    def set_aside(self):
        """A fresh run (no checkpoint-last.pth) over an earlier run's log.jsonl and checkpoint-<epoch>.pth files:
        keep them as log.jsonl.<n> and checkpoint-<epoch>.pth.<n>, say so, start anew."""
        old = [f for f in os.listdir(self.output_dir) if re.fullmatch(r"log\.jsonl|checkpoint-\d+\.pth", f)
               and os.path.isfile(os.path.join(self.output_dir, f))]
        if not is_main() or not old:
            return
        n = next(n for n in itertools.count(1) if not any(os.path.lexists(os.path.join(self.output_dir, f"{f}.{n}"))
                                                       for f in old))
        for f in old:
            os.replace(os.path.join(self.output_dir, f), os.path.join(self.output_dir, f"{f}.{n}"))
        if "log.jsonl" in old:
            self.log(f"{self.log_path} without {self.path} is an earlier run's: kept as log.jsonl.{n}; this run "
                     f"starts a fresh log")
        if len(old) > ("log.jsonl" in old):
            self.log(f"the earlier run's checkpoint-<epoch>.pth files are kept as checkpoint-<epoch>.pth.{n}")

    def sync_log(self, record):
        """Drop log lines past `record` (the checkpoint's last line, None before the first), append it if a kill came
        between the checkpoint and its line; drop lines that are not JSON (cut short by a kill), with a warning."""
        lines = pathlib.Path(self.log_path).read_text().splitlines() if os.path.exists(self.log_path) else []
        records = [json_object(line) for line in lines]
        bad = [str(number) for number, r in enumerate(records, 1) if r is None]
        if bad:
            self.log(f"warning: {self.log_path}: dropped line(s) {', '.join(bad)}, blank or not a JSON object (cut "
                     f"short by a kill?)")
        done = -1 if record is None else record[self.key]
        kept = [line for line, r in zip(lines, records) if r is not None and r.get(self.key, -1) <= done]
        if record is not None and record not in records:
            kept.append(json.dumps(record))
        if kept != lines:
            pathlib.Path(f"{self.log_path}.tmp").write_text("".join(line + "\n" for line in kept))
            os.replace(f"{self.log_path}.tmp", self.log_path)

    # ---- the steps of an epoch

    def global_step(self, epoch, step):  # optimizer steps done: the x axis of the curves
        return step if self.key == "iter" else epoch * self.steps_per_epoch + step

    def where(self, step):
        return (f"iteration {step}/{self.steps_per_epoch}" if self.key == "iter"
                else f"epoch {self.epoch} step {step}/{self.last}")

    def steps(self, epoch, first, last=None):
        """Steps first..last - 1 of an epoch (default last: its end), each after a checkpoint if one is due
        (boundary) and seeding from (seed, rank, epoch, step): a resumed run draws the same masks and crops."""
        self.epoch, self.first, self.start_time = epoch, first, time.time()
        self.last = self.steps_per_epoch if last is None else last
        saved, self.sums, self.saved_sums = self.saved_sums, {}, {}
        self.add_all(saved)
        for step in range(first, self.last):
            self.step = step
            self.boundary()
            seed_step(self.args.seed, rank_world()[0], epoch, step)
            yield step

    def boundary(self):
        """Before an optimizer step, in every process: save with the epoch's running sums when a save is due,
        unless a loss in them is not finite (then stop in one line); after a stop signal, exit with REQUEUE_STATUS.
        The processes act on the same step: their flags are summed on the CPU (gloo), asynchronously, and read at
        the next boundary, so no step waits for the accelerator or for another process's clock."""
        if self.group is None:
            stop, due = self.local_flags().tolist()
        else:  # the flags all processes posted at the previous boundary
            stop, due = 0, 0
            if self.pending is not None:
                self.pending.wait()
                stop, due = self.flags.tolist()
        if (stop or due) and not self.fresh:
            total = self.reduced_sums()
            if not math.isfinite(total.get("loss", 0)):  # weights after a non-finite loss: not worth keeping
                fail(f"non-finite loss before {self.where(self.step)}: not writing {self.path}"
                     + ("; the previous checkpoint is kept" if os.path.isfile(self.path) else ""))
            self.extra["sums_per_process"] = {k: v / rank_world()[1] for k, v in total.items()}
            self.save(self.epoch, self.step)
            del self.extra["sums_per_process"]
        if stop:
            self.log(f"{self.signal or 'a stop signal in another process'}: saved {self.path} at "
                     f"{self.where(self.step)}; exiting with status {REQUEUE_STATUS} (requeue and rerun the same "
                     f"command to resume)")
            if self.group is not None:
                dist.barrier(group=self.group)  # no process exits (and makes a launcher kill the rest) before the write
                dist.destroy_process_group()
            raise SystemExit(REQUEUE_STATUS)
        self.fresh = False
        if self.group is not None:
            self.flags = self.local_flags()
            self.pending = dist.all_reduce(self.flags, group=self.group, async_op=True)

    def local_flags(self):
        interval = self.args.save_interval * 60
        due = interval > 0 and time.monotonic() - self.last_save >= interval
        return torch.tensor([self.signal is not None, due], dtype=torch.float32)

    def add_all(self, values):  # on the model's device; a number by a fill, not a host-to-device copy
        for name, value in values.items():
            value = (value.detach().double() if torch.is_tensor(value)
                     else torch.full((), float(value), dtype=torch.float64, device=self.device))
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def count(self, **counts):  # the epoch's totals (images read, skipped): sums over steps and processes
        self.counted.update(counts)
        self.add_all(counts)

    def log_step(self, **values):
        """After a step: its tensors into the epoch's running means, on the device (all but the loss over their
        finite steps: fp16 skips some, target_std has none on one image); every --print-freq steps read them once:
        stop on a non-finite loss, print the progress line, write train/<name>. Numbers (lr) are shown as given."""
        self.add_all({"steps": 1, "loss": values["loss"]})
        for name, value in values.items():  # the others: sums and counts of their finite values
            if torch.is_tensor(value) and name != "loss":
                finite = value.detach().isfinite()
                self.add_all({name: torch.where(finite, value.detach(), 0.0), f"{name}/steps": finite})
        self.numbers = {k: v for k, v in values.items() if not torch.is_tensor(v)}
        step = self.step + 1
        if step % self.args.print_freq and step != self.last:
            return
        tensors = [k for k, v in values.items() if torch.is_tensor(v)]
        shown = {**values, **dict(zip(tensors, torch.stack([values[k].detach().float() for k in tensors]).tolist()))}
        if not math.isfinite(shown["loss"]):
            at = f"iteration {self.step}" if self.key == "iter" else f"epoch {self.epoch} step {self.step}"
            fail(f"non-finite loss {shown['loss']} at {at}; " + (
                f"the weights of {self.path} diverge at their first step: go back to an earlier checkpoint-<epoch>.pth "
                f"(copy it to checkpoint-last.pth) or start afresh" if (self.epoch, self.step) == self.resumed_at
                else self.kept()))
        done, elapsed = step - self.first, time.time() - self.start_time
        rate = done * self.args.batch_size / max(elapsed, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime(elapsed / done * (self.last - step)))
        text = " ".join(f"{k} {v:{VALUE_FORMATS.get(k, '.4f')}}" for k, v in shown.items() if math.isfinite(v))
        self.log(f"{self.where(step)} {text} {rate:.1f} img/s  eta {eta}")
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.reporter.scalars(self.global_step(self.epoch, step), {
            **{f"train/{k}": v for k, v in shown.items() if math.isfinite(v)}, "train/loss_scale": scale,
            "train/images_per_s": rate})

    def reduced_sums(self):  # summed over processes, as numbers: one synchronisation
        names = sorted(self.sums)
        total = all_reduce_sum(torch.stack([self.sums[k] for k in names])).tolist() if names else []
        return dict(zip(names, total))

    def kept(self):
        return "the last good checkpoint is kept" if os.path.isfile(self.path) else "no checkpoint was written"

    def end_epoch(self, timing=False):
        """The epoch's record: each logged tensor's mean over steps and processes ('train_loss'; None if never
        finite), count()'s totals, the last numbers logged (lr), with `timing` time_s and images_per_s."""
        total = self.reduced_sums()
        if not math.isfinite(total["loss"]):
            fail(f"non-finite loss at epoch {self.epoch}; {self.kept()}")
        means = {k: total[k] / total[f"{k}/steps"] if total[f"{k}/steps"] else None for k in total
                 if f"{k}/steps" in total}
        loss = total["loss"] / total["steps"]
        self.epoch_curves = {"epoch/loss": loss, **{f"epoch/{k}": v for k, v in means.items()}}
        record = {"train_loss": loss, **means, **self.numbers, **{k: int(total[k]) for k in self.counted}}
        if timing:
            elapsed = time.time() - self.start_time
            record.update(time_s=round(elapsed, 2),
                          images_per_s=round((self.last - self.first) * self.args.batch_size / elapsed, 1))
        return record

    def close(self):
        self.reporter.close()
