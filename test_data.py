"""Data reading: decoding (torchcodec, PIL, arrays), --norm-stats auto, shard faults and --extract's outputs: no
silent wrong statistics or pixels, one-line errors for bad data."""
import argparse
import functools
import http.server
import io
import os
import re
import struct
import tarfile
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import linprobe
import pretrain
import utils

PRETRAIN = ["--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8", "--batch-size", "8", "--epochs", "1",
            "--device", "cpu", "--num-workers", "0"]


def extract_args(out, source, *extra):
    return ["--extract", "--data", str(source), "--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8",
            "--batch-size", "4", "--device", "cpu", "--num-workers", "0", "--output-dir", str(out), *extra]


def png_48bit(pixels):
    """A 16-bit RGB PNG of uint16 pixels (H, W, 3), which PIL cannot write."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_torchcodec_decodes_the_pixels_pil_does_without_deprecation_warnings(tmp_path):
    """JPEG and PNG (RGB and grey) decode through torchcodec to the uint8 tensor PIL gives, with no warning (the
    deprecated torchvision.io.decode_image is not used); a 16-bit grey PNG stays uint16 with one channel."""
    pixels = np.random.default_rng(0).integers(0, 256, (19, 23, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, image, in_chans in (("a.jpg", pixels, 3), ("a.png", pixels, 3), ("g.jpg", pixels[:, :, 0], 1),
                                      ("g.png", pixels[:, :, 0], 1)):
            Image.fromarray(image).save(tmp_path / name)
            with Image.open(tmp_path / name) as img:
                expected = torch.from_numpy(np.array(img.convert("RGB" if in_chans == 3 else "L")))
            decoded = data.decode_image(str(tmp_path / name), in_chans=in_chans)
            assert decoded.dtype == torch.uint8
            assert torch.equal(decoded, expected.reshape(19, 23, in_chans).permute(2, 0, 1))
        deep = np.arange(19 * 23, dtype=np.uint16).reshape(19, 23) * 97
        Image.fromarray(deep).save(tmp_path / "deep.png")
        assert torch.equal(data.decode_image(str(tmp_path / "deep.png"), in_chans=1)[0], torch.from_numpy(deep))


def test_norm_stats_auto_skips_unreadable_images_and_counts_them(tmp_path, capsys):
    """Unreadable images among the sampled ones are skipped, named (the first few) and counted: the statistics are
    those of all the readable images, whichever order they are read in."""
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (8, 8 + i, 3), dtype=np.uint8) for i in range(6)]
    for i, pixels in enumerate(good):
        Image.fromarray(pixels).save(tmp_path / f"good{i}.png")
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    args = argparse.Namespace(data=str(tmp_path), in_chans=3, synthetic_size=0, img_size=32, seed=0)
    mean, std = data.channel_stats(data.sample_images(args, 100))
    pixels = np.concatenate([p.reshape(-1, 3) for p in good]) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
    warned = capsys.readouterr().err.splitlines()
    assert len([line for line in warned if re.match(rf"warning: --norm-stats auto skipped cannot read image "
                                                    rf"{tmp_path}/bad\d\.png: ", line)]) == 3
    assert warned[-1] == "warning: --norm-stats auto skipped 3 unreadable image(s) and used 6"


def test_wide_pixels_are_never_clipped_to_8_bits(tmp_path):
    """16-bit and float TIFFs and 16-bit RGB PNGs in an RGB run are unreadable images (every reader), never clipped
    or zeroed; with --in-chans 1 the grey ones keep their values."""
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.tif")
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(tmp_path / "float.tif")
    (tmp_path / "deep.png").write_bytes(png_48bit(np.full((8, 8, 3), 40000, dtype=np.uint16)))
    for name, mode in (("deep.tif", "I;16"), ("float.tif", "F")):
        with pytest.raises(utils.DataError, match=rf"^cannot read image .*{name}: .*{mode} pixels: image files are "
                                                  rf"read as 8-bit"):
            data.decode_image(str(tmp_path / name))
        with pytest.raises(utils.DataError, match=rf"^cannot read image .*{name}: {mode} pixels: RGB runs"):
            data.load_rgb(str(tmp_path / name))
    with pytest.raises(utils.DataError, match=r"^cannot read image .*deep.png: RGB;16B pixels: RGB runs"):
        data.load_rgb(str(tmp_path / "deep.png"))  # linprobe.py, --knn, fine-tuning and transfer read through it
    with pytest.raises(utils.DataError, match=r"^cannot read image .*deep.png: .*torch.uint16 pixels"):
        data.decode_image(str(tmp_path / "deep.png"))
    assert data.decode_image(str(tmp_path / "deep.tif"), in_chans=1).unique().tolist() == [40000]
    assert data.decode_image(str(tmp_path / "float.tif"), in_chans=1).unique().tolist() == [0.25]


def test_non_finite_or_constant_statistics_and_images_are_refused(tmp_path):
    """--mean/--std NaN or inf, a near-zero std, and --norm-stats auto over a constant channel are refused in one
    line naming the channel; an image with NaN or inf pixels, or none at all, is unreadable: pretraining skips and
    counts one with a NaN pixel (its place in the batch taken by a readable image) instead of stopping on a NaN
    loss."""
    for flags, message in ((["--mean", "nan", "0.5", "0.5"], "--mean of channel 0 must be finite, got nan"),
                           (["--std", "0.2", "nan", "0.2"], "--std of channel 1 must be finite and at least 1e-06"),
                           (["--std", "0.2", "0.2", "inf"], "--std of channel 2 must be finite and at least 1e-06"),
                           (["--std", "0.2", "1e-9", "0.2"], "--std of channel 1 must be finite and at least 1e-06")):
        defaults = ["--mean", "0.5", "0.5", "0.5"] if flags[0] == "--std" else ["--std", "0.2", "0.2", "0.2"]
        with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
            pretrain.main(PRETRAIN + ["--data", "synthetic", "--output-dir", str(tmp_path / "out")] + defaults + flags)
    folder = tmp_path / "constant"
    folder.mkdir()
    for i in range(8):  # a full batch, so the run gets as far as estimating the statistics
        np.save(folder / f"{i}.npy", np.stack([np.full((8, 8), 0.1 * i), np.full((8, 8), 0.6)], -1).astype(np.float32))
    with pytest.raises(SystemExit, match=r"^error: --norm-stats auto: channel 1 of the training images is constant "
                                         r"\(std [0-9.e-]+\)$"):
        pretrain.main(PRETRAIN + ["--data", str(folder), "--in-chans", "2", "--norm-stats", "auto",
                                  "--output-dir", str(tmp_path / "out")])
    for name, array, reason in (("nan.npy", np.full((8, 8), np.nan, np.float32), "NaN or infinite pixel values"),
                                ("inf.npy", np.full((8, 8), np.inf, np.float32), "NaN or infinite pixel values"),
                                ("empty.npy", np.zeros((0, 8), np.uint8),
                                 r"not one image with pixels: shape \(1, 0, 8\)")):
        np.save(tmp_path / name, array)
        with pytest.raises(utils.DataError, match=rf"^cannot read image .*{name}: .*{reason}$"):
            data.decode_image(str(tmp_path / name), in_chans=1)
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    for i in range(8):
        np.save(arrays / f"{i}.npy", np.random.default_rng(i).random((32, 32, 2), np.float32))
    np.save(arrays / "3.npy", np.where(np.arange(2048).reshape(32, 32, 2) == 5, np.nan, 0.5).astype(np.float32))
    args = argparse.Namespace(data=str(arrays), num_workers=0, seed=0, synthetic_size=0, img_size=32,
                              train_num_samples=None, in_chans=2)
    loader, _ = data.pretraining_loader(args, lambda image: image, 8, torch.device("cpu"))
    batch = next(iter(loader))
    assert batch.images.isfinite().all() and len(batch.names) == 8
    assert batch.skipped == [f"cannot read image {arrays}/3.npy: cannot decode a .npy file with 2 channel(s): NaN or "
                             f"infinite pixel values"]


def test_data_that_is_no_source_or_empty_says_so(tmp_path):
    """An image or zip given as --data, a shard pattern with an empty part and an empty image file each end in one
    line saying what is wrong; a list file with a UTF-8 byte-order mark is read."""
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    for path, message in ((tmp_path / "photo.png", "is not a folder, a list file of image paths (UTF-8 text) or a "
                                                   "shard pattern"),
                          ("x.tar::", "names an empty shard (patterns are joined by '::', none of them empty)")):
        with pytest.raises(SystemExit, match=f"^error: --data {re.escape(str(path))} {re.escape(message)}$"):
            pretrain.main(PRETRAIN + ["--data", str(path), "--train-num-samples", "8",
                                      "--output-dir", str(tmp_path / "out")])
    (tmp_path / "list.txt").write_text("photo.png\nsub/b.png\n", encoding="utf-8-sig")
    assert data.list_images(str(tmp_path / "list.txt")) == (str(tmp_path), ["photo.png", "sub/b.png"])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(utils.DataError, match=r"^cannot read image .*empty.png: .*: the file is empty$"):
        data.decode_image(str(tmp_path / "empty.png"))


def test_damaged_or_missing_shards_are_named_in_one_line(tmp_path):
    """A shard cut short in a member, an empty one and a URL that answers 404 raise DataError naming the shard (for
    the URL, curl's exit status or, when the tar reader sees the end of the stream first, no data)."""
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for i in range(3):
            member = tarfile.TarInfo(f"s{i}.png")
            member.size = 5000
            tar.addfile(member, io.BytesIO(bytes(5000)))
    (tmp_path / "cut.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:512 + 5120 + 512 + 1000])
    (tmp_path / "empty.tar").write_bytes(b"")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    missing = f"http://127.0.0.1:{server.server_address[1]}/missing.tar"
    try:
        for url, reason in ((str(tmp_path / "cut.tar"), "unexpected end of data"),
                            (str(tmp_path / "empty.tar"), r"no data \(a download or pipe: command that failed"),
                            (missing, r"(its download or pipe: command failed \(exit status 22\)|no data)")):
            with pytest.raises(utils.DataError, match=rf"^cannot read shard {re.escape(url)}: {reason}"):
                list(data.shard_samples([str(tmp_path / "whole.tar"), url]))
    finally:
        server.shutdown()


def test_extract_refuses_bad_names_nan_features_and_no_samples_leaving_old_outputs(tmp_path):
    """--extract refuses a name with a line break, non-finite features and shards without samples, each in one line;
    a failed run leaves the previous outputs as they were and no parts."""
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    linprobe.main(extract_args(out, folder))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(before) == ["instance.npy", "names.txt", "tokens.npy"]
    Image.new("RGB", (32, 32)).save(folder / "line\nbreak.png")
    with pytest.raises(utils.DataError, match=r"^cannot extract image 'line\\nbreak.png': names.txt holds one name a "
                                              r"line, and this one holds a line break \(rename it\)$"):
        linprobe.main(extract_args(out, folder))
    os.remove(folder / "line\nbreak.png")
    (tmp_path / "huge").mkdir()
    np.save(tmp_path / "huge" / "huge.npy", np.full((32, 32, 3), 3e38, np.float32))  # finite, but not its features
    with pytest.raises(SystemExit, match=r"^error: the instance features of image huge.npy are not finite: not "
                                         r"writing .*instance.npy$"):
        linprobe.main(extract_args(out, tmp_path / "huge", "--mean", "0", "0", "0", "--std", "1", "1", "1"))
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(SystemExit, match=r"^error: --data .*empty.tar holds no samples$"):
        linprobe.main(extract_args(out, tmp_path / "empty.tar"))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
