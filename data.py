"""What goes into the encoder: its architecture and inputs (channels, statistics) from --pretrained or the flags
(encoder_inputs), decoding, the pretraining sources (synthetic, a folder, a list file, WebDataset shards) behind
pretraining_loader, the sources of `linprobe.py --extract` behind extraction_loader, labelled classification sets,
the per-process DataLoader with its resumable sampler, and normalisation on the device. Imports utils.py (errors,
the process layout); imported by the stages."""
import functools
import io
import itertools
import math
import os
import pathlib
import re
import signal
import sys
import tarfile
import time
from typing import NamedTuple

import numpy as np
import torch
import torchcodec.decoders
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

import models
import utils

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "npy")  # a shard sample's image, first found
SHUFFLE_BUFFER = 1000  # undecoded shard samples each loader worker shuffles among (about 110 MB of ImageNet JPEGs)
WARN_SKIPPED = 5  # unreadable images named in warnings, per process
EXTRACT_PART = 10000  # rows of a folder or list per part of --extract (a shard is one part)


# ============ Decoding ============


EXTENSIONS = (*IMG_EXTENSIONS, ".npy")  # the files decode() reads: torchvision's image extensions and arrays
# 16-bit and floating-point PIL modes (TIFF) read as arrays: I;16* -> uint16, I -> int32 (cast to uint16), F -> float32
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I", "F")


def wide_pixels(img):
    """The pixel layout of an opened PIL image of more than 8 bits a channel, which 8-bit conversion would clip (a
    WIDE_MODES mode, or 16-bit colour such as a 48-bit PNG: PIL's raw mode "RGB;16B"; not BMP's "BGR;16"), else None."""
    layout = img.tile[0].args if img.tile else None
    layout = layout[0] if isinstance(layout, tuple) else layout
    if img.mode in WIDE_MODES:
        return img.mode
    return layout if isinstance(layout, str) and re.search(r";16[BLN]", layout) else None


def load_rgb(path):
    """Open an 8-bit image as RGB (PIL); an unreadable file, or one of 16-bit or floating-point pixels (which RGB
    conversion would clip), raises DataError naming it."""
    try:
        with Image.open(path) as img:
            if wide := wide_pixels(img):
                raise ValueError(f"{wide} pixels: RGB runs read 8-bit images (16-bit grey images: --in-chans 1)")
            return img.convert("RGB")
    except Exception as e:
        raise utils.DataError(f"cannot read image {path}: {e}") from None


def decode_array(raw, in_chans):
    """A .npy file's bytes, an array (H, W, C) or (H, W) of uint8, uint16 or float32 -> a tensor (C, H, W) of the
    same dtype: a channel-first view, no copy (the crop and the batch collation make contiguous ones)."""
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # native byte order
    array = array[:, :, None] if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[2] != in_chans or array.dtype not in (np.uint8, np.uint16, np.float32):
        raise ValueError(f"expected an array (H, W, {in_chans}) of uint8, uint16 or float32, got {array.dtype} "
                         f"{array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_pil(raw, in_chans):
    """What torchcodec does not decode (TIFF, BMP, ...), through PIL: one channel keeps 16-bit and float grey
    data (WIDE_MODES) as uint16 or float32, else grey uint8; three channels RGB uint8; other 16-bit or float data
    raises (never clipped to 8 bits)."""
    with Image.open(io.BytesIO(raw)) as img:
        wide = wide_pixels(img)
        if in_chans == 1 and wide in WIDE_MODES:
            array = np.array(img)  # (H, W), a writable copy
            array = array.clip(0, 65535).astype(np.uint16) if array.dtype == np.int32 else array
            return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))[None]  # native order
        if in_chans not in (1, 3):
            raise ValueError(f"an image file has 1 or 3 channels, not {in_chans}: store such data as .npy (H, W, C)")
        if wide:
            raise ValueError(f"{wide} pixels: image files are read as 8-bit, except 16-bit and float grey ones with "
                             f"--in-chans 1 (other such data: .npy arrays)")
        return v2.functional.pil_to_tensor(img.convert("L" if in_chans == 1 else "RGB"))


