"""Smoke tests: numerics against the official implementation, masking, and every stage end to end on tiny
synthetic data. Run with `pytest test_smoke.py` (a few minutes on a 2-core CPU)."""
import argparse
import errno
import functools
import http.server
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import generalized_box_iou
from torchvision.transforms import v2

import bench
import data
import finetune
import linprobe
import models
import pretrain
import transfer_det
import transfer_seg
import utils
import visualize

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(ROOT, "fixtures", "official_extrema_tiny.pt")
# A tiny pretraining run: ViT-Tiny widths on 32x32 images of 16 patches, small heads.
TINY = ["--data", "synthetic", "--synthetic-size", "32", "--arch", "vit_tiny", "--img-size", "32",
        "--patch-size", "8", "--batch-size", "16", "--warmup-epochs", "1", "--proj-dim", "32",
        "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2", "--device", "cpu",
        "--num-workers", "0", "--print-freq", "1"]


def read_log(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(*args, **kwargs):
    """`python args...` in the repository, output captured; past 300 s its whole process group is killed (torchrun's
    workers too, which would otherwise outlive it) and the timeout raised."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def official():
    if not os.path.exists(FIXTURE):
        pytest.skip(f"official fixture not found at {FIXTURE}")
    return torch.load(FIXTURE)


@pytest.fixture(scope="module")
def official_file(official, tmp_path_factory):
    """The official fixture and its checkpoint saved as a file for --pretrained."""
    path = tmp_path_factory.mktemp("official") / "extrema_tiny.pth"
    torch.save(official["checkpoint"], path)
    return official, str(path)


@pytest.fixture(scope="module")
def official_model(official):
    model = models.ExtreMA(**official["config"]).eval()
    model.load_state_dict(models.convert_official_state_dict(official["checkpoint"]["state_dict"]), strict=True)
    return model


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint written by pretrain.py (one epoch of the tiny run)."""
    out = tmp_path_factory.mktemp("pretrained")
    pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(out)])
    return out / "checkpoint-last.pth"


# ----------------------------------------------------------------------------------------------------
# Conformance with the official implementation


def test_official_outputs(official, official_model):
    x1, x2, keep, expected = official["x1"], official["x2"], official["keep"], official["expected"]
    model = official_model
    with torch.no_grad():
        outputs = {
            "loss": model(x1, x2, keep=keep),
            "pred": model.predict(x1, keep),
            "target": model.target(x2),
            "inst_masked": model.encoder(x1, keep)[1],
            "inst_target": model.momentum_encoder(x2)[1],
            "inst_full": model.encoder(x1)[1],
            "tokens_full": model.encoder(x1)[0],
            "tokens_full_prenorm": model.encoder.forward_features(x1)[0],
            "inst_full_prenorm": model.encoder.forward_features(x1)[1],
            "momentum_tokens_full_prenorm": model.momentum_encoder.forward_features(x1)[0],
            "momentum_inst_full_prenorm": model.momentum_encoder.forward_features(x1)[1],
        }
    assert set(outputs) == set(expected)
    for name, value in outputs.items():
        assert value.shape == expected[name].shape, name
        assert (value - expected[name]).abs().max().item() < 1e-5, name


def test_conversion_accepts_unprefixed_keys(official):
    sd = {k.removeprefix("module."): v for k, v in official["checkpoint"]["state_dict"].items()}
    converted = models.convert_official_state_dict(sd)
    assert converted.keys() == models.ExtreMA(**official["config"]).state_dict().keys()
    with pytest.raises(ValueError, match="not an official ExtreMA key"):
        models.convert_official_state_dict({"module.encoder.norm.weight": torch.ones(1)})


def test_forward_leaves_momentum_branch(official, official_model):
    before = {k: v.clone() for k, v in official_model.state_dict().items()}
    official_model.train()
    loss = official_model(official["x1"], official["x2"])  # masks sampled
    official_model.eval()
    loss.backward()
    official_model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss) and 0 <= loss.item() <= 4
    after = official_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in official_model.momentum_params())


def test_momentum_update_and_schedule():
    torch.manual_seed(0)
    model = models.ExtreMA(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"], proj_dim=8,
                           proj_hidden_dim=16, mask_ratio=0.75, num_masks=2)
    with torch.no_grad():
        for p in model.online_params():
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in model.online_params()]
    target = [p.clone() for p in model.momentum_params()]
    model.update_momentum(0.9)
    for o, t, new in zip(online, target, model.momentum_params()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * o)
    assert models.momentum_at(0, 300) == pytest.approx(0.996)
    assert models.momentum_at(150, 300) == pytest.approx(0.998)
    assert models.momentum_at(300, 300) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# Masking and position embedding


def test_disjoint_masks():
    keep = models.sample_keep(batch_size=6, num_patches=196, mask_ratio=0.8, num_masks=5)
    assert keep.shape == (5, 6, 39) and keep.dtype == torch.int64
    for b in range(6):
        visible = keep[:, b].flatten()
        assert visible.unique().numel() == 5 * 39  # no patch in two masks
        assert visible.min() >= 0 and visible.max() < 196
    assert not torch.equal(keep[:, 0].sort().values, keep[:, 1].sort().values)  # images differ
    assert models.sample_keep(2, 196, 0.9, 8).shape == (8, 2, 19)
    full = models.sample_keep(3, 16, 0.75, 4)  # 4 masks of 4 cover all 16 patches
    assert all(sorted(full[:, b].flatten().tolist()) == list(range(16)) for b in range(3))


def test_independent_masks():
    keep = models.sample_keep(batch_size=4, num_patches=16, mask_ratio=0.5, num_masks=6, disjoint=False)
    assert keep.shape == (6, 4, 8)
    assert all(keep[m, b].unique().numel() == 8 for m in range(6) for b in range(4))  # within a mask: distinct


def test_mask_errors():
    with pytest.raises(ValueError, match="do not fit"):
        models.sample_keep(2, 196, 0.5, 3)
    with pytest.raises(ValueError, match="keeps no patch"):
        models.sample_keep(2, 16, 0.99, 1)
    with pytest.raises(ValueError, match="do not fit"):
        models.ExtreMA(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"], mask_ratio=0.5, num_masks=3)


def test_gather_is_mask_major():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (B=2, N=4, D=1)
    keep = torch.tensor([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])  # (M=2, B=2, K=2)
    out = models.gather_visible(tokens, keep)
    assert out.squeeze(-1).tolist() == [[0, 1], [6, 7], [3, 2], [5, 4]]


def bicubic_table(table, old_grid, new_grid):
    """The reference resize, written out: (1, h*w, D) rows in row-major grid order to (1, D, h, w), bicubic with
    align_corners=False, and back."""
    dim = table.shape[-1]
    grid = table[0].T.reshape(1, dim, *old_grid)
    resized = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return resized.reshape(dim, -1).T[None]


def test_pos_embed_any_size(official):
    table = models.sincos_pos_embed(64, 4, 4)
    torch.testing.assert_close(table, official["checkpoint"]["state_dict"]["module.base_encoder.pos_embed"][0])
    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).eval()
    tokens, instance = encoder(torch.randn(2, 3, 48, 40))  # 6 x 5 grid from a 4 x 4 table
    assert tokens.shape == (2, 30, 64) and instance.shape == (2, 64)
    assert torch.equal(models.resize_pos_embed(encoder.pos_embed, (4, 4), (4, 4)), encoder.pos_embed)
    table = torch.randn(1, 3 * 5, 8)  # a 3 x 5 grid (h, w) to 4 x 7
    torch.testing.assert_close(models.resize_pos_embed(table, (3, 5), (4, 7)), bicubic_table(table, (3, 5), (4, 7)))
    with pytest.raises(ValueError, match="not divisible"):
        encoder(torch.randn(1, 3, 36, 32))


def test_load_encoder_resizes_and_names_mismatch(official):
    encoder = models.VisionTransformer(img_size=48, patch_size=8, **models.ARCHS["vit_fixture"])
    models.load_encoder(encoder, official["checkpoint"], "momentum")
    assert encoder.pos_embed.shape == (1, 36, 64)
    wrong = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_tiny"])
    with pytest.raises(ValueError, match=r"shape: .*patch_embed.weight"):
        models.load_encoder(wrong, official["checkpoint"], "online")


# ----------------------------------------------------------------------------------------------------
# Pretraining


def test_pretrain_end_to_end(tmp_path):
    pretrain.main(TINY + ["--epochs", "3", "--output-dir", str(tmp_path), "--save-every", "2"])
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    losses = [r["train_loss"] for r in log]
    assert all(0 < v < 4 for v in losses) and len(set(losses)) == 3
    assert log[0]["momentum"] < log[2]["momentum"] <= 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth",
                                            "log.jsonl"]
    assert os.path.samefile(tmp_path / "checkpoint-2.pth", tmp_path / "checkpoint-last.pth")  # no second copy
    assert torch.load(tmp_path / "checkpoint-1.pth", weights_only=False)["epoch"] == 1  # kept as it was
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert {"model", "optimizer", "scaler"} <= set(ckpt)
    model = pretrain.build_model(pretrain.get_args(TINY))
    model.load_state_dict(ckpt["model"])  # the checkpoint loads strictly into the same architecture
    earlier = torch.load(tmp_path / "checkpoint-1.pth", weights_only=False)["model"]
    qkv = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(ckpt["model"][qkv], earlier[qkv])  # the third epoch moved the weights
    # online and momentum branches have moved apart
    assert not torch.equal(model.encoder.blocks[0].mlp.fc1.weight, model.momentum_encoder.blocks[0].mlp.fc1.weight)


def test_resume_continues_the_same_run(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    command = TINY + ["--epochs", "2"]
    pretrain.main(command + ["--output-dir", str(straight)])

    def save_then_crash(state, path):  # the job dies right after its first checkpoint
        save(state, path)
        raise KeyboardInterrupt

    save = utils.save_checkpoint
    monkeypatch.setattr(utils, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(command + ["--output-dir", str(resumed)])
    monkeypatch.setattr(utils, "save_checkpoint", save)
    pretrain.main(command + ["--output-dir", str(resumed)])  # the same command again resumes at epoch 1
    timing = ("time_s", "images_per_s")
    resumed_log = read_log(resumed)  # the crash came before epoch 0's log line: the resumed run writes it
    assert [r["epoch"] for r in resumed_log] == [0, 1]
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_log(straight)] == \
           [{k: v for k, v in r.items() if k not in timing} for r in resumed_log]
    a = torch.load(straight / "checkpoint-last.pth", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoint-last.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_full_batch():
    torch.manual_seed(0)
    args = pretrain.get_args(TINY + ["--drop-path", "0"])
    full, accum = pretrain.build_model(args), pretrain.build_model(args)
    accum.load_state_dict(full.state_dict())
    start = full.predictor[0].weight.detach().clone()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)  # colour off: no random draws
    keep = full.sample_keep(8)  # (M, 8, K)
    for model, batches, keeps in ((full, [images], [keep]), (accum, [images[:4], images[4:]], [keep[:, :4], keep[:, 4:]])):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the update is lr * gradient: comparable
        scaler = utils.grad_scaler(torch.device("cpu"), "none")
        for _ in range(2):
            loss, spread, _ = pretrain.train_step(model, optimizer, scaler, batches, 1.0, 0.99, "none", False, keeps)
            assert 0 < spread.item() < 1.5
        assert torch.isfinite(loss)
    for (name, a), b in zip(full.state_dict().items(), accum.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert (full.predictor[0].weight - start).abs().max() > 1e-3  # the two steps moved the weights


def test_infonce_loss_and_its_label_offset_across_processes(monkeypatch):
    """--loss infonce --temperature T: 2T x the cross-entropy of each mask's prediction against all targets, its own
    image's the label; under 2 processes the targets of both are gathered and rank 1's labels start at B."""
    def by_hand(q, targets, first, t):  # q: masks x 3 images, rows mask-major
        k = F.normalize(targets, dim=-1)
        losses = [-torch.log_softmax(k @ F.normalize(row, dim=0) / t, 0)[first + i % 3] for i, row in enumerate(q)]
        return 2 * t * torch.stack(losses).mean()

    model = pretrain.build_model(pretrain.get_args(TINY + ["--loss", "infonce", "--temperature", "0.2"])).eval()
    x1, x2 = torch.randn(2, 3, 3, 32, 32).unbind()
    keep = model.sample_keep(3)
    with torch.no_grad():
        q, k = model.predict(x1, keep), model.target(x2)  # (2 masks x 3, P), (3, P)
        torch.testing.assert_close(model(x1, x2, keep=keep), by_hand(q, k, 0, 0.2))
    other = F.normalize(torch.randn(3, k.shape[1]), dim=-1)  # rank 0's targets, as gathered; this is rank 1 of 2
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "all_gather", lambda out, t: [out[0].copy_(other), out[1].copy_(t)])
    torch.testing.assert_close(models.infonce_loss(q, k, 0.2), by_hand(q, torch.cat([other, k]), 3, 0.2))


def colour_batch(n, size=4, seed=0):
    """n colourful uint8 images (n, 3, size, size), no channel equal to another and none saturated."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 150 + 50).round().to(torch.uint8)


def unnormalize(x):
    return x * torch.tensor(utils.IMAGENET_STD)[:, None, None] + torch.tensor(utils.IMAGENET_MEAN)[:, None, None]


def test_device_colouring_matches_torchvision_ops():
    """Each op with fixed factors, grayscale, and all four in random orders, against torchvision's functional ops
    on the same uint8-valued images (the issue asks for 1/255; float32 gives about 1e-6)."""
    from torchvision.transforms.v2 import functional as TF
    images = colour_batch(6, 9)
    images[0], images[1, :, :3] = 128, 255  # a grey image, saturated pixels
    images[2, 1] = images[2, 0]  # ties of the largest channel
    x = images.float() / 255
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    values = [[0.6, 1.4, 0.9, 1.2, 0.7, 1.0], [0.6, 1.4, 0.9, 1.2, 0.7, 1.0], [0.8, 1.2, 0.9, 1.1, 0.85, 1.0],
              [-0.1, 0.1, 0.05, -0.03, 0.5, -0.5]]
    in_order = torch.arange(4).expand(6, 4)
    for k, (op, vals) in enumerate(zip(ops, values)):
        factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(6, 1)
        factors[:, k] = torch.tensor(vals)
        expected = torch.stack([op(img, v) for img, v in zip(x, vals)])
        torch.testing.assert_close(pretrain.jitter(x, factors, in_order), expected, atol=1e-5, rtol=0, msg=op.__name__)
    torch.testing.assert_close(pretrain.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    factors = torch.tensor([[1.3, 0.7, 1.15, 0.07]]).repeat(6, 1)
    orders = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    assert len({tuple(o) for o in orders.tolist()}) > 3
    expected = []
    for img, f, order in zip(x, factors, orders):
        for k in order.tolist():
            img = ops[k](img, f[k].item())
        expected.append(img)
    torch.testing.assert_close(pretrain.jitter(x, factors, orders), torch.stack(expected), atol=1e-5, rtol=0)


def test_device_colouring_probabilities_and_independent_views():
    images = colour_batch(4000)
    torch.testing.assert_close(pretrain.colour(images, jitter_p=0, grayscale_p=0), data.normalize(images))
    torch.manual_seed(0)
    x1, x2 = (unnormalize(x) for x in pretrain.two_views(images, True))
    original = images.float() / 255
    for x in (x1, x2):
        grey = (x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-5  # (B,)
        jittered = (x - original).abs().amax((1, 2, 3)) > 1e-5
        assert abs(grey.float().mean() - 0.2) < 0.03  # 4.7 standard errors
        assert abs(jittered[~grey].float().mean() - 0.8) < 0.035
    grey1, grey2 = ((x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-5 for x in (x1, x2))
    assert abs((grey1 & grey2).float().mean() - 0.04) < 0.015  # independent draws per view, not 0.2
    assert not torch.allclose(x1, x2)
    x1, x2 = pretrain.two_views(images, False)
    assert torch.equal(x1, x2) and torch.equal(x1, data.normalize(images))


def test_pretrain_views_share_one_crop(tmp_path, monkeypatch):
    """The loader ships one uint8 crop per image; the two views differ only by their colouring."""
    args = pretrain.get_args(TINY)
    loader, _ = data.pretraining_loader(args, pretrain.crop_transform(32, 0.2), 4, torch.device("cpu"))
    crop = next(iter(loader)).images[0]
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
    seen, forward = [], models.ExtreMA.forward
    monkeypatch.setattr(models.ExtreMA, "forward", lambda self, x1, x2, **kwargs: seen.append((x1, x2)) or
                        forward(self, x1, x2, **kwargs))
    for name, extra in (("off", ["--no-color-aug"]), ("grey", [])):
        if name == "grey":  # colour on, but every view grayscale and no jitter: the views must be equal
            monkeypatch.setattr(pretrain, "colour", lambda images, mean, std, c=pretrain.colour:
                                c(images, mean, std, 0.0, 1.0))
        seen.clear()
        pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path / name)] + extra)
        assert len(seen) == 2 and seen[0][0].dtype == torch.float32
        assert all(torch.equal(x1, x2) for x1, x2 in seen), name
    x = unnormalize(seen[0][0])
    assert (x.amax(1) - x.amin(1)).abs().max() < 1e-5  # grey


def test_random_erasing_per_image():
    images = torch.randn(400, 3, 16, 16)
    assert torch.equal(finetune.random_erasing(images, 0.0), images)
    torch.manual_seed(0)
    erased = finetune.random_erasing(images, 0.5) != images  # (B, 3, H, W)
    hit = erased.flatten(1).any(1)
    assert abs(hit.float().mean() - 0.5) < 0.1
    for mask in erased[hit]:
        rows, cols = mask.any(0).any(1), mask.any(0).any(0)
        assert torch.equal(mask, (rows[:, None] & cols[None, :]).expand(3, -1, -1))  # one rectangle, all channels
        assert 0.01 < mask[0].float().mean() < 0.4  # scale (0.02, 0.33) of the area, up to rounding
    tops = [m[0].any(1).float().argmax().item() for m in erased[hit]]
    assert len(set(tops)) > 5  # each image its own rectangle


def test_jpeg_folder_end_to_end(tmp_path):
    """Pretraining and the linear probe on an ImageFolder of ImageNet-sized JPEGs from bench.py --make-jpegs."""
    bench.main(["--make-jpegs", str(tmp_path / "data"), "--count", "16"])
    with Image.open(tmp_path / "data" / "train" / "class_0" / "img_000000.JPEG") as img:
        assert img.size == (500, 375) and img.format == "JPEG"
    pretrain.main(TINY + ["--epochs", "1", "--warmup-epochs", "0", "--data", str(tmp_path / "data"),
                          "--output-dir", str(tmp_path / "pre")])  # one step, at lr > 0: the online branch moves
    assert read_log(tmp_path / "pre")[0]["epoch"] == 0
    os.symlink(tmp_path / "data" / "train", tmp_path / "data" / "val")
    pretrained = tmp_path / "pre" / "checkpoint-last.pth"
    linprobe.main(eval_args(tmp_path / "probe", "--data", str(tmp_path / "data"), "--num-classes", "10",
                            "--pretrained", str(pretrained), "--branch", "online", arch="vit_tiny"))
    assert round(eval_check_log(tmp_path / "probe", 1)[0]["acc5"] * 16 / 100, 6).is_integer()  # hits of 16 images
    probe, online = eval_checkpoint(tmp_path / "probe")["model"], torch.load(pretrained, weights_only=False)["model"]
    assert all(torch.equal(v, online[k]) for k, v in probe.items() if k.startswith("encoder."))


def test_torchrun_two_processes(tmp_path):
    """DDP on CPU (gloo): both ranks end with identical weights, and only rank 0 writes."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import pretrain\n"
        "built = []\n"
        "build = pretrain.build_model\n"
        "pretrain.build_model = lambda args: built.append(build(args)) or built[-1]\n"
        "pretrain.main(sys.argv[1:])\n"
        "torch.save(built[0].state_dict(), os.path.join(sys.argv[-1] + '_rank' + os.environ['RANK'] + '.pt'))\n")
    out = tmp_path / "ddp"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
                        *TINY, "--batch-size", "32", "--epochs", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["checkpoint-1.pth", "checkpoint-last.pth", "log.jsonl"]
    assert [r["epoch"] for r in read_log(out)] == [0, 1]  # one line per epoch: rank 1 wrote nothing
    assert result.stdout.count("epoch 1 step 1/1 ") == 1  # 32 images / batch 32 = 1 step; one rank prints
    rank0, rank1 = (torch.load(f"{out}_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(out / "checkpoint-last.pth", weights_only=False)["model"]
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)


# ----------------------------------------------------------------------------------------------------
# Bad input: one-line errors, non-zero exit, no damage


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/imagenet"], "does not exist"),
    (["--batch-size", "10", "--accum-iter", "3"], "does not divide"),
    (["--img-size", "36"], "not divisible by --patch-size"),
    (["--mask-ratio", "0.5", "--num-masks", "3"], "do not fit"),
    (["--mask-ratio", "0.99"], "keeps no patch"),
    (["--batch-size", "64"], "no full batch"),
])
def test_pretrain_bad_arguments(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path)] + extra)
    assert not os.path.exists(tmp_path / "checkpoint-last.pth")


STAGES = {"pretrain": pretrain, "linprobe": linprobe, "finetune": finetune, "transfer_seg": transfer_seg,
          "transfer_det": transfer_det}
DEVICE_ERROR = ("error: --device must be cuda or cpu, got 'tpu' (choose GPUs with CUDA_VISIBLE_DEVICES; under "
                "torchrun each process takes GPU LOCAL_RANK)")


def stage_error(script, argv):
    """The message of a stage's SystemExit for argv, run as `python script.py` runs it."""
    with pytest.raises(SystemExit) as error:
        utils.run_main(lambda: STAGES[script].main(argv))
    return str(error.value)


