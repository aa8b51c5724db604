"""COCO object detection and instance segmentation with Mask R-CNN + FPN on a pretrained ExtreMA ViT.

The protocol of the paper, which follows CAE's Mask R-CNN config (lxtGH/CAE downstream_tasks/detection/
evaluation/object_detection/configs/mask_rcnn/vit_base_giou_4conv1f_coco_maskrcnn_1x_cae_sincos_init0.1_lr00003.py
on its _base_/models/mask_rcnn_vit_fpn.py and _base_/schedules/schedule_1x.py), built from torchvision's detection
parts: features of four ViT blocks (4, 6, 8, 12 of 12) brought to strides 4, 8, 16, 32 (two 2x transposed convs;
one; identity; 2x max-pool), an FPN of 256 channels with an extra pooled level, an RPN with an L1 box loss,
RoIAlign with adaptive sampling (ratio 0), a box head of 4 convs (BatchNorm, SyncBN under DDP on GPUs) + 1 fully
connected layer of 1024 whose boxes are decoded and trained with a GIoU loss (weight 10), torchvision's mask head.
1x schedule: 12 epochs, lr x0.1 at epochs 9 and 11, 500 linear warm-up iterations; AdamW (0.9, 0.999), lr 3e-4 at
batch 32 (the config's 16 GPUs x 2) scaled linearly to --batch-size (1.5e-4 at the default 16, the paper's batch),
layer decay 0.75, weight decay 0.05, drop path 0.2. Training: flip, then with probability 0.5 DETR's branch (shorter
side to 400, 500 or 600, a random crop of 384-600 on each side) before the multi-scale resize (shorter side 480-800,
longer side at most 1333) that every image gets. Evaluated at 800/1333 with the COCO API (box AP and mask AP).
Known differences: torchvision's RoIAlign is not pixel-aligned (mmcv's is: aligned=True); the RoI box head predicts
boxes for the background class too (never trained or used).

    python transfer_det.py --data /data/coco --pretrained checkpoint.pth --output-dir out/det
    torchrun --nproc_per_node 8 transfer_det.py --data /data/coco --pretrained extrema_mask08x5_color_1k_300ep.pth
    python transfer_det.py --data synthetic --arch vit_tiny --img-size 64 --patch-size 8 --epochs 2 --batch-size 2

The annotation files are checked when the data sets are built, before any training: a malformed annotation (no
bbox, a bbox that is not [x, y, w, h] with w, h >= 0, a polygon of fewer than 3 points, an RLE of another size than
its image, an unknown image or category) or a missing image file stops the run with one line naming the file, the
annotation id and the field. An annotation without segmentation (missing or []) gives Mask R-CNN no mask: it is
left out of training and evaluation, and the count is logged.
"""
import argparse
import contextlib
import io
import json
import math
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import v2

import data
import models
import utils

STRIDES = (4, 8, 16, 32)  # of the four maps fed to the FPN; it adds a fifth, pooled level at 64
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval.stats
# The reference config's train_cfg / test_cfg, in torchvision's terms (proposal counts per level before NMS)
RPN_SETTINGS = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                    pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=1000),
                    nms_thresh=0.7)
ROI_SETTINGS = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
# The reference assigners (MaxIoUAssigner, match_low_quality=True) take a low-quality match only at IoU >= min_pos_iou
MIN_POS_IOU = dict(rpn=0.3, roi=0.5)
HEAD_CHANNELS = dict(box_conv=256, box_fc=1024, mask=256)  # 4conv1fc box head; mask head of 4 convs + deconv
GIOU_WEIGHT = 10.0


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    utils.add_common_args(p, "COCO 2017 root ({train2017,val2017}/, annotations/instances_{train,val}2017.json)",
                          "output/det", 800, 16, 4, branch="online",
                          img_help="test-time shorter side; training scales (480-800) and the 1333 cap scale with "
                                   "it; the image side with --data synthetic")
    p.add_argument("--synthetic-images", type=int, default=8, help="images per split with --data synthetic")
    p.add_argument("--lsj", action="store_true",
                   help="large-scale jitter instead of multi-scale resize: scale 0.1-2.0 of a square of side "
                        "round(1024 * img_size / 800), crop/pad to it; test with the longer side at that size")
    p.add_argument("--feature-blocks", type=int, nargs=4, default=None,
                   help="1-based blocks whose tokens feed strides 4, 8, 16, 32 (default: 4 6 8 12 of 12, scaled)")
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr-drop-epochs", type=int, nargs="*", default=[9, 11],
                   help="0-based epochs at whose start the lr is multiplied by 0.1")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW lr for the global batch (default 3e-4 x batch-size / 32: 1.5e-4 at batch 16)")
    p.add_argument("--warmup-iters", type=int, default=500, help="optimizer steps of linear warm-up from 0.001 * lr")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.75)
    utils.add_grad_checkpointing_arg(p)
    args = data.encoder_inputs(utils.parse_args(p, argv), channels=(3,))
    if args.lr is None:
        args.lr = 3e-4 * args.batch_size / 32
    return args


