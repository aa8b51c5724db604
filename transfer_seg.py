"""ADE20K semantic segmentation transfer: the pretrained ViT's patch tokens under UperNet.

The protocol of CAE's ViT-B UperNet config (lxtGH/CAE downstream_tasks/semantic_segmentation/configs_local/
cae/upernet/upernet_cae_base_12_512_slide_160k_ade20k_pt_3e-4.py, itself BEiT's), in one file on torch and
torchvision: a relative position bias in every block (zero-initialised, trained; --no-rel-pos-bias drops it); tokens
after four blocks (4, 6, 8, 12 of a 12-block ViT) brought to strides 4, 8, 16, 32 (two 2x transposed convs with BN +
GELU between, one transposed conv, identity, 2x max-pool), fused by a UperNet head of 768 channels (pyramid pooling
on the coarsest map + FPN), plus an auxiliary FCN head of 256 channels on the stride-16 map (loss weight 0.4).
512x512 crops, 160k iterations at batch 16, AdamW (0.9, 0.999) with lr 3e-4 and layer-wise decay 0.65, weight decay
0.05 (the bias tables included, as there), 1500 linear warm-up iterations then poly decay (power 1) to 0, drop path
0.1. Single-scale sliding-window (or whole-image) mIoU over the 150 classes.

--lr is absolute for the global --batch-size, as those configs state it (not scaled with the batch): 3e-4 is the CAE
README's choice for its 300-epoch ViT-B, the length of ExtreMA's released checkpoints (2e-4 for 800 epochs, 1e-4 for
1600). The bias tables are built for the crop's grid; a sliding window smaller than the crop (an image whose short
side ends below --img-size) or --eval-mode whole sees them resized bicubically to its grid.

Data: --data is the ADEChallengeData2016 folder (images/{training,validation}/*.jpg with
annotations/{training,validation}/*.png: 0 = unlabelled and ignored, 1..150 -> classes 0..149), or "synthetic":
coloured rectangles whose label is their class, so there is something to learn.

    python transfer_seg.py --data ADEChallengeData2016 --pretrained extrema.pth --output-dir out/seg
    torchrun --nproc_per_node 8 transfer_seg.py --data ADEChallengeData2016 --pretrained extrema.pth
    python transfer_seg.py --data synthetic --device cpu --arch vit_tiny --img-size 64 --patch-size 8 \
        --batch-size 4 --iters 4 --eval-every 2 --decoder-channels 64      # a tiny run, 30 s of CPU time

Outputs in --output-dir: log.jsonl (one line per evaluation: iter, train_loss, lr, mIoU, mAcc, aAcc in %),
per_class_iou.json (IoU and accuracy of each class in %, null for a class absent from ground truth and
prediction), checkpoint-last.pth (restarting the same command resumes from it).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data
import models
import utils

NUM_CLASSES = 150
IGNORE_INDEX = 255
STRIDES = (4, 8, 16, 32)  # of the four feature maps, relative to the input
AUX_WEIGHT = 0.4
AUX_CHANNELS = 256  # the FCN auxiliary head's width in the configs, whatever the UperNet width
SYNTHETIC_CLASSES = 8


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    utils.add_common_args(p, "ADEChallengeData2016 folder", "output/seg", 512, 16, 8, print_freq=50,
                          branch="online", img_help="crop size (and image size of --data synthetic)")
    p.add_argument("--feature-blocks", type=int, nargs=4, default=None,
                   help="1-based blocks whose tokens feed strides 4, 8, 16, 32 (default: 4 6 8 12 of 12, scaled)")
    p.add_argument("--decoder-channels", type=int, default=768, help="UperNet channels")
    p.add_argument("--no-rel-pos-bias", dest="rel_pos_bias", action="store_false",
                   help="no relative position bias in the encoder's blocks")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=160000)
    p.add_argument("--warmup-iters", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=16000, help="evaluate and save every N iterations")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="absolute peak lr for the global batch (CAE: 3e-4 for 300-epoch checkpoints)")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-mode", default="slide", choices=["slide", "whole"])
    utils.add_grad_checkpointing_arg(p)
    return data.encoder_inputs(utils.parse_args(p, argv), channels=(3,))


# ============ Data ============


def keep_ratio_size(height, width, long_side, short_side):
    """(h, w) rescaled so the long side fits long_side and the short side fits short_side (mmcv rescale)."""
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def reduce_labels(annotation, path):
    """ADE20K annotation uint8 (H, W): 0 (unlabelled) and 255 -> ignore, 1..150 -> 0..149; others fail."""
    bad = (annotation > NUM_CLASSES) & (annotation != IGNORE_INDEX)
    if bad.any():
        raise utils.DataError(f"annotation {path} has label {int(annotation[bad][0])} "
                              f"(ADE20K labels are 0..{NUM_CLASSES}, or {IGNORE_INDEX} for ignore)")
    labels = torch.from_numpy(annotation.astype(np.int64)) - 1
    labels[(labels < 0) | (labels == IGNORE_INDEX - 1)] = IGNORE_INDEX
    return labels


def photometric_distortion(img):
    """mmseg's PhotoMetricDistortion on a float (3, H, W) image in [0, 255], each step with chance 0.5:
    brightness + U(-32, 32); contrast x U(0.5, 1.5) (before or after the colour steps, at random);
    HSV saturation x U(0.5, 1.5); hue + U{-18..18} of OpenCV's 180 steps."""
    def chance():
        return torch.rand(()) < 0.5

    def uniform(low, high):
        return low + (high - low) * torch.rand(()).item()

    def contrast(x):
        return (x * uniform(0.5, 1.5)).clamp(0, 255) if chance() else x

    if chance():
        img = (img + uniform(-32, 32)).clamp(0, 255)
    contrast_first = chance()
    if contrast_first:
        img = contrast(img)
    if chance():  # scale HSV saturation S = 1 - min/max (capped at 1) at fixed hue and value (= max)
        value, low = img.max(0).values, img.min(0).values  # (H, W)
        factor = torch.minimum(torch.tensor(uniform(0.5, 1.5)), value / (value - low).clamp_min(1e-6))
        img = value + factor * (img - value)
    if chance():
        img = TF.adjust_hue(img / 255, torch.randint(-18, 19, ()).item() / 180) * 255
    if not contrast_first:
        img = contrast(img)
    return img


