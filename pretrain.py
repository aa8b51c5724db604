"""ExtreMA pretraining: masked online views predict the momentum encoder's full-image instance representation.

    python pretrain.py --data synthetic --device cpu ...                 # one process
    torchrun --nproc_per_node 8 pretrain.py --data /path/to/imagenet     # official ViT-B recipe (defaults)
    torchrun ... pretrain.py --data 'in22k/{000000..014197}.tar' --train-num-samples 14197122   # shards
    python pretrain.py --data /path/to/scans --in-chans 1 --norm-stats auto ...   # grey or 16-bit images
"""
import argparse
import math
import os
import shutil
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

import data
import linprobe
import models
import utils

MONITOR_K, MONITOR_TEMPERATURE = 20, 0.07  # the k-NN monitor's neighbours and vote temperature
COLLAPSE_STD = 0.1  # target_std below this: the target representation is collapsing
NORM_STATS_IMAGES = 10_000  # --norm-stats auto reads up to this many training images


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    utils.add_common_args(p, "a folder of images at any depth (ROOT/train when it exists), a text file of image "
                             "paths (one a line, relative to its folder), WebDataset shards ('dir/{000..099}.tar', "
                             "several joined by '::', pipe: commands)", "output/pretrain", 224, 2048, 10)
    p.set_defaults(in_chans=3)
    p.add_argument("--norm-stats", choices=["auto"], default=None,
                   help="auto: --mean and --std estimated from up to 10,000 training images before the first step "
                        "(and printed)")
    p.add_argument("--synthetic-size", type=int, default=256, help="images in the synthetic set")
    p.add_argument("--train-num-samples", type=int, default=None,
                   help="images per epoch over shards (required there: shards have no length)")
    p.add_argument("--max-skipped", type=float, default=0.01,
                   help="unreadable images are skipped; stop when more than this fraction of a process's epoch is")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start a new run from a pretraining checkpoint (ours or official; a file or URL): both "
                        "encoders, class attention, projectors and predictor; the optimizer, schedules and epochs "
                        "start afresh (a resume reads checkpoint-last.pth instead)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--warmup-epochs", type=float, default=40)
    p.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * batch-size / 256")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mask-ratio", type=float, default=0.8)
    p.add_argument("--num-masks", type=int, default=5)
    p.add_argument("--no-disjoint", dest="disjoint", action="store_false", help="independent masks")
    p.add_argument("--color-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="per-view colour jitter and grayscale (else both views are the same crop)")
    p.add_argument("--crop-min", type=float, default=0.2, help="RandomResizedCrop minimum scale")
    p.add_argument("--drop-path", type=float, default=0.1, help="online encoder only")
    p.add_argument("--layer-scale", type=float, default=0.1, help="class-attention layer scale init")
    p.add_argument("--ca-depth", type=int, default=2, help="class-attention blocks")
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--proj-hidden-dim", type=int, default=4096)
    p.add_argument("--loss", choices=["byol", "infonce"], default="byol")
    p.add_argument("--temperature", type=float, default=1.0, help="InfoNCE temperature")
    p.add_argument("--predictor-lr-scale", type=float, default=1.0, help="predictor lr = lr x this")
    p.add_argument("--ema", type=float, default=0.996, help="initial momentum, cosine to 1")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradients' total norm to NORM (default: no clipping, as the official recipe)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the forward of the model, in torch.compile's MODE (default: default)")
    p.add_argument("--autocast-residual", action="store_true",
                   help="speed: keep the tokens' residual stream in the --amp dtype (bf16) instead of float32")
    p.add_argument("--split-class-attention", action="store_true",
                   help="speed: class attention without the [cls; tokens] concatenation (the same function)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="speed: replay the optimizer step and the momentum update from CUDA graphs (CUDA, "
                        "--amp bf16 or none)")
    utils.add_grad_checkpointing_arg(p)
    p.add_argument("--save-every", type=int, default=50,
                   help="also keep checkpoint-<epoch>.pth (a hard link to checkpoint-last.pth) every N epochs "
                        "and at the last (0: none)")
    p.add_argument("--monitor", default=None,
                   help="labelled ImageFolder root (DIR/train, DIR/val) or 'synthetic': k-NN accuracy of the "
                        "momentum encoder's instance features, logged as knn_acc1")
    p.add_argument("--monitor-every", type=int, default=1, help="epochs between monitor evaluations")
    p.add_argument("--monitor-per-class", type=int, default=None, help="cap on the monitor's images per class")
    return data.encoder_inputs(utils.parse_args(p, argv))


def crop_transform(img_size, crop_min):
    """The CPU part of the augmentation, one crop + flip shared by both views -> (C, H, W) in the stored dtype
    (uint8, uint16 or float32); colourings and normalisation follow on the device for the batch (two_views)."""
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0)), v2.RandomHorizontalFlip(),
                       v2.PILToTensor()])


