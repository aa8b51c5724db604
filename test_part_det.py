"""Tests of transfer_det.py (COCO detection / instance segmentation): pyramid shapes, a training step,
COCO evaluation of perfect and empty predictions, resume, bad inputs. Tiny images and a small Mask R-CNN
head (the default heads cost ~100 GFLOPs per step even on 64x64 images) keep the file fast on CPU."""
import json
import os

import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor

import models
import transfer_det
import utils

DET_FLAGS = ["--arch", "vit_fixture", "--img-size", "64", "--patch-size", "8", "--batch-size", "2",
             "--synthetic-images", "2", "--num-workers", "0", "--device", "cpu", "--print-freq", "1",
             "--warmup-iters", "2", "--lr", "1e-3"]


def det_small_maskrcnn(backbone, num_classes, **kwargs):
    """torchvision's Mask R-CNN with fewer proposals/samples and narrow box and mask heads (tests only)."""
    model = MaskRCNN(backbone, num_classes=num_classes, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                     rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                     box_detections_per_img=10, **kwargs)
    model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 32)
    model.roi_heads.box_predictor = FastRCNNPredictor(32, num_classes)
    model.roi_heads.mask_head = MaskRCNNHeads(256, (16, 16), 1)
    model.roi_heads.mask_predictor = MaskRCNNPredictor(16, 16, num_classes)
    return model


@pytest.fixture
def det_small_heads(monkeypatch):
    monkeypatch.setattr(transfer_det, "MaskRCNN", det_small_maskrcnn)


@pytest.fixture(scope="module")
def det_coco(tmp_path_factory):
    return transfer_det.write_synthetic_coco(str(tmp_path_factory.mktemp("det") / "coco"), 64, 3)


@pytest.mark.parametrize("patch", [8, 16])
def test_det_pyramid_shapes_non_square(patch):
    args = transfer_det.get_args(["--arch", "vit_fixture", "--patch-size", str(patch), "--img-size", "64"])
    detector = transfer_det.build_detector(args, num_classes=3, log=lambda *a: None)
    assert detector.backbone.maps.feature_blocks == [1, 1, 1, 2]  # 4, 6, 8, 12 scaled to 2 blocks
    assert models.default_feature_blocks(24) == [8, 12, 16, 24]
    features = detector.backbone.eval()(torch.randn(2, 3, 64, 96))
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {"0": (2, 256, 16, 24), "1": (2, 256, 8, 12), "2": (2, 256, 4, 6), "3": (2, 256, 2, 3),
                      "pool": (2, 256, 1, 2)}
    assert detector.transform.size_divisible == 32
    assert detector.transform.min_size == (38, 41, 44, 46, 49, 51, 54, 56, 59, 61, 64)  # 480..800 x 64/800
    assert detector.transform.max_size == 107
    groups = utils.layer_decay_groups(detector, 0.05, 0.75, 2)
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[0] == pytest.approx(0.75 ** 3) and scales[3] == 1.0  # patch embedding vs. heads


def test_det_training_step_has_finite_losses_with_mask(det_coco, det_small_heads):
    torch.manual_seed(0)
    args = transfer_det.get_args(DET_FLAGS)
    dataset = transfer_det.CocoInstances(det_coco, "train", True, transfer_det.train_transform(None))
    assert len(dataset) == 3  # the image without objects is skipped
    images, targets = transfer_det.collate_lists([dataset[0], dataset[1]])
    crowd_free = [a for a in dataset.coco.imgToAnns[dataset.ids[1]] if not a["iscrowd"]]
    assert len(targets[1]["boxes"]) == len(crowd_free) and targets[1]["masks"].shape[1:] == (64, 64)
    assert set(targets[0]["labels"].tolist()) <= {1, 2, 3}
    detector = transfer_det.build_detector(args, len(dataset.cat_ids), log=lambda *a: None).train()
    losses = detector(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert detector.backbone.maps.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_det_coco_eval_perfect_and_empty(det_coco):
    dataset = transfer_det.CocoInstances(det_coco, "val", False, None)
    coco = dataset.coco
    outputs = []
    for image_id in dataset.ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]  # crowd regions are only ignored
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns] or [np.zeros((64, 64), np.uint8)]))
        outputs.append({"boxes": boxes, "labels": torch.tensor([dataset.label_of[a["category_id"]] for a in anns]),
                        "scores": torch.ones(len(anns)), "masks": masks[:len(anns), None].float()})
    results = transfer_det.coco_results(outputs, dataset.ids, dataset.cat_ids)
    json.dumps(results)  # RLE counts are str
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    perfect = transfer_det.coco_evaluate(coco, results)
    assert len(perfect) == 24
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_AR100", "segm_AP", "segm_AP50", "segm_AR100"):
        assert perfect[key] == pytest.approx(1.0), key
    empty = transfer_det.coco_evaluate(coco, [])
    assert empty["bbox_AP"] == 0.0 and empty["segm_AP"] == 0.0