@pytest.mark.parametrize("script", list(STAGES))
def test_bad_common_flags_fail_in_one_line(tmp_path, script):
    """Values no run can use stop every stage with one line, before a model or data set is built."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    tiny = ["--data", "synthetic", "--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8", "--device", "cpu",
            "--num-workers", "0", "--output-dir", str(tmp_path / "out")]
    cases = [(["--print-freq", "0"], "error: --print-freq must be at least 1, got 0"),
             (["--patch-size", "0"], "error: --patch-size must be at least 1, got 0"),
             (["--img-size", "-32"], "error: --img-size must be at least 1, got -32"),
             (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
             (["--num-workers", "-1"], "error: --num-workers must be at least 0, got -1"),
             (["--device", "tpu"], DEVICE_ERROR),
             (["--output-dir", str(a_file)], f"error: --output-dir {a_file} is a file, not a folder"),
             (["--output-dir", str(a_file / "out")], f"error: cannot create --output-dir {a_file / 'out'}: Not a directory")]
    length = "--iters" if script == "transfer_seg" else "--epochs"
    cases += [([length, "0"], f"error: {length} must be at least 1, got 0"),
              ([length, "-3"], f"error: {length} must be at least 1, got -3")]
    for extra, message in cases:
        assert stage_error(script, tiny + extra) == message
    assert not os.path.exists(tmp_path / "out")


def test_bad_flag_from_the_command_line_is_one_line(tmp_path):
    result = run_script("transfer_det.py", "--device", "tpu", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr == DEVICE_ERROR + "\n"


@pytest.mark.parametrize("script", list(STAGES))
def test_help_shows_defaults_and_docstring(capsys, script):
    with pytest.raises(SystemExit) as info:
        STAGES[script].get_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert " ".join(STAGES[script].__doc__.strip().splitlines()[-1].split()) in text  # the docstring's last line
    assert "--seed SEED (default: 0)" in text and "(default: synthetic)" in text
    assert ("--iters ITERS (default: 160000)" if script == "transfer_seg" else "--epochs EPOCHS (default: ") in text


def test_value_ranges_are_the_documented_ones():
    with open(os.path.join(ROOT, "docs", "RELIABILITY.md")) as f:
        section = " ".join(f.read().split("Values no run can use are refused before")[1].split("NaN is")[0].split())
    assert sorted(re.findall(r"`--([a-z-]+)`", section)) == sorted(f.replace("_", "-") for f in utils.VALUE_RANGES)


@pytest.mark.parametrize("flag", sorted(utils.VALUE_RANGES))
def test_out_of_range_values_are_refused_in_every_script(flag):
    """Each flag of utils.VALUE_RANGES (docs/RELIABILITY.md's list), in every script that has it: a value out of
    its range and NaN stop in one line naming both."""
    _, words = utils.VALUE_RANGES[flag]
    bad = {"positive": "0", "at least 0": "-1", "in [0, 1)": "1", "in [0, 1]": "1.5", "in (0, 1]": "0"}[words]
    option = "--" + flag.replace("_", "-")
    scripts = [s for s in (*STAGES.values(), bench, visualize) if hasattr(s.get_args([]), flag)]
    assert scripts, flag
    for script in scripts:
        for value in (bad, "nan"):
            with pytest.raises(SystemExit) as info:
                script.get_args([option, value])
            assert re.fullmatch(rf"error: {option} must be {re.escape(words)}, got {value}(\.0)?", str(info.value)) \
                or (value == "nan" and info.value.code == 2), (script.__name__, value)  # an integer flag: argparse


def test_empty_data_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        pretrain.main(TINY + ["--epochs", "1", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")])


def test_resume_from_another_architecture_is_refused(tmp_path, pretrained):
    (tmp_path / "checkpoint-last.pth").write_bytes(pretrained.read_bytes())
    with pytest.raises(SystemExit, match=r"checkpoint-last.pth was trained with --arch vit_tiny, not --arch "
                                         r"vit_fixture: give the same flags or another --output-dir$"):
        pretrain.main([*TINY, "--arch", "vit_fixture", "--epochs", "2", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--ca-depth 2, not --ca-depth 1"):
        pretrain.main([*TINY, "--ca-depth", "1", "--epochs", "2", "--output-dir", str(tmp_path)])
    checkpoint = torch.load(pretrained, weights_only=False)
    del checkpoint["args"]  # without the flags, the shapes still refuse it
    torch.save(checkpoint, tmp_path / "checkpoint-last.pth")
    with pytest.raises(SystemExit, match=r"does not fit the model \(.*shape: .*encoder.patch_embed.weight"):
        pretrain.main([*TINY, "--arch", "vit_fixture", "--epochs", "2", "--output-dir", str(tmp_path)])


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path)])
    good = (tmp_path / "checkpoint-last.pth").read_bytes()
    forward = models.ExtreMA.forward

    def nan_loss(self, *args, **kwargs):  # pretrain.py asks for the target projections too
        loss, target = forward(self, *args, **kwargs)
        return loss * float("nan"), target

    monkeypatch.setattr(models.ExtreMA, "forward", nan_loss)
    with pytest.raises(SystemExit, match=r"^error: non-finite loss nan at epoch 1 step 0; the weights of .*"
                                         r"checkpoint-last\.pth diverge at their first step: go back to an earlier "
                                         r"checkpoint-<epoch>\.pth \(copy it to checkpoint-last\.pth\) or start "
                                         r"afresh$"):  # the resumed run's first step
        pretrain.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path)])
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == good
    assert len(read_log(tmp_path)) == 1


def test_first_five_skipped_images_are_named(tmp_path, capsys):
    """Seven unreadable images among 16 in one batch: all skipped and counted, the first five named."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(16):
        data.SyntheticImages(1, 32)[0][0].save(folder / f"ok_{i}.png")
    for i in range(7):
        (folder / f"broken_{i}.png").write_bytes(b"not an image")
    pretrain.main(TINY + ["--arch", "vit_fixture", "--epochs", "1", "--batch-size", "23", "--data", str(tmp_path),
                          "--max-skipped", "0.5", "--output-dir", str(tmp_path / "out")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    named = {re.search(r"broken_\d\.png", line).group() for line in warnings}
    assert len(warnings) == len(named) == 5 and warnings[-1].endswith(" (further ones are only counted)")
    assert read_log(tmp_path / "out")[0]["skipped_images"] == 7


def test_norm_stats_auto_reads_at_most_its_cap(tmp_path, monkeypatch):
    """--norm-stats auto reads up to pretrain.NORM_STATS_IMAGES images (10,000; 4 here): the mean of constant
    images of 8 x 2^i is that of exactly 4 of them (4 bits set in the sum)."""
    for i in range(12):
        os.makedirs(tmp_path / "data", exist_ok=True)
        np.save(tmp_path / "data" / f"{i}.npy", np.full((32, 32, 1), 8 << i, dtype=np.uint16))
    monkeypatch.setattr(pretrain, "NORM_STATS_IMAGES", 4)
    pretrain.main(FIXTURE_PRETRAIN + ["--data", str(tmp_path / "data"), "--in-chans", "1", "--norm-stats", "auto",
                                      "--output-dir", str(tmp_path / "out")])
    total = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=False)["mean"][0] * 65535 * 4 / 8
    assert total == pytest.approx(round(total), abs=1e-3) and bin(round(total)).count("1") == 4


def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "train" / "class_a"
    folder.mkdir(parents=True)
    for i in range(16):
        data.SyntheticImages(1, 32)[0][0].save(folder / f"ok_{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = run_script("pretrain.py", *TINY, "--batch-size", "17", "--epochs", "1", "--data", str(tmp_path),
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read image {folder / 'broken.jpg'}: ")

# ====================================================================================================
# Linear probe and fine-tuning


EVAL_SCRIPTS = {"linprobe": linprobe, "finetune": finetune}


def eval_args(out, *extra, arch="vit_fixture", img_size=32):
    """A tiny run: 8 training and 2 validation synthetic images of 4 classes, batch 4, one epoch."""
    return ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4", "--arch", arch,
            "--img-size", str(img_size), "--patch-size", "8", "--batch-size", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--print-freq", "2",
            "--output-dir", str(out), *extra]


def eval_checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=False)


def eval_check_log(out, epochs):
    records = read_log(out)
    assert [r["epoch"] for r in records] == list(range(epochs))
    for r in records:
        assert {"epoch", "train_loss", "lr", "acc1", "acc5", "val_loss", "best_acc1"} <= r.keys()
        assert torch.isfinite(torch.tensor(r["train_loss"])) and 0 <= r["acc1"] <= r["acc5"] <= 100
    return records


@pytest.fixture(scope="module")
def eval_pretrained(tmp_path_factory):
    """A checkpoint written by pretrain.py: one epoch of the fixture-sized ViT on 32x32 images."""
    out = tmp_path_factory.mktemp("pretrain")
    pretrain.main(["--data", "synthetic", "--synthetic-size", "16", "--arch", "vit_fixture", "--img-size", "32",
                   "--patch-size", "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
                   "--proj-dim", "32", "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2",
                   "--output-dir", str(out), "--device", "cpu", "--num-workers", "0"])
    return str(out / "checkpoint-last.pth")


# ----------------------------------------------------------------------------------------------------
# Linear probe


@pytest.mark.parametrize("branch", ["momentum", "online"])
def test_linprobe_official_frozen_and_features(official_file, tmp_path, branch):
    """Training moves the head only; the probe reads the official class-attention output before the norm."""
    fixture, path = official_file
    linprobe.main(eval_args(tmp_path, "--pretrained", path, "--branch", branch))
    eval_check_log(tmp_path, 1)
    state = eval_checkpoint(tmp_path)["model"]
    pretrained = models.encoder_state_dict(fixture["checkpoint"], branch)
    for key, value in pretrained.items():  # the frozen encoder is bit-identical after training
        assert torch.equal(state[f"encoder.{key}"], value), key
    assert state["head.0.num_batches_tracked"] == 2  # the head's BatchNorm did train

    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"])
    probe = linprobe.LinearProbe(encoder, 4).eval()
    probe.load_state_dict(state)
    prefix = "momentum_" if branch == "momentum" else ""
    expected = fixture["expected"][f"{prefix}inst_full_prenorm"]
    torch.testing.assert_close(probe.features(fixture["x1"]), expected, atol=1e-5, rtol=1e-5)
    if branch == "online":  # --final-norm reads the normed instance representation
        probe.final_norm = True
        torch.testing.assert_close(probe.features(fixture["x1"]), fixture["expected"]["inst_full"],
                                   atol=1e-5, rtol=1e-5)


def test_linprobe_pretrain_checkpoint_and_eval_only(eval_pretrained, tmp_path):
    linprobe.main(eval_args(tmp_path, "--pretrained", eval_pretrained, img_size=48))
    last = eval_check_log(tmp_path, 1)[-1]
    state = eval_checkpoint(tmp_path)["model"]
    pretrained = torch.load(eval_pretrained, weights_only=False)["model"]
    assert torch.equal(state["encoder.blocks.0.attn.qkv.weight"],
                       pretrained["momentum_encoder.blocks.0.attn.qkv.weight"])
    assert state["encoder.pos_embed"].shape == (1, 36, 64)  # 4x4 table resized to the 6x6 grid
    torch.testing.assert_close(state["encoder.pos_embed"],
                               bicubic_table(pretrained["momentum_encoder.pos_embed"], (4, 4), (6, 6)))

    linprobe.main(eval_args(tmp_path, img_size=48) + ["--eval-only"])
    record = read_log(tmp_path)[-1]
    assert record["eval_only"] and record["acc1"] == last["acc1"] and record["acc5"] == last["acc5"]


def test_linprobe_lars(official_file, tmp_path):
    linprobe.main(eval_args(tmp_path, "--pretrained", official_file[1], "--optimizer", "lars"))
    state = eval_checkpoint(tmp_path)["model"]
    assert torch.isfinite(state["head.1.weight"]).all() and state["head.1.weight"].std() > 0.005


def test_lars_steps_by_its_rule():
    """Two steps on known gradients: a matrix moves by lr x momentum buffer of (g + wd w) scaled to
    trust |w| / |g + wd w|; a bias by plain momentum SGD without weight decay."""
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    optimizer = linprobe.LARS([weight, bias], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    w, b, w_buffer, b_buffer = weight.detach().clone(), bias.detach().clone(), 0, 0
    for step in range(2):
        weight.grad, bias.grad = torch.randn(3, 4), torch.randn(3)
        update = weight.grad + 0.1 * w
        w_buffer = 0.9 * w_buffer + 0.01 * w.norm() / update.norm() * update
        b_buffer = 0.9 * b_buffer + bias.grad
        w, b = w - 0.5 * w_buffer, b - 0.5 * b_buffer
        optimizer.step()
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


@pytest.mark.parametrize("branch", ["online", "momentum"])
def test_finetune_official_pooling(official_file, branch):
    """The classifier's LayerNorm reads the mean of the official pre-norm patch tokens."""
    fixture, path = official_file
    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"])
    data.load_pretrained_encoder(encoder, path, branch, log=lambda *a: None)
    model = finetune.MeanPoolClassifier(encoder, 4).eval()
    assert not any(k.startswith(("encoder.ca_blocks", "encoder.cls_token", "encoder.norm"))
                   for k in model.state_dict())
    pooled = []
    model.fc_norm.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    assert model(fixture["x1"]).shape == (4, 4)
    prefix = "momentum_" if branch == "momentum" else ""
    expected = fixture["expected"][f"{prefix}tokens_full_prenorm"].mean(dim=1)
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-5)


def test_finetune_official_layer_decay(official_file, tmp_path):
    """The head gets the full lr, the patch embedding the smallest (layer 0), each block 0.65x the next."""
    finetune.main(eval_args(tmp_path, "--pretrained", official_file[1], "--warmup-epochs", "1"))
    eval_check_log(tmp_path, 1)
    groups = eval_checkpoint(tmp_path)["optimizer"]["param_groups"]
    depth = models.ARCHS["vit_fixture"]["depth"]
    by_layer = {}
    for group in groups:
        by_layer.setdefault(group["layer_id"], []).append(group)
    assert sorted(by_layer) == list(range(depth + 2))
    head_lr = max(g["lr"] for g in groups)
    assert head_lr > 0
    for layer, members in by_layer.items():
        for g in members:
            assert g["lr"] == pytest.approx(head_lr * 0.65 ** (depth + 1 - layer))
    assert sum(len(g["params"]) for g in by_layer[0]) == 2  # patch embedding weight and bias
    assert min(g["lr"] for g in groups) == by_layer[0][0]["lr"]
    assert {g["weight_decay"] for g in by_layer[depth + 1]} == {0.0, 0.05}  # head weight decays, norms do not


def test_finetune_pretrain_checkpoint_resized(eval_pretrained, tmp_path):
    finetune.main(eval_args(tmp_path, "--pretrained", eval_pretrained, img_size=48))
    last = eval_check_log(tmp_path, 1)[0]
    assert last["train_images"] == 8
    finetune.main(eval_args(tmp_path, img_size=48) + ["--eval-only"])  # the saved classifier, evaluated again
    record = read_log(tmp_path)[-1]
    assert record["eval_only"] and (record["acc1"], record["acc5"]) == (last["acc1"], last["acc5"])
    assert record["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    state = eval_checkpoint(tmp_path)["model"]
    assert state["encoder.pos_embed"].shape == (1, 36, 64)
    pretrained = torch.load(eval_pretrained, weights_only=False)["model"]
    assert not torch.equal(state["encoder.blocks.0.attn.qkv.weight"], pretrained["encoder.blocks.0.attn.qkv.weight"])
    # one step of a batch of all 8 images at the warm-up's first lr, 0: the saved encoder is the online branch
    finetune.main(eval_args(tmp_path / "start", "--pretrained", eval_pretrained, "--batch-size", "8",
                            "--warmup-epochs", "1"))
    encoder = {k: v for k, v in eval_checkpoint(tmp_path / "start")["model"].items() if k.startswith("encoder.")}
    assert len(encoder) > 20 and all(torch.equal(v, pretrained[k]) for k, v in encoder.items())


def test_finetune_amp_bf16(tmp_path, monkeypatch):
    """--amp bf16 on the CPU: the classifier runs under bf16 autocast, and the run logs what the float32 run logs
    up to bf16 rounding."""
    dtypes, forward = [], finetune.MeanPoolClassifier.forward
    monkeypatch.setattr(finetune.MeanPoolClassifier, "forward", lambda self, x: (
        lambda logits: dtypes.append(logits.dtype) or logits)(forward(self, x)))
    logs = {}
    for amp in ("none", "bf16"):
        dtypes.clear()
        finetune.main(eval_args(tmp_path / amp, "--amp", amp))
        assert set(dtypes) == {torch.bfloat16 if amp == "bf16" else torch.float32}, amp
        logs[amp] = eval_check_log(tmp_path / amp, 1)[0]
    assert eval_checkpoint(tmp_path / "bf16")["args"]["amp"] == "bf16"
    for key in ("train_loss", "val_loss"):
        assert logs["bf16"][key] == pytest.approx(logs["none"][key], rel=0.02), key


def test_finetune_subsets(tmp_path):
    dataset = data.SyntheticImages(40, 8, num_classes=4)
    half = finetune.subset_indices(dataset, None, 0.5)
    assert len(half) == 20
    assert [sum(i % 4 == c for i in half) for c in range(4)] == [5, 5, 5, 5]
    assert half == finetune.subset_indices(dataset, None, 0.5)  # fixed seed
    assert len(finetune.subset_indices(dataset, None, 0.01)) == 4  # at least one per class
    listed = tmp_path / "subset.txt"
    listed.write_text("synthetic_3.png\nsome/dir/synthetic_17.png\n\nsynthetic_3.png\n")
    assert finetune.subset_indices(dataset, str(listed), None) == [3, 17]
    listed.write_text("synthetic_3.png\nn01440764_10026.JPEG\n")
    with pytest.raises(SystemExit, match="n01440764_10026.JPEG"):
        finetune.subset_indices(dataset, str(listed), None)

    listed.write_text("".join(f"synthetic_{i}.png\n" for i in range(0, 8, 2)))
    finetune.main(eval_args(tmp_path / "run", "--train-subset", str(listed)))
    assert read_log(tmp_path / "run")[0]["train_images"] == 4
    with pytest.raises(SystemExit, match="not both"):
        finetune.main(eval_args(tmp_path / "both", "--train-subset", str(listed), "--label-fraction", "0.1"))


# ----------------------------------------------------------------------------------------------------
# Both scripts


class EvalInterrupted(Exception):
    pass


@pytest.mark.parametrize("script", ["linprobe", "finetune"])
def test_resume_continues_identically(official_file, tmp_path, monkeypatch, script):
    """Two epochs in one go == one epoch, a crash after its checkpoint, and the same command again."""
    main = EVAL_SCRIPTS[script].main
    args = lambda out: eval_args(out, "--pretrained", official_file[1], "--epochs", "2", "--warmup-epochs", "1")
    main(args(tmp_path / "straight"))

    save = utils.save_checkpoint

    def save_then_crash(state, path):
        save(state, path)
        raise EvalInterrupted

    monkeypatch.setattr(utils, "save_checkpoint", save_then_crash)
    with pytest.raises(EvalInterrupted):
        main(args(tmp_path / "resumed"))
    monkeypatch.setattr(utils, "save_checkpoint", save)
    assert not (tmp_path / "resumed" / "log.jsonl").exists()  # the checkpoint comes first; the rerun logs it
    main(args(tmp_path / "resumed"))

    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "straight")
    straight, resumed = eval_checkpoint(tmp_path / "straight"), eval_checkpoint(tmp_path / "resumed")
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.parametrize("script", ["linprobe", "finetune"])
def test_bad_inputs(official_file, eval_pretrained, tmp_path, script):
    main = EVAL_SCRIPTS[script].main
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing\.pth does not exist"):
        main(eval_args(tmp_path, "--pretrained", str(tmp_path / "missing.pth")))
    with pytest.raises(SystemExit, match=r"arch vit_fixture in the checkpoint, vit_tiny given$") as info:
        main(eval_args(tmp_path, "--pretrained", eval_pretrained, arch="vit_tiny"))  # a 2-block checkpoint into 12
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit, match="data folder .*nowhere does not exist"):
        main(eval_args(tmp_path) + ["--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--batch-size 10 does not divide"):
        main(eval_args(tmp_path) + ["--batch-size", "10", "--accum-iter", "3"])
    with pytest.raises(SystemExit, match="--eval-only needs"):
        main(eval_args(tmp_path / "empty") + ["--eval-only"])
    with pytest.raises(SystemExit, match="make no full step"):
        main(eval_args(tmp_path / "big") + ["--batch-size", "16"])
    assert not os.path.exists(tmp_path / "big" / "checkpoint-last.pth")


def test_random_init_is_logged(tmp_path, capsys):
    linprobe.main(eval_args(tmp_path))
    assert "random initialisation" in capsys.readouterr().out
    eval_check_log(tmp_path, 1)
    linprobe.main(eval_args(tmp_path, "--eval-only"))  # the encoder comes from the checkpoint, not at random
    out = capsys.readouterr().out
    assert "random initialisation" not in out and f"weights will come from {tmp_path / 'checkpoint-last.pth'}" in out


@pytest.mark.parametrize("script", ["linprobe"])  # finetune passes too (add it; +20 s on 2 cores)
def test_torchrun_two_processes_exact_evaluation(official_file, tmp_path, monkeypatch, script):
    """Under DDP (2 CPU processes, gloo) a validation set of 3 images is counted exactly: the same top-1,
    top-5 and loss as one process evaluating the saved checkpoint. --pretrained is an http:// URL: the first
    process downloads it into torch.hub's cache while the other waits."""
    folder, name = os.path.split(official_file[1])
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    args = eval_args(tmp_path, "--pretrained", url, "--synthetic-size", "12")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", f"{script}.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    server.shutdown()
    server.server_close()
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == [os.path.basename(models.cached_file(url))]
    distributed = read_log(tmp_path)[-1]
    EVAL_SCRIPTS[script].main(args + ["--eval-only"])
    single = read_log(tmp_path)[-1]
    assert single["eval_only"] and single["acc1"] == distributed["acc1"] and single["acc5"] == distributed["acc5"]
    assert single["val_loss"] == pytest.approx(distributed["val_loss"], rel=1e-5)
    assert round(single["acc5"] * 3 / 100, 6).is_integer()  # hits out of 3 images


def test_finetune_image_folder_subset_list(tmp_path):
    """A real folder layout: --train-subset names (as in the ImageNet 1% lists) select by file name."""
    from PIL import Image
    for split, count in (("train", 4), ("val", 1)):
        for wnid, colour in (("n01440764", (200, 30, 30)), ("n01443537", (30, 30, 200))):
            os.makedirs(tmp_path / "data" / split / wnid)
            for i in range(count):
                Image.new("RGB", (40, 40), colour).save(tmp_path / "data" / split / wnid / f"{wnid}_{i}.JPEG")
    listed = tmp_path / "1percent.txt"
    listed.write_text("n01440764_0.JPEG\nn01440764_2.JPEG\nn01443537_1.JPEG\nn01443537_3.JPEG\n")
    args = eval_args(tmp_path / "out", "--train-subset", str(listed), "--batch-size", "2") + [
        "--data", str(tmp_path / "data"), "--num-classes", "2"]
    finetune.main(args)
    assert eval_check_log(tmp_path / "out", 1)[0]["train_images"] == 4
    with pytest.raises(SystemExit, match="--num-classes 4 but .* holds 2 classes"):
        finetune.main(args + ["--num-classes", "4"])

# ----------------------------------------------------------------------------------------------------
# Fidelity (issue 10): fine-tuning and linear probe


def test_randaugment_pixels_equal_timms(monkeypatch):
    """timm's own "rand-m9-mstd0.5-inc1" (timm is a test requirement) has our ops and draws, and every op gives
    timm's pixels: all 15 ops, magnitudes 0 to 10 and fractional ones, both signs, three sizes (one odd and
    non-square), zero pixels differ. PosterizeIncreasing at 10 keeps 0 bits, a black image, where timm's
    Pillow refuses 0 bits. apply() draws the sign: both of timm's outputs appear."""
    from timm.data import auto_augment
    ra = finetune.RandAugment()
    hparams = dict(img_mean=ra.MEAN_PIXEL, interpolation=Image.Resampling.BICUBIC)
    theirs = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(hparams))
    assert [op.name for op in theirs.ops] == list(ra.OPS) and theirs.num_layers == ra.num_ops
    assert {(op.prob, op.magnitude, op.magnitude_std) for op in theirs.ops} == {(ra.prob, ra.magnitude,
                                                                                  ra.magnitude_std)}
    assert ra.MEAN_PIXEL == (124, 116, 104)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((24, 32), (17, 23), (9, 31))]
    sign = {}  # timm negates a signed argument when random.random() > 0.5
    monkeypatch.setattr(auto_augment, "random", type("Sign", (), {"random": staticmethod(lambda: sign["draw"])}))

    def timm_pixels(image, name, magnitude, negative):
        sign["draw"] = 1.0 if negative else 0.0
        return np.asarray(auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image))

    differing, refused = [], 0
    for name in ra.OPS:
        for magnitude in [*range(11), 0.5, 2.7, 4.44, 6.25, 9.3, 9.99]:
            for negative in (False, True):
                v = ra.level(name, magnitude)
                v = -v if negative and name not in ra.UNSIGNED else v
                for image in images:
                    ours = np.asarray(ra.apply_level(image, name, v))
                    try:
                        expected = timm_pixels(image, name, magnitude, negative)
                    except ValueError:  # Pillow >= 10: posterize takes 1 to 8 bits
                        assert (name, magnitude, ours.max()) == ("PosterizeIncreasing", 10, 0)
                        refused += 1
                        continue
                    count = int((ours != expected).any(-1).sum())
                    if count:
                        differing.append((name, magnitude, negative, image.size, count))
    assert differing == [] and refused in (0, 6)

    image = images[2]
    for name in set(ra.OPS) - set(ra.UNSIGNED):  # 8 seeds: both signs
        both = [timm_pixels(image, name, 9.0, negative) for negative in (False, True)]
        outs = []
        for seed in range(8):
            torch.manual_seed(seed)
            outs.append(np.asarray(ra.apply(image, name, 9.0)))
        assert all(any(np.array_equal(out, b) for out in outs) for b in both), name
        assert all(any(np.array_equal(out, b) for b in both) for out in outs), name


