"""Datasets, decoding and loaders of the stages: image folders, the synthetic set, labelled classification
sets and the per-process DataLoader with its resumable sampler.

A file of its own, beside utils.py (which it imports for errors and the process layout) and imported by the
stages: the data sources are a concern of their own, and utils.py holds the rest of the plumbing."""
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


def decode_rgb(path):
    """An image file as a uint8 RGB tensor (3, H, W): torchvision.io for JPEG, PNG, WebP and GIF (about 15% less
    CPU than PIL for a JPEG, and no copy from PIL), else load_rgb; an unreadable file raises DataError naming it."""
    try:
        image = decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError:
        return v2.functional.pil_to_tensor(load_rgb(path))
    if image.dtype != torch.uint8:
        raise utils.DataError(f"cannot read image {path}: {image.dtype} pixels (16-bit?); 8-bit images only")
    return image


def image_folder(root, transform, loader=load_rgb):
    """ImageFolder with a one-line error for a missing or empty folder; loader: load_rgb (PIL) or decode_rgb."""
    if not os.path.isdir(root):
        utils.fail(f"data folder {root} does not exist")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=loader)
    except FileNotFoundError:
        utils.fail(f"no images found in {root} (expected {root}/<class>/<image>)")


class SyntheticImages(torch.utils.data.Dataset):
    """A small random labelled image set, the same for every run: each image is its class's colour plus
    noise, so there is something to learn. Items are PIL images, so real transforms apply."""

    def __init__(self, size, img_size, num_classes=10, transform=None, seed=0):
        self.size, self.img_size, self.num_classes = size, img_size, num_classes
        self.transform, self.seed = transform, seed
        self.colours = np.random.default_rng(seed).integers(0, 256, (num_classes, 3))

    def __len__(self):
        return self.size

    @property
    def targets(self):
        return [index % self.num_classes for index in range(self.size)]

    def __getitem__(self, index):
        label = index % self.num_classes
        rng = np.random.default_rng((self.seed, index))
        noise = rng.normal(0, 40, (self.img_size, self.img_size, 3))
        img = Image.fromarray(np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8))
        return (self.transform(img) if self.transform else img), label


def eval_transform(img_size, interpolation=v2.InterpolationMode.BICUBIC):
    """Resize(256/224 of the crop) + CenterCrop, the ImageNet evaluation protocol: bicubic as timm's fine-tuning
    pipeline, bilinear (torchvision's default) for the official linear probe; uint8 (3, H, W) for to_device."""
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
    foreground group) to the main process, which stops at a step boundary and shuts them down
    (utils.run_main, however it ends); they die with it if it is killed."""
    for name in utils.STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    utils.exit_with_parent(signal.SIGKILL)


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


def classification_datasets(data, img_size, train_transform, val_transform, num_classes=None, synthetic_size=256):
    """(train set, val set, number of classes).

    data "synthetic": SyntheticImages items 0..synthetic_size-1 for training and the next synthetic_size // 4
    (at least 1) of the same set for validation, num_classes default 10. Otherwise ImageFolder
    DATA/train and DATA/val, which must hold the same classes.
    """
    if data == "synthetic":
        if synthetic_size < 1:
            utils.fail(f"--synthetic-size must be positive, got {synthetic_size}")
        num_classes = num_classes or 10
        num_val = max(1, synthetic_size // 4)
        train = SyntheticImages(synthetic_size, img_size, num_classes, train_transform)
        val = torch.utils.data.Subset(SyntheticImages(synthetic_size + num_val, img_size, num_classes, val_transform),
                                      range(synthetic_size, synthetic_size + num_val))
        return train, val, num_classes
    if not os.path.isdir(data):
        utils.fail(f"data folder {data} does not exist")
    train = image_folder(os.path.join(data, "train"), train_transform)
    val = image_folder(os.path.join(data, "val"), val_transform)
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