# ============ Data ============


def write_synthetic_coco(root, img_size, num_images, seed=0):
    """A tiny COCO-format set under root: per split, num_images images of img_size x img_size with 1-3
    filled rectangles or polygons of three categories (non-contiguous ids 1, 3, 7, as in COCO), plus one
    image with no objects; the last object image also holds one iscrowd=1 region. Same files for a seed."""
    rng = np.random.default_rng(seed)
    names, colours = {1: "square", 3: "triangle", 7: "blob"}, {1: (220, 40, 40), 3: (40, 200, 60), 7: (50, 70, 230)}
    categories = [{"id": cat, "name": name, "supercategory": "shape"} for cat, name in names.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split in ("train", "val"):
        folder = os.path.join(root, f"{split}2017")
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, num_images + 2):
            img = Image.fromarray(rng.integers(90, 140, (img_size, img_size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            shapes = [] if image_id == num_images + 1 else [rng.choice([1, 3, 7]) for _ in range(rng.integers(1, 4))]
            if image_id == num_images:
                shapes.append(rng.choice([1, 3, 7]))  # drawn as a crowd region
            for index, cat in enumerate(shapes):
                side = rng.uniform(0.25, 0.5) * img_size
                cx, cy = rng.uniform(side / 2, img_size - side / 2, 2)
                angles = (np.array([0.25, 0.75, 1.25, 1.75]) * np.pi if cat == 1  # a square
                          else np.sort(rng.uniform(0, 2 * np.pi, 3 if cat == 3 else 6)))  # a triangle, a blob
                radius = side / 2 * (1 if cat != 7 else rng.uniform(0.6, 1.0, len(angles)))
                xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
                polygon = [float(round(v, 2)) for xy in zip(xs, ys) for v in xy]
                draw.polygon(polygon, fill=colours[cat])
                crowd = image_id == num_images and index == len(shapes) - 1  # as RLE, as COCO's crowd regions
                rle = mask_util.merge(mask_util.frPyObjects([polygon], img_size, img_size))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")} if crowd else [polygon]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat),
                                    "segmentation": segmentation, "area": float(mask_util.area(rle)),
                                    "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": int(crowd)})
            file_name = f"{image_id:012d}.jpg"
            img.save(os.path.join(folder, file_name), quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": img_size, "width": img_size})
        dataset = {"info": {"description": "ExtreMA synthetic COCO"}, "licenses": [], "images": images,
                   "annotations": annotations, "categories": categories}
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(dataset, f)
        os.replace(f"{path}.tmp", path)
    return root


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_problem(ann, image, known_categories):
    """What is wrong with one COCO instance annotation, as 'field: problem', or None. A missing or empty
    segmentation is not a problem here (see load_coco)."""
    if image is None:
        return f"image_id: {ann.get('image_id')!r} is not in the file's image list"
    if ann.get("category_id") not in known_categories:
        return f"category_id: {ann.get('category_id')!r} is not in the file's category list {sorted(known_categories)}"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(is_number, box)) and min(box[2:]) >= 0):
        return f"bbox: {box!r} is not [x, y, width, height] with a width and height of at least 0"
    if not is_number(ann.get("area", 0)):
        return f"area: {ann['area']!r} is not a number"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        if segmentation.get("size") != [image["height"], image["width"]] or "counts" not in segmentation:
            return (f"segmentation: an RLE needs counts and size [height, width] = "
                    f"[{image['height']}, {image['width']}] of its image, got size {segmentation.get('size')!r}")
    elif isinstance(segmentation, list):
        for polygon in segmentation:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(map(is_number, polygon))):
                return f"segmentation: polygon {str(polygon)[:60]} is not x, y pairs of at least 3 points"
    elif segmentation is not None:
        return f"segmentation: {str(segmentation)[:60]} is neither a list of polygons nor an RLE"
    return None