def test_randaugment_skips_and_magnitude_noise():
    """Two uniform draws with replacement, each kept with p 0.5 (both skipped with p 0.25), magnitude
    N(9, 0.5) drawn per application and clipped to 10."""
    ra = finetune.RandAugment()
    torch.manual_seed(0)
    plans = [ra.sample() for _ in range(20000)]
    lengths = np.bincount([len(p) for p in plans], minlength=3) / len(plans)
    assert lengths == pytest.approx([0.25, 0.5, 0.25], abs=0.012)
    names = [name for plan in plans for name, _ in plan]
    counts = np.array([names.count(op) for op in ra.OPS]) / len(names)
    assert len(ra.OPS) == 15 and counts == pytest.approx(np.full(15, 1 / 15), abs=0.006)
    assert sum(len(p) == 2 and p[0][0] == p[1][0] for p in plans) > 200  # with replacement
    magnitudes = np.array([m for plan in plans for _, m in plan])
    assert magnitudes.max() == 10.0 and (magnitudes == 10.0).mean() == pytest.approx(0.0228, abs=0.004)
    assert magnitudes.mean() == pytest.approx(9.0, abs=0.01)
    assert magnitudes.std() == pytest.approx(0.5 * 0.98, abs=0.01)  # std of N(0, 1) clipped at +2 is 0.98
    assert {m for plan in (finetune.RandAugment(magnitude_std=0).sample() for _ in range(50)) for _, m in plan} == {9.0}
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    assert finetune.RandAugment(prob=0.0)(image) is image


def test_patch_embedding_bias_is_pytorch_conv_default():
    """The official conv keeps PyTorch's default bias: U(+-1/sqrt(C*p*p)), not zero."""
    torch.manual_seed(0)
    bias = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_tiny"]).patch_embed.bias.detach()
    bound = (3 * 8 * 8) ** -0.5
    assert bias.abs().max() <= bound and bias.std() == pytest.approx(bound / 3 ** 0.5, rel=0.2)


def test_eval_transforms_and_probe_head(monkeypatch):
    """Linear probe: bilinear Resize(256/224) + CenterCrop and BatchNorm eps 1e-5; fine-tuning: bicubic
    evaluation and the timm RandAugment in training."""
    seen = {}

    def capture(root, img_size, train_transform, val_transform, *rest):
        seen["train"], seen["val"] = train_transform, val_transform
        raise EvalInterrupted

    monkeypatch.setattr(data, "classification_datasets", capture)
    for script, mode in ((linprobe, "BILINEAR"), (finetune, "BICUBIC")):
        with pytest.raises(EvalInterrupted):
            script.main(eval_args("unused"))
        resize = seen["val"].transforms[0]
        assert resize.size == [36] and resize.interpolation == getattr(v2.InterpolationMode, mode)
    assert any(isinstance(t, finetune.RandAugment) for t in seen["train"].transforms)
    head = linprobe.LinearProbe(models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]),
                                4).head
    assert head[0].eps == 1e-5 and not head[0].affine


def test_min_lr_floor(tmp_path):
    """finetune's cosine ends at --min-lr (1e-6); linprobe's at 0, as the official code."""
    assert finetune.get_args([]).min_lr == 1e-6 and not hasattr(linprobe.get_args([]), "min_lr")
    assert utils.cosine_schedule(100, 100, 5, 2e-3, final=1e-6) == pytest.approx(1e-6)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cpu = torch.device("cpu")
    loader = data.make_loader(torch.utils.data.TensorDataset(torch.randn(4, 3, 2, 2), torch.arange(4) % 3), 1, True,
                              0, 0, cpu)
    probe = argparse.Namespace(features=lambda x: x, head=model)
    for min_lr in (0.25, None):
        args = argparse.Namespace(accum_iter=1, epochs=2, warmup_epochs=0, lr=1.0, amp="none", print_freq=100,
                                  batch_size=1, seed=0, output_dir=str(tmp_path), save_interval=0, report_to="none",
                                  mean=utils.IMAGENET_MEAN, std=utils.IMAGENET_STD, reprob=0.0, smoothing=0.0,
                                  clip_grad=None, **({} if min_lr is None else {"min_lr": min_lr}))
        run = utils.Run(args, 4, log=lambda *a: None)
        scaler = utils.grad_scaler(cpu, "none")
        run.resume(model, optimizer, scaler)
        if min_lr is None:
            linprobe.train_one_epoch(probe, model, loader, optimizer, scaler, 1, run, args, cpu)
        else:
            finetune.train_one_epoch(model, loader, optimizer, scaler, None, 3, 1, run, args, cpu)
        lr = run.end_epoch()["lr"]
        floor = min_lr or 0.0
        assert lr == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
        assert optimizer.param_groups[0]["lr"] == lr


FIDELITY_STAGES = {"pretraining": pretrain, "linear probe": linprobe, "fine-tuning": finetune,
                   "1% / 10% labels": finetune, "ADE20K": transfer_seg, "COCO": transfer_det}


def test_fidelity_table_matches_defaults():
    """Every `--flag value` in the "ours" column of the fidelity table (docs/FIDELITY.md) is that stage's default
    (a `--flag` alone: True; `--flag PLACEHOLDER`: no default), and the table has a row for each stage."""
    with open(os.path.join(ROOT, "docs", "FIDELITY.md")) as f:
        section = f.read().split("\n## The table")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| stage |")]
    assert {"pretraining", "linear probe", "fine-tuning", "1% / 10% labels", "ADE20K", "COCO"} <= {r[0] for r in rows}
    checked = set()
    for stage, setting, ours, *_ in rows:
        if stage not in FIDELITY_STAGES:
            continue
        defaults = vars(FIDELITY_STAGES[stage].get_args([]))
        for flag, value in re.findall(r"`(--[a-z][a-z-]*)(?: ([^`]+))?`", ours):
            default = defaults[flag[2:].replace("-", "_")]
            if value.isupper():  # a placeholder such as FILE: the flag has no default
                assert default is None, (stage, flag, default)
            else:  # the value as the stage's own parser reads it (lists, floats); a flag alone is True
                given = vars(FIDELITY_STAGES[stage].get_args([flag, *value.split()]))[flag[2:].replace("-", "_")]
                assert default == given, (stage, flag, value, default)
            checked.add((stage, flag))
    assert {("pretraining", f) for f in ("--blr", "--batch-size", "--weight-decay", "--warmup-epochs", "--epochs",
                                         "--mask-ratio", "--num-masks", "--ema", "--drop-path", "--layer-scale")} <= checked
    assert {("linear probe", f) for f in ("--blr", "--batch-size", "--warmup-epochs", "--epochs", "--branch")} <= checked
    assert {("fine-tuning", f) for f in ("--blr", "--min-lr", "--batch-size", "--layer-decay", "--weight-decay",
                                         "--warmup-epochs", "--epochs", "--drop-path", "--reprob", "--mixup",
                                         "--cutmix", "--smoothing", "--color-jitter", "--branch")} <= checked
    assert {("ADE20K", f) for f in ("--lr", "--decoder-channels", "--drop-path", "--iters", "--warmup-iters",
                                    "--layer-decay", "--weight-decay", "--batch-size", "--img-size")} <= checked
    assert {("COCO", f) for f in ("--lr", "--drop-path", "--lr-drop-epochs", "--warmup-iters", "--layer-decay",
                                  "--weight-decay", "--epochs", "--batch-size", "--img-size")} <= checked


# ====================================================================================================
# ADE20K segmentation


SEG_TINY = ["--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8", "--decoder-channels", "32",
            "--num-workers", "0", "--device", "cpu", "--amp", "none", "--print-freq", "1", "--lr", "1e-3",
            "--warmup-iters", "1"]


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
        groups = models.layer_decay_groups(model, 0.05, 0.65, 12)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        assert scale[id(model.backbone.encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** 12)
        assert scale[id(model.decode_head.fpn_bottleneck[0].weight)] == 1.0
    args = transfer_seg.get_args(["--arch", "vit_tiny", "--img-size", "64", "--feature-blocks", "1", "2", "3", "5"])
    transfer_seg.check_args(args)
    assert len(transfer_seg.build_model(args, log=lambda *a: None).backbone.encoder.blocks) == 5  # unused: gone


def test_seg_pretrained_official_encoder(official_file):
    fixture, path = official_file
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
    log = read_log(straight)
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
    assert read_log(resumed)[-1]["train_loss"] == log[-1]["train_loss"]
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
    assert read_log(out)[-1]["iter"] == 2
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


def test_seg_upper_case_jpg_and_missing_annotation(tmp_path):
    """Images found as NAME.JPG are loaded from that path; an image without annotation stops the run before
    training, naming it."""
    root = str(tmp_path / "ade")
    seg_write_ade(root, "training", [(40, 40), (40, 40)])
    seg_write_ade(root, "validation", [(40, 40)])
    images = os.path.join(root, "images", "training")
    for name in os.listdir(images):
        os.rename(os.path.join(images, name), os.path.join(images, name[:-4] + ".JPG"))
    img, labels = transfer_seg.ADE20K(root, "training", transfer_seg.EvalTransform(32))[1]
    assert img.shape == (3, 32, 32) and labels.shape == (40, 40)
    os.remove(os.path.join(root, "annotations", "training", "ADE_training_00000001.png"))
    argv = SEG_TINY + ["--data", root, "--batch-size", "2", "--iters", "1", "--output-dir", str(tmp_path / "out")]
    assert seg_run_error(argv) == (f"error: 1 image(s) without an annotation in {root}/annotations/training, "
                                   f"e.g. {images}/ADE_training_00000001.JPG")


def test_seg_torchrun_evaluation_matches_one_process(tmp_path):
    """Two CPU processes split the evaluation set; the reduced confusion gives the one-process metrics."""
    out = str(tmp_path / "out")
    argv = SEG_TINY + ["--batch-size", "4", "--iters", "1", "--eval-every", "1", "--output-dir", out]
    utils.run_main(lambda: transfer_seg.main(argv))  # which lets go of the output folder at the end
    with open(os.path.join(out, "per_class_iou.json")) as f:
        one_process = json.load(f)
    os.remove(os.path.join(out, "per_class_iou.json"))
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(here, "transfer_seg.py"), *argv, "--eval-only"],
                            cwd=here, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "error" in line]
    with open(os.path.join(out, "per_class_iou.json")) as f:
        assert json.load(f) == one_process

# ====================================================================================================
# COCO detection


DET_FLAGS = ["--arch", "vit_fixture", "--img-size", "64", "--patch-size", "8", "--batch-size", "2",
             "--synthetic-images", "2", "--num-workers", "0", "--device", "cpu", "--print-freq", "1",
             "--warmup-iters", "2", "--lr", "1e-3"]


@pytest.fixture
def det_small_heads(monkeypatch):
    """The reference Mask R-CNN with fewer proposals and samples and narrow box and mask heads (tests only)."""
    monkeypatch.setattr(transfer_det, "RPN_SETTINGS", {**transfer_det.RPN_SETTINGS,
                                                       "pre_nms_top_n": dict(training=200, testing=100),
                                                       "post_nms_top_n": dict(training=100, testing=50)})
    monkeypatch.setattr(transfer_det, "ROI_SETTINGS", {**transfer_det.ROI_SETTINGS, "batch_size_per_image": 32,
                                                       "detections_per_img": 10})
    monkeypatch.setattr(transfer_det, "HEAD_CHANNELS", dict(box_conv=8, box_fc=32, mask=16))


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
    groups = models.layer_decay_groups(detector, 0.05, 0.75, 2)
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[0] == pytest.approx(0.75 ** 3) and scales[3] == 1.0  # patch embedding vs. heads


def test_det_training_step_has_finite_losses_with_mask(det_coco, det_small_heads):
    torch.manual_seed(0)
    args = transfer_det.get_args(DET_FLAGS)
    plain = transfer_det.CocoInstances(det_coco, "train", True, v2.ToDtype(torch.float32, scale=True))
    assert len(plain) == 3  # the image without objects is skipped
    _, target = plain[1]
    crowd_free = [a for a in plain.coco.imgToAnns[plain.ids[1]] if not a["iscrowd"]]
    assert len(target["boxes"]) == len(crowd_free) and target["masks"].shape[1:] == (64, 64)
    dataset = transfer_det.CocoInstances(det_coco, "train", True, transfer_det.train_transform(None, 64))
    images, targets = transfer_det.collate_lists([dataset[0], dataset[1]])
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


def test_det_resume_matches_straight_run(tmp_path, monkeypatch, det_small_heads):
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
    evaluate, evaluated = transfer_det.evaluate, []
    monkeypatch.setattr(transfer_det, "evaluate", lambda detector, *a: evaluated.append(detector.state_dict()) or
                        evaluate(detector, *a))
    stats = transfer_det.main(DET_FLAGS + ["--output-dir", straight, "--epochs", "2", "--eval-only"])
    assert all(torch.equal(v, weights[1][k]) for k, v in evaluated[0].items())  # the saved detector
    assert read_log(straight)[-1] == {"epoch": 1, "eval_only": True, **stats}
    assert stats == {k: logs[1][1][k] for k in stats}


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
    with pytest.raises(SystemExit, match=r"annotation 2 \(image \d+\): category_id: 99 is not in the file's category list"):
        transfer_det.main(DET_FLAGS + ["--data", str(broken), "--output-dir", str(tmp_path / "out2")])

    unreadable = tmp_path / "unreadable"
    os.makedirs(unreadable / "annotations")
    os.makedirs(unreadable / "train2017")
    dataset["annotations"][1]["category_id"] = 1
    json.dump(dataset, open(unreadable / "annotations" / "instances_train2017.json", "w"))
    for image in dataset["images"][1:]:
        os.symlink(os.path.join(det_coco, "train2017", image["file_name"]), unreadable / "train2017" / image["file_name"])
    bad_image = unreadable / "train2017" / dataset["images"][0]["file_name"]
    bad_image.write_bytes(b"not a jpeg")
    train = transfer_det.CocoInstances(str(unreadable), "train", True, transfer_det.train_transform(None))
    with pytest.raises(utils.DataError, match=f"cannot read image {bad_image}"):
        train[0]


def det_copy_with(det_coco, root, change):
    """A copy of the synthetic COCO set whose training annotations went through change(dataset)."""
    os.makedirs(root / "annotations")
    for split in ("train", "val"):
        os.symlink(os.path.join(det_coco, f"{split}2017"), root / f"{split}2017")
    os.symlink(os.path.join(det_coco, "annotations", "instances_val2017.json"), root / "annotations" / "instances_val2017.json")
    with open(os.path.join(det_coco, "annotations", "instances_train2017.json")) as f:
        dataset = json.load(f)
    change(dataset)
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump(dataset, f)
    return str(root), dataset


@pytest.mark.parametrize("field, value, problem", [
    ("bbox", None, "bbox: None is not [x, y, width, height] with a width and height of at least 0"),
    ("bbox", "1, 2, 3, 4", "bbox: '1, 2, 3, 4' is not [x, y, width, height] with a width and height of at least 0"),
    ("bbox", [1, 2, 3], "bbox: [1, 2, 3] is not [x, y, width, height] with a width and height of at least 0"),
    ("bbox", [1, 2, -3, 4], "bbox: [1, 2, -3, 4] is not [x, y, width, height] with a width and height of at least 0"),
    ("segmentation", [[1.0, 2.0, 3.0]], "segmentation: polygon [1.0, 2.0, 3.0] is not x, y pairs of at least 3 points"),
    ("segmentation", [[1, 2, 3, 4, 5, 6, 7]],
     "segmentation: polygon [1, 2, 3, 4, 5, 6, 7] is not x, y pairs of at least 3 points"),
    ("segmentation", {"size": [32, 32], "counts": "abc"},
     "segmentation: an RLE needs counts and size [height, width] = [64, 64] of its image, got size [32, 32]"),
])
def test_det_malformed_annotation_is_named_before_training(tmp_path, det_coco, field, value, problem):
    def change(dataset):
        ann = dataset["annotations"][1]
        ann.pop(field) if value is None else ann.update({field: value})
    root, dataset = det_copy_with(det_coco, tmp_path / "coco", change)
    with pytest.raises(SystemExit) as error:
        transfer_det.CocoInstances(root, "train", True, transfer_det.train_transform(None))
    ann_file = os.path.join(root, "annotations", "instances_train2017.json")
    assert str(error.value) == f"error: {ann_file}: annotation 2 (image {dataset['annotations'][1]['image_id']}): {problem}"


@pytest.mark.parametrize("empty", [None, []])
def test_det_annotation_without_segmentation_is_left_out(tmp_path, det_coco, empty):
    def change(dataset):
        ann = dataset["annotations"][0]
        ann.pop("segmentation") if empty is None else ann.update(segmentation=empty)
    root, dataset = det_copy_with(det_coco, tmp_path / "coco", change)
    lines = []
    train = transfer_det.CocoInstances(root, "train", True, transfer_det.train_transform(None), log=lines.append)
    assert lines == [f"{os.path.join(root, 'annotations', 'instances_train2017.json')}: 1 annotation(s) without "
                     f"segmentation left out"]
    image_id = dataset["annotations"][0]["image_id"]
    others = [a for a in dataset["annotations"][1:] if a["image_id"] == image_id and not a["iscrowd"]]
    assert 1 not in train.coco.anns and len(train.coco.imgToAnns[image_id]) == len(others)
    if others:
        _, target = train[train.ids.index(image_id)]
        assert len(target["boxes"]) == len(target["masks"]) == len(others)


def test_det_missing_image_file_is_found_before_training(tmp_path, det_coco):
    def change(dataset):
        dataset["images"][1]["file_name"] = "missing.jpg"
    root, _ = det_copy_with(det_coco, tmp_path / "coco", change)
    with pytest.raises(SystemExit) as error:
        transfer_det.CocoInstances(root, "train", True, transfer_det.train_transform(None))
    assert str(error.value) == (f"error: 1 image(s) of {root}/annotations/instances_train2017.json are not in "
                                f"{root}/train2017, e.g. missing.jpg")


def test_det_loads_official_checkpoint_branch(official_file):
    fixture, path = official_file
    state = fixture["checkpoint"]["state_dict"]
    for branch, prefix in (("momentum", "module.momentum_encoder."), ("online", "module.base_encoder.")):
        args = transfer_det.get_args(["--arch", "vit_fixture", "--patch-size", "8", "--pretrained", path,
                                      "--branch", branch])
        encoder = transfer_det.build_detector(args, num_classes=3, log=lambda *a: None).backbone.maps.encoder
        torch.testing.assert_close(encoder.blocks[1].mlp.fc2.weight, state[prefix + "blocks.1.mlp.fc2.weight"])
        assert not any(name.startswith(("ca_blocks", "cls_token")) for name, _ in encoder.named_parameters())


# ====================================================================================================
# Fidelity (issue 10): segmentation and detection