def grayscale(x):
    """(B, 3, H, W) -> (B, 1, H, W) with torchvision's weights (rgb_to_grayscale)."""
    return x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def blend(x, factors, op, active):
    """Brightness (op 0), contrast (1) or saturation (2) at factors[:, op] where active, as torchvision's adjust_*:
    clamp(f * x + (1 - f) * y, 0, 1), y = 0, the mean grey level or the grey image. x (B, C, H, W) in [0, 1] (the
    grey of C != 3 channels: their mean); factors (B, 4); op, active (B,)."""
    f = torch.where(active, factors.gather(1, op.clamp(max=2)[:, None])[:, 0], 1.0)[:, None, None, None]
    grey = grayscale(x) if x.shape[1] == 3 else x.mean(1, keepdim=True)  # (B, 1, H, W)
    contrast, saturation = ((op == k)[:, None, None, None].float() for k in (1, 2))
    target = grey * saturation + grey.mean((1, 2, 3), keepdim=True) * contrast  # (B, 1, H, W)
    return torch.lerp(target, x, f).clamp_(0, 1)


def shift_hue(x, shift):
    """torchvision's adjust_hue per image: x (B, 3, H, W) in [0, 1] to HSV, hue + shift (B,), back to RGB."""
    v, m = x.max(1).values, x.min(1).values  # (B, H, W)
    c = v - m
    s = c / torch.where(c == 0, 1.0, v)
    rc, gc, bc = ((v[:, None] - x) / torch.where(c == 0, 1.0, c)[:, None]).unbind(1)
    r, g, _ = x.unbind(1)
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))  # in sixths of the circle
    h = (h / 6 + 1 + shift[:, None, None]) % 1
    k = (torch.arange(5, 0, -2, device=x.device)[None, :, None, None] + 6 * h[:, None]) % 6  # (B, 3, H, W)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)  # HSV -> RGB, closed form


def jitter(x, factors, order):
    """torchvision's ColorJitter with each image's own factors and order. x (B, C, H, W) in [0, 1]; factors (B, 4):
    brightness, contrast, saturation (1: unchanged), hue shift (0: unchanged; RGB only); order (B, 4): a permutation
    of the ops 0..3. Three slots for the blends before each image's hue shift, one hue pass, three slots after."""
    hue_at = order.argmax(1)  # (B,): the position of op 3
    for p in range(3):
        x = blend(x, factors, order[:, p], p < hue_at)
    shift = factors[:, 3]
    if x.shape[1] == 3:
        x = torch.where((shift != 0)[:, None, None, None], shift_hue(x, shift), x)
    for p in range(1, 4):
        x = blend(x, factors, order[:, p], p > hue_at)
    return x


def colour(images, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD, jitter_p=0.8, grayscale_p=0.2,
           strength=(0.4, 0.4, 0.2, 0.1)):
    """One random colouring per image of a batch (B, C, H, W) (uint8, uint16 or float, see data.normalize) on its
    device: with probability jitter_p ColorJitter(*strength) (factors and order per image), then with probability
    grayscale_p grayscale. Returns float32 normalised with mean, std. Not RGB (a departure, README): brightness and
    contrast only, one factor each per image for all channels (contrast about their common mean)."""
    b, device = images.shape[0], images.device
    x = data.normalize(images, (0.0,) * images.shape[1], (1.0,) * images.shape[1])  # in [0, 1]
    rgb = images.shape[1] == 3
    u = (2 * torch.rand(b, 4, device=device) - 1) * (torch.rand(b, 1, device=device) < jitter_p)  # 0: no jitter
    factors = torch.stack([1 + strength[0] * u[:, 0], 1 + strength[1] * u[:, 1], 1 + rgb * strength[2] * u[:, 2],
                           rgb * strength[3] * u[:, 3]], dim=1)  # (B, 4); non-RGB: saturation 1, hue shift 0
    x = jitter(x, factors, torch.rand(b, 4, device=device).argsort(1))
    grey = torch.rand(b, device=device) < grayscale_p
    if rgb:
        x = torch.where(grey[:, None, None, None], grayscale(x), x)
    return data.normalize(x, mean, std)


