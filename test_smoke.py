"""Smoke tests: numerics against the official implementation, masking, and every stage end to end on tiny
synthetic data. Run with `pytest test_smoke.py` (a few minutes on a 2-core CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import models
import pretrain
import utils

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "official_extrema_tiny.pt")
# A tiny pretraining run: ViT-Tiny widths on 32x32 images of 16 patches, small heads.
TINY = ["--data", "synthetic", "--synthetic-size", "32", "--arch", "vit_tiny", "--img-size", "32",
        "--patch-size", "8", "--batch-size", "16", "--warmup-epochs", "1", "--proj-dim", "32",
        "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2", "--device", "cpu",
        "--num-workers", "0", "--print-freq", "1"]


def read_log(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def official():
    if not os.path.exists(FIXTURE):
        pytest.skip(f"official fixture not found at {FIXTURE}")
    return torch.load(FIXTURE)


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


def test_pos_embed_any_size(official):
    table = models.sincos_pos_embed(64, 4, 4)
    torch.testing.assert_close(table, official["checkpoint"]["state_dict"]["module.base_encoder.pos_embed"][0])
    encoder = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).eval()
    tokens, instance = encoder(torch.randn(2, 3, 48, 40))  # 6 x 5 grid from a 4 x 4 table
    assert tokens.shape == (2, 30, 64) and instance.shape == (2, 64)
    assert torch.equal(models.resize_pos_embed(encoder.pos_embed, (4, 4), (4, 4)), encoder.pos_embed)
    resized = models.resize_pos_embed(encoder.pos_embed, (4, 4), (8, 8))
    assert resized.shape == (1, 64, 64) and torch.isfinite(resized).all()
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
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert {"model", "optimizer", "scaler"} <= set(ckpt)
    model = pretrain.build_model(pretrain.get_args(TINY))
    model.load_state_dict(ckpt["model"])  # the checkpoint loads strictly into the same architecture
    fresh = pretrain.build_model(pretrain.get_args(TINY))
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, fresh.encoder.blocks[0].attn.qkv.weight)
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
    resumed_log = read_log(resumed)  # the crash came before epoch 0's log line
    assert [r["epoch"] for r in resumed_log] == [1]
    assert {k: v for k, v in read_log(straight)[1].items() if k not in timing} == \
           {k: v for k, v in resumed_log[0].items() if k not in timing}
    a = torch.load(straight / "checkpoint-last.pth", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoint-last.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_full_batch():
    torch.manual_seed(0)
    args = pretrain.get_args(TINY + ["--drop-path", "0"])
    full, accum = pretrain.build_model(args), pretrain.build_model(args)
    accum.load_state_dict(full.state_dict())
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    keep = full.sample_keep(8)  # (M, 8, K)
    for model, batches, keeps in ((full, [(x1, x2)], [keep]),
                                  (accum, [(x1[:4], x2[:4]), (x1[4:], x2[4:])], [keep[:, :4], keep[:, 4:]])):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the update is lr * gradient: comparable
        scaler = utils.grad_scaler(torch.device("cpu"), "none")
        for _ in range(2):
            loss = pretrain.train_step(model, optimizer, scaler, batches, 1.0, 0.99, "none", keeps)
        assert torch.isfinite(loss)
    for (name, a), b in zip(full.state_dict().items(), accum.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(full.predictor[0].weight, pretrain.build_model(args).predictor[0].weight)


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


def test_empty_data_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        pretrain.main(TINY + ["--epochs", "1", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")])


def test_resume_from_another_architecture_is_refused(tmp_path, pretrained):
    (tmp_path / "checkpoint-last.pth").write_bytes(pretrained.read_bytes())
    with pytest.raises(SystemExit, match=r"does not fit the model \(.*shape: .*encoder.patch_embed.weight"):
        pretrain.main([*TINY, "--arch", "vit_fixture", "--epochs", "2", "--output-dir", str(tmp_path)])


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    pretrain.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path)])
    good = (tmp_path / "checkpoint-last.pth").read_bytes()
    forward = models.ExtreMA.forward
    monkeypatch.setattr(models.ExtreMA, "forward", lambda self, *a, **k: forward(self, *a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss"):
        pretrain.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path)])
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == good
    assert len(read_log(tmp_path)) == 1


def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "train" / "class_a"
    folder.mkdir(parents=True)
    for i in range(16):
        utils.SyntheticImages(1, 32)[0][0].save(folder / f"ok_{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = run_script("pretrain.py", *TINY, "--batch-size", "17", "--epochs", "1", "--data", str(tmp_path),
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read image {folder / 'broken.jpg'}: ")