def test_rel_pos_bias_starts_neutral_and_loads_without_tables():
    assert models.relative_position_index(2, 2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    torch.manual_seed(0)
    plain = models.vit_tiny(img_size=32, patch_size=8).eval()
    biased = models.vit_tiny(img_size=32, patch_size=8, rel_pos_bias=True).eval()
    table = biased.blocks[0].attn.relative_position_bias_table
    assert table.shape == (7 * 7, 3) and not table.any()
    assert "blocks.0.attn.relative_position_index" not in biased.state_dict()  # rebuilt, not stored
    models.load_encoder(biased, {"model": {f"encoder.{k}": v for k, v in plain.state_dict().items()}}, "online")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(biased(x)[0], plain(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(biased.intermediate_tokens(x, [3])[0], plain.intermediate_tokens(x, [3])[0],
                                   atol=1e-5, rtol=0)
        for block in biased.blocks:
            block.attn.relative_position_bias_table.normal_()
        assert not torch.allclose(biased(x)[0], plain(x)[0], atol=1e-2)
        assert biased(torch.randn(1, 3, 48, 24))[0].shape == (1, 18, 192)  # table resized to the 6x3 grid
        bias = biased.blocks[0].attn.relative_position_bias((4, 4))  # (heads, N, N)
        assert bias.shape == (3, 16, 16) and torch.equal(bias[:, 5, 5], table[24])  # zero offset: the centre row
    with pytest.raises(ValueError, match="relative position bias needs the token grid"):
        biased(x, keep=models.sample_keep(2, 16, 0.5, 1))
    # the tables are decayed like every other matrix, as in the reference's LayerDecayOptimizerConstructor
    groups = models.layer_decay_groups(biased, 0.05, 0.65, 12)
    group = next(g for g in groups if any(p is table for p in g["params"]))
    assert group["weight_decay"] == 0.05 and group["layer_id"] == 1


def test_seg_rel_pos_bias_heads_and_defaults():
    args = transfer_seg.get_args([])
    assert args.rel_pos_bias and args.decoder_channels == 768 and args.lr == 3e-4
    assert not transfer_seg.get_args(["--no-rel-pos-bias"]).rel_pos_bias
    args = transfer_seg.get_args(["--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8",
                                  "--decoder-channels", "24"])
    transfer_seg.check_args(args)
    model = transfer_seg.build_model(args, log=lambda *a: None)
    attn = model.backbone.encoder.blocks[0].attn
    assert attn.rel_pos_grid == (4, 4) and not attn.relative_position_bias_table.any()
    assert model.decode_head.fpn_bottleneck[0].out_channels == 24
    assert model.aux_head[0][0].out_channels == transfer_seg.AUX_CHANNELS == 256  # whatever the UperNet width
    logits, aux = model(torch.randn(2, 3, 32, 32))
    (logits.mean() + aux.mean()).backward()
    assert attn.relative_position_bias_table.grad.abs().sum() > 0  # trained


def test_seg_head_init_as_mmcv_convmodule():
    """Every UperNet and FCN conv is Kaiming-normal with the fan-out for ReLU, as mmcv's ConvModule initialises
    it (std sqrt(2 / (out * k * k)), PyTorch's default would be 1 / sqrt(3 * in * k * k)); the two classifiers
    are normal(0, 0.01) with bias 0, as mmseg's decode heads."""
    args = transfer_seg.get_args(["--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8",
                                  "--decoder-channels", "32"])
    torch.manual_seed(0)
    model = transfer_seg.build_model(args, log=lambda *a: None)
    classifiers = [model.decode_head.classifier[1], model.aux_head[1][1]]
    convs = [m for head in (model.decode_head, model.aux_head) for m in head.modules()
             if isinstance(m, nn.Conv2d) and all(m is not c for c in classifiers)]
    assert len(convs) == 4 + 1 + 3 + 3 + 1 + 1  # ppm, ppm bottleneck, laterals, fpn convs, fpn bottleneck, aux
    for conv in convs:
        out_channels, in_channels, k, _ = conv.weight.shape
        assert conv.bias is None
        assert conv.weight.std().item() == pytest.approx((2 / (out_channels * k * k)) ** 0.5, rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.1 * (2 / (out_channels * k * k)) ** 0.5
    for conv in classifiers:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.15) and not conv.bias.any()
    norms = [m for m in model.aux_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(n.weight.eq(1).all() and not n.bias.any() for n in norms)


def test_det_reference_heads_and_losses(det_small_heads):
    assert transfer_det.get_args([]).lr == pytest.approx(1.5e-4)
    assert transfer_det.get_args(["--batch-size", "32"]).lr == pytest.approx(3e-4)
    torch.manual_seed(0)
    backbone = nn.Identity()
    backbone.out_channels = 8
    detector = transfer_det.mask_rcnn(backbone, 4, transform=None)
    heads = detector.roi_heads
    assert heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio == 0
    convs = [m for m in heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and sum(isinstance(m, nn.BatchNorm2d) for m in heads.box_head.modules()) == 4
    assert [m.out_features for m in heads.box_head.modules() if isinstance(m, nn.Linear)] == [32]

    # RPN: L1 over the positive anchors, divided by all sampled ones (labels -1 are ignored)
    labels = [torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0])]
    pred, target = torch.randn(5, 4), [torch.randn(5, 4)]
    _, rpn_box = detector.rpn.compute_loss(torch.randn(5), pred, labels, target)
    assert rpn_box.item() == pytest.approx((pred[:2] - target[0][:2]).abs().sum().item() / 4, rel=1e-6)

    # RoI heads with zero deltas: the decoded boxes are the proposals, so the box loss is
    # 10 * sum over positives of (1 - GIoU(proposal, its ground truth)) / sampled RoIs
    nn.init.zeros_(heads.box_predictor.bbox_pred.weight)
    nn.init.zeros_(heads.box_predictor.bbox_pred.bias)
    gt = torch.tensor([[4.0, 4.0, 28.0, 28.0], [30.0, 8.0, 60.0, 40.0]])
    proposals = torch.cat([gt + 2, gt + torch.tensor([0.0, 0.0, 6.0, 0.0]), torch.tensor([[40.0, 44.0, 60.0, 62.0]])])
    features = {str(i): torch.randn(1, 8, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2)) for i in range(4)}
    targets = [{"boxes": gt, "labels": torch.tensor([1, 3]), "masks": torch.zeros(2, 64, 64, dtype=torch.uint8)}]
    heads.train()
    _, losses = heads(features, [proposals], [(64, 64)], targets)
    expected = sum(1 - generalized_box_iou(proposals[i:i + 1], gt[i % 2:i % 2 + 1]).item() for i in range(4))
    assert losses["loss_box_reg"].item() == pytest.approx(10 * expected / 7, rel=1e-5)  # 2 gt copies, 5 proposals
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_det_reference_sizes_are_built():
    """The sizes det_small_heads shrinks, as a run builds them: 2000 / 1000 proposals, 256 anchors and 512 RoIs
    sampled, 100 detections, 256-wide box convs into a 1024-wide fc, 256-wide mask convs to 28 x 28 masks."""
    backbone = nn.Identity()
    backbone.out_channels = 256
    detector = transfer_det.mask_rcnn(backbone, 4, transform=None).eval()
    rpn, heads = detector.rpn, detector.roi_heads
    assert rpn._pre_nms_top_n == rpn._post_nms_top_n == dict(training=2000, testing=1000)
    assert (rpn.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.batch_size_per_image) == (256, 512)
    assert heads.detections_per_img == 100
    assert [m.out_channels for m in heads.box_head.modules() if isinstance(m, nn.Conv2d)] == [256] * 4
    assert [m.out_channels for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)] == [256] * 4
    with torch.no_grad():
        boxes = heads.box_head(torch.randn(2, 256, 7, 7))
        masks = heads.mask_predictor(heads.mask_head(torch.randn(2, 256, 14, 14)))
    assert boxes.shape == (2, 1024) and [t.shape for t in heads.box_predictor(boxes)] == [(2, 4), (2, 16)]
    assert masks.shape == (2, 4, 28, 28)


def test_det_matcher_and_box_decoding_as_mmdet(det_small_heads):
    """mmdetection's MaxIoUAssigner and delta2bbox, which torchvision's Matcher and BoxCoder differ from at the
    boundaries: a low-quality match needs IoU >= min_pos_iou (0.3 in the RPN, 0.5 in the RoI heads), and takes the
    prediction even from its own best box, a later box winning; dw, dh are clamped at -log(1000/16) too."""
    backbone = nn.Identity()
    backbone.out_channels = 8
    detector = transfer_det.mask_rcnn(backbone, 4, transform=None)
    rpn, heads = detector.rpn, detector.roi_heads
    assert [(m.high_threshold, m.low_threshold, m.min_pos_iou) for m in (rpn.proposal_matcher,
                                                                          heads.proposal_matcher)] == [
        (0.7, 0.3, 0.3), (0.5, 0.5, 0.5)]
    assert isinstance(rpn.box_coder, transfer_det.ClampedBoxCoder) and rpn.box_coder.weights == (1.0,) * 4
    assert isinstance(heads.box_coder, transfer_det.ClampedBoxCoder) and heads.box_coder.weights == (10, 10, 5, 5)

    iou = torch.tensor([[0.29, 0.1, 0.0, 0.0, 0.0, 0.0],  # box 0: best 0.29 < 0.3, no match
                        [0.0, 0.3, 0.3, 0.0, 0.0, 0.1],  # box 1: best 0.3 (tied): both taken
                        [0.0, 0.0, 0.0, 0.8, 0.5, 0.0],  # box 2: prediction 3 is positive with it (0.8) ...
                        [0.0, 0.0, 0.0, 0.75, 0.2, 0.0]])  # ... box 3 takes it (its best, 0.75); 4: ignored (0.5)
    assert rpn.proposal_matcher(iou.clone()).tolist() == [-1, 1, 1, 3, -2, -1]
    assert transfer_det.Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone()).tolist() == [0, 1, 1, 2, -2, -1]
    assert heads.proposal_matcher(iou.clone()).tolist() == [-1, -1, -1, 3, 2, -1]  # at 0.5: 0.3 is negative
    assert rpn.proposal_matcher(torch.tensor([[0.0, 0.0]])).tolist() == [-1, -1]  # torchvision: [0, 0]

    limit = math.log(1000 / 16)
    anchors = torch.tensor([[10.0, 20.0, 42.0, 84.0]])  # 32 x 64
    for coder, (ww, wh) in ((rpn.box_coder, (1, 1)), (heads.box_coder, (5, 5))):
        for dw, dh in ((-limit - 0.01, limit + 0.01), (-limit + 0.01, -limit - 5), (-20.0, 0.5)):
            box = coder.decode_single(torch.tensor([[0.0, 0.0, dw * ww, dh * wh]]), anchors)[0]
            width, height = (box[2] - box[0]).item(), (box[3] - box[1]).item()
            assert width == pytest.approx(32 * math.exp(min(max(dw, -limit), limit)), rel=1e-5)
            assert height == pytest.approx(64 * math.exp(min(max(dh, -limit), limit)), rel=1e-5)
            assert (box[:2] + box[2:]).tolist() == pytest.approx([52.0, 104.0], abs=1e-3)  # same centre
    plain = transfer_det.BoxCoder((1.0,) * 4).decode_single(torch.tensor([[0.0, 0.0, -10.0, 0.0]]), anchors)[0]
    assert (plain[2] - plain[0]).item() == pytest.approx(32 * math.exp(-10), rel=1e-2)  # torchvision: no floor
    two_classes = heads.box_coder.decode_single(torch.tensor([[0.0, 0.0, -50.0, 0.0, 0.0, 0.0, 0.0, -50.0]]), anchors)
    assert two_classes.shape == (1, 8)  # per class: dw of class 0 and dh of class 1 at the floor, 16/1000
    assert (two_classes[0, 2] - two_classes[0, 0]).item() == pytest.approx(0.512, rel=1e-5)
    assert (two_classes[0, 7] - two_classes[0, 5]).item() == pytest.approx(1.024, rel=1e-5)
    assert heads.box_coder.decode_single(torch.zeros(0, 20), torch.zeros(0, 4)).shape == (0, 20)


def test_det_detr_branch_crops_and_resizes():
    crop = transfer_det.RandomSizeCrop(384, 600)
    image = tv_tensors.Image(torch.zeros(3, 500, 700, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, 700, 500]], format="XYXY", canvas_size=(500, 700))}
    for _ in range(5):
        out, out_target = crop(image, target)
        h, w = out.shape[-2:]
        assert 384 <= h <= 500 and 384 <= w <= 600
        assert out_target["boxes"].tolist() == [[0, 0, w, h]]  # clipped to the crop
    torch.manual_seed(0)
    transform = transfer_det.train_transform(None, 800)
    sizes = set()
    small = {"boxes": tv_tensors.BoundingBoxes([[10, 10, 110, 90]], format="XYXY", canvas_size=(100, 120)),
             "labels": torch.tensor([1]), "masks": tv_tensors.Mask(torch.ones(1, 100, 120, dtype=torch.uint8))}
    for _ in range(20):
        out, out_target = transform(tv_tensors.Image(torch.zeros(3, 100, 120, dtype=torch.uint8)), dict(small))
        sizes.add(tuple(out.shape[-2:]))
        assert out.dtype == torch.float32 and out_target["masks"].shape[1:] == out.shape[1:]
        assert len(out_target["boxes"]) == len(out_target["labels"]) == len(out_target["masks"])
    assert (100, 120) in sizes and len(sizes) > 1  # the branch is taken sometimes, not always


# ====================================================================================================
# Benchmark (correctness only: no timing is asserted)


BENCH_TINY = ["--arch", "vit_tiny", "--img-size", "32", "--patch-size", "8", "--steps", "2", "--warmup-steps", "1",
              "--device", "cpu", "--amp", "none", "--proj-hidden-dim", "64", "--proj-dim", "32",
              "--mask-ratio", "0.75", "--num-masks", "2", "--num-workers", "0"]


def bench_hand_flops_per_image(dim=192, depth=12, ca_depth=2, patches=16, patch=8, visible=4, masks=2, hidden=64,
                               out=32):
    """Matmul/conv/attention FLOPs of one training step per image, counted by hand (2 per multiply-add)."""
    def blocks(n):  # self-attention blocks over n tokens: qkv, proj, MLP (12 D^2 per token) + QK^T, AV
        return depth * (24 * n * dim ** 2 + 4 * n * n * dim)

    def class_attention(n):  # q on the cls row, k and v on 1+n rows, QK^T and AV of one query, proj, MLP
        return ca_depth * (2 * dim ** 2 + 4 * (n + 1) * dim ** 2 + 4 * (n + 1) * dim + 2 * dim ** 2 + 16 * dim ** 2)

    patch_embed = 2 * patches * dim * 3 * patch * patch
    projector = 2 * (dim * hidden + hidden * hidden + hidden * out)
    predictor = 2 * (out * hidden + hidden * out)
    online = masks * (blocks(visible) + class_attention(visible) + projector + predictor)
    target = patch_embed + blocks(patches) + class_attention(patches) + projector
    # backward = 2x forward, except the patch embedding, whose input needs no gradient (weight gradient only)
    return 3 * online + 2 * patch_embed + target


def run_bench(capsys, argv):
    summary = bench.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last)
    assert printed["flops_per_image"] == summary["flops_per_image"]
    return printed


def test_bench_tiny_run_reports_counted_flops(capsys):
    out = run_bench(capsys, BENCH_TINY + ["--batch-size", "4", "--baseline", "--data", "synthetic"])
    for key in ("images_per_s", "step_ms", "peak_mem_mb", "tflops", "flops_per_image", "baseline_images_per_s",
                "speedup", "speedup_median_pair", "loader_images_per_s"):
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]) and out[key] > 0, key
    assert "mfu" not in out  # no known peak on CPU without --peak-tflops
    hand = bench_hand_flops_per_image()
    assert out["flops_per_image"] == hand  # attention counted too (CPU flash kernel), no recompute
    assert out["baseline_flops_per_image"] == hand  # same work in the official pattern
    assert out["bottleneck"] in ("loader", "step")
    assert 0 < out["loader_cpu_ms_per_image"] and out["workers_needed"] >= 1
    assert out["min_step_ms"] <= out["step_ms"] <= out["max_step_ms"]


def test_bench_times_steps_in_turns():
    calls = []
    seconds = bench.time_interleaved([lambda: calls.append("ours") or time.sleep(0.01),
                                      lambda: calls.append("baseline") or time.sleep(0.03)], torch.device("cpu"), 3)
    assert calls == ["ours", "baseline"] * 3
    assert [len(s) for s in seconds] == [3, 3]
    assert all(0.01 <= t < 0.03 for t in seconds[0]) and all(0.03 <= t < 1 for t in seconds[1])


def test_bench_flops_per_image_independent_of_batch():
    args = bench.get_args(BENCH_TINY)
    learner = pretrain.build_model(args)
    optimizer = utils.adamw(models.param_groups(learner, 0.1), lr=0.0, betas=(0.9, 0.95), device=torch.device("cpu"))
    scaler = utils.grad_scaler(torch.device("cpu"), "none")
    for batch in (3, 6):
        micro_batches = [torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)]  # colouring adds no FLOPs
        flops = bench.count_flops(lambda: pretrain.train_step(learner, optimizer, scaler, micro_batches, 1e-4,
                                                              0.99, "none"))
        assert flops == batch * bench_hand_flops_per_image()


def test_bench_baseline_matches_ours():
    args = bench.get_args(BENCH_TINY + ["--drop-path", "0"])
    torch.manual_seed(0)
    ours = pretrain.build_model(args).train()
    baseline = bench.BaselineExtreMA(args).load_ours(ours.state_dict()).train()
    x1, x2 = torch.randn(2, 3, 3, 32, 32).unbind()
    keep = ours.sample_keep(3)  # (M, B, K)
    loss_ours, loss_base = ours(x1, x2, keep), baseline(x1, x2, keep)
    assert torch.allclose(loss_ours, loss_base, atol=1e-5, rtol=0)
    loss_ours.backward()
    loss_base.backward()
    grad = dict(baseline.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None and ".attn.kv." not in name:
            assert torch.allclose(p.grad, grad[name].grad.reshape(p.shape), atol=1e-5, rtol=1e-4), name

    with torch.no_grad():  # move the online weights, then one momentum step each
        for model in (ours, baseline):
            model.encoder.blocks[0].mlp.fc1.weight.add_(1.0)
            model.update_momentum(0.9)
    assert torch.allclose(ours.momentum_encoder.blocks[0].mlp.fc1.weight,
                          baseline.momentum_encoder.blocks[0].mlp.fc1.weight)


def test_bench_rejects_bad_settings():
    with pytest.raises(SystemExit, match="--steps, --warmup-steps and --data-batches must be at least 1"):
        bench.main(BENCH_TINY + ["--steps", "0"])
    with pytest.raises(SystemExit, match="--warmup-steps and --data-batches must be at least 1"):
        bench.main(BENCH_TINY + ["--warmup-steps", "0"])
    with pytest.raises(SystemExit, match="do not fit"):
        bench.main(BENCH_TINY + ["--mask-ratio", "0.5", "--num-masks", "3"])


# ====================================================================================================
# Reliability: kills, full disks, stop signals, mid-epoch resume, changed flags


def stage_runs(tmp_path, det_small_heads):
    """A tiny run of every stage with 2 optimizer steps per epoch (or evaluation block): main(out, *extra)."""
    return {
        "pretrain": lambda out, *extra: pretrain.main(TINY + ["--arch", "vit_fixture", "--epochs", "2",
                                                              "--output-dir", str(out), *extra]),
        "linprobe": lambda out, *extra: linprobe.main(eval_args(out, "--epochs", "2", *extra)),
        "finetune": lambda out, *extra: finetune.main(eval_args(out, "--epochs", "2", *extra)),
        "seg": lambda out, *extra: transfer_seg.main(SEG_TINY + ["--batch-size", "4", "--iters", "4", "--eval-every",
                                                                 "2", "--output-dir", str(out), *extra]),
        "det": lambda out, *extra: transfer_det.main(DET_FLAGS + ["--synthetic-images", "4", "--epochs", "2",
                                                                  "--output-dir", str(out), *extra]),
    }


def log_keys(out):
    return [r.get("epoch", r.get("iter")) for r in read_log(out)]


@pytest.mark.parametrize("stage", ["pretrain", "linprobe", "finetune", "seg", "det"])
def test_kill_during_checkpoint_write_never_repeats_a_log_line(tmp_path, monkeypatch, det_small_heads, stage):
    """A kill in the middle of the second checkpoint write, then the same command: each epoch (or evaluation)
    is logged once, and a line past the checkpoint is dropped."""
    run = stage_runs(tmp_path, det_small_heads)[stage]
    save, calls = torch.save, []

    def killed_mid_write(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise KeyboardInterrupt
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.setattr(torch, "save", save)
    assert not (tmp_path / "checkpoint-last.pth.tmp").exists()
    with open(tmp_path / "log.jsonl", "a") as f:  # as if logged by a run whose checkpoint was lost
        f.write(json.dumps({"iter" if stage == "seg" else "epoch": 99, "train_loss": 0.0}) + "\n")
    run(tmp_path)
    assert log_keys(tmp_path) == ([2, 4] if stage == "seg" else [0, 1])


@pytest.mark.parametrize("stage, argv, change, refused", [
    ("pretrain", TINY, ["--patch-size", "16"], "--patch-size 8, not --patch-size 16"),
    ("pretrain", TINY, ["--img-size", "64"], "--img-size 32, not --img-size 64"),
    ("pretrain", TINY, ["--proj-dim", "16"], "--proj-dim 32, not --proj-dim 16"),
    ("pretrain", TINY, ["--proj-hidden-dim", "32"], "--proj-hidden-dim 64, not --proj-hidden-dim 32"),
    ("linprobe", eval_args("unused")[:-2], ["--final-norm"], "--final-norm False, not --final-norm True"),
    ("transfer_seg", SEG_TINY, ["--feature-blocks", "1", "1", "2", "2"],
     "--feature-blocks [1, 1, 1, 2], not --feature-blocks [1, 1, 2, 2]"),
    ("transfer_seg", SEG_TINY, ["--decoder-channels", "16"], "--decoder-channels 32, not --decoder-channels 16"),
    ("transfer_seg", SEG_TINY, ["--no-rel-pos-bias"], "--rel-pos-bias True, not --rel-pos-bias False"),
])
def test_architecture_change_on_resume_is_refused(tmp_path, stage, argv, change, refused):
    """A checkpoint-last.pth of a run with argv, resumed with a flag that shapes the model changed: one line naming
    the flag with both values, before anything is loaded."""
    argv = argv + ["--output-dir", str(tmp_path)]
    args = STAGES[stage].get_args(argv)
    if stage == "transfer_seg":
        transfer_seg.check_args(args)  # fills in --feature-blocks
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "epoch": 0, "iter": 1, "args": vars(args)},
               tmp_path / "checkpoint-last.pth")
    assert stage_error(stage, argv + change) == (f"error: {tmp_path / 'checkpoint-last.pth'} was trained with "
                                                 f"{refused}: give the same flags or another --output-dir")


