"""End-to-end fine-tuning of a pretrained ExtreMA encoder for classification (the distributed
representation): mean of the patch tokens -> LayerNorm -> Linear, BEiT-style recipe with layer-wise lr decay,
timm's RandAugment "rand-m9-mstd0.5-inc1", random erasing, MixUp/CutMix and label smoothing.
--train-subset / --label-fraction run the semi-supervised (1% / 10% labels) evaluation.

    python finetune.py --data synthetic --device cpu ...                                   # one process
    torchrun --nproc_per_node 8 finetune.py --data /path/to/imagenet --pretrained CKPT    # official recipe

The recipe names colour jitter 0.4, but the official timm pipeline skips colour jitter when RandAugment is on,
so --color-jitter defaults to 0 (what the official runs did).
"""
import argparse
import math
import os
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data
import linprobe
import models
import utils

SUBSET_SEED = 0  # --label-fraction draws the same images whatever --seed


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    utils.add_common_args(p, "ImageNet root (ROOT/train, ROOT/val)", "output/finetune", None, 1024, 10,
                          branch="online", img_help=utils.IMG_HELP)
    p.add_argument("--synthetic-size", type=int, default=256, help="training images in the synthetic set")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic: default 10; folders: their classes")
    p.add_argument("--train-subset", default=None,
                   help="file of training image names, one per line (e.g. the 1%% / 10%% ImageNet lists)")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="class-balanced random fraction of the training images (fixed seed)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--blr", type=float, default=5e-4, help="lr = blr * batch-size / 256")
    p.add_argument("--min-lr", type=float, default=1e-6, help="floor of the cosine schedule (not scaled by batch)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.65, help="lr scale per block below the head")
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--color-jitter", type=float, default=0.0,
                   help="brightness/contrast/saturation jitter after RandAugment (default 0, as the official runs)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha; 0: off")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha; 0: off")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradients' total norm to NORM (default: no clipping, as the official recipe)")
    utils.add_grad_checkpointing_arg(p)
    return data.encoder_inputs(utils.parse_args(p, argv), channels=(1, 3))  # RandAugment's PIL: grey or RGB


