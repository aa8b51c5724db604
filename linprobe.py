"""Linear probe of a pretrained ExtreMA encoder: the encoder is frozen, a BatchNorm + linear head is trained
on its instance representation (the class-attention output; by default before the final norm and from the
momentum encoder, as the official probe). With --knn, the same frozen features are evaluated without
training instead: the weighted k-nearest-neighbour classifier of DINO (cosine similarity, votes exp(sim / T)).
With --extract, the features of every image of --data (a folder, a list file or shards, as pretrain.py reads
them; no labels needed) are written to <output-dir>/instance.npy, tokens.npy and names.txt instead.

    python linprobe.py --data synthetic --device cpu ...                                   # one process
    torchrun --nproc_per_node 8 linprobe.py --data /path/to/imagenet --pretrained CKPT    # official recipe
    torchrun --nproc_per_node 8 linprobe.py --extract --data 'in22k/{000000..014197}.tar' --pretrained CKPT
"""
import argparse
import math
import os
import shutil

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

import data
import models
import utils


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    utils.add_common_args(p, "ImageNet root (ROOT/train, ROOT/val)", "output/linprobe", None, 4096, 10,
                          branch="momentum", img_help=utils.IMG_HELP)
    p.add_argument("--synthetic-size", type=int, default=256, help="training images in the synthetic set")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic: default 10; folders: their classes")
    p.add_argument("--final-norm", action="store_true",
                   help="probe the class-attention output after the final norm (default: before, as official)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--blr", type=float, default=0.1, help="lr = blr * batch-size / 256")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd", help="momentum 0.9 either way")
    p.add_argument("--knn", action="store_true",
                   help="weighted k-NN evaluation of the frozen features instead of training a probe")
    p.add_argument("--knn-k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours, one result each")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="votes weigh exp(similarity / T)")
    p.add_argument("--extract", action="store_true",
                   help="write the features of every image of --data (a folder at any depth, a list file, shards) "
                        "to <output-dir>/instance.npy (N, D) float32 (the probe's feature), tokens.npy (N, D) (the "
                        "mean patch token after the final norm) and names.txt (one line per row), in the source's "
                        "order, instead of training")
    return data.encoder_inputs(utils.parse_args(p, argv))


class LinearProbe(nn.Module):
    """The official probe: frozen encoder (always in eval mode, no gradients) -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, encoder, num_classes, final_norm=False):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.final_norm = final_norm
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False),
                                  nn.Linear(encoder.embed_dim, num_classes))
        nn.init.normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images, with_tokens=False):
        """(B, C, H, W) -> class-attention output (B, D), before the final norm unless final_norm; with_tokens:
        (that, the mean of the patch tokens after the final norm (B, D))."""
        tokens, instance = self.encoder.forward_features(images)  # (B, N, D), (B, D)
        instance = self.encoder.norm(instance) if self.final_norm else instance
        return (instance, self.encoder.norm(tokens).mean(1)) if with_tokens else instance

    def forward(self, images):
        return self.head(self.features(images))  # (B, C)


class LARS(torch.optim.Optimizer):
    """Momentum SGD with layer-wise adaptive rate scaling (You et al., 2017): the update of each weight matrix (weight
    decay included) is rescaled to trust_coefficient * |w| / |update|; 1-D parameters (biases): plain momentum SGD."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def load_encoder(args, rank, log):
    """The frozen encoder: --pretrained's --branch, else random (the same in every process)."""
    utils.set_seed(args.seed)  # every process draws the same random encoder (used without --pretrained)
    config = models.encoder_config(utils.load_checkpoint(args.pretrained)) if args.pretrained else {}
    encoder = models.VisionTransformer(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                                       **models.ARCHS[args.arch], ca_depth=args.ca_depth,
                                       rel_pos_bias=config.get("rel_pos_bias", False))
    utils.set_seed(args.seed + rank)
    # --knn and --extract train nothing: they read --pretrained even where a probe's checkpoint-last.pth exists
    trains = not (args.knn or args.extract)
    data.load_pretrained_encoder(encoder, args.pretrained, args.branch, log, args.output_dir if trains else None)
    return encoder