def test_save_every_zero_and_changed_flags(tmp_path, capsys):
    """--save-every 0 keeps no numbered checkpoint; a negative one is refused; a resumed run warns in one line
    about changed schedule flags."""
    tiny = TINY + ["--arch", "vit_fixture", "--output-dir", str(tmp_path)]
    pretrain.main(tiny + ["--epochs", "1", "--save-every", "0"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "log.jsonl"]
    with pytest.raises(SystemExit, match=r"^error: --save-every must be 0 \(no numbered checkpoints\) or positive"):
        pretrain.main(tiny + ["--save-every", "-1"])
    capsys.readouterr()
    pretrain.main(tiny + ["--epochs", "2", "--blr", "3e-4", "--batch-size", "8", "--save-every", "0"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: resuming {tmp_path / 'checkpoint-last.pth'} with changed flags: --batch-size "
                        f"16 -> 8, --epochs 1 -> 2, --blr 0.00015 -> 0.0003"]
    assert log_keys(tmp_path) == [0, 1] and sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "log.jsonl"]


def test_full_disk_during_checkpoint_write(tmp_path, monkeypatch):
    """A write that fails (here: over the file size limit, EFBIG; a full disk is ENOSPC) ends in one line naming
    the file and the cause; the temporary file is removed and the old checkpoint is intact."""
    path = str(tmp_path / "checkpoint-last.pth")
    utils.save_checkpoint({"epoch": 0}, path)
    old = open(path, "rb").read()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(SystemExit) as info:
            utils.save_checkpoint({"epoch": 1, "model": torch.zeros(1 << 20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value) == f"error: cannot write {path}: File too large; the previous checkpoint is kept"
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"] and open(path, "rb").read() == old

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*checkpoint-last\.pth: No space left on device; "
                                         r"the previous checkpoint is kept$"):
        utils.save_checkpoint({"epoch": 1}, path)
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"] and open(path, "rb").read() == old


def test_second_ctrl_c_and_bad_save_interval(tmp_path):
    """The first Ctrl-C only asks for a stop at the next step boundary; a second one stops at once, in one line."""
    with pytest.raises(SystemExit, match=r"^error: --save-interval must be 0 \(only at epoch ends\) or positive"):
        utils.Run(argparse.Namespace(output_dir=str(tmp_path), save_interval=-1), 1)
    checkpointer = utils.Run(argparse.Namespace(output_dir=str(tmp_path), save_interval=30), 1)
    signal.raise_signal(signal.SIGINT)
    assert checkpointer.signal == "SIGINT"
    utils.save_checkpoint({"epoch": 0}, checkpointer.path)
    with pytest.raises(SystemExit, match=r"^error: interrupted by a second Ctrl-C; .*checkpoint-last\.pth holds "
                                         r"the last saved state$"):
        utils.run_main(lambda: signal.raise_signal(signal.SIGINT))


def test_run_main_closes_the_process_group(tmp_path):
    """A stage that returns leaves no process group open: an open one can abort its peers at exit."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    utils.run_main(lambda: None)
    assert not torch.distributed.is_initialized()


def test_torchrun_finetune_seg_and_det_then_a_signal_to_one_worker(tmp_path):
    """Fine-tuning, segmentation and detection (small heads) under torchrun, 2 CPU processes, one launch: each
    trains its one step, evaluates and writes one log line and the checkpoint (rank 1 writes nothing). Then
    pretraining, where SIGTERM reaches rank 1 alone during step 1: both stop after step 2 (the flags travel one step
    late), rank 0 saves there, each exits 143 and torchrun 1."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import torch.distributed as dist\n"
        "import os, signal\n"
        "import finetune, pretrain, transfer_det, transfer_seg\n"
        "step, sent = pretrain.train_step, []\n"
        "def signalled(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1' and not sent:\n"
        "        sent.append(os.kill(os.getpid(), signal.SIGTERM))\n"
        "    return step(*args, **kwargs)\n"
        "pretrain.train_step = signalled\n"
        "transfer_det.RPN_SETTINGS.update(pre_nms_top_n=dict(training=200, testing=100),\n"
        "                                 post_nms_top_n=dict(training=100, testing=50))\n"
        "transfer_det.ROI_SETTINGS.update(batch_size_per_image=32, detections_per_img=10)\n"
        "transfer_det.HEAD_CHANNELS.update(box_conv=8, box_fc=32, mask=16)\n"
        "init = dist.init_process_group  # one group for the three stages (a second one, after the first, hung)\n"
        "dist.init_process_group = lambda *a, **k: dist.is_initialized() or init(*a, **k)\n"
        "for stage, argv in json.loads(sys.argv[1]):\n"
        "    sys.modules[stage].main(argv)\n"
        "dist.destroy_process_group()\n")
    runs = [("finetune", eval_args(tmp_path / "finetune", "--batch-size", "8")),  # 8 images: 1 step of 2 x 4
            ("transfer_seg", SEG_TINY + ["--batch-size", "4", "--iters", "1", "--output-dir", str(tmp_path / "seg")]),
            ("transfer_det", DET_FLAGS + ["--epochs", "1", "--output-dir", str(tmp_path / "det")]),  # 2 images
            ("pretrain", TINY + ["--arch", "vit_fixture", "--synthetic-size", "256", "--batch-size", "32", "--epochs",
                                 "1", "--output-dir", str(tmp_path / "pre")])]  # 8 steps
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
                        json.dumps(runs), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "exitcode  : 143" in result.stderr, result.stderr[-3000:]
    assert (f"a stop signal in another process: saved {tmp_path / 'pre' / 'checkpoint-last.pth'} at epoch 0 step 2/8; "
            f"exiting with status 143") in result.stdout
    checkpoint = torch.load(tmp_path / "pre" / "checkpoint-last.pth", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (-1, 2)
    assert "fine-tuning the online encoder (vit_fixture): 8 training / 2 validation images, 4 classes" in result.stdout
    for out, key, metric in (("finetune", "epoch", "acc1"), ("seg", "iter", "mIoU"), ("det", "epoch", "bbox_AP")):
        (record,) = read_log(tmp_path / out)
        assert record[key] == (1 if key == "iter" else 0) and math.isfinite(record["train_loss"]) and metric in record
        checkpoint = torch.load(tmp_path / out / "checkpoint-last.pth", weights_only=False)
        assert checkpoint[key] == record[key] and checkpoint["log"] == record
    assert read_log(tmp_path / "finetune")[0]["train_images"] == 8


def test_sigterm_saves_and_exits_for_requeue(tmp_path):
    """SIGTERM during a pretraining step: the step finishes, checkpoint-last.pth is written, one line says so,
    the exit status is 143; the same command resumes and ends with each epoch logged once. 8 steps per epoch: the
    run is far from its end when the signal comes, even on a busy machine."""
    command = ["pretrain.py", *TINY, "--arch", "vit_fixture", "--synthetic-size", "128", "--epochs", "2",
               "--output-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("epoch 0 step 1/8"):  # a step has finished, the next has started
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    lines = "".join(out + [rest]).splitlines()
    assert proc.returncode == utils.REQUEUE_STATUS == 143, err
    assert "Traceback" not in err
    assert re.fullmatch(r"SIGTERM: saved .*checkpoint-last\.pth at epoch \d step \d/8; exiting with status 143 "
                        r"\(requeue and rerun the same command to resume\)", lines[-1])
    checkpoint = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert 1 <= (checkpoint["epoch"] + 1) * 8 + checkpoint["step"] < 16  # steps done: stopped before the end
    pretrain.main(command[1:])
    assert log_keys(tmp_path) == [0, 1]


@pytest.mark.parametrize("stage, signum", [("linprobe", signal.SIGUSR1), ("finetune", signal.SIGINT),
                                           ("seg", signal.SIGTERM), ("det", signal.SIGUSR1)])
def test_stop_signal_mid_epoch_then_exact_resume(tmp_path, monkeypatch, capsys, det_small_heads, stage, signum):
    """A stop signal during the first step: that step finishes, the run saves its position (epoch 0, step 1)
    and exits 143; the same command resumes mid-epoch and ends with the weights and log of a straight run."""
    run = stage_runs(tmp_path, det_small_heads)[stage]
    run(tmp_path / "straight")
    step, calls = utils.set_lr, []

    def signalled_step(*a, **k):  # set_lr begins every optimizer step of every stage
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return step(*a, **k)

    monkeypatch.setattr(utils, "set_lr", signalled_step)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "resumed")
    assert info.value.code == utils.REQUEUE_STATUS
    where = "iteration 1/4" if stage == "seg" else "epoch 0 step 1/2"
    path = tmp_path / "resumed" / "checkpoint-last.pth"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{signal.Signals(signum).name}: saved {path} at {where}; exiting with status 143 (requeue and rerun the "
        f"same command to resume)")
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=False)
    assert (checkpoint["iter"] == 1) if stage == "seg" else (checkpoint["epoch"], checkpoint["step"]) == (-1, 1)
    monkeypatch.setattr(utils, "set_lr", step)
    run(tmp_path / "resumed")
    clock = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert clock(read_log(tmp_path / "resumed")) == clock(read_log(tmp_path / "straight"))
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=False)["model"]
            for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_mid_epoch_resume_is_exact(tmp_path, monkeypatch):
    """Killed after a --save-interval checkpoint in the middle of epoch 1 and resumed: the same log and weights as
    a straight run (--num-workers 0), and the resumed run reads only the images it has not trained on."""
    command = TINY + ["--arch", "vit_fixture", "--synthetic-size", "48", "--epochs", "2"]  # 3 steps per epoch
    pretrain.main(command + ["--output-dir", str(tmp_path / "straight")])
    save = utils.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if (state["epoch"], state["step"]) == (0, 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(utils, "save_checkpoint", save_then_die)
    resumed = command + ["--output-dir", str(tmp_path / "resumed"), "--save-interval", "1e-9"]
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(resumed)
    monkeypatch.setattr(utils, "save_checkpoint", save)
    getitem, reads = data.SyntheticImages.__getitem__, []
    monkeypatch.setattr(data.SyntheticImages, "__getitem__", lambda self, i: reads.append(i) or getitem(self, i))
    pretrain.main(resumed)
    assert len(reads) == 2 * 16  # epoch 1, steps 1 and 2
    timing = ("time_s", "images_per_s")
    clock = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert clock(read_log(tmp_path / "resumed")) == clock(read_log(tmp_path / "straight"))
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=False) for d in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resumed_epoch_keeps_the_data_order_with_workers():
    """make_loader's sampler started part-way gives the rest of the same epoch's order, with workers too."""
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    loader = data.make_loader(dataset, 4, True, num_workers=2, seed=3, device=torch.device("cpu"))
    full = [batch[0].tolist() for batch in data.epoch_batches(loader, 5)]
    assert [batch[0].tolist() for batch in data.epoch_batches(loader, 5, skip_batches=3)] == full[3:]
    assert len(full) == 10 and full != [batch[0].tolist() for batch in data.epoch_batches(loader, 6)]


def run_with_deadline(*args, timeout=120, env=None):
    """A script run in its own session: one still running after `timeout` seconds fails the test, and every process
    of its session (loader workers too) is killed. Returns (status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args[:3])} ... still running after {timeout} s")
    return proc.returncode, out, err


def processes_naming(text):
    """The ids of this machine's processes whose command line holds text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with __import__("contextlib").suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
    return found


def image_folder_with_empty_files(root, good, empty):
    """root/{train,val}/a/ with `good` small PNGs and `empty` 0-byte ones; returns the first 0-byte file."""
    for split in ("train", "val"):
        folder = root / split / "a"
        folder.mkdir(parents=True)
        for i in range(good):
            data.SyntheticImages(1, 32)[0][0].save(folder / f"ok_{i}.png")
        for i in range(empty):
            (folder / f"empty_{i}.png").write_bytes(b"")
    return root / "train" / "a" / "empty_0.png"


def test_unreadable_image_with_loader_workers_ends_the_run(tmp_path):
    """A 0-byte image read by a loader worker (--num-workers 2): the run ends promptly with one line and status 1,
    in one process and under torchrun, and leaves no worker behind."""
    root = tmp_path / "data"
    image_folder_with_empty_files(root, 8, 8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"pretrain": ["pretrain.py", *TINY, "--epochs", "1", "--num-workers", "2", "--data", str(root),
                         "--output-dir", str(tmp_path / "pretrain")],
            "torchrun linprobe": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                  "linprobe.py", *eval_args(tmp_path / "linprobe", "--data", str(root), "--num-classes",
                                                            "1", "--batch-size", "16", "--num-workers", "2")]}
    for name, command in runs.items():
        status, out, err = run_with_deadline(*command, env=env)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert status == 1 and errors and re.fullmatch(rf"error: cannot read image {root}/train/a/empty_\d\.png: .*",
                                                       errors[0]), (name, err[-2000:])
        if name == "pretrain":
            assert err.strip().splitlines() == errors[:1]
        assert processes_naming(str(tmp_path)) == [], name


def test_no_checkpoint_from_non_finite_weights(tmp_path, monkeypatch):
    """A loss gone NaN between two print-freq checks, then a mid-epoch save due: the save is refused in one line,
    checkpoint-last.pth keeps the last good state, and the same command without the fault resumes from it.
    A checkpoint holding NaN is never written, whatever asks for it."""
    command = TINY + ["--arch", "vit_fixture", "--output-dir", str(tmp_path), "--print-freq", "100"]
    pretrain.main(command + ["--epochs", "1"])
    good = eval_checkpoint(tmp_path)["model"]
    forward = models.ExtreMA.forward

    def nan_loss(self, *args, **kwargs):
        loss, target = forward(self, *args, **kwargs)
        return loss * float("nan"), target

    monkeypatch.setattr(models.ExtreMA, "forward", nan_loss)
    with pytest.raises(SystemExit, match=r"^error: non-finite loss before epoch 1 step 1/2: not writing .*"
                                         r"checkpoint-last\.pth; the previous checkpoint is kept$"):
        pretrain.main(command + ["--epochs", "2", "--save-interval", "1e-9"])
    kept = eval_checkpoint(tmp_path)  # written at epoch 1 step 0, before the first NaN
    assert (kept["epoch"], kept["step"]) == (0, 0) and all(torch.equal(kept["model"][k], good[k]) for k in good)
    monkeypatch.setattr(models.ExtreMA, "forward", forward)
    pretrain.main(command + ["--epochs", "2"])
    assert log_keys(tmp_path) == [0, 1] and all(math.isfinite(r["train_loss"]) for r in read_log(tmp_path))
    path = str(tmp_path / "checkpoint-last.pth")
    state = torch.load(path, weights_only=False)
    state["optimizer"]["state"][0]["exp_avg"][0] = float("inf")
    with pytest.raises(SystemExit, match=r"^error: not writing .*: 1 tensor\(s\) hold NaN or infinite values, e\.g\. "
                                         r"optimizer\.state\.0\.exp_avg .*; the previous checkpoint is kept$"):
        utils.save_checkpoint(state, path)


def test_sigusr1_to_torchrun_then_resume_on_one_process(tmp_path, capsys, monkeypatch):
    """SIGUSR1 to torchrun (what `sbatch --signal=USR1@120` sends to the job step) kills torchrun; its two workers
    get SIGTERM (PR_SET_PDEATHSIG), save checkpoint-last.pth mid-epoch, say so and exit. Resumed on one process,
    the epoch's figures count the two processes' partial sums as one process's: the mean over steps is right."""
    out = tmp_path / "out"
    flags = [*TINY, "--arch", "vit_fixture", "--synthetic-size", "384", "--batch-size", "32", "--epochs", "1",
             "--output-dir", str(out)]  # 12 steps: far from the end when the signal comes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "pretrain.py", *flags], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 0 step 1/12"):
                proc.send_signal(signal.SIGUSR1)
                break
        rest, err = proc.communicate(timeout=120)  # the workers hold the pipes until they exit
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGUSR1
    saved = re.search(r"SIGTERM: saved \S+ at epoch 0 step (\d+)/12; exiting with status 143", rest)
    assert saved, rest + err[-2000:]
    assert processes_naming(str(out)) == []
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=False)
    done = int(saved.group(1))
    assert (checkpoint["epoch"], checkpoint["step"]) == (-1, done) and 0 < done < 12
    steps, train_step = [], pretrain.train_step

    def recorded_step(*args, **kwargs):  # -> loss, target_std, ...
        out = train_step(*args, **kwargs)
        steps.append((out[0].item(), out[1].item()))
        return out

    monkeypatch.setattr(pretrain, "train_step", recorded_step)
    pretrain.main(flags)
    assert len(steps) == 12 - done
    record = read_log(out)[-1]
    per_process = checkpoint["sums_per_process"]
    assert record["train_loss"] == pytest.approx((per_process["loss"] + sum(s[0] for s in steps)) / 12, rel=1e-5)
    assert record["target_std"] == pytest.approx((per_process["target_std"] + sum(s[1] for s in steps)) / 12,
                                                 rel=1e-5)


def test_one_run_per_output_folder(tmp_path):
    """While a run holds its output folder (here: this process, as a stage does in make_output_dir), another run
    on it stops in one line naming the folder and writes nothing; the folder is free once the holder lets go."""
    utils.make_output_dir(str(tmp_path))
    status, out, err = run_with_deadline("pretrain.py", *TINY, "--epochs", "1", "--output-dir", str(tmp_path))
    assert status == 1 and err == (f"error: --output-dir {tmp_path} is in use by another run (one run per folder: "
                                   f"wait for it to end, or give another --output-dir)\n")
    assert os.listdir(tmp_path) == []
    utils.release_output_dirs()
    status, out, err = run_with_deadline("-c", f"import utils; utils.make_output_dir({str(tmp_path)!r})")
    assert status == 0, err


def test_log_set_aside_repaired_and_bad_checkpoints(tmp_path, capsys):
    """A fresh run over an old log.jsonl keeps it as log.jsonl.1 and starts a new log; a log cut short or with
    blank lines is repaired from the checkpoint on resume; a log.jsonl folder and checkpoints that are not this
    stage's stop in one line before training."""
    command = TINY + ["--arch", "vit_fixture", "--output-dir", str(tmp_path)]
    pretrain.main(command + ["--epochs", "1"])
    os.remove(tmp_path / "checkpoint-last.pth")
    first = (tmp_path / "log.jsonl").read_text()
    capsys.readouterr()
    pretrain.main(command + ["--epochs", "1"])
    assert (f"{tmp_path / 'log.jsonl'} without {tmp_path / 'checkpoint-last.pth'} is an earlier run's: kept as "
            f"log.jsonl.1; this run starts a fresh log") in capsys.readouterr().out.splitlines()
    assert (tmp_path / "log.jsonl.1").read_text() == first and log_keys(tmp_path) == [0]
    line = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text("\n" + line[:20])  # a blank line, then the only line cut short
    pretrain.main(command + ["--epochs", "2"])
    assert "warning: " in capsys.readouterr().out and log_keys(tmp_path) == [0, 1]
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == json.loads(line)
    good = (tmp_path / "checkpoint-last.pth").read_bytes()
    for bad, problem in ([{"epoch": 0}, "no model, optimizer, scaler"], [[1, 2], "not a dict"]):
        torch.save(bad, tmp_path / "checkpoint-last.pth")
        assert stage_error("pretrain", command + ["--epochs", "3"]) == (
            f"error: {tmp_path / 'checkpoint-last.pth'} is not a checkpoint of this stage ({problem}): move it away "
            f"or give another --output-dir")
    (tmp_path / "checkpoint-last.pth").write_bytes(good)
    os.rename(tmp_path / "log.jsonl", tmp_path / "kept.jsonl")
    (tmp_path / "log.jsonl").mkdir()
    assert stage_error("pretrain", command + ["--epochs", "3"]) == (
        f"error: {tmp_path / 'log.jsonl'} is a folder: move it away or give another --output-dir")
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == good


def test_failed_log_append_names_the_file(tmp_path):
    """log.jsonl that cannot be appended to (here a link into a folder that is gone): one line naming it, after the
    checkpoint of the epoch it would complete."""
    (tmp_path / "log.jsonl").symlink_to(tmp_path / "gone" / "log.jsonl")
    assert stage_error("pretrain", TINY + ["--arch", "vit_fixture", "--epochs", "1", "--output-dir", str(tmp_path)]) \
        == f"error: cannot write {tmp_path / 'log.jsonl'}: No such file or directory"
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["log"]["epoch"] == 0


def test_unusable_values_and_misleading_messages(tmp_path):
    """Each flag value no run can use stops its script in one line; a 16-bit PNG among RGB images is named; a
    second Ctrl-C before any save claims no checkpoint; --export-timm onto a folder claims none kept."""
    cases = [(linprobe, ["--knn-temperature", "0"], "--knn-temperature must be positive, got 0.0"),
             (linprobe, ["--knn-temperature", "-1"], "--knn-temperature must be positive, got -1.0"),
             (bench, ["--peak-tflops", "-5"], "--peak-tflops must be positive, got -5.0"),
             (finetune, ["--smoothing", "1.5"], "--smoothing must be in [0, 1), got 1.5"),
             (finetune, ["--reprob", "2"], "--reprob must be in [0, 1], got 2.0"),
             (finetune, ["--mixup", "-1"], "--mixup must be at least 0, got -1.0"),
             (finetune, ["--cutmix", "-1"], "--cutmix must be at least 0, got -1.0"),
             (finetune, ["--label-fraction", "0"], "--label-fraction must be in (0, 1], got 0.0"),
             (transfer_det, ["--warmup-iters", "-5"], "--warmup-iters must be at least 0, got -5"),
             (transfer_seg, ["--warmup-iters", "-5"], "--warmup-iters must be at least 0, got -5"),
             (pretrain, ["--temperature", "0"], "--temperature must be positive, got 0.0"),
             (pretrain, ["--crop-min", "0"], "--crop-min must be in (0, 1], got 0.0"),
             (pretrain, ["--warmup-epochs", "nan"], "--warmup-epochs must be at least 0, got nan")]
    for script, extra, message in cases:
        with pytest.raises(SystemExit) as info:
            script.get_args(extra)
        assert str(info.value) == f"error: {message}", extra
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match=rf"^error: cannot create --make-jpegs {a_file}/train: Not a directory$"):
        bench.main(["--make-jpegs", str(a_file)])

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(16):
        data.SyntheticImages(1, 32)[0][0].save(folder / f"ok_{i}.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    with pytest.raises(utils.DataError, match=rf"^cannot read image {folder / 'deep.png'}: .*torch.uint16 pixels"):
        data.decode_image(str(folder / "deep.png"))
    assert data.decode_image(str(folder / "deep.png"), in_chans=1).dtype == torch.uint16  # grey 16-bit: one channel
    with pytest.raises(utils.DataError, match=rf"^cannot read image {folder / 'deep.png'}: I;16 pixels"):
        data.load_rgb(str(folder / "deep.png"))  # the evaluation stages' RGB reader: no silent clipping either

    utils.Run(argparse.Namespace(output_dir=str(tmp_path), save_interval=30), 1)
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(SystemExit, match=r"^error: interrupted by a second Ctrl-C; no checkpoint was written$"):
        utils.run_main(lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit) as info:
        utils.save_checkpoint({"state_dict": {}}, str(tmp_path))
    assert str(info.value) == f"error: cannot write {tmp_path}: Is a directory"


# ====================================================================================================
# Speed options: the same function as the default, behind flags


@pytest.mark.parametrize("option", ["split_class_attention"])  # autocast_residual: the bf16 test below
def test_speed_options_keep_official_outputs_and_gradients(official, option):
    x1, x2, keep, expected = official["x1"], official["x2"], official["keep"], official["expected"]
    state = models.convert_official_state_dict(official["checkpoint"]["state_dict"])
    reference, model = (models.ExtreMA(**official["config"], **options) for options in ({}, {option: True}))
    for m in (reference, model):
        m.load_state_dict(state)
    with torch.no_grad():  # float32, no autocast: the official outputs
        for name, value in (("inst_masked", model.encoder(x1, keep)[1]), ("target", model.target(x2)),
                            ("inst_full_prenorm", model.encoder.forward_features(x1)[1])):
            assert (value - expected[name]).abs().max().item() < 1e-5, name
    loss, ref_loss = model(x1, x2, keep=keep), reference(x1, x2, keep=keep)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_autocast_residual_keeps_the_stream_in_bf16():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"], proj_dim=8, proj_hidden_dim=16,
              mask_ratio=0.75, num_masks=2)
    reference, model = models.ExtreMA(**kw), models.ExtreMA(**kw, autocast_residual=True)
    model.load_state_dict(reference.state_dict())
    x1, x2 = torch.randn(2, 3, 3, 32, 32).unbind()
    keep = model.sample_keep(3)
    with torch.no_grad():  # no effect outside autocast
        assert all(map(torch.equal, model.encoder(x1, keep), reference.encoder(x1, keep)))
    losses, dtypes, features = [], [], []
    for m in (reference, model):
        hook = m.encoder.blocks[0].register_forward_hook(lambda mod, inputs, out: dtypes.append(out.dtype))
        with torch.autocast("cpu", torch.bfloat16):
            losses.append(m(x1, x2, keep=keep))
            features.append([t.float() for t in m.encoder.forward_features(x1, keep)])  # tokens, instance
        hook.remove()
        losses[-1].backward()
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2  # the residual stream, default and option
    error = lambda a, b: ((a - b).norm() / b.norm()).item()  # bf16 rounding alone: below 1% here
    assert error(losses[1], losses[0]) < 0.01
    assert all(error(ours, theirs) < 0.02 for ours, theirs in zip(*features[::-1]))
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:  # up to 2.3% here
            assert error(p.grad, grads[name].grad) < 0.05, name


