"""Tests of transfer_seg.py (ADE20K semantic segmentation): metrics, feature pyramid, training on synthetic
and ADE-layout data, resume, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import models
import transfer_seg
import utils

SEG_FIXTURE = os.path.join(os.path.dirname(__file__), "..", "shared", "fixtures", "official_extrema_tiny.pt")
SEG_TINY = ["--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8", "--decoder-channels", "32",
            "--num-workers", "0", "--device", "cpu", "--amp", "none", "--print-freq", "1", "--lr", "1e-3",
            "--warmup-iters", "1"]


@pytest.fixture(autouse=True)
def seg_one_thread():
    """Tiny tensors run far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seg_read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def seg_write_ade(root, split, sizes, annotations=None, seed=0):
    """An ADEChallengeData2016-layout split: image i of size sizes[i] = (w, h) with random labels 0..150."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    labels = []
    for i, (w, h) in enumerate(sizes):
        name = f"ADE_{split}_{i:08d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "images", split, name + ".jpg"))
        label = annotations[i] if annotations else rng.choice([0, 1, 2, 5, 150], (h, w)).astype(np.uint8)
        Image.fromarray(label).save(os.path.join(root, "annotations", split, name + ".png"))
        labels.append(label)
    return labels


def test_seg_metrics_against_hand_computed_confusion():
    labels = torch.tensor([0, 0, 1, 1, 2, 255, 255, 0, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 3, 2, 0, 4])  # the 3 and 2 fall on ignored pixels
    confusion = transfer_seg.confusion_matrix(pred, labels, 5)
    expected = torch.tensor([[2, 1, 0, 0, 0],   # rows: ground truth, columns: prediction
                             [0, 2, 0, 0, 0],
                             [1, 0, 0, 0, 1],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]])
    assert torch.equal(confusion, expected)
    m = transfer_seg.segmentation_metrics(confusion)
    # IoU: 2/(3+3-2), 2/(2+3-2), 0/2, absent from both -> NaN, predicted without ground truth -> 0
    assert m["iou"][:3] == pytest.approx([50.0, 200 / 3, 0.0]) and m["iou"][4] == 0.0
    assert math.isnan(m["iou"][3])
    assert m["mIoU"] == pytest.approx((50 + 200 / 3) / 4)
    # accuracy: 2/3, 2/2, 0/2, NaN without ground truth (classes 3 and 4)
    assert m["acc"][:3] == pytest.approx([200 / 3, 100.0, 0.0]) and all(map(math.isnan, m["acc"][3:]))
    assert m["mAcc"] == pytest.approx((200 / 3 + 100) / 3)
    assert m["aAcc"] == pytest.approx(400 / 7)


def test_seg_labels_and_schedule():
    annotation = np.array([[0, 1, 150, 255]], dtype=np.uint8)
    assert transfer_seg.reduce_labels(annotation, "x.png").tolist() == [[255, 0, 149, 255]]
    with pytest.raises(utils.DataError, match="x.png has label 151"):
        transfer_seg.reduce_labels(np.array([[151]], dtype=np.uint8), "x.png")
    assert transfer_seg.keep_ratio_size(512, 683, 2048, 512) == (512, 683)
    assert transfer_seg.keep_ratio_size(100, 1000, 2048, 512) == (205, 2048)
    lrs = [transfer_seg.poly_lr(it, 100, 10, 1.0) for it in (0, 5, 10, 55, 100)]
    assert lrs == pytest.approx([0.0, 0.5 * 0.95, 0.9, 0.45, 0.0])


def test_seg_train_transform_shapes_and_padding():
    torch.manual_seed(0)
    img = Image.fromarray(np.full((20, 40, 3), 128, dtype=np.uint8))
    labels = torch.full((20, 40), 3)
    # ratio 0.5 of the (256, 64) scale: 20x40 -> 32x64, smaller than the 64x64 crop
    out_img, out_labels = transfer_seg.TrainTransform(64, ratio_range=(0.5, 0.5))(img, labels)
    assert out_img.shape == (3, 64, 64) and out_labels.shape == (64, 64)
    assert (out_labels[:32] == 3).all() and (out_labels[32:] == 255).all()  # ignore-padded below
    assert (out_img[:, 32:] == 0).all() and (out_img[:, :32] != 0).any()  # image padding 0 after normalising


def test_seg_feature_pyramid_shapes_and_layers():
    assert models.default_feature_blocks(12) == [4, 6, 8, 12]
    assert models.default_feature_blocks(24) == [8, 12, 16, 24]
    assert models.default_feature_blocks(2) == [1, 1, 1, 2]
    x = torch.randn(2, 3, 64, 64)
    for patch in (8, 16):
        args = transfer_seg.get_args(["--arch", "vit_tiny", "--img-size", "64", "--patch-size", str(patch),
                                      "--decoder-channels", "32"])
        transfer_seg.check_args(args)
        assert args.feature_blocks == [4, 6, 8, 12]
        model = transfer_seg.build_model(args, log=lambda *a: None).eval()
        assert not any("ca_blocks" in n or "cls_token" in n for n, _ in model.named_parameters())
        with torch.no_grad():
            maps = model.backbone(x)
            logits, aux = model(x)
            tokens8 = model.backbone.encoder.intermediate_tokens(x, [8])[0]  # (B, N, D)
        assert [tuple(m.shape) for m in maps] == [(2, 192, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
        stride16 = rearrange(tokens8, "b (h w) d -> b d h w", h=64 // patch)
        if patch == 8:
            stride16 = F.max_pool2d(stride16, 2)
        assert torch.allclose(maps[2], stride16)  # the stride-16 map is block 8
        assert logits.shape == (2, 150, 16, 16) and aux.shape == (2, 150, 4, 4)
        groups = utils.layer_decay_groups(model, 0.05, 0.65, 12)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        assert scale[id(model.backbone.encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** 12)
        assert scale[id(model.decode_head.fpn_bottleneck[0].weight)] == 1.0
    args = transfer_seg.get_args(["--arch", "vit_tiny", "--img-size", "64", "--feature-blocks", "1", "2", "3", "5"])
    transfer_seg.check_args(args)
    assert len(transfer_seg.build_model(args, log=lambda *a: None).backbone.encoder.blocks) == 5  # unused: gone


def test_seg_pretrained_official_encoder(tmp_path):
    fixture = torch.load(SEG_FIXTURE, weights_only=False)
    path = tmp_path / "official.pth"
    torch.save(fixture["checkpoint"], path)
    args = transfer_seg.get_args(SEG_TINY + ["--pretrained", str(path), "--branch", "online"])
    transfer_seg.check_args(args)
    model = transfer_seg.build_model(args, log=lambda *a: None).eval()
    with torch.no_grad():
        tokens = model.backbone.encoder.intermediate_tokens(fixture["x1"], [2])[0]
    assert torch.allclose(tokens, fixture["expected"]["tokens_full_prenorm"], atol=1e-5)


def test_seg_synthetic_end_to_end_and_resume(tmp_path, monkeypatch):
    argv = SEG_TINY + ["--batch-size", "4", "--iters", "4", "--eval-every", "2"]
    straight = str(tmp_path / "straight")
    transfer_seg.main(argv + ["--output-dir", straight])
    log = seg_read_log(straight)
    assert [r["iter"] for r in log] == [2, 4]
    for record in log:
        assert {"iter", "train_loss", "lr", "mIoU", "aAcc", "mAcc"} <= record.keys()
        assert math.isfinite(record["train_loss"]) and 0 <= record["mIoU"] <= 100
    assert log[0]["train_loss"] != log[1]["train_loss"]
    with open(os.path.join(straight, "per_class_iou.json")) as f:
        per_class = json.load(f)
    assert len(per_class["iou"]) == 150 and per_class["iou"][100] is None  # synthetic classes are 0..7
    assert any(v is not None for v in per_class["iou"][:8])

    # interrupted after the first save (the second evaluation crashes), then resumed by the same command
    resumed = str(tmp_path / "resumed")
    evaluate, calls = transfer_seg.evaluate, []

    def crash_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return evaluate(*a, **k)

    monkeypatch.setattr(transfer_seg, "evaluate", crash_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        transfer_seg.main(argv + ["--output-dir", resumed])
    assert torch.load(os.path.join(resumed, "checkpoint-last.pth"), weights_only=False)["iter"] == 2
    monkeypatch.setattr(transfer_seg, "evaluate", evaluate)
    transfer_seg.main(argv + ["--output-dir", resumed])
    assert seg_read_log(resumed)[-1]["train_loss"] == log[-1]["train_loss"]
    a = torch.load(os.path.join(straight, "checkpoint-last.pth"), weights_only=False)
    b = torch.load(os.path.join(resumed, "checkpoint-last.pth"), weights_only=False)
    assert a["iter"] == b["iter"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_seg_ade_layout_folder(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    seg_write_ade(root, "training", [(48, 40), (40, 48), (64, 36)])
    val_labels = seg_write_ade(root, "validation", [(50, 38), (36, 70)], seed=1)
    out = str(tmp_path / "out")
    argv = SEG_TINY + ["--data", root, "--batch-size", "2", "--output-dir", out]
    transfer_seg.main(argv + ["--iters", "2", "--eval-every", "2"])
    assert seg_read_log(out)[-1]["iter"] == 2
    # evaluated at the annotations' own sizes: exactly the classes with ground truth have an accuracy
    present = sorted({int(v) - 1 for label in val_labels for v in np.unique(label) if 1 <= v <= 150})
    for mode in ("slide", "whole"):
        metrics = transfer_seg.main(argv + ["--iters", "2", "--eval-only", "--eval-mode", mode])
        assert [i for i, a in enumerate(metrics["acc"]) if not math.isnan(a)] == present
        with open(os.path.join(out, "per_class_iou.json")) as f:
            assert [i for i, a in enumerate(json.load(f)["acc"]) if a is not None] == present


def seg_run_error(argv):
    with pytest.raises(SystemExit) as error:
        utils.run_main(lambda: transfer_seg.main(argv))
    return str(error.value)


def test_seg_bad_input(tmp_path):
    argv = SEG_TINY + ["--batch-size", "2", "--iters", "1", "--output-dir", str(tmp_path / "out")]
    message = seg_run_error(argv + ["--data", str(tmp_path / "missing")])
    assert message.startswith("error:") and "missing" in message and "does not exist" in message

    mismatch = str(tmp_path / "mismatch")
    seg_write_ade(mismatch, "training", [(40, 40), (40, 40)],
                  annotations=[np.ones((40, 40), np.uint8), np.ones((32, 40), np.uint8)])
    seg_write_ade(mismatch, "validation", [(40, 40)])
    message = seg_run_error(argv + ["--data", mismatch])
    assert "ADE_training_00000001.png is 40x32" in message and "40x40" in message

    bad_label = str(tmp_path / "bad_label")
    seg_write_ade(bad_label, "training", [(40, 40), (40, 40)],
                  annotations=[np.ones((40, 40), np.uint8), np.full((40, 40), 151, np.uint8)])
    seg_write_ade(bad_label, "validation", [(40, 40)])
    message = seg_run_error(argv + ["--data", bad_label])
    assert "ADE_training_00000001.png has label 151" in message
    assert not os.path.exists(tmp_path / "out" / "checkpoint-last.pth")

    message = seg_run_error(argv + ["--data", "synthetic", "--patch-size", "12"])
    assert "power of two" in message


def test_seg_torchrun_evaluation_matches_one_process(tmp_path):
    """Two CPU processes split the evaluation set; the reduced confusion gives the one-process metrics."""
    out = str(tmp_path / "out")
    argv = SEG_TINY + ["--batch-size", "4", "--iters", "1", "--eval-every", "1", "--output-dir", out]
    transfer_seg.main(argv)
    with open(os.path.join(out, "per_class_iou.json")) as f:
        one_process = json.load(f)
    os.remove(os.path.join(out, "per_class_iou.json"))
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             os.path.join(here, "transfer_seg.py"), *argv, "--eval-only"],
                            cwd=here, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "error" in line]
    with open(os.path.join(out, "per_class_iou.json")) as f:
        assert json.load(f) == one_process
