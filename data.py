"""Datasets, decoding and loaders of the stages: image folders, the synthetic set, labelled classification
sets and the per-process DataLoader with its resumable sampler.

A file of its own, beside utils.py (which it imports for errors and the process layout) and imported by the
stages: the data sources are a concern of their own, and utils.py holds the rest of the plumbing."""
import functools
import io
import itertools
import os
import signal

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

import utils


def load_rgb(path):
    """Open an image as RGB; an unreadable file raises DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise utils.DataError(f"cannot read image {path}: {e}") from None


ARRAY_DTYPES = (np.uint8, np.uint16, np.float32)  # of .npy inputs, kept as they are (normalize scales each)
# the files decode() reads: torchvision's image extensions and arrays
EXTENSIONS = (*datasets.folder.IMG_EXTENSIONS, ".npy")
# 16-bit and floating-point PIL modes (TIFF) read as arrays: I;16* -> uint16, I -> int32 (cast to uint16), F -> float32
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I", "F")


def decode_array(raw, in_chans):
    """A .npy file's bytes: an array (H, W, C) or, for one channel, (H, W) of uint8, uint16 or float32 -> a
    tensor (C, H, W) of the same dtype: a channel-first view of the loaded array (no copy; the crop and the
    batch collation make the contiguous ones)."""
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    array = array[:, :, None] if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[2] != in_chans or array.dtype not in ARRAY_DTYPES:
        raise ValueError(f"expected an array (H, W, {in_chans}) of uint8, uint16 or float32, got {array.dtype} "
                         f"{array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_pil(raw, in_chans):
    """What torchvision.io does not decode (TIFF, BMP, ...), through PIL: one channel keeps 16-bit and float
    data (WIDE_MODES) as uint16 or float32, else grey uint8; three channels RGB uint8."""
    with Image.open(io.BytesIO(raw)) as img:
        if in_chans == 1 and img.mode in WIDE_MODES:
            array = np.array(img)  # (H, W), a writable copy
            if array.dtype == np.int32:
                array = array.clip(0, 65535).astype(np.uint16)
            elif not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            return torch.from_numpy(array)[None]
        if in_chans not in (1, 3):
            raise ValueError(f"an image file has 1 or 3 channels, not {in_chans}: store such data as .npy (H, W, C)")
        return v2.functional.pil_to_tensor(img.convert("L" if in_chans == 1 else "RGB"))


def decode(raw, ext, in_chans=3):
    """An image file's bytes and extension (".png", ".npy", ...) -> a compact tensor (in_chans, H, W) in the
    stored dtype, which normalize later maps to [0, 1] on the device: uint8 / 255, uint16 / 65535, float32 as
    stored.

    .npy: see decode_array. Image files: in_chans 1 gives one grey channel (a grey image is kept as it is, a
    colour one converted; 16-bit PNG and TIFF stay uint16, never replicated), in_chans 3 RGB (a grey image
    replicated), any other count the image's own channels if it has that many (RGBA for 4). JPEG, PNG, WebP and
    GIF through torchvision.io (about 15% less CPU than PIL for a JPEG), the rest through PIL. Raises DataError
    for a file that cannot give in_chans channels."""
    try:
        if ext.lower() == ".npy":
            return decode_array(raw, in_chans)
        mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(in_chans, ImageReadMode.UNCHANGED)
        try:
            image = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=mode)
        except RuntimeError:
            image = decode_pil(raw, in_chans)
        if image.shape[0] != in_chans:
            raise ValueError(f"{image.shape[0]} channel(s), not --in-chans {in_chans}")
        return image
    except Exception as e:
        raise utils.DataError(f"cannot decode a {ext} file with {in_chans} channel(s): {e}") from None


def decode_file(path, in_chans=3):
    """decode() of the file at path; an unreadable file raises DataError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return decode(raw, os.path.splitext(path)[1], in_chans)
    except (OSError, utils.DataError) as e:
        raise utils.DataError(f"cannot read image {path}: {e}") from None


def image_folder(root, transform, loader=load_rgb, extensions=datasets.folder.IMG_EXTENSIONS):
    """ImageFolder (as torchvision's DatasetFolder, which takes the extensions) with a one-line error for a missing
    or empty folder; loader: load_rgb (PIL) or a decode_file (with EXTENSIONS: arrays too)."""
    if not os.path.isdir(root):
        utils.fail(f"data folder {root} does not exist")
    try:
        return datasets.DatasetFolder(root, loader, extensions, transform=transform)
    except FileNotFoundError:
        utils.fail(f"no images found in {root} (expected {root}/<class>/<image>)")