def load_coco(ann_file):
    """pycocotools COCO with one-line errors for a missing or malformed file, image entry or annotation; returns
    (COCO, how many annotations without segmentation, no mask to learn or score, were left out of its index)."""
    if not os.path.isfile(ann_file):
        utils.fail(f"annotation file {ann_file} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(ann_file)
    except Exception as e:
        utils.fail(f"cannot read annotation file {ann_file}: {type(e).__name__}: {e}")
    for image in coco.imgs.values():
        if not (isinstance(image.get("file_name"), str) and all(
                isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width"))):
            utils.fail(f"{ann_file}: image {image.get('id')!r} needs a file_name and positive integer height "
                       f"and width, got {str(image)[:100]}")
    known, kept = set(coco.getCatIds()), []
    for ann in coco.dataset.get("annotations", []):
        problem = annotation_problem(ann, coco.imgs.get(ann.get("image_id")), known)
        if problem:
            utils.fail(f"{ann_file}: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}): {problem}")
        if ann.get("segmentation"):
            kept.append(ann)
    without_mask = len(coco.dataset.get("annotations", [])) - len(kept)
    if without_mask:
        coco.dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return coco, without_mask


def usable(ann):
    """A training target: not a crowd region, box at least 1 pixel wide and high (as mmdetection)."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1 and ann.get("area", 1) > 0


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances of one split. Items: (image (3, H, W), target), in training target {boxes (N, 4) xyxy,
    labels (N,) in 1..C, masks (N, H, W) uint8, image_id}, in evaluation {image_id} (COCOeval reads the ground
    truth itself). Training skips images without usable annotations; crowd regions are never targets. The
    annotations and the presence of every image file are checked here, before any training."""

    def __init__(self, root, split, train, transform, cat_ids=None, log=print):
        self.ann_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
        self.img_dir = os.path.join(root, f"{split}2017")
        self.coco, without_mask = load_coco(self.ann_file)
        if without_mask:
            log(f"{self.ann_file}: {without_mask} annotation(s) without segmentation left out")
        if not os.path.isdir(self.img_dir):
            utils.fail(f"image folder {self.img_dir} does not exist")
        self.cat_ids = sorted(self.coco.getCatIds())
        if cat_ids is not None and self.cat_ids != cat_ids:
            utils.fail(f"the category ids of {self.ann_file} differ from the validation set's")
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.cat_ids)}  # 0 is the background
        self.ids = sorted(self.coco.getImgIds())
        if train:
            self.ids = [i for i in self.ids if any(usable(a) for a in self.coco.imgToAnns[i])]
        if not self.ids:
            utils.fail(f"{self.ann_file} has no {'annotated ' if train else ''}images")
        names, files = [self.coco.imgs[i]["file_name"] for i in self.ids], set(os.listdir(self.img_dir))
        missing = [name for name in names if name not in files and not os.path.isfile(os.path.join(self.img_dir, name))]
        if missing:
            utils.fail(f"{len(missing)} image(s) of {self.ann_file} are not in {self.img_dir}, e.g. {missing[0]}")
        self.train, self.transform = train, transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.img_dir, info["file_name"])
        img = data.load_rgb(path)
        if img.size != (info["width"], info["height"]):
            raise utils.DataError(f"image {path} is {img.size[0]}x{img.size[1]} but {self.ann_file} says "
                                  f"{info['width']}x{info['height']}")
        image = tv_tensors.Image(v2.functional.pil_to_tensor(img))
        if not self.train:
            return self.transform(image).as_subclass(torch.Tensor), {"image_id": image_id}
        anns = [a for a in self.coco.imgToAnns[image_id] if usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        masks = np.stack([self.coco.annToMask(a) for a in anns])  # (N, H, W)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns]),
                  "masks": tv_tensors.Mask(torch.from_numpy(masks)), "image_id": image_id}
        image, target = self.transform(image, target)  # tv_tensors, returned as plain tensors
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v
                                                 for k, v in target.items()}