def decode(raw, ext, in_chans=3):
    """An image file's bytes and extension (".png", ".npy", ...) -> a compact tensor (in_chans, H, W) in the stored
    dtype, which normalize maps to [0, 1] on the device. .npy: decode_array. Image files, in_chans 1: one grey
    channel (a colour image converted; 16-bit PNG and TIFF stay uint16); 3: RGB (a grey image replicated; 8-bit
    only); other counts: the image's own 8-bit channels if it has that many (RGBA for 4). JPEG, PNG, WebP and GIF
    through torchcodec (less CPU than PIL for a JPEG, the same pixels), the rest through PIL. DataError for a file
    that cannot give in_chans channels, an empty one, one without pixels, one with NaN or infinite values."""
    try:
        if not raw:
            raise ValueError("the file is empty")
        if ext.lower() == ".npy":
            image = decode_array(raw, in_chans)
        else:
            try:
                image = torchcodec.decoders.decode_image(raw, mode={1: "GRAY", 3: "RGB"}.get(in_chans, "UNCHANGED"),
                                                         output_dtype="auto")
            except (RuntimeError, ValueError):  # a format torchcodec does not read, or a damaged file: PIL says
                image = decode_pil(raw, in_chans)
            if image.shape[0] != in_chans:
                raise ValueError(f"{image.shape[0]} channel(s), not --in-chans {in_chans}")
            if in_chans != 1 and image.dtype != torch.uint8:
                raise ValueError(f"{image.dtype} pixels: image files of {in_chans} channels are read as 8-bit (16-bit "
                                 f"grey images: --in-chans 1; other 16-bit data: .npy arrays)")
        if image.ndim != 3 or image.numel() == 0:
            raise ValueError(f"not one image with pixels: shape {tuple(image.shape)}")
        if image.is_floating_point() and not image.isfinite().all():
            raise ValueError("NaN or infinite pixel values")
        return image
    except Exception as e:
        reason = "not an image PIL can identify" if isinstance(e, Image.UnidentifiedImageError) else e
        raise utils.DataError(f"cannot decode a {ext} file with {in_chans} channel(s): {reason}") from None


def decode_image(source, name=None, in_chans=3):
    """An image file (a path) or its bytes -> decode's tensor: the one decoder of every pretraining and extraction
    source, so a new format is added here. name (default: the path; a shard sample's key.ext) is what an error
    names, and its extension says how to decode. An unreadable or missing image raises DataError naming it."""
    name = source if name is None else name
    try:
        raw = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
        return decode(raw, os.path.splitext(name)[1], in_chans)
    except (OSError, utils.DataError) as e:
        raise utils.DataError(f"cannot read image {name}: {e.strerror if isinstance(e, OSError) else e}") from None


# ============ Finding images: folders, list files, shards ============


def folder_images(root, extensions=EXTENSIONS):
    """The images at any depth under root (torchvision's extensions, any case), as sorted paths relative to root;
    symlinked folders are followed, except a link back into a folder above it (a loop: images without end)."""
    names = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = os.path.realpath(folder)
        subfolders[:] = [d for d in subfolders
                         if not (here + os.sep).startswith(os.path.realpath(os.path.join(folder, d)) + os.sep)]
        relative = os.path.relpath(folder, root)
        names += [os.path.normpath(os.path.join(relative, f)) for f in files if f.lower().endswith(extensions)]
    return sorted(names)