def test_det_resume_matches_straight_run(tmp_path, det_small_heads):
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    transfer_det.main(DET_FLAGS + ["--output-dir", resumed, "--epochs", "1"])
    transfer_det.main(DET_FLAGS + ["--output-dir", resumed, "--epochs", "2"])
    transfer_det.main(DET_FLAGS + ["--output-dir", straight, "--epochs", "2"])
    logs = [[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (resumed, straight)]
    assert [r["epoch"] for r in logs[0]] == [0, 1] == [r["epoch"] for r in logs[1]]
    assert logs[0][1]["train_loss"] == pytest.approx(logs[1][1]["train_loss"], rel=1e-6)
    assert np.isfinite(logs[0][1]["train_loss"])
    for name in ("bbox_AP", "bbox_AP50", "bbox_ARl", "segm_AP", "segm_AR100", "lr"):
        assert name in logs[0][1]
    weights = [torch.load(os.path.join(d, "checkpoint-last.pth"), weights_only=False)["model"]
               for d in (resumed, straight)]
    for key in weights[1]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6, msg=key)


def test_det_bad_inputs(tmp_path, det_coco):
    missing = tmp_path / "no_annotations"
    (missing / "val2017").mkdir(parents=True)
    with pytest.raises(SystemExit, match="annotation file .*instances_val2017.json does not exist"):
        transfer_det.main(DET_FLAGS + ["--data", str(missing), "--output-dir", str(tmp_path / "out1")])

    broken = tmp_path / "unknown_category"
    os.makedirs(broken / "annotations")
    for split in ("train", "val"):
        os.symlink(os.path.join(det_coco, f"{split}2017"), broken / f"{split}2017")
    os.symlink(os.path.join(det_coco, "annotations", "instances_val2017.json"),
               broken / "annotations" / "instances_val2017.json")
    dataset = json.load(open(os.path.join(det_coco, "annotations", "instances_train2017.json")))
    dataset["annotations"][1]["category_id"] = 99
    json.dump(dataset, open(broken / "annotations" / "instances_train2017.json", "w"))
    with pytest.raises(SystemExit, match=r"annotation 2 .*category id 99.*not in the file's category list"):
        transfer_det.main(DET_FLAGS + ["--data", str(broken), "--output-dir", str(tmp_path / "out2")])

    unreadable = tmp_path / "unreadable"
    os.makedirs(unreadable / "annotations")
    os.makedirs(unreadable / "train2017")
    dataset["annotations"][1]["category_id"] = 1
    json.dump(dataset, open(unreadable / "annotations" / "instances_train2017.json", "w"))
    bad_image = unreadable / "train2017" / dataset["images"][0]["file_name"]
    bad_image.write_bytes(b"not a jpeg")
    train = transfer_det.CocoInstances(str(unreadable), "train", True, transfer_det.train_transform(None))
    with pytest.raises(utils.DataError, match=f"cannot read image {bad_image}"):
        train[0]


def test_det_loads_official_checkpoint_branch(tmp_path):
    fixture = torch.load(os.path.join(os.path.dirname(__file__), "..", "shared", "fixtures",
                                      "official_extrema_tiny.pt"), weights_only=False)
    path = str(tmp_path / "official.pth")
    torch.save(fixture["checkpoint"], path)
    state = fixture["checkpoint"]["state_dict"]
    for branch, prefix in (("momentum", "module.momentum_encoder."), ("online", "module.base_encoder.")):
        args = transfer_det.get_args(["--arch", "vit_fixture", "--patch-size", "8", "--pretrained", path,
                                      "--branch", branch])
        encoder = transfer_det.build_detector(args, num_classes=3, log=lambda *a: None).backbone.maps.encoder
        torch.testing.assert_close(encoder.blocks[1].mlp.fc2.weight, state[prefix + "blocks.1.mlp.fc2.weight"])
        assert not any(name.startswith(("ca_blocks", "cls_token")) for name, _ in encoder.named_parameters())