class MeanPoolClassifier(nn.Module):
    """Mean of the patch tokens after the last block (before the final norm) -> LayerNorm -> Linear (trunc-normal
    std 0.02 x 0.001, bias 0). The encoder's class-attention blocks, cls token and final norm are deleted (after
    loading), so every parameter gets a gradient and DDP needs no unused-parameter search."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        del encoder.ca_blocks, encoder.cls_token, encoder.norm
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        self.head.weight.data.mul_(0.001)
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        tokens = self.encoder.intermediate_tokens(images, [len(self.encoder.blocks)])[-1]  # (B, N, D)
        return self.head(self.fc_norm(tokens.mean(dim=1)))  # (B, C)


class RandAugment:
    """timm's RandAugment "rand-m9-mstd0.5-inc1" (the official fine-tuning's --aa) on PIL images: timm's PIL calls
    with timm's arguments, so the same pixels (torchvision's functional where its PIL kernel makes timm's call, PIL's
    affine transform for shear and translation).

    Each image gets `num_ops` ops drawn uniformly, with replacement, from timm's "increasing" set, each applied with
    probability `prob` at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]; level() maps it to
    the op's argument as timm does, and the signed ops (rotate, shear, translate, enhancements) take a random sign.
    Geometric ops resample bicubically (the official --train_interpolation) and fill with `fill` (default the
    ImageNet mean pixel, as timm; finetune.py gives the run's mean)."""

    OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
           "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
           "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    ENHANCE = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
    UNSIGNED = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd")
    MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM
    MEAN_PIXEL = tuple(round(255 * m) for m in utils.IMAGENET_MEAN)  # (124, 116, 104)

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=MEAN_PIXEL):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = list(fill)  # one value per channel of the images

    @classmethod
    def level(cls, name, magnitude):
        """timm's argument of op `name` at `magnitude` (0..10), before the random sign; None for the ops
        without one. The enhancements return their distance from the identity factor 1."""
        f = magnitude / cls.MAX_MAGNITUDE
        levels = {"Rotate": 30 * f, "PosterizeIncreasing": 4 - int(4 * f),  # bits kept
                  "SolarizeIncreasing": 256 - min(256, int(256 * f)),  # threshold
                  "SolarizeAdd": min(128, int(110 * f)), "ShearX": 0.3 * f, "ShearY": 0.3 * f,
                  "TranslateXRel": 0.45 * f, "TranslateYRel": 0.45 * f}
        return 0.9 * f if name in cls.ENHANCE else levels.get(name)

    def sample(self):
        """The ops one image gets, as a list of (name, magnitude): num_ops draws, each kept with prob."""
        ops = []
        for index in torch.randint(len(self.OPS), (self.num_ops,)).tolist():
            if torch.rand(()).item() < self.prob:
                magnitude = self.magnitude + self.magnitude_std * torch.randn(()).item()
                ops.append((self.OPS[index], min(max(magnitude, 0.0), self.MAX_MAGNITUDE)))
        return ops

    def apply(self, image, name, magnitude):
        """Op `name` at `magnitude` on a PIL image; the signed ops negate their argument with probability 0.5."""
        v = self.level(name, magnitude)
        if name not in self.UNSIGNED and torch.rand(()).item() < 0.5:
            v = -v
        return self.apply_level(image, name, v)

    def apply_level(self, image, name, v):
        """Op `name` with timm's (signed) argument `v` on a PIL image."""
        width, height = image.size

        def affine(*coefficients):
            # PIL reads output pixel (x, y) from input (a x + b y + c, d x + e y + f), (a..f) timm's coefficients:
            # ShearX (1, v, 0, 0, 1, 0) shears about the top-left corner, TranslateXRel (1, 0, v * width, 0, 1, 0)
            # shifts by -v * width. TF.affine's matrix, built from angles, is off in the last bit: pixels cross edges.
            return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC,
                                   fillcolor=tuple(self.fill) if len(self.fill) > 1 else self.fill[0])

        ops = {
            "AutoContrast": lambda: TF.autocontrast(image),
            "Equalize": lambda: TF.equalize(image),
            "Invert": lambda: TF.invert(image),
            "Rotate": lambda: TF.rotate(image, v, interpolation=v2.InterpolationMode.BICUBIC, fill=self.fill),
            # 0 bits (magnitude 10) keeps nothing: black, as the PIL of the official runs (current PIL refuses 0)
            "PosterizeIncreasing": lambda: TF.posterize(image, v) if v > 0 else image.point(lambda i: 0),
            "SolarizeIncreasing": lambda: TF.solarize(image, v),
            "SolarizeAdd": lambda: image.point(lambda i: min(255, i + v) if i < 128 else i),
            "ColorIncreasing": lambda: TF.adjust_saturation(image, max(0.1, 1 + v)),
            "ContrastIncreasing": lambda: TF.adjust_contrast(image, max(0.1, 1 + v)),
            "BrightnessIncreasing": lambda: TF.adjust_brightness(image, max(0.1, 1 + v)),
            "SharpnessIncreasing": lambda: TF.adjust_sharpness(image, max(0.1, 1 + v)),
            "ShearX": lambda: affine(1, v, 0, 0, 1, 0),
            "ShearY": lambda: affine(1, 0, 0, v, 1, 0),
            "TranslateXRel": lambda: affine(1, 0, v * width, 0, 1, 0),
            "TranslateYRel": lambda: affine(1, 0, 0, 0, 1, v * height),
        }
        return ops[name]()

    def __call__(self, image):
        for name, magnitude in self.sample():
            image = self.apply(image, name, magnitude)
        return image


def eight_bit_pil(image):
    """A decoded uint8 grey tensor (1, H, W) as a PIL image for RandAugment (a PIL image as it is); 16-bit and
    floating-point inputs are refused: RandAugment's PIL operations are 8-bit."""
    if not isinstance(image, torch.Tensor):
        return image
    if image.dtype != torch.uint8:
        raise utils.DataError(f"fine-tuning's RandAugment works on 8-bit images, not {image.dtype}")
    return TF.to_pil_image(image)