class TrainTransform:
    """mmseg's ADE20K training pipeline: random keep-ratio resize of the (4c, c) scale by 0.5-2.0, random
    c x c crop where one class covers < 75% of the labelled pixels (up to 10 tries), flip, photometric
    distortion, normalise, pad to c x c (image 0, label ignore)."""

    def __init__(self, crop_size, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, crop_tries=10,
                 mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
        self.crop, self.ratio_range, self.mean, self.std = crop_size, ratio_range, mean, std
        self.cat_max_ratio, self.crop_tries = cat_max_ratio, crop_tries

    def random_crop_box(self, mask):
        h, w = mask.shape[-2:]
        for _ in range(self.crop_tries):
            top = torch.randint(0, max(h - self.crop, 0) + 1, ()).item()
            left = torch.randint(0, max(w - self.crop, 0) + 1, ()).item()
            window = mask[top:top + self.crop, left:left + self.crop]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, img, labels):  # PIL image, (H, W) int64
        img, mask = tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(labels)
        ratio = self.ratio_range[0] + (self.ratio_range[1] - self.ratio_range[0]) * torch.rand(()).item()
        size = keep_ratio_size(*img.shape[-2:], int(4 * self.crop * ratio), int(self.crop * ratio))
        img = TF.resize(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        mask = TF.resize(mask, size)  # nearest for masks
        top, left = self.random_crop_box(mask)
        img, mask = (t.as_subclass(torch.Tensor)[..., top:top + self.crop, left:left + self.crop] for t in (img, mask))
        if torch.rand(()) < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        img = photometric_distortion(img.float()).div_(255)  # (3, h, w) in [0, 1], h and w <= c
        img = data.normalize(img, self.mean, self.std)
        pad = (0, self.crop - mask.shape[1], 0, self.crop - mask.shape[0])  # right and bottom
        return F.pad(img, pad, value=0.0), F.pad(mask, pad, value=IGNORE_INDEX)  # (3, c, c), (c, c)


class EvalTransform:
    """mmseg's ADE20K test pipeline: keep-ratio resize to the (4c, c) scale, normalise; labels untouched
    (predictions are resized back to the annotation's size)."""

    def __init__(self, crop_size, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
        self.crop, self.mean, self.std = crop_size, mean, std

    def __call__(self, img, labels):
        img = TF.pil_to_tensor(img)
        size = keep_ratio_size(*img.shape[-2:], 4 * self.crop, self.crop)
        img = TF.resize(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        return data.normalize(img, self.mean, self.std), labels


def files_by_stem(folder, extension):
    """{name without extension: path} of the files in folder whose extension is `extension`, in any case."""
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if os.path.splitext(f)[1].lower() == extension and os.path.isfile(os.path.join(folder, f))}


class ADE20K(torch.utils.data.Dataset):
    """ADEChallengeData2016/{images,annotations}/<split>/: NAME.jpg with NAME.png (extensions in any case).
    The pairs are found once, when the set is built: every image must have its annotation."""

    def __init__(self, root, split, transform):
        image_dir, annotation_dir = (os.path.join(root, kind, split) for kind in ("images", "annotations"))
        for folder in (image_dir, annotation_dir):
            if not os.path.isdir(folder):
                utils.fail(f"data folder {folder} does not exist (expected the ADEChallengeData2016 layout: "
                           f"images/{{training,validation}}/*.jpg, annotations/{{training,validation}}/*.png)")
        images, annotations = files_by_stem(image_dir, ".jpg"), files_by_stem(annotation_dir, ".png")
        if not images:
            utils.fail(f"no .jpg images in {image_dir}")
        missing = [name for name in images if name not in annotations]
        if missing:
            utils.fail(f"{len(missing)} image(s) without an annotation in {annotation_dir}, e.g. {images[missing[0]]}")
        self.samples = [(images[name], annotations[name]) for name in sorted(images)]  # (image, annotation)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, path = self.samples[index]
        img = data.load_rgb(image_path)
        try:
            with Image.open(path) as ann:
                annotation = np.array(ann)  # uint8 (H, W) for a single-channel label png
        except Exception as e:
            raise utils.DataError(f"cannot read annotation {path}: {e}") from None
        if annotation.ndim != 2 or annotation.dtype != np.uint8:
            raise utils.DataError(f"annotation {path} is not a single-channel 8-bit label image")
        if annotation.shape != (img.height, img.width):
            raise utils.DataError(f"annotation {path} is {annotation.shape[1]}x{annotation.shape[0]} but its "
                                  f"image {image_path} is {img.width}x{img.height}")
        return self.transform(img, reduce_labels(annotation, path))


class SyntheticSegmentation(torch.utils.data.Dataset):
    """A small fixed set of img_size x img_size images: a background class and three rectangles of random
    classes (1..8 in ADE20K coding), each class with its own colour plus noise, and a 1-pixel unlabelled
    border; the label of a pixel is the class of what covers it."""

    def __init__(self, size, img_size, transform, seed):
        self.size, self.img_size, self.transform, self.seed = size, img_size, transform, seed
        self.colours = np.random.default_rng(0).integers(0, 256, (SYNTHETIC_CLASSES + 1, 3))  # every split

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        s, rng = self.img_size, np.random.default_rng((self.seed, index))
        annotation = np.full((s, s), rng.integers(1, SYNTHETIC_CLASSES + 1), dtype=np.uint8)
        for _ in range(3):
            h, w = rng.integers(s // 4, s // 2 + 1, 2)
            top, left = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
            annotation[top:top + h, left:left + w] = rng.integers(1, SYNTHETIC_CLASSES + 1)
        annotation[[0, -1], :] = annotation[:, [0, -1]] = 0
        pixels = self.colours[annotation] + rng.normal(0, 20, (s, s, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        return self.transform(img, reduce_labels(annotation, f"synthetic #{index}"))


def build_datasets(args):
    train_tf = TrainTransform(args.img_size, mean=args.mean, std=args.std)
    eval_tf = EvalTransform(args.img_size, args.mean, args.std)
    if args.data == "synthetic":
        return (SyntheticSegmentation(16, args.img_size, train_tf, seed=0),
                SyntheticSegmentation(4, args.img_size, eval_tf, seed=1))
    if not os.path.isdir(args.data):
        utils.fail(f"data folder {args.data} does not exist")
    return ADE20K(args.data, "training", train_tf), ADE20K(args.data, "validation", eval_tf)


# ============ Model: ViT feature pyramid + UperNet + FCN auxiliary head ============


def conv_bn_relu(in_channels, out_channels, kernel_size):
    """mmcv's ConvModule with BatchNorm and ReLU: the conv Kaiming-normal for ReLU with the fan-out (std
    sqrt(2 / (out_channels * k * k))), as ConvModule re-initialises it, no bias; BatchNorm 1 and 0."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier(channels, num_classes):
    """Dropout2d(0.1) + 1x1 conv, weights normal(0, 0.01) as mmseg's decode heads."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(0.1), conv)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """Pyramid pooling (scales 1, 2, 3, 6) on the coarsest map, FPN top-down fusion of all four maps,
    3x3 fuse of the concatenated upsampled levels, classifier at stride 4."""

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                 for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in STRIDES[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in STRIDES[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(STRIDES) * channels, channels, 3)
        self.classifier = classifier(channels, num_classes)

    def forward(self, features):  # four (B, D, H/s, W/s), s = 4, 8, 16, 32
        coarsest = features[-1]
        pooled = [upsample(branch(coarsest), coarsest.shape[-2:]) for branch in self.ppm]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.ppm_bottleneck(torch.cat([coarsest, *pooled], dim=1)))  # (B, C, H/32, W/32)
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [upsample(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, dim=1)))  # (B, classes, H/4, W/4)


class Segmenter(nn.Module):
    """ViT pyramid + UperNet; forward gives (logits at stride 4, auxiliary FCN logits at stride 16)."""

    def __init__(self, encoder, feature_blocks, channels, num_classes):
        super().__init__()
        dim, self.num_classes = encoder.embed_dim, num_classes
        self.backbone = models.FeatureMaps(encoder, feature_blocks, STRIDES)
        self.decode_head = UperNetHead(dim, channels, num_classes)
        self.aux_head = nn.Sequential(conv_bn_relu(dim, AUX_CHANNELS, 3), classifier(AUX_CHANNELS, num_classes))

    def forward(self, x):
        features = self.backbone(x)
        return self.decode_head(features), self.aux_head(features[STRIDES.index(16)])

    def predict(self, x):
        """Logits (B, classes, H, W) at the input's size."""
        return upsample(self.decode_head(self.backbone(x)), x.shape[-2:])


def build_model(args, log=print, load_pretrained=True):
    """The pretrained encoder inside the segmenter, read up to its last feature block (models.FeatureMaps);
    the relative position bias tables (for the crop's grid) start at zero."""
    encoder = models.VisionTransformer(img_size=args.img_size, patch_size=args.patch_size,
                                       **models.ARCHS[args.arch], drop_path=args.drop_path, ca_depth=args.ca_depth,
                                       rel_pos_bias=args.rel_pos_bias)
    encoder.set_grad_checkpointing(args.grad_checkpointing)
    if load_pretrained:
        data.load_pretrained_encoder(encoder, args.pretrained, args.branch, log=log)
    return Segmenter(encoder, args.feature_blocks, args.decoder_channels, NUM_CLASSES)


ARCH_FLAGS = utils.ARCH_FLAGS + ("feature_blocks", "decoder_channels", "rel_pos_bias")  # fixed on resume


def check_args(args):
    depth = models.ARCHS[args.arch]["depth"]
    p = args.patch_size
    if p & (p - 1):
        utils.fail(f"--patch-size {p} must be a power of two (the maps at strides 4..32 are 2x rescales)")
    args.size_divisor = max(32, p)
    if args.img_size % args.size_divisor:
        utils.fail(f"--img-size {args.img_size} must be divisible by {args.size_divisor}")
    args.feature_blocks = args.feature_blocks or models.default_feature_blocks(depth)
    if not all(1 <= block <= depth for block in args.feature_blocks):
        utils.fail(f"--feature-blocks {args.feature_blocks} must be blocks 1..{depth} of {args.arch}")
    for flag in ("eval_every", "decoder_channels"):
        if getattr(args, flag) < 1:
            utils.fail(f"--{flag.replace('_', '-')} must be at least 1")


# ============ Loss, schedule, inference, metrics ============


def seg_loss(logits, labels):
    """Cross-entropy of logits upsampled to the labels, averaged over all pixels (ignored ones count 0), as mmseg."""
    logits = upsample(logits.float(), labels.shape[-2:])
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


def poly_lr(it, total_iters, warmup_iters, base):
    """mmseg's poly policy (power 1, min 0) times a linear warm-up from 0."""
    lr = base * (1 - it / total_iters)
    return lr * it / warmup_iters if it < warmup_iters else lr


def padded_predict(model, img, divisor):
    """Logits (1, classes, h, w) of img (1, 3, h, w), zero-padded below/right to multiples of divisor."""
    h, w = img.shape[-2:]
    x = F.pad(img, (0, -w % divisor, 0, -h % divisor))
    return model.predict(x)[..., :h, :w].float()


def infer(model, img, mode, crop, stride, divisor):
    """Whole-image or mmseg sliding-window logits (1, classes, h, w) for img (1, 3, h, w)."""
    if mode == "whole":
        return padded_predict(model, img, divisor)
    h, w = img.shape[-2:]
    rows, cols = (max(n - crop + stride - 1, 0) // stride + 1 for n in (h, w))
    logits, count = img.new_zeros(1, model.num_classes, h, w), img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[..., y1:y2, x1:x2] += padded_predict(model, img[..., y1:y2, x1:x2], divisor)
            count[..., y1:y2, x1:x2] += 1
    return logits / count


def confusion_matrix(pred, labels, num_classes):
    """(classes, classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    valid = labels != IGNORE_INDEX
    index = labels[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion):
    """mmseg's metrics in %: per-class IoU (NaN when a class is in neither ground truth nor prediction) and
    accuracy (NaN without ground truth), their NaN-skipping means, overall pixel accuracy."""
    confusion = confusion.double()
    hits, truth, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    iou = hits / (truth + predicted - hits) * 100
    acc = hits / truth * 100
    return {"mIoU": iou.nanmean().item(), "mAcc": acc.nanmean().item(),
            "aAcc": (hits.sum() / confusion.sum() * 100).item(), "iou": iou.tolist(), "acc": acc.tolist()}


@torch.no_grad()
def evaluate(model, loader, args, device, amp):
    """Metrics over the evaluation set (one image per step, confusion summed over processes)."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    stride = round(args.img_size * 2 / 3)  # 341 for 512 crops, as mmseg
    for img, labels in loader:  # (1, 3, h, w), (1, H, W)
        img, labels = img.to(device), labels.to(device)
        with utils.autocast(device, amp):
            logits = infer(model, img, args.eval_mode, args.img_size, stride, args.size_divisor)
        pred = upsample(logits.float(), labels.shape[-2:]).argmax(1)  # (1, H, W)
        confusion += confusion_matrix(pred, labels, NUM_CLASSES)
    return segmentation_metrics(utils.all_reduce_sum(confusion))


def write_per_class(output_dir, metrics):
    """per_class_iou.json: class index (annotation value - 1) -> IoU and accuracy in %, null when NaN."""
    if utils.is_main():
        with open(os.path.join(output_dir, "per_class_iou.json"), "w") as f:
            json.dump({k: [None if math.isnan(v) else round(v, 4) for v in metrics[k]] for k in ("iou", "acc")}, f)


def summary(metrics):
    return {k: round(metrics[k], 4) for k in ("mIoU", "mAcc", "aAcc")}


def endless_batches(loader, first_epoch, skip=0):
    """Batches forever, the sampler's epoch counting up from first_epoch at each pass, without the first `skip`
    (a run resumed part-way through an evaluation block)."""
    epoch, skip = first_epoch + skip // len(loader), skip % len(loader)
    while True:
        yield from data.epoch_batches(loader, epoch, skip)
        epoch, skip = epoch + 1, 0


# ============ Training and evaluation ============


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    rank, world, device = utils.init_distributed(args.device)
    amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, world, args.accum_iter)
    sync_bn = world > 1 and device.type == "cuda"  # SyncBatchNorm is CUDA-only: CPU processes keep their own
    if local_batch * (world if sync_bn else 1) < 2:
        utils.fail(f"BatchNorm needs at least 2 images per step (the 1x1 pyramid-pooling map), got micro-batch "
                   f"{local_batch}{' per process' if world > 1 else ''}: raise --batch-size or lower --accum-iter")
    log = print if utils.is_main() else (lambda *a, **k: None)
    utils.make_output_dir(args.output_dir)
    run = utils.Run(args, args.iters, log, key="iter", stage="transfer_seg.py")
    if args.eval_only and not os.path.exists(run.path):
        utils.fail(f"--eval-only needs {run.path}")

    train_set, val_set = build_datasets(args)
    train_loader = data.make_loader(train_set, local_batch, True, args.num_workers, args.seed, device)
    val_loader = data.make_loader(val_set, 1, False, args.num_workers, args.seed, device)
    if len(train_loader) == 0:
        utils.fail(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")

    utils.set_seed(args.seed)
    model = build_model(args, log, load_pretrained=not os.path.exists(run.path)).to(device)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = models.layer_decay_groups(model, args.weight_decay, args.layer_decay, models.ARCHS[args.arch]["depth"])
    optimizer = utils.adamw(groups, args.lr, (0.9, 0.999), device)
    scaler = utils.grad_scaler(device, amp)
    run.resume(model, optimizer, scaler, ARCH_FLAGS)
    start_iter = run.start_step
    if args.eval_only:
        metrics = evaluate(model, val_loader, args, device, amp)
        write_per_class(args.output_dir, metrics)
        log(json.dumps({"iter": start_iter, **summary(metrics)}))
        return metrics
    model_without_ddp = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    rel_pos = " with relative position bias" if args.rel_pos_bias else ""
    log(f"{args.arch}{rel_pos} blocks {args.feature_blocks} -> UperNet({args.decoder_channels}); "
        f"{len(train_set)} train / {len(val_set)} val images; batch {args.batch_size} = {world} x {local_batch} x "
        f"{args.accum_iter}; amp {amp}")

    it, metrics = start_iter, None
    while it < args.iters:  # blocks of --eval-every iterations, each one's data stream fixed by its start
        block_start = it // args.eval_every * args.eval_every
        block_end = min(block_start + args.eval_every, args.iters)
        batches = endless_batches(train_loader, first_epoch=block_start, skip=(it - block_start) * args.accum_iter)
        model.train()
        for it in run.steps(0, it, block_end):
            lr = poly_lr(it, args.iters, args.warmup_iters, args.lr)
            utils.set_lr(optimizer, lr)
            losses = []
            for i in range(args.accum_iter):
                imgs, labels = (t.to(device, non_blocking=True) for t in next(batches))  # (b, 3, c, c), (b, c, c)
                with utils.no_sync(model, i < args.accum_iter - 1):
                    with utils.autocast(device, amp):
                        logits, aux_logits = model(imgs)  # (b, classes, c/4, c/4), (b, classes, c/16, c/16)
                        loss = seg_loss(logits, labels) + AUX_WEIGHT * seg_loss(aux_logits, labels)
                    scaler.scale(loss / args.accum_iter).backward()
                losses.append(loss.detach())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # logged, not clipped
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.log_step(loss=torch.stack(losses).mean(), lr=lr, grad_norm=grad_norm)
        it = block_end
        record = {"iter": it, **run.end_epoch()}
        metrics = evaluate(model_without_ddp, val_loader, args, device, amp)
        record.update(**summary(metrics), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_per_class(args.output_dir, metrics)
        run.save(0, it, record, {f"eval/{k}": v for k, v in summary(metrics).items()})
        log(json.dumps(record))
    run.close()
    if start_iter >= args.iters:
        log(f"already trained for {start_iter} iterations; --eval-only evaluates the checkpoint")
    return metrics


if __name__ == "__main__":
    utils.run_main(main)