def train_one_epoch(probe, head, loader, optimizer, scaler, epoch, run, args, device):
    """One epoch of the probe's head on the frozen encoder's features, from where a resumed run stopped."""
    steps = run.steps_per_epoch
    first = run.start_step if epoch == run.start_epoch else 0
    batches = data.epoch_batches(loader, epoch, first * args.accum_iter)
    for step in run.steps(epoch, first):
        lr = utils.cosine_schedule(epoch + step / steps, args.epochs, args.warmup_epochs, args.lr)  # per iteration
        utils.set_lr(optimizer, lr)
        losses = []
        for i in range(args.accum_iter):
            images, targets = data.to_device(next(batches), device, args.mean, args.std)
            with utils.no_sync(head, i < args.accum_iter - 1):
                with utils.autocast(device, args.amp):
                    loss = F.cross_entropy(head(probe.features(images)), targets)  # features: no gradient
                scaler.scale(loss / args.accum_iter).backward()
            losses.append(loss.detach())
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(probe.head.parameters(), math.inf)  # logged, not clipped
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.log_step(loss=torch.stack(losses).mean(), lr=lr, grad_norm=grad_norm)


def accuracy_counts(logits, targets):
    """Top-1 and top-5 hits in a batch: logits (B, C), integer targets (B,) -> float64 (2,)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
    hits = top == targets[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


@torch.no_grad()
def evaluate(model_fn, loader, device, amp, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
    """(top-1 %, top-5 %, mean cross-entropy) of model_fn(images) -> logits over a whole evaluation set, its images
    normalised on the device with mean, std. Exact however the set divides: each process counts its share
    (make_loader(train=False) gives every image to exactly one process) and the sums are added over processes."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for batch in loader:
        images, targets = data.to_device(batch, device, mean, std)
        with utils.autocast(device, amp):
            logits = model_fn(images).float()  # (B, C)
        sums[:2] += accuracy_counts(logits, targets)
        sums[2] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[3] += len(targets)
    top1, top5, loss, count = utils.all_reduce_sum(sums).tolist()
    return 100 * top1 / count, 100 * top5 / count, loss / count


def evaluate_checkpoint(model, val_loader, device, run, checkpoint, args, log):
    """--eval-only: top-1 and top-5 of the classifier that <output-dir>/checkpoint-last.pth holds, logged."""
    if checkpoint is None:
        utils.fail(f"--eval-only needs a trained model: {run.path} does not exist")
    model.eval()
    acc1, acc5, val_loss = evaluate(model, val_loader, device, args.amp, args.mean, args.std)
    log(f"evaluation of {run.path}: acc1 {acc1:.2f} acc5 {acc5:.2f} on {len(val_loader.dataset)} images")
    utils.log_json(args.output_dir, dict(epoch=checkpoint["epoch"], eval_only=True, acc1=acc1, acc5=acc5,
                                         val_loss=val_loss))


# ============ k-nearest-neighbour evaluation of frozen features (--knn, and pretrain.py --monitor) ============


def all_gather_rows(x):
    """Concatenate the (n_r, ...) tensors of all processes along dim 0, in rank order (n_r may differ)."""
    if utils.rank_world()[1] == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0],) + x.shape[1:])])  # (max n_r, ...)
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)])


@torch.no_grad()
def extract_features(feature_fn, loader, device, amp, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
    """L2-normalised float32 features (n, D) and labels (n,) of this process's share of a loader (images: mean, std)."""
    features, labels = [], []
    for batch in loader:
        images, targets = data.to_device(batch, device, mean, std)
        with utils.autocast(device, amp):
            out = feature_fn(images)
        features.append(F.normalize(out.float(), dim=-1))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_counts(train_features, train_labels, features, labels, num_classes, ks, temperature=0.07, chunk=256):
    """Weighted k-NN classification (DINO's): the k most cosine-similar training images (features L2-normalised)
    vote for their class with weight exp(similarity / temperature). Returns float64 (len(ks), 2): top-1 and top-5
    hits for each k. Queries go `chunk` at a time, so memory stays at chunk x len(train_features)."""
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
                 temperature=0.07, mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD):
    """{k: (top-1 %, top-5 %)} of the weighted k-NN classifier on frozen features feature_fn(images) -> (B, D), the
    images normalised with mean, std. Both loaders from make_loader(train=False): every process extracts its share,
    the training features are gathered and each validation image counts once: the one-process result, always."""
    train_features, train_labels = extract_features(feature_fn, train_loader, device, amp, mean, std)
    train_features, train_labels = all_gather_rows(train_features), all_gather_rows(train_labels)
    features, labels = extract_features(feature_fn, val_loader, device, amp, mean, std)
    hits = utils.all_reduce_sum(knn_counts(train_features, train_labels, features, labels, num_classes, ks,
                                           temperature))
    count = utils.all_reduce_sum(torch.tensor(float(len(labels)), dtype=torch.float64, device=device)).item()
    return {k: (100 * top1 / count, 100 * top5 / count) for k, (top1, top5) in zip(ks, hits.tolist())}