class RandomSizeCrop:
    """mmdetection's RandomCrop(crop_type='absolute_range', allow_negative_crop=True): a crop whose height and
    width are drawn from low..high (each at most the image's), at a random place; boxes are clipped to it."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, image, target):
        size = [torch.randint(min(side, self.low), min(side, self.high) + 1, ()).item() for side in image.shape[-2:]]
        return v2.RandomCrop(size)(image, target)


def train_transform(lsj_size, img_size=800):
    """Horizontal flip, then with probability 0.5 DETR's branch: shorter side to 400, 500 or 600 (longer side
    at most 1333), a random crop of 384-600 on each side, objects cropped away dropped (an image may end up
    without any). All sizes scale with img_size / 800; the multi-scale resize is Mask R-CNN's transform.
    With lsj_size, large-scale jitter instead: flip, resize by 0.1-2.0 of the square, crop/pad to it."""
    steps = [v2.RandomHorizontalFlip()]
    if lsj_size:
        steps += [v2.ScaleJitter((lsj_size, lsj_size), scale_range=(0.1, 2.0)),
                  v2.RandomCrop(lsj_size, pad_if_needed=True), v2.SanitizeBoundingBoxes(min_size=1)]
    else:
        def scaled(*sizes):
            return [round(s * img_size / 800) for s in sizes]
        steps.append(v2.RandomApply([v2.RandomShortestSize(scaled(400, 500, 600), *scaled(1333), antialias=False),
                                     RandomSizeCrop(*scaled(384, 600)), v2.SanitizeBoundingBoxes(min_size=1)], p=0.5))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])


def to_device(images, targets, device):
    """A detection batch (lists of images and of target dicts) on the device."""
    return ([img.to(device, non_blocking=True) for img in images],
            [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets])


def collate_lists(batch):
    """Detection batches are lists: images have different sizes and targets different counts."""
    return tuple(map(list, zip(*batch)))


# ============ Model ============


class ViTPyramid(nn.Module):
    """ViT maps at strides 4, 8, 16, 32 -> FPN with 256 channels and a fifth level max-pooled to stride 64.
    Input (B, 3, H, W) with H, W multiples of 32 and of the patch size."""

    def __init__(self, encoder, feature_blocks, out_channels=256):
        super().__init__()
        self.maps = models.FeatureMaps(encoder, feature_blocks, STRIDES)
        self.fpn = FeaturePyramidNetwork([encoder.embed_dim] * len(STRIDES), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # what MaskRCNN reads

    def forward(self, images):  # (B, 3, H, W)
        maps = self.maps(images)  # four (B, D, H/stride, W/stride)
        return self.fpn(OrderedDict((str(level), m) for level, m in enumerate(maps)))  # '0'..'3', 'pool'


class ClampedBoxCoder(BoxCoder):
    """torchvision's BoxCoder with the decoded log-scales dw, dh clamped to [-log(1000/16), log(1000/16)], as
    mmdetection's delta2bbox (torchvision clamps them from above only): a decoded side is at most 1000/16 times
    longer or shorter than its anchor's or proposal's."""

    def decode_single(self, rel_codes, boxes):  # rel_codes (N, 4K): weights x (dx, dy, dw, dh) per class
        limit_w, limit_h = (self.bbox_xform_clip * weight for weight in self.weights[2:])
        floor = rel_codes.new_tensor([-math.inf, -math.inf, -limit_w, -limit_h]).repeat(rel_codes.shape[-1] // 4)
        return super().decode_single(torch.maximum(rel_codes, floor), boxes)


class MaxIoUMatcher(Matcher):
    """mmdetection's MaxIoUAssigner (match_low_quality=True, gt_max_assign_all=True) on torchvision's Matcher:
    a prediction is positive at IoU >= high_threshold with its best box, negative below low_threshold, ignored
    in between; then, in box order, each ground-truth box whose best IoU is at least min_pos_iou takes every
    prediction at that IoU, even from the prediction's best box (a later box wins a prediction two boxes share).
    torchvision's low-quality matches have no minimum and give such a prediction its best box."""

    def __init__(self, high_threshold, low_threshold, min_pos_iou):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches, all_matches, match_quality_matrix):  # IoU (G, P)
        best = match_quality_matrix.max(dim=1, keepdim=True).values  # (G, 1)
        takes = (match_quality_matrix == best) & (best >= self.min_pos_iou)  # (G, P)
        order = torch.arange(1, len(takes) + 1, device=takes.device)[:, None]  # (G, 1)
        last = (takes * order).max(dim=0).values  # (P,): 1 + the last box that takes each prediction; 0: none
        matches[last > 0] = last[last > 0] - 1


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with the reference's L1 box loss (mmdetection L1Loss) instead of smooth-L1 (beta 1/9);
    both are summed over the positive anchors and divided by the sampled anchors."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = (torch.where(torch.cat(s))[0] for s in self.fg_bg_sampler(labels))
        sampled = torch.cat([sampled_pos, sampled_neg])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos], reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss / sampled.numel()