def channel_stats(dataset, max_images=10_000, num_workers=0):
    """Per-channel mean and standard deviation (lists of floats) of the pixels of up to max_images items of a
    dataset of decoded tensors (C, H, W) in [0, 1] units (utils.normalize's scaling), over all their pixels: the
    first max_images of a fixed random order (the same in every process and on resume). Sums in float64."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:max_images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=None,
                                         num_workers=num_workers, worker_init_fn=ignore_stop_signals)
    sums = 0
    for image, _ in loader:
        x = utils.normalize(image, (0.0,) * len(image), (1.0,) * len(image)).double().flatten(1)  # (C, H*W)
        sums = sums + torch.stack([x.sum(1), x.square().sum(1), torch.full_like(x[:, 0], x.shape[1])])
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


class SyntheticImages(torch.utils.data.Dataset):
    """A small random labelled image set, the same for every run: each image is its class's colour plus
    noise, so there is something to learn. Items are PIL images (RGB, or grey for in_chans 1), so real
    transforms apply; with other in_chans, uint8 tensors (C, H, W), as decode() gives."""

    def __init__(self, size, img_size, num_classes=10, transform=None, seed=0, in_chans=3):
        self.size, self.img_size, self.num_classes = size, img_size, num_classes
        self.transform, self.seed, self.in_chans = transform, seed, in_chans
        self.colours = np.random.default_rng(seed).integers(0, 256, (num_classes, in_chans))

    def __len__(self):
        return self.size

    @property
    def targets(self):
        return [index % self.num_classes for index in range(self.size)]

    def __getitem__(self, index):
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, index))
        noise = rng.normal(0, 40, (self.img_size, self.img_size, self.in_chans))
        pixels = np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8)  # (H, W, C)
        if self.in_chans in (1, 3):
            img = Image.fromarray(pixels[:, :, 0] if self.in_chans == 1 else pixels)
        else:
            img = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        return (self.transform(img) if self.transform else img), label


def eval_transform(img_size, interpolation=v2.InterpolationMode.BICUBIC):
    """Resize(256/224 of the crop) + CenterCrop, the ImageNet evaluation protocol: bicubic as timm's fine-tuning
    pipeline, bilinear (torchvision's default) for the official linear probe; a PIL image or a decoded tensor
    -> (C, H, W) in its stored dtype (uint8 for PIL) for to_device."""
    return v2.Compose([v2.Resize(int(img_size * 256 / 224), interpolation=interpolation),
                       v2.CenterCrop(img_size), v2.PILToTensor()])


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose epoch can start part-way: set_epoch(epoch, skip) leaves out this process's first
    `skip` indices of that epoch's order, so a run resumed mid-epoch reads (and decodes) none of the images it
    has trained on and then sees the rest in the same order. len() stays the whole epoch's."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM, SIGUSR1 and SIGINT (sent to every process of a job, or of a terminal's
    foreground group) to the main process, which stops at a step boundary and shuts them down."""
    for name in utils.STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def make_loader(dataset, batch_size, train, num_workers, seed, device, collate_fn=None):
    """Per-process DataLoader.

    train: a shuffling ResumableSampler that drops the last partial batch (also in one process, so the order
    depends only on seed and epoch: start each epoch with epoch_batches()).
    Otherwise every process takes the indices rank, rank + world, ...: each item is seen exactly once
    over all processes, with no padding, so evaluation sums are exact.
    """
    rank, world = utils.rank_world()
    if train:
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = range(rank, len(dataset), world)
    # its own generator for the workers' seeds: starting an epoch draws nothing from the seeded global RNG
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1)[0]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0, collate_fn=collate_fn,
                                       worker_init_fn=ignore_stop_signals, generator=generator)


def classification_datasets(data, img_size, train_transform, val_transform, num_classes=None, synthetic_size=256,
                            in_chans=3):
    """(train set, val set, number of classes).

    data "synthetic": SyntheticImages items 0..synthetic_size-1 for training and the next synthetic_size // 4
    (at least 1) of the same set for validation, num_classes default 10, in_chans channels. Otherwise
    ImageFolder DATA/train and DATA/val, which must hold the same classes: PIL RGB images for 3 channels (the
    official pipelines' decoding), else decode_file's tensors of in_chans channels (arrays too).
    """
    if data == "synthetic":
        if synthetic_size < 1:
            utils.fail(f"--synthetic-size must be positive, got {synthetic_size}")
        num_classes = num_classes or 10
        num_val = max(1, synthetic_size // 4)
        train = SyntheticImages(synthetic_size, img_size, num_classes, train_transform, in_chans=in_chans)
        val = torch.utils.data.Subset(SyntheticImages(synthetic_size + num_val, img_size, num_classes, val_transform,
                                                      in_chans=in_chans),
                                      range(synthetic_size, synthetic_size + num_val))
        return train, val, num_classes
    if not os.path.isdir(data):
        utils.fail(f"data folder {data} does not exist")
    files = (load_rgb, datasets.folder.IMG_EXTENSIONS) if in_chans == 3 else \
        (functools.partial(decode_file, in_chans=in_chans), EXTENSIONS)
    train = image_folder(os.path.join(data, "train"), train_transform, *files)
    val = image_folder(os.path.join(data, "val"), val_transform, *files)
    if train.classes != val.classes:
        utils.fail(f"{data}/train and {data}/val hold different classes ({len(train.classes)} vs {len(val.classes)})")
    if num_classes not in (None, len(train.classes)):
        utils.fail(f"--num-classes {num_classes} but {data}/train holds {len(train.classes)} classes")
    return train, val, len(train.classes)


def labels_of(dataset):
    """The labels of an ImageFolder, a synthetic set or a Subset of one, read without loading any image."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return dataset.targets


def cap_per_class(dataset, per_class):
    """The first per_class items of each class of an ImageFolder or a labelled synthetic set, as a Subset."""
    labels = labels_of(dataset)
    seen, keep = {}, []
    for index, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= per_class:
            keep.append(index)
    return torch.utils.data.Subset(dataset, keep)