def knn(probe, train_set, val_set, num_classes, batch_size, device, args, log):
    """k-NN evaluation of the probe's frozen features; one line per k, one JSON line in log.jsonl and, with
    --report-to, eval/k{k}_acc1 and eval/k{k}_acc5 at step 0."""
    loaders = [data.make_loader(dataset, batch_size, False, args.num_workers, args.seed, device)
               for dataset in (train_set, val_set)]
    results = knn_evaluate(probe.features, *loaders, num_classes, device, args.amp, args.knn_k, args.knn_temperature,
                           args.mean, args.std)
    record = dict(knn=True, branch=args.branch, pretrained=args.pretrained, temperature=args.knn_temperature)
    for k, (acc1, acc5) in results.items():
        log(f"{k}-NN of the {args.branch} encoder: acc1 {acc1:.2f} acc5 {acc5:.2f} "
            f"({len(train_set)} training / {len(val_set)} validation images)")
        record.update({f"k{k}_acc1": acc1, f"k{k}_acc5": acc5})
    utils.log_json(args.output_dir, record)
    reporter = utils.Reporter(args)
    reporter.scalars(0, {f"eval/{key}": value for key, value in record.items() if key.endswith(("_acc1", "_acc5"))})
    reporter.close()


def extract(probe, transform, batch_size, device, args, log):
    """--extract: every process appends the rows of its parts of the source (data.extraction_loader) to files of
    their own; then rank 0 joins them in the source's order into instance.npy, tokens.npy (open_memmap: never the
    whole array in memory) and names.txt, renamed into place at the end: a failed run leaves the previous outputs
    as they were, and no parts."""
    loader, num_parts = data.extraction_loader(args.data, transform, batch_size, args.num_workers, args.seed, device,
                                               args.synthetic_size, args.img_size, args.in_chans)
    parts = os.path.join(args.output_dir, "extract-parts")
    outputs = {kind: os.path.join(args.output_dir, kind) for kind in ("instance.npy", "tokens.npy", "names.txt")}
    if utils.is_main():
        shutil.rmtree(parts, ignore_errors=True)  # of an earlier, stopped run
        os.makedirs(parts)
    barrier = torch.distributed.barrier if utils.distributed() else (lambda: None)
    barrier()

    def part_path(part, kind):
        return os.path.join(parts, f"{part:06d}.{kind}")

    try:
        for images, names, part in loader:
            with utils.autocast(device, args.amp):
                rows = probe.features(data.normalize(images.to(device, non_blocking=True), args.mean, args.std),
                                      with_tokens=True)
            for kind, values in zip(("instance", "tokens"), rows):
                values = values.float().cpu().numpy()
                if not np.isfinite(values).all():
                    utils.fail(f"the {kind} features of image {names[np.isfinite(values).all(1).argmin()]} are not "
                               f"finite: not writing {outputs[kind + '.npy']}")
                with open(part_path(part, kind), "ab") as f:
                    f.write(values.tobytes())
            with open(part_path(part, "names"), "a") as f:
                f.write("".join(name + "\n" for name in names))
        barrier()
        if not utils.is_main():
            return
        dim = probe.encoder.embed_dim
        filled = [p for p in range(num_parts) if os.path.exists(part_path(p, "instance"))]  # parts with images
        sizes = [os.path.getsize(part_path(p, "instance")) // (4 * dim) for p in filled]
        if not sum(sizes):
            utils.fail(f"--data {args.data} holds no samples")
        for kind in ("instance", "tokens"):
            out = np.lib.format.open_memmap(part_path(0, f"{kind}.npy"), mode="w+", dtype=np.float32,
                                            shape=(sum(sizes), dim))
            for p, start, size in zip(filled, np.cumsum([0] + sizes), sizes):
                out[start:start + size] = np.fromfile(part_path(p, kind), dtype=np.float32).reshape(-1, dim)
            out.flush()
            del out
        with open(part_path(0, "names.txt"), "w") as f:
            for p in filled:
                with open(part_path(p, "names")) as part:
                    shutil.copyfileobj(part, f)
        for kind, path in outputs.items():
            os.replace(part_path(0, kind), path)
    finally:
        if utils.is_main():
            shutil.rmtree(parts, ignore_errors=True)
    log(f"wrote the {args.branch} encoder's features of {sum(sizes)} images of {args.data} to {args.output_dir}: "
        f"instance.npy and tokens.npy ({sum(sizes)}, {dim}), names.txt")


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = utils.init_distributed(args.device)
    args.amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, world_size, args.accum_iter)
    args.lr = args.blr * args.batch_size / 256
    log = print if rank == 0 else (lambda *a: None)
    utils.make_output_dir(args.output_dir)

    # torchvision's default bilinear resizing for training and evaluation, as the official probe
    val_transform = data.eval_transform(args.img_size, v2.InterpolationMode.BILINEAR)
    if args.extract:
        probe = LinearProbe(load_encoder(args, rank, log), 1, args.final_norm).to(device)
        return extract(probe, val_transform, local_batch, device, args, log)
    train_transform = v2.Compose([v2.RandomResizedCrop(args.img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    if args.knn:  # neighbours are looked up among the training images as evaluated
        train_transform = val_transform
    train_set, val_set, num_classes = data.classification_datasets(
        args.data, args.img_size, train_transform, val_transform, args.num_classes, args.synthetic_size, args.in_chans)
    if args.knn and min(args.knn_k) < 1:
        utils.fail(f"--knn-k must be at least 1, got {min(args.knn_k)}")
    if args.knn and max(args.knn_k) > len(train_set):
        utils.fail(f"--knn-k {max(args.knn_k)} is more than the {len(train_set)} training images")

    probe = LinearProbe(load_encoder(args, rank, log), num_classes, args.final_norm).to(device)
    if args.knn:
        return knn(probe, train_set, val_set, num_classes, local_batch, device, args, log)
    train_loader = data.make_loader(train_set, local_batch, True, args.num_workers, args.seed, device)
    val_loader = data.make_loader(val_set, local_batch, False, args.num_workers, args.seed, device)
    head = probe.head  # the only trained (and DDP-wrapped) part
    if world_size > 1:
        if device.type == "cuda":  # SyncBatchNorm has no CPU kernel; on CPU each process keeps its own statistics
            probe.head = nn.SyncBatchNorm.convert_sync_batchnorm(probe.head)
        head = DDP(probe.head, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer_class = LARS if args.optimizer == "lars" else torch.optim.SGD
    optimizer = optimizer_class(probe.head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = utils.grad_scaler(device, args.amp)
    log(f"linear probe of the {args.branch} encoder ({args.arch}, {'after' if args.final_norm else 'before'} the "
        f"final norm): {len(train_set)} training / {len(val_set)} validation images, {num_classes} classes, "
        f"lr {args.lr:.3e}, {world_size} process(es) x {local_batch} x {args.accum_iter}")

    # the frozen encoder is saved with the head, so a checkpoint evaluates on its own
    run = utils.Run(args, utils.steps_per_epoch(train_loader, args), log, stage="linprobe.py")
    checkpoint = run.resume(probe, optimizer, scaler, utils.ARCH_FLAGS + ("final_norm",))
    if args.eval_only:
        return evaluate_checkpoint(probe, val_loader, device, run, checkpoint, args, log)
    run.extra["best_acc1"] = 0.0 if checkpoint is None else checkpoint["best_acc1"]
    for epoch in range(run.start_epoch, args.epochs):
        probe.train()  # the head's BatchNorm; the encoder stays in eval mode
        train_one_epoch(probe, head, train_loader, optimizer, scaler, epoch, run, args, device)
        record = {"epoch": epoch, **run.end_epoch()}
        probe.eval()
        if world_size > 1:  # evaluate everywhere with the BatchNorm statistics that rank 0 saves
            for buffer in probe.head.buffers():
                torch.distributed.broadcast(buffer, 0)
        acc1, acc5, val_loss = evaluate(probe, val_loader, device, args.amp, args.mean, args.std)
        run.extra["best_acc1"] = best_acc1 = max(run.extra["best_acc1"], acc1)
        log(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc1 {acc1:.2f} acc5 {acc5:.2f} "
            f"(best {best_acc1:.2f})")
        record.update(acc1=acc1, acc5=acc5, val_loss=val_loss, best_acc1=best_acc1)
        run.save(epoch + 1, 0, record, {"eval/acc1": acc1, "eval/acc5": acc5, "eval/loss": val_loss})
    run.close()


if __name__ == "__main__":
    utils.run_main(main)