class GIoURoIHeads(RoIHeads):
    """torchvision's RoIHeads trained as the reference config's bbox head (reg_decoded_bbox=True, GIoULoss
    weight 10): the predicted deltas of each positive RoI are decoded into a box, and 1 - GIoU with its
    ground-truth box, summed and divided by the sampled RoIs, is the box loss. Evaluation is torchvision's."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes)
        proposals, matched_idxs, labels, _ = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)  # (R, classes), (R, classes * 4)
        positive = [torch.where(lab > 0)[0] for lab in labels]
        pos_proposals = [p[i] for p, i in zip(proposals, positive)]
        pos_matched = [m[i] for m, i in zip(matched_idxs, positive)]
        gt_boxes = torch.cat([t["boxes"][m] for t, m in zip(targets, pos_matched)])  # (P, 4)
        labels = torch.cat(labels)
        pos = torch.where(labels > 0)[0]  # the same RoIs, in the concatenated order
        deltas = box_regression.reshape(len(labels), -1, 4)[pos, labels[pos]].float()  # (P, 4)
        boxes = self.box_coder.decode_single(deltas, torch.cat(pos_proposals))
        box_loss = generalized_box_iou_loss(boxes, gt_boxes, reduction="sum")  # 0, still in the graph, for P = 0
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_proposals, image_shapes)))
        mask_loss = maskrcnn_loss(mask_logits, pos_proposals, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], pos_matched)
        return [], {"loss_classifier": F.cross_entropy(class_logits, labels),
                    "loss_box_reg": GIOU_WEIGHT * box_loss / len(labels), "loss_mask": mask_loss}


def mask_rcnn(backbone, num_classes, transform):
    """Mask R-CNN of the reference config on backbone (its FPN levels '0'..'3', 'pool'); classes with background.
    Anchors 32..512 (one size per level) x ratios 0.5, 1, 2; RoIAlign 7 (boxes) and 14 (masks) with adaptive
    sampling; box head 4 x (3x3 conv, BatchNorm, ReLU) + fc 1024, then class scores and per-class box deltas,
    initialised as mmdetection's (fc Xavier; BBoxHead normal with std 0.01 and 0.001); mmdetection's matching
    (low-quality matches at IoU >= MIN_POS_IOU) and box decoding in the RPN and RoI heads."""
    channels, levels = backbone.out_channels, ["0", "1", "2", "3"]
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn = L1RegionProposalNetwork(anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]), **RPN_SETTINGS)
    box_head = FastRCNNConvFCHead((channels, 7, 7), [HEAD_CHANNELS["box_conv"]] * 4, [HEAD_CHANNELS["box_fc"]],
                                  norm_layer=nn.BatchNorm2d)
    for layer in box_head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    box_predictor = FastRCNNPredictor(HEAD_CHANNELS["box_fc"], num_classes)
    for layer, std in ((box_predictor.cls_score, 0.01), (box_predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    mask = HEAD_CHANNELS["mask"]
    roi_heads = GIoURoIHeads(MultiScaleRoIAlign(levels, 7, sampling_ratio=0), box_head, box_predictor, **ROI_SETTINGS,
                             mask_roi_pool=MultiScaleRoIAlign(levels, 14, sampling_ratio=0),
                             mask_head=MaskRCNNHeads(channels, [mask] * 4, 1),
                             mask_predictor=MaskRCNNPredictor(mask, mask, num_classes))
    for stage, min_pos_iou in ((rpn, MIN_POS_IOU["rpn"]), (roi_heads, MIN_POS_IOU["roi"])):  # mmdet's assigner, coder
        matcher = stage.proposal_matcher
        stage.proposal_matcher = MaxIoUMatcher(matcher.high_threshold, matcher.low_threshold, min_pos_iou)
        stage.box_coder = ClampedBoxCoder(stage.box_coder.weights)
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)


ARCH_FLAGS = utils.ARCH_FLAGS + ("feature_blocks",)  # fixed on resume


def build_detector(args, num_classes, log=print):
    """Mask R-CNN of the reference config on the pretrained ViT; num_classes without background. Its transform
    normalises with the statistics the checkpoint records (data.encoder_inputs; RGB only)."""
    patch = args.patch_size
    if patch & (patch - 1):
        utils.fail(f"--patch-size {patch} must be a power of two to give maps at strides {STRIDES}")
    depth = models.ARCHS[args.arch]["depth"]
    blocks = args.feature_blocks or models.default_feature_blocks(depth)
    if not all(1 <= b <= depth for b in blocks):
        utils.fail(f"--feature-blocks {blocks} must lie in 1..{depth} for {args.arch}")
    pretrain_size = 224 // patch * patch  # the grid the position table is stored at; resized per batch
    encoder = models.VisionTransformer(img_size=pretrain_size, patch_size=patch, **models.ARCHS[args.arch],
                                       drop_path=args.drop_path, ca_depth=args.ca_depth)
    data.load_pretrained_encoder(encoder, args.pretrained, args.branch, log, args.output_dir)
    encoder.set_grad_checkpointing(args.grad_checkpointing)
    if args.lsj:
        min_size = max_size = round(1024 * args.img_size / 800)  # the square
    else:  # shorter side 480..800 (step 32; one at random per training image, the last at test), longer <= 1333
        min_size = tuple(sorted({round(s * args.img_size / 800) for s in range(480, 801, 32)}))
        max_size = round(1333 * args.img_size / 800)
    transform = GeneralizedRCNNTransform(min_size, max_size, args.mean, args.std, size_divisible=max(32, patch))
    return mask_rcnn(ViTPyramid(encoder, blocks), num_classes + 1, transform)


def lr_at(step, epoch, args):
    """Step schedule: x0.1 at each --lr-drop-epochs, after a linear warm-up from 0.001 * lr (mmdetection)."""
    lr = args.lr * 0.1 ** sum(epoch >= e for e in args.lr_drop_epochs)
    if step < args.warmup_iters:
        lr *= 0.001 + 0.999 * step / args.warmup_iters
    return lr


# ============ COCO evaluation ============


def coco_results(outputs, image_ids, cat_ids):
    """Mask R-CNN outputs (boxes xyxy in image pixels, labels 1..C, scores, masks (N, 1, H, W) probabilities)
    -> COCO result dicts with xywh box and RLE mask (thresholded at 0.5, counts as str for JSON)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        for box, label, score, rle in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist(), rles):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": int(image_id), "category_id": cat_ids[label - 1], "score": float(score),
                            "bbox": box, "segmentation": rle})
    return results