def train_transform(args):
    """RandomResizedCrop (bicubic), flip, RandAugment on PIL (eight_bit_pil; filling with the run's mean pixel),
    colour jitter -> uint8 (C, H, W); normalisation, erasing and MixUp/CutMix follow on the device (soft_targets)."""
    steps = [v2.RandomResizedCrop(args.img_size, interpolation=v2.InterpolationMode.BICUBIC),
             v2.RandomHorizontalFlip(), eight_bit_pil, RandAugment(fill=[round(255 * m) for m in args.mean])]
    if args.color_jitter > 0:
        steps.append(v2.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    return v2.Compose(steps + [v2.PILToTensor()])


def random_erasing(images, p, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts=10):
    """torchvision's RandomErasing(p, value="random") per image of a normalised batch (B, C, H, W), on its device:
    with probability p, a rectangle of scale x H*W pixels and aspect ratio h/w in ratio (log-uniform), the first
    of `attempts` draws that fits (none if none fits), is filled with normal noise."""
    b, _, height, width = images.shape
    area = height * width * torch.empty(b, attempts, device=images.device).uniform_(*scale)  # (B, attempts)
    aspect = torch.empty(b, attempts, device=images.device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (h < height) & (w < width)
    first = fits.int().argmax(1, keepdim=True)  # (B, 1): the first draw that fits
    h, w = h.gather(1, first), w.gather(1, first)
    erase = (torch.rand(b, 1, device=images.device) < p) & fits.any(1, keepdim=True)  # (B, 1)
    top = (torch.rand(b, 1, device=images.device) * (height - h + 1)).floor()
    left = (torch.rand(b, 1, device=images.device) * (width - w + 1)).floor()
    rows, cols = torch.arange(height, device=images.device), torch.arange(width, device=images.device)
    in_rows = (rows >= top) & (rows < top + h) & erase  # (B, H)
    in_cols = (cols >= left) & (cols < left + w)  # (B, W)
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
    return torch.where(inside, torch.randn_like(images), images)


def batch_mixing(args, num_classes):
    """MixUp or CutMix, chosen at random per batch, or None when both are off; labels become (B, C)."""
    choices = [mix(alpha=alpha, num_classes=num_classes)
               for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    return v2.RandomChoice(choices) if choices else None


def subset_indices(dataset, train_subset, label_fraction):
    """Training indices named in the train_subset file (by basename; synthetic item i is synthetic_{i}.png), or a
    class-balanced label_fraction of each class (at least one image per class), or None for the whole set."""
    if isinstance(dataset, data.SyntheticImages):  # SyntheticImages labels item i with class i % num_classes
        names = [f"synthetic_{i}.png" for i in range(len(dataset))]
        labels = [i % dataset.num_classes for i in range(len(dataset))]
    else:
        names, labels = [os.path.basename(path) for path, _ in dataset.samples], list(dataset.targets)
    if train_subset is not None:
        if not os.path.isfile(train_subset):
            utils.fail(f"--train-subset file {train_subset} does not exist")
        with open(train_subset) as f:
            wanted = [os.path.basename(line.strip()) for line in f if line.strip()]
        index = {name: i for i, name in enumerate(names)}
        if len(index) < len(names):
            utils.fail("--train-subset matches file names, but the training set repeats some file names")
        unknown = [name for name in wanted if name not in index]
        if unknown:
            utils.fail(f"{train_subset}: {len(unknown)} name(s) not in the training set, e.g. {', '.join(unknown[:3])}")
        return sorted({index[name] for name in wanted})
    if label_fraction is not None:
        by_class = defaultdict(list)
        for i, label in enumerate(labels):
            by_class[label].append(i)
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        chosen = []
        for label in sorted(by_class):
            members = by_class[label]
            count = max(1, round(label_fraction * len(members)))
            chosen += [members[j] for j in torch.randperm(len(members), generator=generator)[:count].tolist()]
        return sorted(chosen)
    return None


def soft_targets(images, targets, mixing, num_classes, args):
    """timm's order: random erasing per image, then MixUp/CutMix per batch, then label smoothing. Returns the
    images and (B, num_classes) target distributions."""
    images = random_erasing(images, args.reprob)
    if mixing is not None:
        images, targets = mixing(images, targets)  # targets (B, C), mixed one-hot
    else:
        targets = F.one_hot(targets, num_classes).float()
    return images, targets * (1 - args.smoothing) + args.smoothing / num_classes


def train_one_epoch(model, loader, optimizer, scaler, mixing, num_classes, epoch, run, args, device):
    """One epoch of fine-tuning the whole classifier, from where a resumed run stopped."""
    first = run.start_step if epoch == run.start_epoch else 0
    batches = data.epoch_batches(loader, epoch, first * args.accum_iter)
    for step in run.steps(epoch, first):
        # per iteration: linear warm-up, then half cosine to --min-lr; each layer at its layer-decayed share
        lr = utils.cosine_schedule(epoch + step / run.steps_per_epoch, args.epochs, args.warmup_epochs, args.lr,
                                   args.min_lr)
        utils.set_lr(optimizer, lr)
        losses = []
        for i in range(args.accum_iter):
            images, targets = data.to_device(next(batches), device, args.mean, args.std)
            images, targets = soft_targets(images, targets, mixing, num_classes, args)
            with utils.no_sync(model, i < args.accum_iter - 1):
                with utils.autocast(device, args.amp):
                    loss = F.cross_entropy(model(images), targets)
                scaler.scale(loss / args.accum_iter).backward()
            losses.append(loss.detach())
        scaler.unscale_(optimizer)  # fp16: the true gradients, then the norm before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.log_step(loss=torch.stack(losses).mean(), lr=lr, grad_norm=grad_norm)


def main(argv=None):
    args = get_args(argv)
    if args.train_subset is not None and args.label_fraction is not None:
        utils.fail("give --train-subset or --label-fraction, not both")
    rank, world_size, device = utils.init_distributed(args.device)
    args.amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, world_size, args.accum_iter)
    args.lr = args.blr * args.batch_size / 256
    log = print if rank == 0 else (lambda *a: None)
    utils.make_output_dir(args.output_dir)
    utils.set_seed(args.seed + rank)

    train_set, val_set, num_classes = data.classification_datasets(
        args.data, args.img_size, train_transform(args), data.eval_transform(args.img_size), args.num_classes,
        args.synthetic_size, args.in_chans)
    indices = subset_indices(train_set, args.train_subset, args.label_fraction)
    if indices is not None:
        log(f"semi-supervised: {len(indices)} of {len(train_set)} training images")
        train_set = torch.utils.data.Subset(train_set, indices)
    train_loader = data.make_loader(train_set, local_batch, True, args.num_workers, args.seed, device)
    val_loader = data.make_loader(val_set, local_batch, False, args.num_workers, args.seed, device)
    mixing = batch_mixing(args, num_classes)

    encoder = models.VisionTransformer(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                                       **models.ARCHS[args.arch], ca_depth=args.ca_depth, drop_path=args.drop_path)
    data.load_pretrained_encoder(encoder, args.pretrained, args.branch, log, args.output_dir)
    encoder.set_grad_checkpointing(args.grad_checkpointing)
    model = MeanPoolClassifier(encoder, num_classes).to(device)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    groups = models.layer_decay_groups(model, args.weight_decay, args.layer_decay, len(encoder.blocks))
    optimizer = utils.adamw(groups, args.lr, (0.9, 0.999), device)
    scaler = utils.grad_scaler(device, args.amp)
    log(f"fine-tuning the {args.branch} encoder ({args.arch}): {len(train_set)} training / {len(val_set)} "
        f"validation images, {num_classes} classes, lr {args.lr:.3e}, layer decay {args.layer_decay}, "
        f"{world_size} process(es) x {local_batch} x {args.accum_iter}")

    run = utils.Run(args, utils.steps_per_epoch(train_loader, args), log, stage="finetune.py")
    checkpoint = run.resume(model, optimizer, scaler)
    if args.eval_only:
        return linprobe.evaluate_checkpoint(model, val_loader, device, run, checkpoint, args, log)
    run.extra["best_acc1"] = 0.0 if checkpoint is None else checkpoint["best_acc1"]
    for epoch in range(run.start_epoch, args.epochs):
        model.train()
        train_one_epoch(ddp_model, train_loader, optimizer, scaler, mixing, num_classes, epoch, run, args, device)
        record = {"epoch": epoch, **run.end_epoch()}
        model.eval()
        acc1, acc5, val_loss = linprobe.evaluate(model, val_loader, device, args.amp, args.mean, args.std)
        run.extra["best_acc1"] = best_acc1 = max(run.extra["best_acc1"], acc1)
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc1 {acc1:.2f} acc5 {acc5:.2f} "
            f"(best {best_acc1:.2f})")
        record.update(acc1=acc1, acc5=acc5, val_loss=val_loss, best_acc1=best_acc1, train_images=len(train_set))
        run.save(epoch + 1, 0, record, {"eval/acc1": acc1, "eval/acc5": acc5, "eval/loss": val_loss})
    run.close()


if __name__ == "__main__":
    utils.run_main(main)
