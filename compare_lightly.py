"""lightly's DINO, BYOL, MAE and SimCLR on our ViT and data, beside ExtreMA's small-data command
(docs/SMALL_DATA.md, "Side by side with lightly"). A file of its own, not a stage: it runs another library's methods,
and lightly is not a dependency of the project (`pip install lightly==1.6.0`).

Each method is lightly's example (examples/pytorch/<method>.py): its transforms, heads, loss, momentum schedule,
batch size, optimizer and constant lr in the example's plain loop, changed only in image size (DINO's local crops are
half of it), backbone (models.vit_tiny; its class-attention output is what the heads see) and epochs. The encoders
are saved as pretrain.py saves them, so `linprobe.py --pretrained` reads them ('momentum_encoder': the teacher, or
the only encoder; 'encoder': the student). log.jsonl gets per epoch the mean loss, wall and CPU seconds (the process
and its finished loader workers) and, for BYOL, `target_std` as pretrain.py defines it.

    OMP_NUM_THREADS=1 python compare_lightly.py --method mae --data data/fmnist --epochs 6 --output-dir output/mae
    python linprobe.py --knn --data data/fmnist --pretrained output/mae/checkpoint-last.pth --arch vit_tiny \\
        --img-size 28 --patch-size 7 --device cpu --output-dir output/mae-knn
"""
import argparse
import copy
import json
import os
import resource
import time

import torch
import torch.nn as nn
from torchvision.datasets import ImageFolder

import models
import utils

try:
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import (BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead,
                                        MaskedVisionTransformerDecoderTIMM, SimCLRProjectionHead)
    from lightly.models.modules.masked_vision_transformer_timm import init_weights
    from lightly.models.utils import (deactivate_requires_grad, get_at_index, patchify, random_token_mask,
                                      set_at_index, update_momentum)
    from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform,
                                    MAETransform, SimCLRTransform)
    from lightly.utils.scheduler import cosine_schedule
except ImportError:
    raise SystemExit("compare_lightly.py needs the lightly package: pip install lightly==1.6.0")

# the examples' batch size, optimizer and lr
EXAMPLES = {"dino": (64, torch.optim.Adam, 1e-3), "byol": (256, torch.optim.SGD, 0.06),
            "mae": (256, torch.optim.AdamW, 1.5e-4), "simclr": (256, torch.optim.SGD, 0.06)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--method", choices=sorted(EXAMPLES), required=True)
    p.add_argument("--data", required=True, help="ImageFolder root; DATA/train is trained on")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=10, help="the examples train 10")
    p.add_argument("--batch-size", type=int, default=None, help="default: the example's (DINO 64, others 256)")
    p.add_argument("--lr", type=float, default=None,
                   help="constant, as in the examples; default: the example's (DINO 1e-3, MAE 1.5e-4, others 0.06)")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--momentum-by-step", action="store_true",
                   help="DINO, BYOL: the teacher momentum's cosine (0.996 -> 1) over steps, not over epochs")
    p.add_argument("--head-norm", choices=("batch", "layer"), default="batch",
                   help="BYOL: BatchNorm1d (lightly's) or LayerNorm (ExtreMA's) in projector and predictor")
    p.add_argument("--save-every", type=int, default=5, help="also keep checkpoint-<epoch>.pth every N epochs")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def instance(encoder, images):
    """(B, C, H, W) -> the backbone's feature (B, D): the class-attention output after the final norm."""
    return encoder(images)[1]


class DINO(nn.Module):
    """Student and EMA teacher with DINO heads; the teacher sees the 2 global crops, the student all 8."""

    def __init__(self, backbone, args):
        super().__init__()
        dim = backbone.embed_dim
        self.student, self.student_head = backbone, DINOProjectionHead(dim, 512, 64, 2048, freeze_last_layer=1)
        self.teacher, self.teacher_head = copy.deepcopy(backbone), DINOProjectionHead(dim, 512, 64, 2048)
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
        self.online, self.target = self.student, self.teacher

    @staticmethod
    def transform(size):
        return DINOTransform(global_crop_size=size, local_crop_size=size // 2)

    def loss(self, views, epoch, m):
        update_momentum(self.student, self.teacher, m=m)
        update_momentum(self.student_head, self.teacher_head, m=m)
        teacher_out = [self.teacher_head(instance(self.teacher, v)) for v in views[:2]]
        student_out = [self.student_head(instance(self.student, v)) for v in views]
        return self.criterion(teacher_out, student_out, epoch=epoch)

    def after_backward(self, epoch):
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)