def test_graphed_updates_step_like_the_optimizer():
    """--cuda-graphs' updates (tensor lr and momentum, gradients zeroed in place) run eagerly off CUDA: three
    steps with changing lr and momentum land on the same weights as the plain optimizer and momentum update.
    lr and 1 - momentum are powers of two, exact in the float32 tensors: class attention's k bias has a gradient
    of rounding noise only, which Adam turns into steps of +-lr, so a 1-ulp difference would show."""
    args = pretrain.get_args(TINY + ["--drop-path", "0"])
    torch.manual_seed(0)
    plain = pretrain.build_model(args)
    graphed = pretrain.build_model(args)
    graphed.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    optimizers = [utils.adamw(models.param_groups(m, 0.1), lr=0.0, betas=(0.9, 0.95), device=cpu)
                  for m in (plain, graphed)]
    updates = pretrain.GraphedUpdates(graphed, optimizers[1])
    scaler = utils.grad_scaler(cpu, "none")
    for i in range(3):
        micro_batches = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)]  # uncoloured: the same views
        keeps = [plain.sample_keep(4)]
        for model, step_with in ((plain, optimizers[0]), (graphed, updates)):
            pretrain.train_step(model, step_with, scaler, micro_batches, 2.0 ** (i - 10), 1 - 2.0 ** (-3 - i), "none",
                                False, keeps)
    assert [g["lr"].item() for g in optimizers[1].param_groups] == [2.0 ** -8] * 2
    assert all(p.grad is not None and not p.grad.any() for p in graphed.online_params())  # zeroed, kept
    graphed_state = graphed.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(graphed_state[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_speed_flags_reach_the_model_and_compile(capsys, monkeypatch):
    args = pretrain.get_args(TINY + ["--autocast-residual", "--split-class-attention"])
    learner = pretrain.build_model(args)
    for encoder in (learner.encoder, learner.momentum_encoder):
        assert encoder.autocast_residual and all(blk.split for blk in encoder.ca_blocks)
    assert not any(blk.split for blk in pretrain.build_model(pretrain.get_args(TINY)).encoder.ca_blocks)
    assert pretrain.get_args(TINY + ["--compile"]).compile == "default"
    assert pretrain.get_args(TINY).compile is None
    with pytest.raises(SystemExit) as info:
        pretrain.get_args(TINY + ["--compile", "fastest"])
    assert info.value.code == 2 and "--compile: invalid choice: 'fastest'" in capsys.readouterr().err

    modes = []
    monkeypatch.setattr(pretrain, "compile_model", lambda learner, mode: modes.append(mode))
    out = run_bench(capsys, BENCH_TINY + ["--batch-size", "4", "--compile", "max-autotune", "--autocast-residual",
                                          "--split-class-attention"])
    assert modes == ["max-autotune"]
    assert out["compile"] == "max-autotune" and out["options"] == ["autocast_residual", "split_class_attention"]


def test_cuda_graphs_refused_off_cuda(tmp_path):
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        pretrain.main(TINY + ["--epochs", "1", "--cuda-graphs", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        bench.main(BENCH_TINY + ["--cuda-graphs"])


# ====================================================================================================
# Memory: gradient checkpointing (issue 29)


def forward_calls(module):
    """A list that grows by one at each forward call of module (a checkpoint's recomputation included: a pre-hook,
    since the recomputation stops once it has what the backward needs)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def assert_same_gradients(model, reference):
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_grad_checkpointing_keeps_the_pretraining_loss_and_gradients():
    """--grad-checkpointing runs each online block twice (forward, and again in the backward) and changes nothing
    else: the same loss and gradients with drop path 0.5 (the checkpoint replays the RNG state, so the recomputed
    block drops the same samples), the RNG left where the default leaves it, and the momentum encoder (no_grad),
    evaluation and no_grad forwards run once."""
    x1, x2 = torch.randn(2, 4, 3, 32, 32).unbind()
    runs = []
    for flags in ([], ["--grad-checkpointing"]):
        torch.manual_seed(0)
        model = pretrain.build_model(pretrain.get_args(TINY + ["--drop-path", "0.5", *flags]))
        online, target = forward_calls(model.encoder.blocks[-1]), forward_calls(model.momentum_encoder.blocks[-1])
        torch.manual_seed(1)
        loss = model(x1, x2)
        loss.backward()
        runs.append(dict(model=model, loss=loss, next_draw=torch.rand(8), online=len(online), target=len(target)))
        with torch.no_grad():
            model.encoder(x1)
        model.eval().encoder.forward_features(x1)[1].sum().backward()
        assert len(online) == runs[-1]["online"] + 2
    plain, checkpointed = runs
    learner = checkpointed["model"]
    assert learner.encoder.grad_checkpointing and not learner.momentum_encoder.grad_checkpointing
    assert (plain["online"], plain["target"]) == (1, 1) and (checkpointed["online"], checkpointed["target"]) == (2, 1)
    torch.testing.assert_close(checkpointed["loss"], plain["loss"], atol=1e-6, rtol=1e-6)
    assert torch.equal(checkpointed["next_draw"], plain["next_draw"])
    assert_same_gradients(checkpointed["model"], plain["model"])


def test_grad_checkpointing_keeps_the_dense_gradients():
    """The dense stages' path (FeatureMaps reading four blocks' tokens through intermediate_tokens, relative
    position bias, drop path 0.5): the same maps and gradients with the flag; detection's encoder gets it too."""
    x = torch.randn(2, 3, 32, 32)
    runs = []
    for flags in ([], ["--grad-checkpointing"]):
        args = transfer_seg.get_args(SEG_TINY + ["--drop-path", "0.5", "--feature-blocks", "1", "1", "2", "2", *flags])
        transfer_seg.check_args(args)
        torch.manual_seed(0)
        model = transfer_seg.build_model(args, log=lambda *a: None).train()
        calls = forward_calls(model.backbone.encoder.blocks[0])
        torch.manual_seed(1)
        logits, aux = model(x)
        (logits.square().mean() + aux.square().mean()).backward()
        runs.append((model, logits, len(calls)))
    (plain, plain_logits, plain_calls), (checkpointed, logits, calls) = runs
    assert (plain_calls, calls) == (1, 2)
    torch.testing.assert_close(logits, plain_logits, atol=1e-6, rtol=1e-5)
    assert_same_gradients(checkpointed, plain)
    detector = transfer_det.build_detector(transfer_det.get_args(DET_FLAGS + ["--grad-checkpointing"]), 3,
                                           log=lambda *a: None)
    assert detector.backbone.maps.encoder.grad_checkpointing


def test_grad_checkpointing_end_to_end_and_free_on_resume(tmp_path, monkeypatch, capsys):
    """Pretraining and fine-tuning runs with the flag log what the default runs log (drop path and augmentations
    on), and a resume may switch it off without a word (it does not change the model)."""
    checkpoint = models.checkpoint
    checkpoints = []
    monkeypatch.setattr(models, "checkpoint", lambda *a, **k: checkpoints.append(1) or checkpoint(*a, **k))
    timing = ("time_s", "images_per_s")
    # a large lr, so that a gradient computed differently shows in the weights
    for stage, command in ((pretrain, TINY + ["--epochs", "1", "--warmup-epochs", "0", "--blr", "0.1"]),
                           (finetune, eval_args(tmp_path / "finetune", "--blr", "0.5"))):
        logs, weights = [], []
        for flags in ([], ["--grad-checkpointing"]):
            out = tmp_path / f"{stage.__name__}{len(flags)}"
            checkpoints.clear()
            stage.main(command + ["--output-dir", str(out), *flags])
            assert bool(checkpoints) == bool(flags)
            logs.append([{k: v for k, v in r.items() if k not in timing} for r in read_log(out)])
            weights.append(torch.load(out / "checkpoint-last.pth", weights_only=False)["model"])
        assert logs[0] == logs[1], stage.__name__
        torch.testing.assert_close(weights[1], weights[0])  # float32 tolerance
    capsys.readouterr()
    pretrain.main(TINY + ["--epochs", "2", "--warmup-epochs", "0", "--blr", "0.1",
                          "--output-dir", str(tmp_path / "pretrain1")])  # the flag off now
    assert "with changed flags: --epochs 1 -> 2\n" in capsys.readouterr().out  # and nothing about the flag
    assert [r["epoch"] for r in read_log(tmp_path / "pretrain1")] == [0, 1]


def test_bench_grad_checkpointing_counts_model_flops(capsys, monkeypatch):
    """bench.py --grad-checkpointing times checkpointed steps, but counts the model's FLOPs (MFU's), without the
    recomputation."""
    checkpoint = models.checkpoint
    checkpoints = []
    monkeypatch.setattr(models, "checkpoint", lambda *a, **k: checkpoints.append(1) or checkpoint(*a, **k))
    out = run_bench(capsys, BENCH_TINY + ["--batch-size", "4", "--grad-checkpointing"])
    assert out["options"] == ["grad_checkpointing"] and checkpoints
    assert out["flops_per_image"] == bench_hand_flops_per_image() and out["peak_mem_mb"] > 0


# ====================================================================================================
# kNN evaluation, the pretraining monitor and the collapse statistic (issue 15)


def test_knn_counts_by_hand():
    """Four training vectors whose neighbours and exp(sim / T) votes can be counted by hand."""
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 2])
    queries, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    # query 0: similarities 1, 0.8, 0, -1. k=1: class 0. k=3 at T=1: class 0 has e^1 = 2.72, class 1 has
    # e^0.8 + e^0 = 3.23, so class 1 wins (top-1 miss, top-5 hit); at T=0.07 class 0 has e^14.3 and wins.
    # query 1: similarities 0, 0.6, 1, 0: class 1 for every k (k=3 ties a with d: class 1 still leads)
    hits = linprobe.knn_counts(train, train_labels, queries, labels, num_classes=3, ks=(1, 3), temperature=1.0)
    assert hits.tolist() == [[2, 2], [1, 2]]
    hits = linprobe.knn_counts(train, train_labels, queries, labels, num_classes=3, ks=(1, 3), temperature=0.07,
                            chunk=1)
    assert hits.tolist() == [[2, 2], [2, 2]]
    with pytest.raises(ValueError, match="k = 5 nearest neighbours .* only 4 images"):
        linprobe.knn_counts(train, train_labels, queries, labels, num_classes=3, ks=(1, 5))


def test_linprobe_knn(tmp_path, pretrained):
    args = eval_args(tmp_path, "--arch", "vit_tiny", "--pretrained", str(pretrained), "--synthetic-size", "30",
                     "--knn", "--knn-k", "1", "20")
    linprobe.main(args)
    record = read_log(tmp_path)[-1]
    assert record["knn"] and record["branch"] == "momentum"
    for k in (1, 20):
        assert 0 <= record[f"k{k}_acc1"] <= record[f"k{k}_acc5"] <= 100
        assert round(record[f"k{k}_acc1"] * 7 / 100, 6).is_integer()  # hits out of 30 // 4 = 7 images
    assert not os.path.exists(tmp_path / "checkpoint-last.pth")  # nothing is trained
    (tmp_path / "checkpoint-last.pth").write_bytes(b"a probe's checkpoint")  # --knn still reads --pretrained
    linprobe.main(args)
    assert read_log(tmp_path)[-1] == record
    with pytest.raises(SystemExit, match="--knn-k 31 is more than the 30 training images"):
        linprobe.main(args + ["--knn-k", "31"])


def test_linprobe_knn_torchrun_equals_one_process(tmp_path, pretrained):
    """Two processes (gloo) give the one-process result: training features gathered, each of the 7
    validation images (4 on one rank, 3 on the other) counted once."""
    args = eval_args(tmp_path, "--arch", "vit_tiny", "--pretrained", str(pretrained), "--synthetic-size", "30",
                     "--knn", "--knn-k", "1", "5", "29")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "linprobe.py", *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    linprobe.main(args)
    distributed, single = read_log(tmp_path)
    assert distributed == single


def test_target_std():
    torch.manual_seed(0)
    assert models.target_std(torch.randn(4096, 64)).item() == pytest.approx(1.0, abs=0.02)  # spread: about 1
    assert models.target_std(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32)).item() < 1e-3  # collapsed: 0


def test_cap_per_class_reads_labels_only(monkeypatch):
    """cap_per_class keeps the first items of each class of a synthetic set or a Subset of one, without
    generating a single image."""
    monkeypatch.setattr(data.SyntheticImages, "__getitem__", lambda self, i: pytest.fail("an image was generated"))
    train, val, _ = data.classification_datasets("synthetic", 16, None, None, num_classes=3, synthetic_size=12)
    assert data.cap_per_class(train, 2).indices == [0, 1, 2, 3, 4, 5]
    assert data.cap_per_class(val, 1).indices == [0, 1, 2]  # val holds items 12, 13, 14: classes 0, 1, 2


def test_monitor_logs_knn_and_target_std(tmp_path, capsys):
    pretrain.main(TINY + ["--epochs", "3", "--output-dir", str(tmp_path), "--monitor", "synthetic",
                          "--monitor-per-class", "3", "--monitor-every", "2"])
    records = read_log(tmp_path)
    assert ["knn_acc1" in r for r in records] == [False, True, True]  # every 2 epochs, and the last
    for r in records:
        assert 0.1 < r["target_std"] < 1.5
    for r in records[1:]:
        assert round(r["knn_acc1"] * 30 / 100, 6).is_integer()  # hits out of 3 x 10 validation images
        assert round(r["knn_acc1_init"] * 30 / 100, 6).is_integer()
        assert r["knn_acc1_init"] == records[1]["knn_acc1_init"]  # one baseline, measured before the first step
    out = capsys.readouterr().out
    assert "20-NN acc1" in out and f"20-NN acc1 {records[1]['knn_acc1_init']:.2f} at initialisation" in out
    pretrain.main(TINY + ["--epochs", "4", "--output-dir", str(tmp_path), "--monitor", "synthetic",
                          "--monitor-per-class", "3", "--monitor-every", "2"])  # resumed: the baseline is kept
    resumed = read_log(tmp_path)
    assert len(resumed) == 4 and resumed[3]["knn_acc1_init"] == records[1]["knn_acc1_init"]
    with pytest.raises(SystemExit, match="fewer than the k = 20 neighbours"):
        pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path / "few"), "--monitor", "synthetic",
                              "--monitor-per-class", "1"])


def test_collapsed_target_is_reported(tmp_path, capsys, monkeypatch):
    """A target whose projections are constant gives target_std near 0 and the one-line warning."""
    build = pretrain.build_model

    def collapsed(args):
        model = build(args)
        last = model.momentum_projector[-1]
        with torch.no_grad():
            last.weight.zero_(), last.bias.fill_(1.0)
        return model

    monkeypatch.setattr(pretrain, "build_model", collapsed)
    pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path)])
    assert read_log(tmp_path)[0]["target_std"] < 0.01
    assert "warning: target_std 0.0" in capsys.readouterr().out


# ====================================================================================================
# Export to timm's ViT layout; attention maps and token PCA


def fixture_encoder(fixture, branch):
    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).eval()
    models.load_encoder(encoder, fixture["checkpoint"], branch)
    return encoder


def timm_model(export):
    """The README's lines: timm.create_model with the exported arguments, then a strict load."""
    import timm  # a test requirement (requirements.txt)
    model = timm.create_model("vit_base_patch16_224", **export["timm_kwargs"]).eval()
    model.load_state_dict(export["state_dict"])
    return model


@pytest.mark.parametrize("branch", ["momentum", "online"])
def test_timm_export_of_pretrained_encoder(official_file, tmp_path, branch):
    """visualize.py --export-timm: timm's forward_features are our patch tokens before pooling (to 1e-5), the
    class-attention side is named as left out, and the way back into our encoder is exact."""
    fixture, path = official_file
    out = tmp_path / "timm.pth"
    visualize.main(["--pretrained", path, "--branch", branch, "--arch", "vit_fixture", "--export-timm", str(out)])
    export = torch.load(out)
    prefix = "momentum_" if branch == "momentum" else ""
    assert export["left_out"] == sorted([f"{prefix}encoder.ca_blocks.0", f"{prefix}encoder.ca_blocks.1",
                                         f"{prefix}encoder.cls_token", f"{prefix}encoder.norm", f"{prefix}projector"]
                                        + ([] if prefix else ["predictor"]))
    assert export["timm_kwargs"]["num_classes"] == 0 and export["state_dict"]["pos_embed"].shape == (1, 16, 64)
    encoder, model = fixture_encoder(fixture, branch), timm_model(export)
    with torch.no_grad():
        ours = encoder.forward_features(fixture["x1"])[0]
        theirs = model.forward_features(fixture["x1"])  # (B, N, D)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, fixture["expected"][f"{prefix}tokens_full_prenorm"], atol=1e-5, rtol=1e-5)

    back = models.from_timm_state_dict(export["state_dict"])
    again = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).eval()
    result = again.load_state_dict({k.removeprefix("encoder."): v for k, v in back.items()
                                    if k.startswith("encoder.")}, strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"cls_token", "ca_blocks", "norm"}
    trunk = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("cls_token", "ca_blocks", "norm"))}
    for key, value in trunk.items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(again.forward_features(fixture["x1"])[0], ours)


def test_timm_export_of_finetuned_model(official, tmp_path):
    """A finetune.py checkpoint: same tokens and logits in timm (to 1e-5), nothing left out, an exact round trip."""
    torch.manual_seed(0)
    model = finetune.MeanPoolClassifier(fixture_encoder(official, "online"), 5).eval()
    with torch.no_grad():
        for p in [*model.fc_norm.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    checkpoint = dict(model=model.state_dict(), epoch=0)
    state_dict, left_out = models.timm_state_dict(checkpoint, branch="momentum")  # one encoder: branch n/a
    assert left_out == []
    export = dict(state_dict=state_dict, timm_kwargs=models.timm_vit_kwargs(state_dict, "vit_fixture"))
    theirs = timm_model(export)
    x = official["x1"]
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), model.encoder.intermediate_tokens(x, [2])[-1],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
    back = models.from_timm_state_dict(state_dict)
    assert back.keys() == checkpoint["model"].keys()
    for key, value in checkpoint["model"].items():
        assert torch.equal(back[key], value), key
    assert all(torch.equal(v, state_dict[k]) for k, v in models.timm_state_dict({"model": back})[0].items())


def test_timm_export_refusals(official_file, tmp_path):
    fixture, path = official_file
    with pytest.raises(SystemExit, match=r"error: .*extrema_tiny\.pth: arch vit_fixture in the checkpoint, "
                                         r"vit_tiny given$") as info:
        visualize.main(["--pretrained", path, "--arch", "vit_tiny", "--export-timm", str(tmp_path / "x.pth")])
    assert "\n" not in str(info.value) and not os.path.exists(tmp_path / "x.pth")
    with pytest.raises(SystemExit, match="--export-timm needs --pretrained"):
        visualize.main(["--export-timm", str(tmp_path / "x.pth")])
    sd = models.model_state_dict(fixture["checkpoint"])
    sd["momentum_encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(49, 4)
    with pytest.raises(ValueError, match="no place for blocks.0.attn.relative_position_bias_table"):
        models.timm_state_dict(sd)
    timm_sd, _ = models.timm_state_dict(fixture["checkpoint"])
    with pytest.raises(ValueError, match="timm key cls_token has no place"):
        models.from_timm_state_dict({**timm_sd, "cls_token": torch.zeros(1, 1, 64)})


def test_class_attention_weights(official):
    """The explicit weights are the ones the SDPA forward applies; rows sum to 1, and over the patches once the
    cls token's own share is dropped."""
    encoder = fixture_encoder(official, "momentum")
    x = official["x1"]
    with torch.no_grad():
        tokens, attention = models.last_class_attention(encoder, x)  # (B, N, D), (B, H, 1+N)
        torch.testing.assert_close(tokens, encoder(x)[0])
        assert attention.shape == (4, 4, 17) and (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(4, 4))

        cls = encoder.cls_token.expand(4, -1, -1)
        cls = encoder.ca_blocks[0](cls, encoder.forward_features(x)[0])
        last = encoder.ca_blocks[-1]
        u = last.norm1(torch.cat([cls, encoder.forward_features(x)[0]], dim=1))
        v = rearrange(last.attn.kv(u), "b n (two h d) -> two b h n d", two=2, h=4)[1]
        by_hand = last.attn.proj(rearrange(attention[:, :, None] @ v, "b h 1 d -> b 1 (h d)"))
        torch.testing.assert_close(by_hand, last.attn(u), atol=1e-6, rtol=1e-5)

    maps = visualize.patch_attention(attention, encoder.grid_size)  # (B, 1+H, h, w): mean, then each head
    assert maps.shape == (4, 5, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(4, 5))
    pca = visualize.token_pca(tokens[0], encoder.grid_size)
    assert pca.shape == (3, 4, 4) and pca.min() == 0 and pca.max() == 1


def test_visualize_pictures(official_file, tmp_path):
    """One PNG per image: image, PCA, mean attention and 4 heads side by side at the image size; any size
    divisible by the patch."""
    _, path = official_file
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    common = ["--pretrained", path, "--arch", "vit_fixture", "--patch-size", "8", "--device", "cpu"]
    visualize.main(common + ["--img-size", "32", "--data", "synthetic", "--output-dir", str(tmp_path / "a")])
    visualize.main(common + ["--img-size", "48", str(tmp_path / "cat.png"), "--output-dir", str(tmp_path / "b")])
    for name, size in [("a/synthetic_0", 32), ("a/synthetic_1", 32), ("b/cat", 48)]:
        with Image.open(tmp_path / f"{name}_attention.png") as picture:
            assert picture.mode == "RGB" and picture.size == (7 * (size + 2) + 2, size + 4), name  # (W, H)
            assert np.asarray(picture).std() > 0
    with pytest.raises(SystemExit, match=r"arch vit_fixture in the checkpoint, vit_tiny given$") as info:
        visualize.main(common + ["--arch", "vit_tiny", "--data", "synthetic", "--output-dir", str(tmp_path)])
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit, match="give image files or --data synthetic"):
        visualize.main(common + ["--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--synthetic-size must be at least 1, got 0"):
        visualize.main(common + ["--data", "synthetic", "--synthetic-size", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="image .*missing.png does not exist"):
        visualize.main(common + [str(tmp_path / "missing.png"), "--output-dir", str(tmp_path)])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(utils.DataError, match="cannot read image .*broken.png"):  # run_main: one line
        visualize.main(common + [str(tmp_path / "broken.png"), "--output-dir", str(tmp_path)])


def test_predictor_lr_scale(tmp_path):
    """The predictor's groups step at lr x scale; the scale shapes the optimizer state, so resume refuses a new one."""
    pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path), "--predictor-lr-scale", "10"])
    groups = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 1.0, 10.0, 10.0]
    lrs = {g["lr_scale"]: g["lr"] for g in groups}  # the last step's lr of each kind of group
    assert lrs[1.0] > 0 and lrs[10.0] == pytest.approx(10 * lrs[1.0])
    with pytest.raises(SystemExit, match="predictor-lr-scale 10"):
        pretrain.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path), "--predictor-lr-scale", "5"])