def two_views(images, color_aug, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
    """Crops (B, C, H, W) on the device -> two views, float32 normalised with mean, std, each with its own
    colouring (without color_aug both are the crop itself)."""
    if not color_aug:
        x = data.normalize(images, mean, std)
        return x, x
    return colour(images, mean, std), colour(images, mean, std)


# fixed on resume: they shape the model, or (--predictor-lr-scale) the optimizer state
ARCH_FLAGS = utils.ARCH_FLAGS + ("ca_depth", "proj_dim", "proj_hidden_dim", "predictor_lr_scale")


def build_model(args):
    learner = models.ExtreMA(
        img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans, **models.ARCHS[args.arch],
        ca_depth=args.ca_depth, layer_scale=args.layer_scale, proj_dim=args.proj_dim,
        proj_hidden_dim=args.proj_hidden_dim, mask_ratio=args.mask_ratio, num_masks=args.num_masks,
        disjoint=args.disjoint, drop_path=args.drop_path, loss=args.loss, temperature=args.temperature,
        autocast_residual=args.autocast_residual, split_class_attention=args.split_class_attention)
    learner.encoder.set_grad_checkpointing(args.grad_checkpointing)  # the momentum encoder runs without autograd
    return learner


def check_args(args):
    if args.save_every < 0:
        utils.fail(f"--save-every must be 0 (no numbered checkpoints) or positive, got {args.save_every}")
    try:
        models.check_masks((args.img_size // args.patch_size) ** 2, args.mask_ratio, args.num_masks, args.disjoint)
    except ValueError as e:
        utils.fail(e)


class SkippedImages:
    """This process's unreadable images (data.Batch.skipped): warns about the run's first data.WARN_SKIPPED, stops
    with one line when an epoch's `count` (reset by main) passes --max-skipped of its `share` of the epoch."""

    def __init__(self, max_skipped, share):
        self.max_skipped, self.share, self.count, self.warned = max_skipped, share, 0, 0

    def add(self, batch, epoch):
        for error in batch.skipped:
            self.count += 1
            if self.count > self.max_skipped * self.share:
                utils.fail(f"{error} ({self.count} unreadable images in epoch {epoch}: more than --max-skipped "
                           f"{self.max_skipped} of the {self.share} images a process reads per epoch)")
            if self.warned < data.WARN_SKIPPED:
                self.warned += 1
                print(f"warning: skipped {error}" + (" (further ones are only counted)"
                                                      if self.warned == data.WARN_SKIPPED else ""), file=sys.stderr)


def estimate_stats(args, log=print):
    """--norm-stats auto: args.mean and args.std from up to NORM_STATS_IMAGES training images, as decoded (no
    crop), printed; the same images in every process and on resume, so the values are too."""
    start = time.time()
    args.mean, args.std = data.channel_stats(data.sample_images(args, NORM_STATS_IMAGES))
    data.check_stats(args.in_chans, args.mean, args.std)
    log(f"--norm-stats auto ({time.time() - start:.0f} s): --mean {' '.join(f'{v:.6g}' for v in args.mean)} "
        f"--std {' '.join(f'{v:.6g}' for v in args.std)}")


def build_optimizer(args, learner, device):
    """AdamW (0.9, 0.95) without weight decay on biases, norms, pos_embed and cls_token; with
    --predictor-lr-scale, the predictor's groups step at that multiple of the lr."""
    groups = models.param_groups(learner, args.weight_decay)
    if args.predictor_lr_scale != 1:
        predictor = {id(p) for p in learner.predictor.parameters()}
        groups = [dict(g, params=[p for p in g["params"] if (id(p) in predictor) == fast], lr_scale=scale)
                  for g in groups for fast, scale in ((False, 1.0), (True, args.predictor_lr_scale))]
    return utils.adamw(groups, lr=0.0, betas=(0.9, 0.95), device=device)


def train_step(model, optimizer, scaler, micro_batches, lr, momentum, amp, color_aug=True, keeps=None,
               clip_grad=None, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
    """One ExtreMA optimizer step over --accum-iter micro-batches of crops (b, C, H, W) on the device; keeps: one
    (M, b, K) tensor of visible patches per micro-batch (None: drawn here, outside a compiled model). Returns the mean
    loss, the target_std of the targets and the gradient norm before clipping, as device tensors (no host sync)."""
    learner = model.module if isinstance(model, DDP) else model
    # Step 1. This step's lr, and the momentum (EMA) update of the target branch. As in the official code the EMA
    # step comes first: the online branch then chases a target that already includes its last step.
    utils.set_lr(optimizer, lr)
    learner.update_momentum(momentum)
    # Step 2. Forward and backward, micro-batch by micro-batch; the gradients add up to those of the whole batch.
    losses, targets = [], []
    for i, images in enumerate(micro_batches):
        # two colourings of the same crop: x1 for the online encoder, which sees only the visible patches of each
        # of the M masks (a batch of M*b short sequences); x2 for the momentum encoder, which sees it whole
        x1, x2 = two_views(images, color_aug, mean, std)
        keep = learner.sample_keep(len(images), images.device) if keeps is None else keeps[i]  # (M, b, K) visible
        with utils.no_sync(model, i < len(micro_batches) - 1):  # DDP all-reduces the gradients of the last only
            with utils.autocast(images.device, amp):
                loss, target = model(x1, x2, keep=keep, return_target=True)  # target: (b, P)
            scaler.scale(loss / len(micro_batches)).backward()  # the target branch has no gradient
        losses.append(loss.detach())
        targets.append(target)
    # Step 3. The optimizer step on the true gradients (fp16: unscaled first), clipped to --clip-grad if asked.
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), math.inf if clip_grad is None else clip_grad)
    scaler.step(optimizer)  # fp16: skipped when a gradient is not finite
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(), models.target_std(torch.cat(targets)), grad_norm


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    rank, world_size, device = utils.init_distributed(args.device)
    utils.make_output_dir(args.output_dir)
    amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, world_size, args.accum_iter)
    utils.set_seed(args.seed + rank)
    log = print if rank == 0 else (lambda *a, **k: None)

    # ============ data: crops on the CPU, colour on the device ============
    loader, epoch_images = data.pretraining_loader(args, crop_transform(args.img_size, args.crop_min), local_batch,
                                                   device)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        utils.fail(f"{epoch_images} images give no full batch of {args.batch_size}; lower --batch-size")
    skipped = SkippedImages(args.max_skipped, steps_per_epoch * args.accum_iter * local_batch)

    # ============ model, optimizer, and the run to resume ============
    learner = build_model(args).to(device)
    optimizer = build_optimizer(args, learner, device)
    scaler = utils.grad_scaler(device, amp)
    run = utils.Run(args, steps_per_epoch, log, stage="pretrain.py")
    checkpoint = run.resume(learner, optimizer, scaler, ARCH_FLAGS)  # a resumed --norm-stats auto keeps its values
    if args.mean is None:
        estimate_stats(args, log)
    warn_resharding(args, checkpoint, run, log)
    if checkpoint is None and args.init is not None:
        init_from(args.init, learner, log)
    if args.compile:
        compile_model(learner, args.compile)
    optimizer = step_updates(args, learner, optimizer, device, amp)
    model = DDP(learner) if world_size > 1 else learner
    base_lr = args.blr * args.batch_size / 256
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    log(f"{args.arch} {sum(p.numel() for p in learner.online_params()) / 1e6:.1f}M online params | {epoch_images} "
        f"images, {world_size} process(es) x {local_batch} x {args.accum_iter} = batch {args.batch_size} | lr "
        f"{base_lr:.2e} | amp {amp} | {steps_per_epoch} steps/epoch on {device}")
    monitor = Monitor(args, learner, local_batch, device, amp, checkpoint, run, log) if args.monitor else None
    run.extra.update(in_chans=args.in_chans, mean=args.mean, std=args.std)  # what later stages read

    # ============ training ============
    for epoch in range(run.start_epoch, args.epochs):
        learner.train()
        first = run.start_step if epoch == run.start_epoch else 0  # steps done before a mid-epoch resume
        batches = data.epoch_batches(loader, epoch, first * args.accum_iter)
        skipped.count = 0
        for step in run.steps(epoch, first):
            it = epoch * steps_per_epoch + step
            # per-iteration schedules: lr warms up linearly then follows a half cosine to 0; the EMA momentum rises
            # from --ema to 1 on a half cosine, so the target settles as training ends
            lr = utils.cosine_schedule(it, total_steps, warmup_steps, base_lr)
            momentum = models.momentum_at(it / steps_per_epoch, args.epochs, args.ema)
            loaded = [next(batches) for _ in range(args.accum_iter)]
            for batch in loaded:
                skipped.add(batch, epoch)
            loss, target_std, grad_norm = train_step(
                model, optimizer, scaler, [batch.images.to(device, non_blocking=True) for batch in loaded], lr,
                momentum, amp, args.color_aug, clip_grad=args.clip_grad, mean=args.mean, std=args.std)
            run.count(samples=sum(len(b.names) for b in loaded), skipped_images=sum(len(b.skipped) for b in loaded))
            run.log_step(loss=loss, lr=lr, momentum=momentum, grad_norm=grad_norm, target_std=target_std)

        record = {"epoch": epoch, **run.end_epoch(timing=True), **({"init": args.init} if args.init else {})}
        if record["target_std"] is None:
            log(f"warning: no target_std in epoch {epoch}: a step's batch of one image has no spread to measure")
        elif record["target_std"] < COLLAPSE_STD:
            log(f"warning: target_std {record['target_std']:.3f} < {COLLAPSE_STD} in epoch {epoch}: the target "
                f"representation is collapsing; try --predictor-lr-scale 10 or --loss infonce (README: Is it "
                f"learning?)")
        if monitor is not None:
            monitor.evaluate(epoch, record)
        log(f"epoch {epoch}: loss {record['train_loss']:.4f} target_std {record['target_std'] or float('nan'):.3f} | "
            f"{record['samples']} images read, {record['skipped_images']} unreadable skipped"
            + (f" {MONITOR_K}-NN acc1 {record['knn_acc1']:.2f}" if "knn_acc1" in record else ""))
        run.save(epoch + 1, 0, record, {"monitor/knn_acc1": record.get("knn_acc1")})
        if rank == 0 and args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
            keep_copy(run.path, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    run.close()


def keep_copy(path, copy):
    """Give path's file the second name `copy` (a hard link, else a copy), kept when save_checkpoint replaces path."""
    tmp = f"{copy}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy)


def init_from(path, learner, log):
    """--init: a released or earlier pretraining checkpoint's weights start this run (continued pretraining on one's
    own data); the position table is resized and an RGB patch embedding adapted as in the other stages."""
    try:
        note = models.load_pretraining(learner, utils.load_checkpoint(path))
    except ValueError as e:
        utils.fail(f"--init {path}: {e}")
    log(f"--init: started from {path}" + (f"; {note}" if note else ""))


def warn_resharding(args, checkpoint, run, log):
    """A mid-epoch resume over shards with another --num-workers splits the rest of the epoch anew."""
    saved = None if checkpoint is None else checkpoint["args"].get("num_workers")
    if run.start_step and data.is_shards(args.data) and saved != args.num_workers:
        log(f"warning: resumed mid-epoch over shards with --num-workers {args.num_workers}, not {saved}: the shards "
            f"of the rest of epoch {run.start_epoch} are split anew, so it may read images the run has already used "
            f"in it")


class Monitor:
    """--monitor: k-NN top-1 (linprobe.py's) of the momentum encoder's instance features on a labelled set, at
    initialisation (the baseline, kept in the checkpoint) and every --monitor-every epochs, into the record."""

    def __init__(self, args, learner, batch_size, device, amp, checkpoint, run, log):
        self.args, self.encoder, self.device, self.amp = args, learner.momentum_encoder, device, amp
        transform = data.eval_transform(args.img_size)
        train, val, self.num_classes = data.classification_datasets(args.monitor, args.img_size, transform,
                                                                    transform, in_chans=args.in_chans)
        if args.monitor_per_class is not None:
            train, val = (data.cap_per_class(dataset, args.monitor_per_class) for dataset in (train, val))
        if MONITOR_K > len(train):
            utils.fail(f"--monitor {args.monitor}: {len(train)} training images, fewer than the k = {MONITOR_K} "
                       f"neighbours of the k-NN monitor")
        self.loaders = [data.make_loader(dataset, batch_size, False, args.num_workers, args.seed, device)
                        for dataset in (train, val)]
        self.init = self.knn() if checkpoint is None else checkpoint.get("knn_acc1_init")  # None: began unmonitored
        if self.init is not None:
            log(f"monitor: {MONITOR_K}-NN acc1 {self.init:.2f} at initialisation")
        if checkpoint is None:
            run.reporter.scalars(0, {"monitor/knn_acc1": self.init})
        run.extra["knn_acc1_init"] = self.init

    def knn(self):
        return linprobe.knn_evaluate(lambda images: self.encoder.forward_features(images)[1], *self.loaders,
                                     self.num_classes, self.device, self.amp, (MONITOR_K,), MONITOR_TEMPERATURE,
                                     self.args.mean, self.args.std)[MONITOR_K][0]

    def evaluate(self, epoch, record):
        if (epoch + 1) % self.args.monitor_every == 0 or epoch + 1 == self.args.epochs:
            start = time.time()
            record.update(knn_acc1=self.knn(), knn_time_s=round(time.time() - start, 2))
            if self.init is not None:
                record["knn_acc1_init"] = self.init


# ============ speed options: the same step, faster ============


def compile_model(learner, mode="default"):
    """torch.compile the whole forward (both branches, masking and loss) in place: state_dict keys stay."""
    learner.compile(mode=mode)


class GraphedUpdates:
    """--cuda-graphs: the optimizer step and the momentum update replayed from CUDA graphs, one launch each.

    A graph replays fixed addresses, so lr and momentum live in device tensors and the gradients are zeroed in place,
    never freed. Each update runs eagerly on its first call (AdamW makes its state) and is captured on the second; off
    CUDA always eagerly (what the CPU tests check). Stands in for the optimizer and learner.update_momentum in
    train_step, so the step reads the same with or without it."""

    def __init__(self, learner, optimizer):
        device = next(learner.parameters()).device
        self.learner, self.optimizer, self.param_groups = learner, optimizer, optimizer.param_groups
        for group in optimizer.param_groups:  # after a resume: the loaded lr becomes a tensor set in place
            group.update(lr=torch.tensor(float(group["lr"]), device=device), capturable=True)
        self.momentum = torch.zeros((), device=device)
        self.cuda, self.seen, self.graphs = device.type == "cuda", set(), {}
        self.ema_step = learner.update_momentum
        learner.update_momentum = self.update_momentum

    def replay(self, name, update):
        if not self.cuda or name not in self.seen:
            self.seen.add(name)
            return update()
        if name not in self.graphs:
            self.graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graphs[name]):  # records, does not run
                update()
        self.graphs[name].replay()

    @torch.no_grad()
    def update_momentum(self, m):
        """models.ExtreMA.update_momentum with m read from a device tensor."""
        self.momentum.fill_(m)
        self.replay("momentum", lambda: self.ema_step(self.momentum))

    def step(self):
        self.replay("step", self.optimizer.step)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=False)


def step_updates(args, learner, optimizer, device, amp):
    """What train_step steps: the optimizer, or with --cuda-graphs GraphedUpdates around it (after a resume)."""
    if not args.cuda_graphs:
        return optimizer
    if device.type != "cuda":
        utils.fail(f"--cuda-graphs needs a CUDA device, not {device.type}")
    if amp == "fp16":
        utils.fail("--cuda-graphs needs --amp bf16 or none (the fp16 loss scaler skips steps from the host)")
    return GraphedUpdates(learner, optimizer)


if __name__ == "__main__":
    utils.run_main(main)