class BYOL(nn.Module):
    """Online network with projector and predictor against an EMA target; symmetric negative cosine."""

    def __init__(self, backbone, args):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.embed_dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        if args.head_norm == "layer":  # each head's one BatchNorm1d -> LayerNorm, as in ExtreMA's heads
            for head in (self.projection_head, self.prediction_head):
                head.layers[1] = nn.LayerNorm(head.layers[1].num_features)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.online, self.target = self.backbone, self.backbone_momentum

    @staticmethod
    def transform(size):  # the example turns the blur off for CIFAR-10's 32 px
        return BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0),
                             view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0))

    def loss(self, views, epoch, m):
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        p0, p1 = (self.prediction_head(self.projection_head(instance(self.backbone, x))) for x in views)
        z0, z1 = (self.projection_head_momentum(instance(self.backbone_momentum, x)).detach() for x in views)
        targets = nn.functional.normalize(torch.cat([z0, z1]), dim=-1)  # (2B, P), as pretrain.py's target_std
        self.target_std = targets.std(dim=0).mean() * targets.shape[1] ** 0.5
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class MAE(nn.Module):
    """75% of the patches dropped; a 1-block decoder predicts the pixels of the dropped ones. Our encoder drops
    the masked patches itself (keep) and its class-attention output stands in for timm's class token, so the
    pooling the probe reads is trained too."""

    def __init__(self, backbone, args):
        super().__init__()
        decoder_dim, self.mask_ratio, self.patch_size = 512, 0.75, backbone.patch_size
        self.backbone = backbone
        self.sequence_length = backbone.num_patches + 1  # the class token first, as in timm
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=backbone.num_patches, embed_dim=decoder_dim, depth=1, num_heads=16, num_prefix_tokens=1,
            mlp_ratio=4.0, proj_drop_rate=0.0, attn_drop_rate=0.0)
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        self.decoder_embed.apply(init_weights)
        self.prediction_head.apply(init_weights)
        self.criterion = nn.MSELoss()
        self.online = self.target = self.backbone

    @staticmethod
    def transform(size):
        return MAETransform(input_size=size)

    def loss(self, views, epoch, m):
        images = views[0]
        idx_keep, idx_mask = random_token_mask(size=(len(images), self.sequence_length), mask_ratio=self.mask_ratio)
        tokens, cls = self.backbone(images, keep=(idx_keep[:, 1:] - 1)[None])  # index 0 is the class token
        x_decode = self.decoder_embed(torch.cat([cls[:, None], tokens], dim=1))  # (B, 1+K, decoder_dim)
        x_masked = set_at_index(x_decode.new_zeros(len(images), self.sequence_length, x_decode.shape[-1]),
                                idx_keep, x_decode)
        x_pred = self.prediction_head(get_at_index(self.decoder(x_masked, idx_mask=idx_mask), idx_mask))
        target = get_at_index(patchify(images, self.patch_size), idx_mask - 1)
        return self.criterion(x_pred, target)


class SimCLR(nn.Module):
    """One encoder, two views, NT-Xent over the batch."""

    def __init__(self, backbone, args):
        super().__init__()
        self.backbone, self.projection_head = backbone, SimCLRProjectionHead(backbone.embed_dim, 512, 128)
        self.criterion = NTXentLoss()
        self.online = self.target = self.backbone

    @staticmethod
    def transform(size):
        return SimCLRTransform(input_size=size, gaussian_blur=0.0)

    def loss(self, views, epoch, m):
        z0, z1 = (self.projection_head(instance(self.backbone, x)) for x in views)
        return self.criterion(z0, z1)


METHODS = {"dino": DINO, "byol": BYOL, "mae": MAE, "simclr": SimCLR}


def cpu_seconds():
    """User + system CPU time of this process and its ended children (the loader workers end with each epoch)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def save(model, args, epoch, path):
    """The two encoders in pretrain.py's naming, which linprobe.py --pretrained --branch reads."""
    state = {f"{name}.{key}": value for name, encoder in (("encoder", model.online), ("momentum_encoder", model.target))
             for key, value in encoder.state_dict().items()}
    utils.save_checkpoint({"model": state, "epoch": epoch, "args": vars(args)}, path)


def main(argv=None):
    args = get_args(argv)
    batch_size, optimizer_class, lr = EXAMPLES[args.method]
    args.batch_size, args.lr = args.batch_size or batch_size, args.lr or lr
    utils.set_seed(args.seed)
    method = METHODS[args.method]
    model = method(models.vit_tiny(img_size=args.img_size, patch_size=args.patch_size), args)
    dataset = ImageFolder(os.path.join(args.data, "train"), transform=method.transform(args.img_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers)
    optimizer = optimizer_class(model.parameters(), lr=args.lr)
    utils.make_output_dir(args.output_dir)
    print(f"{args.method}: {len(dataset)} images, batch {args.batch_size}, {len(loader)} steps/epoch, "
          f"{optimizer_class.__name__} lr {args.lr}, {torch.get_num_threads()} thread(s)")
    wall, cpu = time.time(), cpu_seconds()
    for epoch in range(args.epochs):
        total, spread = 0.0, []
        for i, (views, _) in enumerate(loader):
            # the examples' teacher momentum: a cosine from 0.996 to 1 over epochs (or, --momentum-by-step, steps)
            step, steps = ((epoch * len(loader) + i, args.epochs * len(loader)) if args.momentum_by_step
                           else (epoch, args.epochs))
            loss = model.loss(views, epoch, cosine_schedule(step, steps, 0.996, 1))
            loss.backward()
            if hasattr(model, "after_backward"):
                model.after_backward(epoch)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
            if hasattr(model, "target_std"):
                spread.append(model.target_std.item())
        record = {"epoch": epoch, "loss": total / len(loader), "wall_s": round(time.time() - wall, 1),
                  "cpu_s": round(cpu_seconds() - cpu, 1)}
        if spread:
            record["target_std"] = round(sum(spread) / len(spread), 4)
        print(json.dumps(record), flush=True)
        utils.log_json(args.output_dir, record)
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            save(model, args, epoch, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    save(model, args, args.epochs - 1, os.path.join(args.output_dir, "checkpoint-last.pth"))


if __name__ == "__main__":
    utils.run_main(main)
