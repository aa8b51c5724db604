"""Tests of linprobe.py and finetune.py on tiny synthetic data, from a pretrain.py checkpoint and from the
official fixture. Run with `python -m pytest -q test_part_eval.py`."""
import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
import linprobe
import models
import pretrain
import utils

EVAL_ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_FIXTURE = os.path.join(EVAL_ROOT, "..", "shared", "fixtures", "official_extrema_tiny.pt")
EVAL_SCRIPTS = {"linprobe": linprobe, "finetune": finetune}


def eval_args(out, *extra, arch="vit_fixture", img_size=32):
    """A tiny run: 8 training and 2 validation synthetic images of 4 classes, batch 4, one epoch."""
    return ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4", "--arch", arch,
            "--img-size", str(img_size), "--patch-size", "8", "--batch-size", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--print-freq", "2",
            "--output-dir", str(out), *extra]


def eval_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=False)


def eval_check_log(out, epochs):
    records = eval_log(out)
    assert [r["epoch"] for r in records] == list(range(epochs))
    for r in records:
        assert {"epoch", "train_loss", "lr", "acc1", "acc5", "val_loss", "best_acc1"} <= r.keys()
        assert torch.isfinite(torch.tensor(r["train_loss"])) and 0 <= r["acc1"] <= r["acc5"] <= 100
    return records


@pytest.fixture(scope="module", autouse=True)
def eval_one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_official(tmp_path_factory):
    """The official fixture and its checkpoint saved as a file for --pretrained."""
    if not os.path.exists(EVAL_FIXTURE):
        pytest.skip(f"official fixture not found at {EVAL_FIXTURE}")
    fixture = torch.load(EVAL_FIXTURE)
    path = tmp_path_factory.mktemp("official") / "extrema_tiny.pth"
    torch.save(fixture["checkpoint"], path)
    return fixture, str(path)


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
def test_linprobe_official_frozen_and_features(eval_official, tmp_path, branch):
    """Training moves the head only; the probe reads the official class-attention output before the norm."""
    fixture, path = eval_official
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
                               models.resize_pos_embed(pretrained["momentum_encoder.pos_embed"], (4, 4), (6, 6)))

    linprobe.main(eval_args(tmp_path, img_size=48) + ["--eval-only"])
    record = eval_log(tmp_path)[-1]
    assert record["eval_only"] and record["acc1"] == last["acc1"] and record["acc5"] == last["acc5"]


def test_linprobe_lars(eval_official, tmp_path):
    linprobe.main(eval_args(tmp_path, "--pretrained", eval_official[1], "--optimizer", "lars"))
    state = eval_checkpoint(tmp_path)["model"]
    assert torch.isfinite(state["head.1.weight"]).all() and state["head.1.weight"].std() > 0.005


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


@pytest.mark.parametrize("branch", ["online", "momentum"])
def test_finetune_official_pooling(eval_official, branch):
    """The classifier's LayerNorm reads the mean of the official pre-norm patch tokens."""
    fixture, path = eval_official
    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"])
    utils.load_pretrained_encoder(encoder, path, branch, log=lambda *a: None)
    model = finetune.MeanPoolClassifier(encoder, 4).eval()
    assert not any(k.startswith(("encoder.ca_blocks", "encoder.cls_token", "encoder.norm"))
                   for k in model.state_dict())
    pooled = []
    model.fc_norm.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    assert model(fixture["x1"]).shape == (4, 4)
    prefix = "momentum_" if branch == "momentum" else ""
    expected = fixture["expected"][f"{prefix}tokens_full_prenorm"].mean(dim=1)
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-5)


def test_finetune_official_layer_decay(eval_official, tmp_path):
    """The head gets the full lr, the patch embedding the smallest (layer 0), each block 0.65x the next."""
    finetune.main(eval_args(tmp_path, "--pretrained", eval_official[1], "--warmup-epochs", "1"))
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
    assert eval_check_log(tmp_path, 1)[0]["train_images"] == 8
    state = eval_checkpoint(tmp_path)["model"]
    assert state["encoder.pos_embed"].shape == (1, 36, 64)
    pretrained = torch.load(eval_pretrained, weights_only=False)["model"]
    assert not torch.equal(state["encoder.blocks.0.attn.qkv.weight"], pretrained["encoder.blocks.0.attn.qkv.weight"])


def test_finetune_subsets(tmp_path):
    dataset = utils.SyntheticImages(40, 8, num_classes=4)
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
    assert eval_log(tmp_path / "run")[0]["train_images"] == 4
    with pytest.raises(SystemExit, match="not both"):
        finetune.main(eval_args(tmp_path / "both", "--train-subset", str(listed), "--label-fraction", "0.1"))


# ----------------------------------------------------------------------------------------------------
# Both scripts


class EvalInterrupted(Exception):
    pass


@pytest.mark.parametrize("script", ["linprobe", "finetune"])
def test_resume_continues_identically(eval_official, tmp_path, monkeypatch, script):
    """Two epochs in one go == one epoch, a crash after its checkpoint, and the same command again."""
    main = EVAL_SCRIPTS[script].main
    args = lambda out: eval_args(out, "--pretrained", eval_official[1], "--epochs", "2", "--warmup-epochs", "1")
    main(args(tmp_path / "straight"))

    save = utils.save_checkpoint

    def save_then_crash(state, path):
        save(state, path)
        raise EvalInterrupted

    monkeypatch.setattr(utils, "save_checkpoint", save_then_crash)
    with pytest.raises(EvalInterrupted):
        main(args(tmp_path / "resumed"))
    monkeypatch.setattr(utils, "save_checkpoint", save)
    assert len(eval_log(tmp_path / "resumed")) == 1
    main(args(tmp_path / "resumed"))

    assert eval_log(tmp_path / "resumed") == eval_log(tmp_path / "straight")
    straight, resumed = eval_checkpoint(tmp_path / "straight"), eval_checkpoint(tmp_path / "resumed")
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.parametrize("script", ["linprobe", "finetune"])
def test_bad_inputs(eval_official, eval_pretrained, tmp_path, script):
    main = EVAL_SCRIPTS[script].main
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing\.pth does not exist"):
        main(eval_args(tmp_path, "--pretrained", str(tmp_path / "missing.pth")))
    with pytest.raises(SystemExit, match=r"does not fit the model.*blocks\.2\.") as info:
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


@pytest.mark.parametrize("script", ["linprobe"])  # finetune passes too (add it; +20 s on 2 cores)
def test_torchrun_two_processes_exact_evaluation(eval_official, tmp_path, script):
    """Under DDP (2 CPU processes, gloo) a validation set of 3 images is counted exactly: the same top-1,
    top-5 and loss as one process evaluating the saved checkpoint."""
    args = eval_args(tmp_path, "--pretrained", eval_official[1], "--synthetic-size", "12")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", f"{script}.py", *args], cwd=EVAL_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    distributed = eval_log(tmp_path)[-1]
    EVAL_SCRIPTS[script].main(args + ["--eval-only"])
    single = eval_log(tmp_path)[-1]
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
