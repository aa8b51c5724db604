"""The weights in one call and in other formats: architecture read from --pretrained by every stage, torch.hub
entries, and visualize.py's --export-hf and --export-onnx."""
import argparse
import json
import os

import pytest
import torch

import finetune
import hubconf
import linprobe
import models
import pretrain
import visualize
from test_smoke import FIXTURE, ROOT, read_log

# the README's quick start, one epoch on 16 images
QUICKSTART = ["--data", "synthetic", "--synthetic-size", "16", "--device", "cpu", "--arch", "vit_tiny", "--img-size",
              "32", "--patch-size", "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
              "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2", "--num-workers", "0"]
# a stage's run without architecture flags: 8 training and 2 validation images of 4 classes, one epoch
EVAL = ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4", "--batch-size", "4", "--epochs", "1",
        "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    pretrain.main(QUICKSTART + ["--output-dir", str(out)])
    return str(out / "checkpoint-last.pth")


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """The official fixture's checkpoint as a file, named as the released ones."""
    if not os.path.exists(FIXTURE):
        pytest.skip(f"official fixture not found at {FIXTURE}")
    path = tmp_path_factory.mktemp("official") / "extrema_mask08x5_color_1k_300ep.pth"
    torch.save(torch.load(FIXTURE)["checkpoint"], path)
    return str(path)


def test_stages_take_the_architecture_from_pretrained(quickstart, tmp_path):
    linprobe.main(EVAL + ["--pretrained", quickstart, "--knn", "--knn-k", "2", "--output-dir", str(tmp_path / "knn")])
    assert 0 <= read_log(tmp_path / "knn")[-1]["k2_acc1"] <= 100
    for stage, name in ((linprobe, "probe"), (finetune, "finetune")):
        stage.main(EVAL + ["--pretrained", quickstart, "--output-dir", str(tmp_path / name)])
        saved = torch.load(tmp_path / name / "checkpoint-last.pth", weights_only=True)
        assert {k: saved["args"][k] for k in ("arch", "patch_size", "img_size", "in_chans")} == \
            {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "in_chans": 3}, name
        assert saved["model"]["encoder.pos_embed"].shape == (1, 16, 192), name  # the checkpoint's 4x4 grid
    with pytest.raises(SystemExit, match=r"checkpoint-last.pth: patch size 8 in the checkpoint, 16 given$"):
        finetune.main(EVAL + ["--pretrained", quickstart, "--patch-size", "16", "--output-dir", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match=r"arch vit_tiny in the checkpoint, vit_small given$"):
        linprobe.main(EVAL + ["--pretrained", quickstart, "--arch", "vit_small", "--output-dir", str(tmp_path / "a")])


def test_official_checkpoint_read_without_flags(official_file, tmp_path):
    checkpoint = torch.load(official_file, weights_only=True)
    assert models.encoder_config(checkpoint) == dict(arch="vit_fixture", img_size=32, patch_size=8, in_chans=3,
                                                     ca_depth=2, rel_pos_bias=False, mean=None, std=None)
    linprobe.main(EVAL + ["--pretrained", official_file, "--knn", "--knn-k", "2", "--output-dir", str(tmp_path)])
    assert read_log(tmp_path)[-1]["k2_acc1"] >= 0
    # a checkpoint of one momentum encoder, its args saved as a Namespace (older checkpoints) or a dict
    ours = {"model": {"momentum_encoder." + k: v for k, v in models.encoder_state_dict(checkpoint).items()},
            "args": argparse.Namespace(arch="vit_fixture", in_chans=3, mean=[0.5] * 3, std=[0.2] * 3)}
    assert models.encoder_config(ours)["mean"] == [0.5] * 3
    ours["args"] = vars(ours["args"])
    assert models.encoder_config(ours)["arch"] == "vit_fixture"


def test_load_encoder_names_the_patch_size():
    sizes = dict(img_size=32, **models.ARCHS["vit_fixture"])
    small_patches = {"model": {f"encoder.{k}": v for k, v in
                               models.VisionTransformer(patch_size=8, **sizes).state_dict().items()}}
    with pytest.raises(ValueError, match=r"^patch size 8 in the checkpoint, 16 given$"):
        models.load_encoder(models.VisionTransformer(patch_size=16, **sizes), small_patches, "online")


def test_hub_loads_any_checkpoint(official_file, quickstart, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    images = torch.randn(2, 3, 48, 48)
    for path in (official_file, quickstart):
        checkpoint = torch.load(path, weights_only=True)
        config = models.encoder_config(checkpoint)
        expected = models.VisionTransformer(img_size=config["img_size"], patch_size=config["patch_size"],
                                            **models.ARCHS[config["arch"]]).eval()
        models.load_encoder(expected, checkpoint, "momentum")
        with torch.no_grad():
            want = expected(images)
            for source in (path, "file://" + path) if path == official_file else (path,):
                encoder = torch.hub.load(ROOT, "extrema", source="local", checkpoint=source)
                assert not encoder.training
                assert all(torch.equal(a, b) for a, b in zip(encoder(images), want)), source
    assert not os.path.exists(tmp_path / "torch_home" / "hub" / "checkpoints")  # file:// is read in place
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == {"extrema", "extrema_vitb16_mask08x5_1k", "extrema_vitb16_mask08x5_color_1k",
                       "extrema_vitb16_mask09x8_color_1k", "extrema_vitb16_mask08x5_color_22k"}  # torch.hub.list's
    monkeypatch.setitem(models.ARCHS, "vit_base", models.ARCHS["vit_fixture"])  # a small ViT-B stand-in
    random = hubconf.extrema_vitb16_mask09x8_color_1k(pretrained=False)
    assert (random.patch_size, random.grid_size, random.training) == (16, (14, 14), False)
    # an official entry downloads its file by name (here from a file:// copy of the fixture)
    monkeypatch.setattr(hubconf, "OFFICIAL_URL", "file://" + os.path.dirname(official_file) + "/extrema_{}.pth")
    encoder = hubconf.extrema_vitb16_mask08x5_color_1k(branch="online")
    assert torch.equal(encoder.blocks[0].attn.qkv.weight,
                       models.encoder_state_dict(torch.load(official_file), "online")["blocks.0.attn.qkv.weight"])


def test_export_hf_loads_in_timm(official_file, tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    hf, export = tmp_path / "hf", tmp_path / "timm.pth"
    visualize.main(["--pretrained", official_file, "--export-hf", str(hf), "--export-timm", str(export)])
    assert json.loads((hf / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    model = timm.create_model(f"local-dir:{hf}", pretrained=True)
    expected = torch.load(export, weights_only=True)["state_dict"]
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_export_onnx_matches_pytorch(official_file, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "encoder.onnx"
    visualize.main(["--pretrained", official_file, "--export-onnx", str(path)])
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["tokens", "instance"]
    encoder = models.pretrained_encoder(torch.load(official_file, weights_only=True))
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = encoder(images)
        got = session.run(None, {"images": images.numpy()})
        for ours, theirs in zip(got, want):
            assert ours.shape == theirs.shape
            assert abs(torch.from_numpy(ours) - theirs).max() <= 1e-4