def list_images(path):
    """The image paths of a list file, one a line (blank lines ignored), relative ones taken from the file's
    folder: (the list's folder, the lines). A missing image is found when read (pretraining skips it). UTF-8 text,
    with or without a byte-order mark; a file that is not text is refused in one line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        utils.fail(f"--data {path} is not a folder, a list file of image paths (UTF-8 text) or a shard pattern")
    if not names:
        utils.fail(f"list file {path} names no images")
    return os.path.dirname(os.path.abspath(path)), names


def is_shards(data):
    """Whether --data names WebDataset shards: a brace pattern, patterns joined by '::', pipe:, a URL, a .tar file."""
    return ("::" in data or "{" in data or data.startswith("pipe:") or re.match(r"^\w+://", data) is not None
            or data.endswith((".tar", ".tar.gz", ".tgz")))


def source_kind(data):
    """What --data names: 'synthetic', 'folder', 'shards' (is_shards), 'list' (any other file); else one line."""
    if data == "synthetic":
        return data
    if os.path.isdir(data):
        return "folder"
    if is_shards(data):
        return "shards"
    if os.path.isfile(data):
        return "list"
    utils.fail(f"--data {data} does not exist")


def shard_urls(data):
    """The shards of a brace pattern (several joined by '::'); one-line error when a local one does not exist."""
    urls = utils.optional_import("webdataset", "webdataset", "reading shards").shardlists.expand_urls(data)
    if not all(urls):
        utils.fail(f"--data {data} names an empty shard (patterns are joined by '::', none of them empty)")
    missing = [url for url in urls if not re.match(r"^(pipe:|\w+://)", url) and not os.path.isfile(url)]
    if missing:
        utils.fail(f"--data {data}: {len(missing)} of its {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def shard_samples(urls):
    """(key, bytes, extension) of every sample of the shards, in order, undecoded; extension: its image's (None
    without any of SHARD_IMAGE_KEYS). A shard that cannot be read to its end as a tar file (cut short, a failed
    download) raises DataError naming it: it loses an unknown number of samples, so it is not skipped."""
    import webdataset as wds  # only where shards are read; shard_urls, called first, says so when it is missing
    for url in urls:
        try:
            for sample in wds.tarfile_samples(iter([{"url": url}])):
                ext = next((key for key in SHARD_IMAGE_KEYS if key in sample), None)
                yield sample["__key__"], sample.get(ext), ext
        except (tarfile.TarError, OSError) as e:
            reason = str(e.args[0] if e.args else e).split(" @ ")[0]  # webdataset appends the stream and url
            status = re.search(r"exit (\d+)", reason)
            if reason == "empty file":
                reason = "no data (a download or pipe: command that failed, or an empty file)"
            elif status:
                reason = f"its download or pipe: command failed (exit status {status[1]})"
            raise utils.DataError(f"cannot read shard {url}: {reason}") from None


def read_sample(sample, in_chans=3):
    """The decoded image of an undecoded shard sample (name, bytes, extension); DataError when it has none."""
    name, raw, ext = sample
    if ext is None:
        raise utils.DataError(f"cannot read image {name}: no {'/'.join(SHARD_IMAGE_KEYS)} in the sample")
    return decode_image(raw, f"{name}.{ext}", in_chans)


# ============ Pretraining batches: every source, unreadable images skipped ============


class Batch(NamedTuple):
    """A pretraining batch: crops (B, C, H, W) in their decoded dtype; the B names read (paths relative to the data
    root, shard keys, synthetic indices); the errors of the unreadable ones among them, whose places hold copies of
    readable crops of the batch; the CPU seconds the loading process spent on it (bench.py)."""
    images: torch.Tensor
    names: list
    skipped: list
    cpu_s: float


def collate_skipping(items, start=None):
    """(crop or None, name, error) items -> Batch, each unreadable image's place taken by a readable crop of the
    batch, so the batch size stays; start: time.process_time() when its first item began (default: now)."""
    start = time.process_time() if start is None else start
    good = [crop for crop, _, _ in items if crop is not None]
    skipped = [error for _, _, error in items if error is not None]
    if not good:
        raise utils.DataError(f"all {len(items)} images of a batch are unreadable, e.g. {skipped[0]}")
    images = [crop if crop is not None else good[i % len(good)] for i, (crop, _, _) in enumerate(items)]
    for crop, name, _ in items:
        if crop is not None and crop.dtype != good[0].dtype:
            raise utils.DataError(f"image {name} has {crop.dtype} pixels where others of its batch have "
                                  f"{good[0].dtype}: the images of a run share one type (8-bit, 16-bit or float)")
    return Batch(torch.stack(images), [name for _, name, _ in items], skipped, time.process_time() - start)


def timed_collate(items):
    """collate_skipping of Samples items (item, CPU seconds): the batch's CPU time includes the items'."""
    batch = collate_skipping([item for item, _ in items])
    return batch._replace(cpu_s=batch.cpu_s + sum(seconds for _, seconds in items))


class Samples(torch.utils.data.Dataset):
    """A map-style pretraining source: item i is ((transform(read(i)) or None when unreadable, names[i], error),
    the CPU seconds it took). read: index -> PIL image or uint8 tensor, raising DataError."""

    def __init__(self, names, read, transform):
        self.names, self.read, self.transform = names, read, transform

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        start = time.process_time()
        try:
            item = self.transform(self.read(index)), self.names[index], None
        except utils.DataError as e:
            item = None, self.names[index], str(e)
        return item, time.process_time() - start


def read_file(root, names, in_chans, index):  # read(i) of a folder or list (functools.partial: picklable for workers)
    return decode_image(os.path.join(root, names[index]), in_chans=in_chans)


def read_synthetic(images, index):  # read(i) of a synthetic set: item i's image (PIL), without its label
    return images[index][0]


def indexed_source(data, kind, synthetic_size, img_size, seed, in_chans=3):
    """(names, read) of a synthetic set ('0', '1', ...), a folder (DIR/train when it exists; every image at any
    depth, paths relative to it) or a list file (its lines); read(i) gives image i."""
    if kind == "synthetic":
        images = SyntheticImages(synthetic_size, img_size, seed=seed, in_chans=in_chans)
        return [str(i) for i in range(synthetic_size)], functools.partial(read_synthetic, images)
    if kind == "folder":
        root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
        names = folder_images(root)
        if not names:
            utils.fail(f"no images found in {root}")
    else:
        root, names = list_images(data)
    return names, functools.partial(read_file, root, names, in_chans)


class ShardBatches(torch.utils.data.IterableDataset):
    """Pretraining batches of WebDataset shards, made in the loader's workers (len: batches per process).

    Each epoch the shards are dealt to (process, worker) readers. A process takes epoch_samples // world samples in
    whole batches; DataLoader takes its workers' batches in turn, so reader w of K makes batches w, w + K, ... of its
    process (a resumed epoch's first batch comes from the worker reading for the reader whose turn it is). A reader
    reads its shards in order through a shuffle buffer of undecoded samples seeded by (seed, epoch, reader): after a
    mid-epoch resume it passes over the samples its batches used without decoding them. A reader whose shards run
    out before its share starts them again in a new order, with a warning (those samples are read twice). set_epoch
    writes the epoch in shared memory, which the persistent workers read when an epoch starts."""

    def __init__(self, urls, epoch_samples, batch_size, transform, seed, workers, in_chans=3):
        self.rank, self.world = utils.rank_world()
        self.urls, self.batch_size, self.transform = urls, batch_size, transform
        self.seed, self.in_chans, self.workers = seed, in_chans, max(1, workers)
        self.batches = epoch_samples // self.world // batch_size
        self.position = torch.zeros(2, dtype=torch.long).share_memory_()  # epoch, batches of it already used

    def __len__(self):
        return self.batches

    def set_epoch(self, epoch, skip_batches=0):
        self.position[:] = torch.tensor([epoch, skip_batches])

    def reader_samples(self, epoch, worker):
        """The endless undecoded sample stream of reader (rank, worker) in an epoch: its shards, pass after pass."""
        import webdataset as wds
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        # the shards shuffled from (seed, epoch), then dealt round-robin: each goes to exactly one reader of the epoch
        order = np.random.default_rng([self.seed % 2**64, epoch]).permutation(len(self.urls))
        shards = [self.urls[i] for i in order[slot::slots]]
        for repeat in itertools.count():
            order = np.random.default_rng([self.seed % 2**64, epoch, slot, repeat]).permutation(len(shards))
            stream = shard_samples([shards[i] for i in order] if repeat else shards)
            count = 0
            seed = int(np.random.SeedSequence([self.seed % 2**64, epoch, slot, repeat]).generate_state(1)[0])
            for count, sample in enumerate(wds.shuffle(SHUFFLE_BUFFER, seed=seed)(stream), 1):
                yield sample
            if count == 0:
                raise utils.DataError(f"shards {', '.join(shards)} hold no samples")
            print(f"warning: process {self.rank} loader worker {worker} has read all {count} samples of its shards "
                  f"in epoch {epoch} and starts them again (its share of --train-num-samples is larger)",
                  file=sys.stderr)

    def load(self, sample):
        """(crop or None, name, error) of an undecoded shard sample."""
        try:
            return self.transform(read_sample(sample, self.in_chans)), sample[0], None
        except utils.DataError as e:
            return None, sample[0], str(e)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        epoch, skip = self.position.tolist()
        # DataLoader asks its workers in turn from worker 0, which therefore makes batch `skip`: it reads for reader
        # skip % K of the epoch's split, worker 1 for the next reader, ...
        worker = ((0 if info is None else info.id) + skip) % self.workers
        done, share = len(range(worker, skip, self.workers)), len(range(worker, self.batches, self.workers))
        samples = itertools.islice(self.reader_samples(epoch, worker), done * self.batch_size, None)
        for _ in range(share - done):
            start = time.process_time()
            yield collate_skipping([self.load(next(samples)) for _ in range(self.batch_size)], start)


def pretraining_loader(args, transform, batch_size, device):
    """(per-process loader of Batch, images per epoch) of --data: 'synthetic', a folder (DIR/train when it exists;
    every image at any depth), a list file of image paths, or WebDataset shards (args.train_num_samples images per
    epoch). Every process takes the same number of batches per epoch; epoch_batches starts an epoch, part-way after
    a resume without reading the images already used."""
    kind = source_kind(args.data)
    if kind != "shards":
        names, read = indexed_source(args.data, kind, args.synthetic_size, args.img_size, args.seed, args.in_chans)
        dataset = Samples(names, read, transform)
        return make_loader(dataset, batch_size, True, args.num_workers, args.seed, device, timed_collate), len(names)
    urls = shard_urls(args.data)
    world = utils.rank_world()[1]
    if args.train_num_samples is None:
        utils.fail("--data over shards needs --train-num-samples N, the images of an epoch (shards have no length)")
    if args.train_num_samples < 1:
        utils.fail(f"--train-num-samples must be at least 1, got {args.train_num_samples}")
    if len(urls) < world * max(1, args.num_workers):
        utils.fail(f"{len(urls)} shards for {world} process(es) x {max(1, args.num_workers)} loader worker(s): "
                   f"each needs a shard of its own (write more shards or lower --num-workers)")
    dataset = ShardBatches(urls, args.train_num_samples, batch_size, transform, args.seed, args.num_workers,
                           args.in_chans)
    return make_loader(dataset, batch_size, True, args.num_workers, args.seed, device), args.train_num_samples


# ============ The encoder and its inputs: channels and statistics from the checkpoint or the flags ============


OFFICIAL_ARCH = {"arch": "vit_base", "patch_size": 16, "img_size": 224}  # a stage's encoder without --pretrained
MIN_STD = 1e-6  # a smaller per-channel std (in [0, 1] units) would blow a nearly constant channel up to noise


def check_stats(in_chans, mean, std):
    """One-line error unless mean and std hold in_chans finite values each and every std is at least MIN_STD."""
    if in_chans < 1:
        utils.fail(f"--in-chans must be at least 1, got {in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        utils.fail(f"--mean and --std need {in_chans} value(s) each (one per input channel), got {len(mean)} and "
                   f"{len(std)}")
    for channel, (m, s) in enumerate(zip(mean, std)):
        if not math.isfinite(m):
            utils.fail(f"--mean of channel {channel} must be finite, got {m}")
        if not (math.isfinite(s) and s >= MIN_STD):
            utils.fail(f"--std of channel {channel} must be finite and at least {MIN_STD:g}, got {s}")


def encoder_inputs(args, channels=None):
    """The one place that decides the encoder and its inputs for every stage, before anything is built (every
    stage's get_args calls it after utils.parse_args; returns args). A stage that reads an encoder: unset --arch,
    --patch-size and --img-size, and the class-attention depth (args.ca_depth), are the --pretrained checkpoint's
    (models.encoder_config), or a resumed run's own, else the official ViT-B/16 at 224. --in-chans, --mean and
    --std: what the checkpoint records (an RGB one without statistics: ImageNet's), else the flags, else 3 channels
    and ImageNet's; pretraining's --norm-stats auto leaves them to be estimated. A flag that contradicts the
    checkpoint is refused in one line naming both values, except another --img-size (the position table is resized
    on load) and --in-chans C with an RGB checkpoint (its patch embedding is adapted on load: give the data's --mean
    and --std). channels: the channel counts the stage's data pipeline reads (None: any)."""
    path, auto = getattr(args, "pretrained", None), getattr(args, "norm_stats", None) == "auto"
    found = dict(OFFICIAL_ARCH, in_chans=None, mean=None, std=None, ca_depth=2)
    last = os.path.join(getattr(args, "output_dir", None) or "", "checkpoint-last.pth")
    if path is None and hasattr(args, "pretrained") and os.path.isfile(last):  # resumed, --eval-only: the run's own
        path, saved = last, utils.load_checkpoint(last).get("args", {})
        found.update({k: saved[k] for k in found if saved.get(k) is not None})
    elif path is not None:
        try:
            found = models.encoder_config(utils.load_checkpoint(path))
        except ValueError as e:
            utils.fail(f"{path}: {e}")
        if found["in_chans"] == 3 and found["mean"] is None:
            found.update(mean=list(utils.IMAGENET_MEAN), std=list(utils.IMAGENET_STD))
    if hasattr(args, "pretrained"):  # a stage that reads an encoder
        for key in OFFICIAL_ARCH:
            given = getattr(args, key)
            if key != "img_size" and path is not None and given not in (None, found[key]):
                utils.fail(f"{path}: {key.replace('_', ' ')} {found[key]} in the checkpoint, {given} given")
            setattr(args, key, found[key] if given is None else given)
        args.ca_depth = found["ca_depth"]  # the class-attention blocks it holds (pretraining has its flag)
    if args.img_size % args.patch_size and not hasattr(args, "feature_blocks"):  # dense stages: stricter checks
        utils.fail(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    in_chans, mean, std = found["in_chans"], found["mean"], found["std"]
    if None not in (args.in_chans, in_chans) and args.in_chans != in_chans:
        if in_chans != 3:
            utils.fail(f"--in-chans {args.in_chans} contradicts {path}, which holds {in_chans} channel(s)")
        in_chans, mean, std = args.in_chans, None, None  # adapted on load: the statistics are the data's
    for flag, given, recorded in (("--mean", args.mean, mean), ("--std", args.std, std)):
        if given is not None and recorded is not None and [float(v) for v in given] != list(recorded):
            utils.fail(f"{flag} {' '.join(map(str, given))} contradicts {path}, which records "
                       f"{' '.join(f'{v:g}' for v in recorded)}")
    args.in_chans = in_chans = in_chans or args.in_chans or 3
    if channels is not None and in_chans not in channels:
        utils.fail(f"this stage's data pipeline reads {' or '.join(map(str, channels))}-channel images, not "
                   f"{in_chans} channel(s)")
    mean, std = (args.mean if mean is None else mean), (args.std if std is None else std)
    if auto:  # estimated by pretrain.py before its first step
        if mean is not None or std is not None:
            utils.fail("give --mean and --std, or --norm-stats auto, not both")
        return args
    if mean is None and std is None and in_chans == 3:
        mean, std = list(utils.IMAGENET_MEAN), list(utils.IMAGENET_STD)
    if mean is None or std is None:
        utils.fail(f"--in-chans {in_chans} needs --mean and --std ({in_chans} values each) or --norm-stats auto"
                   if hasattr(args, "norm_stats") else f"{in_chans} input channel(s) need --mean and --std "
                                                        f"({in_chans} values each)")
    check_stats(in_chans, mean, std)
    args.mean, args.std = [float(v) for v in mean], [float(v) for v in std]
    if (in_chans != 3 or args.mean != list(utils.IMAGENET_MEAN)) and utils.is_main():
        print(f"inputs: {in_chans} channel(s), mean {' '.join(f'{v:.4f}' for v in args.mean)}, "
              f"std {' '.join(f'{v:.4f}' for v in args.std)}")
    return args


def load_pretrained_encoder(encoder, path, branch, log=print, output_dir=None):
    """--pretrained PATH into a VisionTransformer (ours or official format); None means random init.
    Nothing is read when output_dir holds checkpoint-last.pth: resuming and --eval-only load the whole model."""
    if output_dir is not None and os.path.exists(last := os.path.join(output_dir, "checkpoint-last.pth")):
        log(f"the encoder's weights will come from {last}" + (f" (--pretrained {path} is not read)" if path else ""))
        return
    if path is None:
        log("no --pretrained given: the encoder starts from random initialisation")
        return
    try:
        note = models.load_encoder(encoder, utils.load_checkpoint(path), branch)
    except ValueError as e:
        utils.fail(f"{path}: {e}")
    log(f"loaded the {branch} encoder from {path}" + (f"; {note}" if note else ""))


def sample_images(args, max_images):
    """Up to max_images decoded training images of --data (PIL ones as uint8 tensors) for --norm-stats auto: a fixed
    random subset of a folder, list or synthetic set (the same in every process and on resume), the first images of
    shards. Unreadable ones are skipped: the first WARN_SKIPPED named in warnings, all counted in one (main process)."""
    kind = source_kind(args.data)
    if kind == "shards":
        samples = shard_samples(shard_urls(args.data))
        read = functools.partial(read_sample, in_chans=args.in_chans)
    else:
        names, read = indexed_source(args.data, kind, args.synthetic_size, args.img_size, args.seed, args.in_chans)
        samples = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
    count, skipped = 0, 0
    warn = print if utils.is_main() else lambda *a, **k: None
    for sample in samples:
        if count == max_images:
            break
        try:
            image = read(sample)
        except utils.DataError as e:
            skipped += 1
            if skipped <= WARN_SKIPPED:
                warn(f"warning: --norm-stats auto skipped {e}", file=sys.stderr)
            continue
        count += 1
        yield image if isinstance(image, torch.Tensor) else v2.functional.pil_to_tensor(image)
    if skipped:
        warn(f"warning: --norm-stats auto skipped {skipped} unreadable image(s) and used {count}", file=sys.stderr)


def channel_stats(images):
    """Per-channel mean and standard deviation (lists of floats) over all the pixels of decoded images (C, H, W),
    in [0, 1] units (normalize's scaling). Sums in float64."""
    sums = 0
    for image in images:
        x = normalize(image, (0.0,) * len(image), (1.0,) * len(image)).double().flatten(1)  # (C, H*W)
        sums = sums + torch.stack([x.sum(1), x.square().sum(1), torch.full_like(x[:, 0], x.shape[1])])
    if isinstance(sums, int):
        utils.fail("--norm-stats auto found no readable training image")
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean.square()).clamp_min(0).sqrt()
    for channel, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
        if not math.isfinite(m + s) or s < MIN_STD:
            problem = f"constant (std {s:.2g})" if math.isfinite(m + s) else f"not finite (mean {m}, std {s})"
            utils.fail(f"--norm-stats auto: channel {channel} of the training images is {problem}")
    return mean.tolist(), std.tolist()


# ============ Extraction: every image once, in the source's order ============


class ExtractionBatches(torch.utils.data.IterableDataset):
    """Batches (images (b, C, H, W), names, part) of the parts of a source: a shard, or EXTRACT_PART consecutive
    images of a folder, list or synthetic set. Process r of W reads parts r, r + W, ..., and its worker w of K every
    K-th of those, each part in order; a part's last batch may be short. An unreadable image stops the run
    (DataError), as in every evaluation."""

    def __init__(self, parts, read, transform, batch_size, workers):
        self.parts, self.read, self.transform, self.batch_size = parts, read, transform, batch_size
        self.rank, self.world, self.workers = *utils.rank_world(), max(1, workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        for part in range(self.rank + self.world * worker, len(self.parts), self.world * self.workers):
            samples = iter(self.read(self.parts[part]))
            while batch := list(itertools.islice(samples, self.batch_size)):
                for name, _ in batch:
                    if name.splitlines() != [name]:
                        raise utils.DataError(f"cannot extract image {name!r}: names.txt holds one name a line, and "
                                              f"this one holds a line break (rename it)")
                yield (torch.stack([self.transform(image) for _, image in batch]), [name for name, _ in batch], part)


def read_shard(url, in_chans=3):
    """(name, decoded image) of every sample of a shard, in order; a sample without a readable image raises."""
    for sample in shard_samples([url]):
        yield sample[0], read_sample(sample, in_chans)


def read_part(names, read, part):
    """(name, image) of each item of a part (a range of indices) of an indexed source, in order."""
    for i in part:
        yield names[i], read(i)


def extraction_loader(data, transform, batch_size, num_workers, seed, device, synthetic_size=256, img_size=224,
                      in_chans=3):
    """(per-process loader of ExtractionBatches, number of parts) of --data as pretraining_loader reads it
    (no labels needed): every image once, an unreadable one an error."""
    kind = source_kind(data)
    if kind == "shards":
        parts, read = shard_urls(data), functools.partial(read_shard, in_chans=in_chans)
    else:
        names, read_item = indexed_source(data, kind, synthetic_size, img_size, seed, in_chans)
        parts = [range(i, min(i + EXTRACT_PART, len(names))) for i in range(0, len(names), EXTRACT_PART)]
        read = functools.partial(read_part, names, read_item)
    dataset = ExtractionBatches(parts, read, transform, batch_size, num_workers)
    return make_loader(dataset, batch_size, False, num_workers, seed, device), len(parts)


# ============ Labelled sets and loaders ============


class LabelledFolder(datasets.DatasetFolder):
    """ImageFolder (a DatasetFolder of the given extensions) whose images in each class folder are found by
    folder_images (symlinked folders followed, loops not)."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = [(os.path.join(directory, name, image), index) for name, index in sorted(class_to_idx.items())
                   for image in folder_images(os.path.join(directory, name), extensions or IMG_EXTENSIONS)]
        if not samples and not allow_empty:
            raise FileNotFoundError(f"no images in {directory}")
        return samples


def image_folder(root, transform, loader=load_rgb, extensions=IMG_EXTENSIONS):
    """LabelledFolder of the files with these extensions, with a one-line error for a missing or empty folder;
    loader: load_rgb (PIL) or a decode_image of in_chans (with EXTENSIONS: arrays too)."""
    if not os.path.isdir(root):
        utils.fail(f"data folder {root} does not exist")
    try:
        return LabelledFolder(root, loader, extensions, transform=transform)
    except FileNotFoundError:
        utils.fail(f"no images found in {root} (expected {root}/<class>/<image>)")


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
        noise = np.random.default_rng((self.seed, index)).normal(0, 40, (self.img_size, self.img_size, self.in_chans))
        pixels = np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8)  # (H, W, C)
        if self.in_chans in (1, 3):
            img = Image.fromarray(pixels[:, :, 0] if self.in_chans == 1 else pixels)
        else:
            img = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        return (self.transform(img) if self.transform else img), label


def eval_transform(img_size, interpolation=v2.InterpolationMode.BICUBIC):
    """Resize(256/224 of the crop) + CenterCrop, the ImageNet evaluation protocol (bicubic as timm's fine-tuning,
    bilinear as the official linear probe): a PIL image or decoded tensor -> (C, H, W), stored dtype (PIL: uint8)."""
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
    """DataLoader workers leave SIGTERM, SIGUSR1 and SIGINT (sent to a whole job, or a terminal's foreground group) to
    the main process, which stops at a step boundary and ends them (utils.run_main); they die with it when killed."""
    for name in utils.STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    utils.exit_with_parent(signal.SIGKILL)


def make_loader(dataset, batch_size, train, num_workers, seed, device, collate_fn=None):
    """Per-process DataLoader. An IterableDataset makes its own batches and split (batch_size is its business).
    train: a shuffling ResumableSampler that drops the last partial batch (also in one process, so the order depends
    only on seed and epoch: start each epoch with epoch_batches()). Otherwise process r takes items r, r + world,
    ...: each item is seen exactly once over all processes, with no padding, so evaluation sums are exact."""
    rank, world = utils.rank_world()
    if isinstance(dataset, torch.utils.data.IterableDataset):  # ShardBatches, ExtractionBatches: batches made there
        sampler = batch_size = None
    elif train:
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = range(rank, len(dataset), world)
    # its own generator for the workers' seeds: starting an epoch draws nothing from the seeded global RNG
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1)[0]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=train and batch_size is not None, pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0, collate_fn=collate_fn,
                                       worker_init_fn=ignore_stop_signals, generator=generator)


def classification_datasets(data, img_size, train_transform, val_transform, num_classes=None, synthetic_size=256,
                            in_chans=3):
    """(train set, val set, number of classes). "synthetic": SyntheticImages items 0..synthetic_size-1 for training
    and the next synthetic_size // 4 (at least 1) of the same set for validation, num_classes default 10. Otherwise
    ImageFolder DATA/train and DATA/val, which must hold the same classes: PIL RGB images for 3 channels (the
    official pipelines' decoding), else decode_image's tensors of in_chans channels (arrays too)."""
    if data == "synthetic":
        if synthetic_size < 1:
            utils.fail(f"--synthetic-size must be positive, got {synthetic_size}")
        num_classes = num_classes or 10
        num_val = max(1, synthetic_size // 4)
        train = SyntheticImages(synthetic_size, img_size, num_classes, train_transform, in_chans=in_chans)
        val = SyntheticImages(synthetic_size + num_val, img_size, num_classes, val_transform, in_chans=in_chans)
        return train, torch.utils.data.Subset(val, range(synthetic_size, synthetic_size + num_val)), num_classes
    if not os.path.isdir(data):
        utils.fail(f"data folder {data} does not exist")
    files = (load_rgb, IMG_EXTENSIONS) if in_chans == 3 else (functools.partial(decode_image, in_chans=in_chans),
                                                               EXTENSIONS)
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
    seen, keep = {}, []
    for index, label in enumerate(labels_of(dataset)):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= per_class:
            keep.append(index)
    return torch.utils.data.Subset(dataset, keep)


# ============ Batches on the device ============


FULL_SCALE = {torch.uint8: 255, torch.uint16: 65535}  # the value that maps to 1; floating point: 1 (as stored)


def normalize(images, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
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


def to_device(batch, device, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
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