def coco_evaluate(coco_gt, results):
    """COCOeval of results for 'bbox' and 'segm': {bbox_AP, bbox_AP50, ..., segm_ARl}. No results: all 0."""
    stats = {}
    for iou_type, key in (("bbox", "bbox"), ("segm", "segmentation")):
        dets = [{k: r[k] for k in ("image_id", "category_id", "score", key)} for r in results]
        values = [0.0] * len(METRICS)
        if dets:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
                evaluator.evaluate()
                evaluator.accumulate()
            print(f"{iou_type}:")
            evaluator.summarize()
            values = evaluator.stats.tolist()
        stats.update({f"{iou_type}_{name}": float(v) for name, v in zip(METRICS, values)})
    return stats


@torch.no_grad()
def evaluate(detector, loader, coco_gt, cat_ids, device, amp):
    """Detect on every image of the loader (split over processes), gather, score on the main process."""
    detector.eval()
    results = []
    for images, targets in loader:
        with utils.autocast(device, amp):
            outputs = detector([img.to(device, non_blocking=True) for img in images])
        results += coco_results(outputs, [t["image_id"] for t in targets], cat_ids)
    if utils.distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return coco_evaluate(coco_gt, results) if utils.is_main() else {}


# ============ Training and evaluation ============


def main(argv=None):
    args = get_args(argv)
    rank, world, device = utils.init_distributed(args.device)
    amp = utils.resolve_amp(args.amp, device)
    local_batch = utils.local_batch_size(args.batch_size, world, args.accum_iter)
    log = print if utils.is_main() else (lambda *a, **k: None)
    utils.make_output_dir(args.output_dir)

    root = args.data
    if root == "synthetic":
        root = os.path.join(args.output_dir, "synthetic_coco")
        if utils.is_main():
            write_synthetic_coco(root, args.img_size, args.synthetic_images, seed=args.seed)
        if world > 1:
            dist.barrier()
    elif not os.path.isdir(root):
        utils.fail(f"data folder {root} does not exist")
    val_set = CocoInstances(root, "val", False, v2.ToDtype(torch.float32, scale=True), log=log)
    val_loader = data.make_loader(val_set, local_batch, False, args.num_workers, args.seed, device, collate_lists)
    log(f"{len(val_set)} validation images, {len(val_set.cat_ids)} categories")
    if not args.eval_only:
        lsj_size = round(1024 * args.img_size / 800) if args.lsj else None
        train_set = CocoInstances(root, "train", True, train_transform(lsj_size, args.img_size), val_set.cat_ids, log)
        train_loader = data.make_loader(train_set, local_batch, True, args.num_workers, args.seed, device,
                                         collate_lists)
        log(f"{len(train_set)} training images")
        if len(train_loader) < args.accum_iter:
            utils.fail(f"{len(train_set)} training images make no full batch of {args.batch_size}")

    utils.set_seed(args.seed)  # the same initial heads in every process and every run
    detector = build_detector(args, len(val_set.cat_ids), log).to(device)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm has no CPU kernel
        detector = nn.SyncBatchNorm.convert_sync_batchnorm(detector)
    groups = models.layer_decay_groups(detector, args.weight_decay, args.layer_decay, models.ARCHS[args.arch]["depth"])
    optimizer = utils.adamw(groups, args.lr, (0.9, 0.999), device)
    scaler = utils.grad_scaler(device, amp)

    steps_per_epoch = 0 if args.eval_only else utils.steps_per_epoch(train_loader, args)
    run = utils.Run(args, steps_per_epoch, log, stage="transfer_det.py")
    checkpoint = run.resume(detector, optimizer, scaler, ARCH_FLAGS)
    if checkpoint is None and args.eval_only:
        utils.fail(f"--eval-only needs a trained detector at {run.path}")
    if args.eval_only:
        stats = evaluate(detector, val_loader, val_set.coco, val_set.cat_ids, device, amp)
        utils.log_json(args.output_dir, {"epoch": run.start_epoch - 1, "eval_only": True, **stats})
        return stats

    model = detector
    if world > 1:
        model = nn.parallel.DistributedDataParallel(detector,
                                                    device_ids=[device.index] if device.type == "cuda" else None)
    log(f"{args.epochs} epochs of {steps_per_epoch} steps, lr {args.lr}, amp {amp}, {world} process(es)")

    stats = {}
    for epoch in range(run.start_epoch, args.epochs):
        first = run.start_step if epoch == run.start_epoch else 0  # steps done before a mid-epoch resume
        model.train()
        batches = data.epoch_batches(train_loader, epoch, first * args.accum_iter)
        for step in run.steps(epoch, first):
            lr = lr_at(epoch * steps_per_epoch + step, epoch, args)
            utils.set_lr(optimizer, lr)
            losses = []
            for i in range(args.accum_iter):
                images, targets = to_device(*next(batches), device)
                with utils.no_sync(model, i < args.accum_iter - 1):
                    with utils.autocast(device, amp):
                        terms = model(images, targets)  # loss_classifier, loss_box_reg, loss_mask, loss_objectness, ...
                        loss = sum(terms.values())
                    scaler.scale(loss / args.accum_iter).backward()
                losses.append(loss.detach())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # logged, not clipped
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.log_step(loss=torch.stack(losses).mean(), lr=lr, grad_norm=grad_norm,
                         **{name: term.detach() for name, term in terms.items()})  # the last micro-batch's terms
        stats = {"epoch": epoch, **run.end_epoch()}
        stats.update(evaluate(detector, val_loader, val_set.coco, val_set.cat_ids, device, amp))
        run.save(epoch + 1, 0, stats, {f"eval/{k}": v for k, v in stats.items() if k.startswith(("bbox_", "segm_"))})
        log(f"epoch {epoch}: train loss {stats['train_loss']:.4f}  box AP {stats.get('bbox_AP', 0):.3f}  "
            f"mask AP {stats.get('segm_AP', 0):.3f}")
    run.close()
    if world > 1:
        dist.barrier()
    return stats


if __name__ == "__main__":
    utils.run_main(main)