# ====================================================================================================
# Documentation

DOC_PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                                   if name.endswith(".md"))
OFFICIAL_NAME = "extrema_mask08x5_color_1k_300ep.pth"  # the checkpoint the examples name


def doc_text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def test_documentation_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of README.md and docs/*.md runs as written, at tiny sizes: "vit_base" becomes the
    fixture's widths, and the official checkpoint is a stand-in of those widths, in torch.hub's cache (as if
    downloaded) and in the working folder, beside the timm export that the README's command writes."""
    blocks = [(page, code) for page in DOC_PAGES
              for code in re.findall(r"^```python\n(.*?)^```", doc_text(page), re.S | re.M)]
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    standin = {"model": models.ExtreMA(**models.ARCHS["vit_fixture"]).state_dict()}
    urls = set(re.findall(rf"https://\S+/{OFFICIAL_NAME}", "".join(map(doc_text, DOC_PAGES))))
    for path in [tmp_path / OFFICIAL_NAME] + [models.cached_file(url) for url in urls]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(standin, path)
    visualize.main(["--pretrained", OFFICIAL_NAME, "--arch", "vit_fixture", "--branch", "online",
                    "--export-timm", "output/vit_base_timm.pth"])
    for page, code in blocks:
        namespace = {"__name__": "__example__"}
        exec(compile(code.replace('"vit_base"', '"vit_fixture"'), f"<{page} example>", "exec"), namespace)
        assert all(torch.isfinite(v).all() for v in namespace.values() if isinstance(v, torch.Tensor)), page


def test_documentation_links_and_length():
    """The README stays at most 300 lines, and every relative link of README.md and docs/*.md names a file."""
    assert doc_text("README.md").count("\n") <= 300
    for page in DOC_PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc_text(page)):
            if not re.match(r"[a-z]+://", target):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)), (page, target)


# Watching a run: TensorBoard and W&B curves, the gradient norm, --clip-grad, visualize --curves (issue 27)


def event_scalars(folder):
    """{tag: [(step, value), ...]} of the TensorBoard event files in folder, read by TensorBoard's own reader
    (which hides what a restarted writer purged)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_pretrain_tags_and_steps_continue_after_resume(tmp_path, monkeypatch):
    """Killed mid-epoch one step after its last checkpoint, then resumed: every tag has one point per print step
    or epoch, numbered by optimizer steps across the restart (what the killed run wrote past the checkpoint is
    hidden); the logged gradient norm is the one clip_grad_norm_ returned (before clipping to --clip-grad)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    command = TINY + ["--arch", "vit_fixture", "--synthetic-size", "48", "--epochs", "2", "--print-freq", "2",
                      "--output-dir", str(out), "--report-to", "tensorboard", "--clip-grad", "1e-3",
                      "--monitor", "synthetic", "--monitor-per-class", "3", "--save-interval", "1e-9"]
    clip, norms = torch.nn.utils.clip_grad_norm_, []

    def recorded_clip(params, max_norm, *a, **k):
        norms.append((max_norm, clip(params, max_norm, *a, **k)))
        return norms[-1][1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    save = utils.save_checkpoint

    def die_before_saving(state, path):  # the checkpoint after 4 steps is on disk, step 5 was logged
        if (state["epoch"], state["step"]) == (0, 2):
            raise KeyboardInterrupt
        save(state, path)

    monkeypatch.setattr(utils, "save_checkpoint", die_before_saving)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(command)
    assert [step for step, _ in event_scalars(out / "tensorboard")["train/loss"]] == [2, 3, 5]
    monkeypatch.setattr(utils, "save_checkpoint", save)
    pretrain.main(command)  # resumes after step 4 (3 steps per epoch)
    scalars, records = event_scalars(out / "tensorboard"), read_log(out)
    assert set(scalars) == {"train/loss", "train/lr", "train/momentum", "train/grad_norm", "train/target_std",
                            "train/images_per_s", "epoch/loss", "epoch/target_std", "epoch/grad_norm",
                            "monitor/knn_acc1"}  # no train/loss_scale without fp16
    for tag in ("train/loss", "train/lr", "train/momentum", "train/grad_norm", "train/target_std"):
        assert [step for step, _ in scalars[tag]] == [2, 3, 5, 6], tag
    assert scalars["epoch/loss"] == [(3, pytest.approx(records[0]["train_loss"])),
                                     (6, pytest.approx(records[1]["train_loss"]))]
    assert [v for _, v in scalars["epoch/grad_norm"]] == pytest.approx([r["grad_norm"] for r in records])
    assert scalars["monitor/knn_acc1"] == [(0, pytest.approx(records[0]["knn_acc1_init"])),
                                           (3, pytest.approx(records[0]["knn_acc1"])),
                                           (6, pytest.approx(records[1]["knn_acc1"]))]
    assert all(max_norm == 1e-3 for max_norm, _ in norms) and len(norms) == 5 + 2  # steps 1-5, then 5-6 again
    before = [norm.item() for _, norm in norms[:4] + norms[5:]]  # the norms of steps 1-4, 5, 6 as finally run
    assert [v for _, v in scalars["train/grad_norm"]] == pytest.approx([before[i] for i in (1, 2, 4, 5)])
    assert min(before) > 1e-2  # far above the clip: the logged norm is the one before clipping
    assert records[1]["grad_norm"] == pytest.approx(sum(before[3:]) / 3)
    fp16 = tmp_path / "fp16"
    pretrain.main(TINY + ["--arch", "vit_fixture", "--synthetic-size", "16", "--epochs", "1", "--amp", "fp16",
                          "--output-dir", str(fp16), "--report-to", "tensorboard"])
    assert [step for step, _ in event_scalars(fp16 / "tensorboard")["train/loss_scale"]] == [1]


@pytest.mark.parametrize("stage", ["finetune", "det"])
def test_tensorboard_training_and_evaluation_tags_of_the_stages(tmp_path, det_small_heads, stage):
    """Fine-tuning (linear probing shares its loop) and detection write their loss, lr and gradient norm at print
    steps and their metrics at each evaluation, against the optimizer step; fine-tuning takes --clip-grad."""
    pytest.importorskip("tensorboard")
    extra = ["--report-to", "tensorboard"] + (["--clip-grad", "1.0"] if stage == "finetune" else [])
    stage_runs(tmp_path, det_small_heads)[stage](tmp_path, *extra)
    scalars, records = event_scalars(tmp_path / "tensorboard"), read_log(tmp_path)
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [step for step, _ in scalars[tag]] == ([2, 4] if stage == "finetune" else [1, 2, 3, 4]), tag
    metric = "eval/acc1" if stage == "finetune" else "eval/segm_AP"
    assert scalars[metric] == [(2, pytest.approx(records[0][metric[5:]])), (4, pytest.approx(records[1][metric[5:]]))]
    assert [step for step, _ in scalars["epoch/loss"]] == [2, 4]
    if stage == "finetune":
        assert {"eval/acc5", "eval/loss"} <= set(scalars) and all(r["grad_norm"] > 0 for r in records)


def test_wandb_offline_run_resumes_its_id_and_knn_reports(tmp_path, monkeypatch, pretrained):
    """W&B offline leaves its run folder; the resumed run continues the same run id. Segmentation writes its
    metrics to both writers; linprobe --knn writes its accuracies."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "seg"
    command = SEG_TINY + ["--batch-size", "4", "--eval-every", "2", "--output-dir", str(out),
                          "--report-to", "tensorboard,wandb", "--wandb-name", "tiny-seg"]
    transfer_seg.main(command + ["--iters", "2"])
    run_id = (out / "wandb-run-id").read_text().strip()
    transfer_seg.main(command + ["--iters", "4"])  # resumed
    assert (out / "wandb-run-id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)
    scalars = event_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["eval/mIoU"]] == pytest.approx([r["mIoU"] for r in read_log(out)])
    knn_out = tmp_path / "knn"
    linprobe.main(eval_args(knn_out, "--arch", "vit_tiny", "--pretrained", str(pretrained), "--synthetic-size", "30",
                            "--knn", "--knn-k", "20", "--report-to", "tensorboard"))
    assert event_scalars(knn_out / "tensorboard")["eval/k20_acc1"] == [(0, pytest.approx(read_log(knn_out)[0]["k20_acc1"]))]


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clip_grad_bounds_the_update_and_returns_the_norm_before(tmp_path, amp):
    """A fine-tuning step over two micro-batches: the returned norm is the total norm of the (unscaled, under fp16)
    gradients, computed here by hand; with SGD at lr 1 the update is the gradient clipped to the norm 0.5."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x, y = 10 * torch.randn(6, 2, 2, 2), torch.arange(6) % 4
    loss_fn = lambda a, b: F.cross_entropy(model(a).float(), F.one_hot(b, 4).float())
    loader = data.make_loader(torch.utils.data.TensorDataset(x, y), 3, True, 0, 0, cpu)
    for a, b in data.epoch_batches(loader, 0):  # the step's two micro-batches, in its order
        with utils.autocast(cpu, amp):
            loss = loss_fn(a, b)
        (loss / 2).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    model.zero_grad()
    assert norm > 1
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=amp == "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    args = argparse.Namespace(accum_iter=2, epochs=1, warmup_epochs=0, lr=1.0, min_lr=1.0, amp=amp, print_freq=100,
                              batch_size=6, seed=0, output_dir=str(tmp_path), save_interval=0, report_to="none",
                              mean=(0.0, 0.0), std=(1.0, 1.0), reprob=0.0, smoothing=0.0, clip_grad=0.5)
    run = utils.Run(args, 1, log=lambda *a: None)
    run.resume(model, optimizer, scaler)
    finetune.train_one_epoch(model, loader, optimizer, scaler, None, 4, 0, run, args, cpu)
    returned = torch.tensor(run.end_epoch()["grad_norm"])
    assert returned.item() == pytest.approx(norm, rel=1e-3)
    updates = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert torch.cat([u.flatten() for u in updates]).norm().item() == pytest.approx(0.5, rel=1e-4)
    for update, grad in zip(updates, grads):
        torch.testing.assert_close(update, grad * 0.5 / norm, rtol=1e-3, atol=1e-6)


def test_report_to_without_its_package_and_bad_values_are_one_line(tmp_path, monkeypatch):
    """A missing tensorboard, wandb or matplotlib stops the run in one line naming the package, before anything is
    built or written; so do a --report-to or --clip-grad that no run can use."""
    tiny = TINY + ["--output-dir", str(tmp_path / "out")]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    for target in ("tensorboard", "wandb"):
        assert stage_error("pretrain", tiny + ["--report-to", target]) == \
               f"error: --report-to {target} needs the {target} package: pip install {target}"
    assert stage_error("transfer_seg", SEG_TINY + ["--output-dir", str(tmp_path / "out"), "--report-to",
                                                   "wandb,tensorboard"]) == \
           "error: --report-to wandb needs the wandb package: pip install wandb"
    assert stage_error("pretrain", tiny + ["--report-to", "tensorbord"]) == \
           "error: --report-to takes none, tensorboard, wandb or tensorboard,wandb, got 'tensorbord'"
    assert stage_error("finetune", eval_args(tmp_path / "out", "--clip-grad", "0")) == \
           "error: --clip-grad must be positive, got 0.0"
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "train_loss": 1.0}\n')
    with pytest.raises(SystemExit) as error:
        utils.run_main(lambda: visualize.main(["--curves", str(tmp_path / "log.jsonl")]))
    assert str(error.value) == "error: --curves needs the matplotlib package: pip install matplotlib"


def test_curves_of_two_logs(tmp_path):
    """visualize.py --curves: one 1000 x 700 PNG with a colour per run (matplotlib's first two); a log's folder
    stands for it; missing logs and lines that are not JSON are one-line errors."""
    pytest.importorskip("matplotlib")
    for name, knn in (("run_a", True), ("run_b", False)):
        (tmp_path / name).mkdir()
        records = [{"epoch": e, "train_loss": 2 - e / 10, "target_std": 0.5 + e / 50, "lr": 1e-4 * e,
                    **({"knn_acc1": 20.0 + e, "knn_acc1_init": 15.0} if knn else {})} for e in range(5)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                                    + '{"epoch": 4, "eval_only": true}\n\n')
    output = tmp_path / "pictures" / "curves.png"
    visualize.main(["--curves", str(tmp_path / "run_a" / "log.jsonl"), str(tmp_path / "run_b"),
                    "--output", str(output)])
    with Image.open(output) as picture:
        assert picture.size == (1000, 700)
        pixels = {tuple(p) for p in np.asarray(picture.convert("RGB")).reshape(-1, 3)}
    assert {(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)} <= pixels  # C0 and C1: both runs are drawn
    with pytest.raises(SystemExit, match=r"^error: log .*run_c.* does not exist$"):
        visualize.main(["--curves", str(tmp_path / "run_c")])
    (tmp_path / "run_a" / "log.jsonl").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(SystemExit, match=r"^error: .*log.jsonl line 2 is not JSON$"):
        visualize.main(["--curves", str(tmp_path / "run_a")])


# Data sources: folders at any depth, list files, WebDataset shards; unreadable images; --extract


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """24 synthetic 32x32 PNGs as an unlabelled folder (img<i>.png at depth 0, 1 and 2 in turn) and the same bytes
    as 4 WebDataset shards of 6 (keys img000 .. img023) written with webdataset.ShardWriter."""
    wds = pytest.importorskip("webdataset")
    root = tmp_path_factory.mktemp("sources")
    images = data.SyntheticImages(24, 32, seed=1)
    with wds.ShardWriter(str(root / "shard-%d.tar"), maxcount=6, verbose=0) as sink:
        for i in range(24):
            path = root / "folder" / ("", "a", "a/b")[i % 3] / f"img{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            images[i][0].save(path)
            sink.write({"__key__": f"img{i:03d}", "png": path.read_bytes()})
    return root


def shards(root):
    return f"{root}/shard-{{0..3}}.tar"


def record_batches(monkeypatch):
    """The names of the images of every batch the pretraining loop takes, by epoch ({epoch: [[names], ...]})."""
    seen, start = {}, data.epoch_batches

    def recording(loader, epoch, skip_batches=0):
        for batch in start(loader, epoch, skip_batches):
            seen.setdefault(epoch, []).append(batch.names)
            yield batch

    monkeypatch.setattr(data, "epoch_batches", recording)
    return seen


def test_folder_at_any_depth_and_symlinks(sources, tmp_path, monkeypatch):
    """Every image at any depth is a sample, in sorted path order; a symlinked folder is followed, a loop is not
    (also in the labelled folders of the evaluation stages); pretraining reads them all."""
    names = data.folder_images(str(sources / "folder"))
    assert len(names) == 24 and names == sorted(names)
    assert {"img000.png", "a/img001.png", "a/b/img002.png"} <= set(names)
    tree, other = tmp_path / "tree", tmp_path / "other"
    shutil.copytree(sources / "folder", tree)
    other.mkdir()
    shutil.copy(tree / "img000.png", other / "x.png")
    os.symlink("..", tree / "a" / "loop")  # would repeat the tree without end
    os.symlink(other, tree / "linked")
    assert data.folder_images(str(tree)) == sorted(names + ["linked/x.png"])
    (tmp_path / "labelled").mkdir()
    os.symlink(tree, tmp_path / "labelled" / "class_a")
    assert len(data.image_folder(str(tmp_path / "labelled"), None)) == 25
    seen = record_batches(monkeypatch)
    pretrain.main(TINY + ["--arch", "vit_fixture", "--epochs", "1", "--batch-size", "8",
                          "--data", str(sources / "folder"), "--output-dir", str(tmp_path / "out")])
    assert sorted(sum(seen[0], [])) == names  # 3 steps of 8: each image once
    assert read_log(tmp_path / "out")[0]["samples"] == 24 and read_log(tmp_path / "out")[0]["skipped_images"] == 0


def test_list_file_missing_and_corrupt_images_are_skipped(sources, tmp_path, monkeypatch, capsys):
    """A list file with relative and absolute paths, a missing entry and a corrupt image: both skipped in a batch
    that keeps its size, named in warnings, counted in the epoch's log line; above --max-skipped one line stops."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    folder = str(sources / "folder")
    good = [os.path.relpath(os.path.join(folder, name), tmp_path) for name in data.folder_images(folder)]
    lines = good[:13] + [str(sources / "folder" / "img003.png"), "", "missing.png", "broken.png"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    command = TINY + ["--arch", "vit_fixture", "--epochs", "1", "--data", str(tmp_path / "list.txt"), "--output-dir"]
    seen, shapes, step = record_batches(monkeypatch), [], pretrain.train_step
    monkeypatch.setattr(pretrain, "train_step", lambda model, opt, scaler, micro_batches, *a, **k:
                        shapes.append(micro_batches[0].shape) or step(model, opt, scaler, micro_batches, *a, **k))
    pretrain.main(command + [str(tmp_path / "skip"), "--max-skipped", "0.2"])
    assert shapes == [(16, 3, 32, 32)] and sorted(seen[0][0]) == sorted(line for line in lines if line)
    record = read_log(tmp_path / "skip")[0]
    assert record["samples"] == 16 and record["skipped_images"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and any(f"{tmp_path / 'missing.png'}: " in w for w in warnings)
    assert any(f"cannot read image {tmp_path / 'broken.png'}: " in w for w in warnings)
    message = stage_error("pretrain", command + [str(tmp_path / "stop")])
    assert re.fullmatch(r"error: cannot read image .*: .* \(1 unreadable images in epoch 0: more than --max-skipped "
                        r"0\.01 of the 16 images a process reads per epoch\)", message)
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = TINY + ["--data", str(tmp_path / "empty.txt"), "--output-dir", str(tmp_path / "e")]
    assert stage_error("pretrain", empty) == f"error: list file {tmp_path / 'empty.txt'} names no images"


def test_unreadable_shard_samples_are_skipped(sources, tmp_path, monkeypatch):
    """In shards too: a corrupt image and a sample without one are skipped and counted, the batch keeps its size."""
    import webdataset as wds
    with wds.ShardWriter(str(tmp_path / "bad-%d.tar"), maxcount=8, verbose=0) as sink:
        for i, name in enumerate(data.folder_images(str(sources / "folder"))[:14]):
            sink.write({"__key__": f"img{i:03d}", "png": (sources / "folder" / name).read_bytes()})
        sink.write({"__key__": "corrupt", "jpg": b"not an image"})
        sink.write({"__key__": "text_only", "txt": b"no image here"})
    seen = record_batches(monkeypatch)
    pretrain.main(TINY + ["--arch", "vit_fixture", "--epochs", "1", "--data", f"{tmp_path}/bad-{{0..1}}.tar",
                          "--train-num-samples", "16", "--max-skipped", "0.2", "--output-dir", str(tmp_path / "out")])
    assert {"corrupt", "text_only"} <= set(seen[0][0]) and len(seen[0][0]) == 16
    record = read_log(tmp_path / "out")[0]
    assert (record["samples"], record["skipped_images"]) == (16, 2)


def test_shard_errors_are_one_line(sources, tmp_path, monkeypatch):
    command = TINY + ["--data", shards(sources), "--output-dir", str(tmp_path / "out")]
    assert stage_error("pretrain", command) == ("error: --data over shards needs --train-num-samples N, the images of "
                                                "an epoch (shards have no length)")
    assert stage_error("pretrain", command + ["--train-num-samples", "24", "--num-workers", "5"]) == (
        "error: 4 shards for 1 process(es) x 5 loader worker(s): each needs a shard of its own (write more shards or "
        "lower --num-workers)")
    nothing = f"{tmp_path}/none-{{00..02}}.tar::{tmp_path}/other.tar"
    assert stage_error("pretrain", TINY + ["--data", nothing, "--train-num-samples", "24"]) == (
        f"error: --data {nothing}: 4 of its 4 shards do not exist, e.g. {tmp_path}/none-00.tar")
    monkeypatch.setitem(sys.modules, "webdataset", None)  # not installed
    assert stage_error("pretrain", command + ["--train-num-samples", "24"]) == \
        "error: reading shards needs the webdataset package: pip install webdataset"


def test_shards_mid_epoch_resume_reads_no_sample_twice(sources, tmp_path, monkeypatch, capsys):
    """Over shards, killed after a --save-interval checkpoint mid-epoch and resumed: with --num-workers 0 the log and
    weights of a straight run; with 2 workers the same images in the same order, none read twice in the epoch.
    An epoch larger than the shards starts them again, with a warning."""
    save = utils.save_checkpoint
    for workers, stop in (("0", (0, 2)), ("2", (0, 3))):
        command = TINY + ["--arch", "vit_fixture", "--data", shards(sources), "--train-num-samples", "24",
                          "--batch-size", "4", "--epochs", "2" if workers == "0" else "1", "--num-workers", workers]
        seen = record_batches(monkeypatch)
        pretrain.main(command + ["--output-dir", str(tmp_path / f"straight{workers}")])
        straight = {epoch: sum(names, []) for epoch, names in seen.items()}
        assert all(len(set(names)) == 24 for names in straight.values())  # 6 steps: every image once per epoch

        def save_then_die(state, path):
            save(state, path)
            if (state["epoch"] + 1, state["step"]) == stop:  # a checkpoint's epoch is the last finished one
                raise KeyboardInterrupt

        monkeypatch.setattr(utils, "save_checkpoint", save_then_die)
        resumed = command + ["--output-dir", str(tmp_path / f"resumed{workers}"), "--save-interval", "1e-9"]
        seen.clear()
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(resumed)
        monkeypatch.setattr(utils, "save_checkpoint", save)
        killed = sum(seen.pop(0), [])
        assert len(killed) == 4 * stop[1]  # died before reading the batch of step stop[1]
        if workers == "2":  # the same checkpoint resumed with another --num-workers: taken, with a warning
            other = tmp_path / "other_workers"
            other.mkdir()
            shutil.copy(tmp_path / "resumed2" / "checkpoint-last.pth", other)
            capsys.readouterr()
            pretrain.main(resumed + ["--output-dir", str(other), "--num-workers", "0"])
            assert ("warning: resumed mid-epoch over shards with --num-workers 0, not 2: the shards of the rest of "
                    "epoch 0 are split anew, so it may read images the run has already used in it"
                    ) in capsys.readouterr().out.splitlines()
            assert log_keys(other) == [0]
            seen.clear()
        pretrain.main(resumed)
        assert killed + sum(seen[0], []) == straight[0]
        assert {epoch: sum(names, []) for epoch, names in seen.items() if epoch} == \
               {epoch: names for epoch, names in straight.items() if epoch}
        clock = lambda out: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in read_log(out)]
        if workers == "0":  # in the main process the crops, too, are the same
            assert clock(tmp_path / "resumed0") == clock(tmp_path / "straight0")
            a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=False)["model"]
                    for d in ("straight0", "resumed0"))
            assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    seen = record_batches(monkeypatch)
    pretrain.main(TINY + ["--arch", "vit_fixture", "--data", shards(sources), "--train-num-samples", "32",
                          "--batch-size", "8", "--epochs", "1", "--output-dir", str(tmp_path / "more")])
    names = sum(seen[0], [])
    assert len(names) == 32 and len(set(names)) == 24
    assert "has read all 24 samples of its shards in epoch 0 and starts them again" in capsys.readouterr().err


def extract_args(out, source, *extra):
    return ["--extract", "--data", source, "--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8",
            "--batch-size", "4", "--device", "cpu", "--num-workers", "0", "--output-dir", str(out), *extra]


def read_extract(out):
    with open(os.path.join(out, "names.txt")) as f:
        names = f.read().splitlines()
    return np.load(os.path.join(out, "instance.npy")), np.load(os.path.join(out, "tokens.npy")), names


def test_extract_folder_and_shards(sources, tmp_path, official_file):
    """--extract writes a row per image in the source's order: the probe's instance feature and the mean token after
    the final norm, float32; names are paths for a folder and keys for shards, the same image the same rows."""
    _, checkpoint = official_file
    linprobe.main(extract_args(tmp_path / "folder", str(sources / "folder"), "--pretrained", checkpoint))
    linprobe.main(extract_args(tmp_path / "shards", shards(sources), "--pretrained", checkpoint, "--num-workers", "2"))
    instance, tokens, names = read_extract(tmp_path / "folder")
    assert names == data.folder_images(str(sources / "folder"))
    assert instance.shape == tokens.shape == (24, 64) and instance.dtype == tokens.dtype == np.float32
    assert sorted(os.listdir(tmp_path / "folder")) == ["instance.npy", "names.txt", "tokens.npy"]
    args = linprobe.get_args(extract_args(tmp_path, "x", "--pretrained", checkpoint))
    data.encoder_inputs(args)
    encoder = linprobe.load_encoder(args, 0, lambda *a: None).eval()
    image = data.eval_transform(32, v2.InterpolationMode.BILINEAR)(data.decode_image(
        str(sources / "folder" / names[5])))
    with torch.no_grad():
        patch_tokens, expected = encoder.forward_features(data.normalize(image[None]))
    assert torch.allclose(torch.from_numpy(instance[5]), expected[0], atol=1e-5)
    assert torch.allclose(torch.from_numpy(tokens[5]), encoder.norm(patch_tokens).mean(1)[0], atol=1e-5)
    shard_instance, shard_tokens, keys = read_extract(tmp_path / "shards")
    assert keys == [f"img{i:03d}" for i in range(24)]  # shard 0's samples, then shard 1's, ...
    order = [keys.index(os.path.basename(name)[:-4]) for name in names]
    assert np.allclose(shard_instance[order], instance, atol=1e-5)
    assert np.allclose(shard_tokens[order], tokens, atol=1e-5)


def test_torchrun_shards_equal_steps_and_extract(sources, tmp_path, official_file):
    """Two processes x 2 loader workers over 4 shards: every process takes the same steps, an epoch reads no image
    twice and logs the images read; then --extract over the shards in two processes writes the one-process rows."""
    _, checkpoint = official_file
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import data, pretrain\n"
        "seen, start = {}, data.epoch_batches\n"
        "def recording(loader, epoch, skip_batches=0):\n"
        "    for batch in start(loader, epoch, skip_batches):\n"
        "        seen.setdefault(epoch, []).append(batch.names)\n"
        "        yield batch\n"
        "data.epoch_batches = recording\n"
        "pretrain.main(json.loads(sys.argv[1]))\n"
        "json.dump(seen, open(sys.argv[2] + os.environ['RANK'], 'w'))\n")
    out = tmp_path / "pre"
    pretraining = TINY + ["--arch", "vit_fixture", "--data", shards(sources), "--train-num-samples", "16",
                          "--batch-size", "8", "--num-workers", "2", "--epochs", "2", "--output-dir", str(out)]
    extraction = extract_args(tmp_path / "two", shards(sources), "--pretrained", checkpoint, "--batch-size", "8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = [subprocess.Popen(torchrun + command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # the two runs side by side
            for command in ([str(driver), json.dumps(pretraining), str(tmp_path / "names")],
                            ["linprobe.py", *extraction])]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in results]
    ranks = [json.loads((tmp_path / f"names{r}").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        assert [len(rank[epoch]) for rank in ranks] == [2, 2]  # 16 images / (2 processes x 4) each epoch
        names = sum(ranks[0][epoch] + ranks[1][epoch], [])
        assert len(names) == len(set(names)) == 16
    assert [(r["samples"], r["skipped_images"]) for r in read_log(out)] == [(16, 0), (16, 0)]
    assert "starts them again" not in results[0][1]
    linprobe.main(extract_args(tmp_path / "one", shards(sources), "--pretrained", checkpoint))
    one_instance, one_tokens, one_names = read_extract(tmp_path / "one")
    instance, tokens, names = read_extract(tmp_path / "two")
    assert names == one_names and len(names) == 24
    assert np.allclose(instance, one_instance, atol=1e-6) and np.allclose(tokens, one_tokens, atol=1e-6)


def test_bench_times_the_loader_over_shards(sources, capsys, monkeypatch):
    seen = record_batches(monkeypatch)
    out = run_bench(capsys, BENCH_TINY + ["--batch-size", "4", "--data", shards(sources), "--train-num-samples", "24",
                                          "--data-batches", "2"])
    names = sum(seen[0], [])
    assert len(names) == len(set(names)) == 12 and set(names) <= {f"img{i:03d}" for i in range(24)}  # 3 batches
    cpu_ms = out["loader_cpu_ms_per_image"]
    assert out["loader_images_per_s"] > 0 and cpu_ms > 0
    assert out["loader_images_per_s_per_worker"] == pytest.approx(1000 / cpu_ms, rel=1e-4)
    assert out["workers_needed"] == math.ceil(out["images_per_s"] * cpu_ms / 1000)
    assert out["bottleneck"] == ("loader" if out["loader_images_per_s"] < out["images_per_s"] else "step")


# Inputs other than RGB: grey, 16-bit and multi-channel images with the data's own statistics


FIXTURE_PRETRAIN = ["--data", "synthetic", "--synthetic-size", "16", "--arch", "vit_fixture", "--img-size", "32",
                    "--patch-size", "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
                    "--proj-dim", "32", "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2",
                    "--device", "cpu", "--num-workers", "0"]


def test_grey_input_to_an_adapted_rgb_encoder_matches_replicated_rgb():
    """An RGB checkpoint loaded into a one-channel encoder (patch embedding summed over R, G, B) gives a grey
    image the tokens the RGB encoder gives it replicated three times; four channels get R, G, B, R scaled by 3 / 4
    (timm's rule); only an RGB embedding is adapted."""
    rgb = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).eval()
    checkpoint = {"model": {f"momentum_encoder.{k}": v for k, v in rgb.state_dict().items()}}
    grey = models.VisionTransformer(img_size=32, patch_size=8, in_chans=1, **models.ARCHS["vit_fixture"]).eval()
    note = models.load_encoder(grey, checkpoint)
    assert "adapted to 1 channel(s)" in note and "summed" in note
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        for ours, theirs in zip(grey(x), rgb(x.expand(-1, 3, -1, -1))):  # tokens, instance
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    four = models.VisionTransformer(img_size=32, patch_size=8, in_chans=4, **models.ARCHS["vit_fixture"])
    assert "scaled by 3 / C" in models.load_encoder(four, checkpoint)
    r, g, b = rgb.patch_embed.weight.reshape(64, 3, 64).unbind(1)  # (D, p*p) each
    torch.testing.assert_close(four.patch_embed.weight.reshape(64, 4, 64), torch.stack([r, g, b, r], 1) * 0.75)
    with pytest.raises(ValueError, match="takes 1 channels .* only an RGB one"):
        models.load_encoder(four, {"model": {f"momentum_encoder.{k}": v for k, v in grey.state_dict().items()}})


def test_one_channel_pretraining_carries_channels_and_statistics(tmp_path, monkeypatch):
    """Pretraining on one channel records it with its statistics; the linear probe (also --knn) and fine-tuning
    read both from the checkpoint without flags and normalise with them; a contradicting flag is refused. The
    timm export and the pictures follow the checkpoint too."""
    pretrain.main(FIXTURE_PRETRAIN + ["--in-chans", "1", "--mean", "0.4", "--std", "0.2",
                                      "--output-dir", str(tmp_path / "pre")])
    path = str(tmp_path / "pre" / "checkpoint-last.pth")
    checkpoint = torch.load(path, weights_only=False)
    assert (checkpoint["in_chans"], checkpoint["mean"], checkpoint["std"]) == (1, [0.4], [0.2])
    assert checkpoint["model"]["encoder.patch_embed.weight"].shape == (64, 8 * 8)
    seen, to_device = [], data.to_device
    monkeypatch.setattr(data, "to_device", lambda batch, device, mean, std: seen.append(
        (batch[0].shape[1], mean, std)) or to_device(batch, device, mean, std))
    for name, main, extra in (("probe", linprobe.main, []), ("knn", linprobe.main, ["--knn", "--knn-k", "2"]),
                              ("finetune", finetune.main, [])):
        seen.clear()
        main(eval_args(tmp_path / name, "--pretrained", path, *extra))
        assert seen and all((c, list(m), list(s)) == (1, [0.4], [0.2]) for c, m, s in seen), name
        if name != "knn":
            saved = eval_checkpoint(tmp_path / name)
            assert (saved["args"]["in_chans"], saved["args"]["mean"]) == (1, [0.4]), name
    for flags, message in ((["--in-chans", "3"], "--in-chans 3 contradicts .* holds 1 channel"),
                           (["--mean", "0.5"], "--mean 0.5 contradicts .* records 0.4")):
        with pytest.raises(SystemExit, match=message) as info:
            linprobe.main(eval_args(tmp_path / "refused", "--pretrained", path, *flags))
        assert "\n" not in str(info.value)
    export = tmp_path / "timm.pth"  # the export to timm carries in_chans and the statistics
    visualize.main(["--pretrained", path, "--arch", "vit_fixture", "--export-timm", str(export)])
    export = torch.load(export)
    assert (export["timm_kwargs"]["in_chans"], export["mean"], export["std"]) == (1, [0.4], [0.2])
    encoder = models.VisionTransformer(img_size=32, patch_size=8, in_chans=1, **models.ARCHS["vit_fixture"]).eval()
    models.load_encoder(encoder, checkpoint)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(export).forward_features(x), encoder.forward_features(x)[0],
                                   atol=1e-5, rtol=1e-5)
    visualize.main(["--pretrained", path, "--arch", "vit_fixture", "--patch-size", "8", "--img-size", "32",
                    "--data", "synthetic", "--synthetic-size", "1", "--device", "cpu",
                    "--output-dir", str(tmp_path / "pictures")])
    assert os.path.exists(tmp_path / "pictures" / "synthetic_0_attention.png")
    with pytest.raises(SystemExit, match="--in-chans 2 needs --mean and --std"):
        pretrain.main(FIXTURE_PRETRAIN + ["--in-chans", "2", "--output-dir", str(tmp_path / "no_stats")])
    with pytest.raises(SystemExit, match="need 2 value"):
        pretrain.main(FIXTURE_PRETRAIN + ["--in-chans", "2", "--mean", "0.5", "--std", "0.2", "0.3",
                                          "--output-dir", str(tmp_path / "short")])


def test_input_stats_from_checkpoint_flags_or_defaults(official_file, tmp_path):
    """data.encoder_inputs: an official (RGB) checkpoint means ImageNet's statistics, and --in-chans 1 adapts it
    with the data's own --mean and --std (required); without a checkpoint the flags decide; a checkpoint of ours
    gives its own values and refuses others."""
    _, official_path = official_file
    grey_path = tmp_path / "grey.pth"
    grey = models.VisionTransformer(img_size=32, patch_size=8, in_chans=1, **models.ARCHS["vit_fixture"])
    torch.save({"in_chans": 1, "mean": [0.4], "std": [0.2],  # the encoder's config is read from its weights
                "model": {f"momentum_encoder.{k}": v for k, v in grey.state_dict().items()}}, grey_path)

    def resolve(pretrained, *flags, channels=None):
        parser = argparse.ArgumentParser()
        utils.add_encoder_args(parser, 32, branch="momentum")
        args = parser.parse_args([*flags] + ([] if pretrained is None else ["--pretrained", str(pretrained)]))
        data.encoder_inputs(args, channels)
        return args.in_chans, args.mean, args.std

    imagenet = (3, list(utils.IMAGENET_MEAN), list(utils.IMAGENET_STD))
    assert resolve(None) == resolve(official_path) == imagenet
    assert resolve(None, "--in-chans", "1", "--mean", "0.5", "--std", "0.25") == (1, [0.5], [0.25])
    assert resolve(official_path, "--in-chans", "1", "--mean", "0.5", "--std", "0.25") == (1, [0.5], [0.25])
    assert resolve(grey_path) == (1, [0.4], [0.2]) == resolve(grey_path, "--mean", "0.4")
    for pretrained, flags, message in (
            (official_path, ["--in-chans", "1"], "1 input channel.* need --mean and --std"),
            (None, ["--in-chans", "2"], "2 input channel.* need --mean and --std"),
            (official_path, ["--mean", "0.5", "0.5", "0.5"], "--mean 0.5 0.5 0.5 contradicts .* records 0.485"),
            (grey_path, ["--std", "0.3"], "--std 0.3 contradicts .* records 0.2"),
            (grey_path, ["--in-chans", "4"], "--in-chans 4 contradicts .* holds 1 channel"),
            (None, ["--in-chans", "2", "--mean", "0.5", "--std", "0.2"], "need 2 value"),
            (grey_path, ["--arch", "vit_fixture"], "reads 3-channel images, not 1")):
        with pytest.raises(SystemExit, match=message):
            resolve(pretrained, *flags, channels=(3,) if "--arch" in flags else None)


def write_rows_image(folder, name, rows, channels, kind):
    """A 32 x 32 uint16 image whose value depends only on the row and channel (a crop of scale 1 and a flip keep
    it): a 16-bit grey PNG or an (H, W, C) .npy. Returns the array (H, W, C)."""
    array = np.repeat(rows[:, None, None] + 1000 * np.arange(channels)[None, None, :], 32, axis=1).astype(np.uint16)
    os.makedirs(folder, exist_ok=True)
    if kind == "png":
        Image.fromarray(array[:, :, 0]).save(os.path.join(folder, f"{name}.png"))
    else:
        np.save(os.path.join(folder, f"{name}.npy"), array)
    return array


@pytest.mark.parametrize("source", ["folder", "shards"])
@pytest.mark.parametrize("kind,channels", [("png", 1), ("npy", 4)])
def test_sixteen_bit_inputs_reach_the_model_scaled(tmp_path, monkeypatch, kind, channels, source):
    """16-bit grey PNGs (one channel, never replicated) and (H, W, 4) uint16 arrays, in a folder or in WebDataset
    shards, travel as uint16 and reach the model as (x / 65535 - mean) / std, pixel by pixel."""
    rows = np.linspace(0, 60000, 32).round()
    for i in range(8):
        array = write_rows_image(tmp_path / "data" / "all", f"img{i}", rows, channels, kind)
    where = [str(tmp_path / "data")]
    if source == "shards":
        wds = pytest.importorskip("webdataset")
        with wds.ShardWriter(str(tmp_path / "shard-%d.tar"), maxcount=4, verbose=0) as sink:
            for i in range(8):
                sink.write({"__key__": f"img{i}", kind: (tmp_path / "data" / "all" / f"img{i}.{kind}").read_bytes()})
        where = [f"{tmp_path}/shard-{{0..1}}.tar", "--train-num-samples", "8"]
    mean, std = [0.3 + 0.1 * c for c in range(channels)], [0.2 + 0.05 * c for c in range(channels)]
    argv = FIXTURE_PRETRAIN + ["--data", *where, "--in-chans", str(channels), "--crop-min", "1",
                               "--no-color-aug", "--mean", *map(str, mean), "--std", *map(str, std),
                               "--output-dir", str(tmp_path / "out")]
    loader, _ = data.pretraining_loader(pretrain.get_args(argv), pretrain.crop_transform(32, 1.0), 8,
                                        torch.device("cpu"))
    crop = next(iter(loader)).images[0]
    assert crop.dtype == torch.uint16 and crop.shape == (channels, 32, 32)
    seen, forward = [], models.ExtreMA.forward
    monkeypatch.setattr(models.ExtreMA, "forward", lambda self, x1, x2, **kwargs: seen.append(x1) or
                        forward(self, x1, x2, **kwargs))
    pretrain.main(argv)
    unit = torch.from_numpy(array.astype(np.float64) / 65535).permute(2, 0, 1)  # (C, 32, 32) in [0, 1]
    expected = (unit - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert seen[0].shape == (8, channels, 32, 32)
    torch.testing.assert_close(seen[0], expected.float().expand(8, -1, -1, -1), atol=1e-5, rtol=1e-5)
    pixel = (60000 + 1000 * (channels - 1)) / 65535  # the last channel of the last row
    assert seen[0][0, -1, 31, 5].item() == pytest.approx((pixel - mean[-1]) / std[-1], abs=1e-5)


def test_decode_keeps_channels_and_dtypes(tmp_path):
    """data.decode: grey stays one channel (8 or 16 bits, PNG or TIFF), colour converts to the asked channels,
    arrays keep their dtype; a file that cannot give the asked channels is a DataError."""
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    grey8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    colour = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)

    def encoded(array, fmt):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        return buffer.getvalue()

    for raw, ext in ((encoded(grey16, "PNG"), ".png"), (encoded(grey16, "TIFF"), ".tif")):
        x = data.decode(raw, ext, 1)
        assert x.dtype == torch.uint16 and torch.equal(x[0].int(), torch.from_numpy(grey16.astype(np.int32)))
    x = data.decode(encoded(grey8, "PNG"), ".png", 1)
    assert x.dtype == torch.uint8 and torch.equal(x[0], torch.from_numpy(grey8))
    assert torch.equal(data.decode(encoded(grey8, "PNG"), ".png", 3), torch.from_numpy(grey8).expand(3, -1, -1))
    assert data.decode(encoded(colour, "PNG"), ".png", 1).shape == (1, 5, 7)
    for array in (rng.random((5, 7, 2), dtype=np.float32), colour, grey16.astype(">u2")):
        np.save(tmp_path / "a.npy", array)
        x = data.decode_image(str(tmp_path / "a.npy"), in_chans=1 if array.ndim == 2 else array.shape[2])
        assert x.dtype == {4: torch.float32, 1: torch.uint8, 2: torch.uint16}[array.dtype.itemsize]
        assert torch.equal(x, torch.from_numpy(array.astype(array.dtype.newbyteorder("="))).reshape(5, 7, -1)
                           .permute(2, 0, 1))
    with pytest.raises(utils.DataError, match="a.npy.*expected an array \\(H, W, 3\\)"):
        data.decode_image(str(tmp_path / "a.npy"), in_chans=3)
    with pytest.raises(utils.DataError, match="1 or 3 channels, not 4"):
        data.decode(encoded(grey16, "TIFF"), ".tif", 4)
    assert data.SyntheticImages(2, 8, in_chans=4)[0][0].shape == (4, 8, 8)
    mixed = [(torch.zeros(1, 4, 4, dtype=torch.uint8), "a.png", None), (torch.zeros(1, 4, 4, dtype=torch.uint16),
                                                                       "b.png", None)]
    with pytest.raises(utils.DataError, match="image b.png has torch.uint16 pixels where others of its batch have "
                                              "torch.uint8"):
        data.collate_skipping(mixed)
    with pytest.raises(utils.DataError, match="RandAugment works on 8-bit images, not torch.uint16"):
        finetune.eight_bit_pil(torch.zeros(1, 8, 8, dtype=torch.uint16))
    assert finetune.eight_bit_pil(torch.zeros(1, 8, 8, dtype=torch.uint8)).mode == "L"


def test_norm_stats_auto_equals_numpy(tmp_path):
    """--norm-stats auto: the per-channel mean and std over all pixels of the training images (of different sizes),
    in [0, 1] units, as numpy computes them; printed, recorded in the checkpoint and refused with --mean."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 65536, (32 + 8 * (i % 3), 40, 2), dtype=np.uint16) for i in range(8)]
    for i, array in enumerate(arrays):
        os.makedirs(tmp_path / "data" / "x", exist_ok=True)
        np.save(tmp_path / "data" / "x" / f"{i}.npy", array // np.array([1, 3], dtype=np.uint16))
    pixels = np.concatenate([(a // np.array([1, 3], dtype=np.uint16)).reshape(-1, 2) for a in arrays]) / 65535
    argv = FIXTURE_PRETRAIN + ["--data", str(tmp_path / "data"), "--in-chans", "2", "--norm-stats", "auto",
                               "--output-dir", str(tmp_path / "out")]
    pretrain.main(argv)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=False)
    np.testing.assert_allclose(checkpoint["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(checkpoint["std"], pixels.std(0), rtol=1e-6)
    with pytest.raises(SystemExit, match="--mean and --std, or --norm-stats auto, not both"):
        pretrain.main(argv + ["--mean", "0.5", "0.5"])


@pytest.mark.parametrize("channels", [1, 4])
def test_colouring_of_grey_and_multi_channel_images(channels):
    """One or four channels: each view gets its own brightness and contrast, one affine map y = a x + b per image
    for all channels together (no saturation, hue or grayscale); with all probabilities 0 the colouring is the
    identity (the normalisation alone), for uint8 and uint16 batches."""
    images = (torch.rand(200, channels, 6, 6, generator=torch.Generator().manual_seed(0)) * 70 + 90).to(torch.uint8)
    zeros, ones = (0.0,) * channels, (1.0,) * channels
    for batch in (images, images.to(torch.uint16) * 257):
        torch.testing.assert_close(pretrain.colour(batch, zeros, ones, jitter_p=0, grayscale_p=0),
                                   data.normalize(batch, zeros, ones))
    torch.manual_seed(0)
    x = images.double().flatten(1) / 255  # (B, C*H*W)
    fits = []
    for view in pretrain.two_views(images, True, zeros, ones):
        y = view.double().flatten(1)
        dx, dy = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        a = (dx * dy).sum(1) / dx.square().sum(1)  # least squares, per image
        b = y.mean(1) - a * x.mean(1)
        assert (y - (a[:, None] * x + b[:, None])).abs().max() < 1e-5  # one brightness and contrast for all channels
        fits.append(torch.stack([a, b], 1))
    changed = [(fit - torch.tensor([1.0, 0.0], dtype=torch.float64)).abs().amax(1) > 1e-4 for fit in fits]
    for jittered in changed:
        assert abs(jittered.float().mean() - 0.8) < 0.1
    differ = (fits[0] - fits[1]).abs().amax(1) > 1e-4
    assert differ.float().mean() > 0.85  # at least one view jittered (0.96), each with its own factors
