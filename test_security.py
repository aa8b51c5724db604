"""Security and the URL cache: a checkpoint never runs code, whichever way it is read (--pretrained FILE or URL,
resume, visualize.py), and torch.hub's cache keeps one complete checkpoint per URL. Run with
`pytest test_security.py` (about 5 s after the imports)."""
import functools
import http.server
import os
import multiprocessing
import re
import signal
import threading
import time
from contextlib import suppress

import pytest
import torch

import finetune
import models
import pretrain
import utils
import visualize

TINY = ["--data", "synthetic", "--synthetic-size", "8", "--arch", "vit_fixture", "--img-size", "32",
        "--patch-size", "8", "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]


class MakesFolder:
    """Unpickled by torch.load(weights_only=False), this calls os.mkdir(path): the side effect a test looks for."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class Handler(http.server.SimpleHTTPRequestHandler):
    """The files of the served folder; /slow/NAME sends 256 KiB of a never-ending file at once, then 1 KiB every
    50 ms until the client goes."""

    def do_GET(self):
        if not self.path.startswith("/slow/"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        try:
            self.wfile.write(bytes(1 << 18))
            while True:
                time.sleep(0.05)
                self.wfile.write(bytes(1024))
        except OSError:  # the client was killed
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(served folder, its http:// address), with torch.hub's cache in tmp_path/torch."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def cached(tmp_path):
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def malicious(path, marker):
    """A checkpoint of pretrain.py's keys whose model, once unpickled, has made the folder `marker`."""
    torch.save({"model": MakesFolder(marker), "optimizer": {}, "scaler": {}, "epoch": 0, "step": 0}, path)


def refused_message(path):
    return (rf"^error: cannot read checkpoint {re.escape(str(path))}: it holds {os.mkdir.__module__}\.mkdir, and a "
            rf"checkpoint may hold only tensors, dicts, lists, numbers and strings \(nothing in it was run\)$")


def test_malicious_checkpoint_is_refused_through_every_door(server, tmp_path):
    """--pretrained FILE, --pretrained http://..., resuming from checkpoint-last.pth and visualize.py all refuse the
    file in one line (SystemExit: exit status 1), naming it and what it holds; the folder its pickle would make is
    never made, and the download is not cached."""
    root, url = server
    marker = tmp_path / "made_by_the_checkpoint"
    evil = tmp_path / "evil.pth"
    malicious(evil, marker)
    malicious(root / "evil.pth", marker)
    out = tmp_path / "resume"
    out.mkdir()
    malicious(out / "checkpoint-last.pth", marker)
    args = TINY + ["--num-classes", "2", "--epochs", "1", "--output-dir", str(tmp_path / "ft")]
    with pytest.raises(SystemExit, match=refused_message(evil)):
        finetune.main(args + ["--pretrained", str(evil)])
    with pytest.raises(SystemExit, match=rf"^error: cannot use {url}/evil\.pth: it holds {os.mkdir.__module__}\.mkdir"
                                         rf", .*\(nothing in it was run\); nothing was cached$"):
        finetune.main(args + ["--pretrained", f"{url}/evil.pth"])
    assert cached(tmp_path) == []
    with pytest.raises(SystemExit, match=refused_message(out / "checkpoint-last.pth")):
        pretrain.main(TINY + ["--epochs", "1", "--proj-dim", "32", "--proj-hidden-dim", "64", "--output-dir", str(out)])
    with pytest.raises(SystemExit, match=refused_message(evil)):
        visualize.main(["--pretrained", str(evil), "--arch", "vit_fixture", "--data", "synthetic", "--output-dir",
                        str(tmp_path / "pictures")])
    assert not marker.exists()


def encoder_checkpoint(path, seed):
    """A checkpoint of one random momentum encoder (vit_fixture); returns its weights."""
    torch.manual_seed(seed)
    weights = models.VisionTransformer(img_size=32, patch_size=8, **models.ARCHS["vit_fixture"]).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"momentum_encoder.{k}": v for k, v in weights.items()}}, path)
    return weights


def exported_blocks(source, out):
    """The transformer blocks of the encoder that visualize.py --export-timm reads from `source`."""
    visualize.main(["--pretrained", source, "--arch", "vit_fixture", "--export-timm", str(out)])
    return {k: v for k, v in torch.load(out)["state_dict"].items() if k.startswith("blocks.")}


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_same_file_name_at_two_addresses_gives_each_its_weights(server, tmp_path, monkeypatch, o_tmpfile):
    """a/ and b/checkpoint-last.pth: file:// reads each in place (nothing cached); http:// caches each
    under its own name, downloaded once (read from the cache once the server's files are gone). Also where the
    system has no O_TMPFILE (a named partial file)."""
    root, url = server
    if not o_tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE")
    runs = {run: encoder_checkpoint(root / run / "checkpoint-last.pth", seed) for seed, run in enumerate(["a", "b"])}
    for run, weights in runs.items():
        blocks = exported_blocks((root / run / "checkpoint-last.pth").as_uri(), tmp_path / "export.pth")
        assert blocks.keys() == {k for k in weights if k.startswith("blocks.")}
        assert all(torch.equal(v, weights[k]) for k, v in blocks.items()), run
    assert cached(tmp_path) == []
    for attempt in range(2):  # the second time from the cache alone
        for run, weights in runs.items():
            blocks = exported_blocks(f"{url}/{run}/checkpoint-last.pth", tmp_path / "export.pth")
            assert all(torch.equal(v, weights[k]) for k, v in blocks.items()), run
            (root / run / "checkpoint-last.pth").unlink(missing_ok=True)
        names = cached(tmp_path)
        assert len(names) == 2 and all(re.fullmatch(r"checkpoint-last-[0-9a-f]{8}\.pth", name) for name in names)


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_html_page_is_refused_and_not_cached(server, tmp_path, monkeypatch, o_tmpfile):
    """A server's error page under the checkpoint's name: one line quoting how it starts; a missing file: one line
    with the HTTP error. Nothing cached, with or without O_TMPFILE."""
    root, url = server
    if not o_tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE")
    (root / "extrema.pth").write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n")
    with pytest.raises(SystemExit, match=rf"^error: cannot use {url}/extrema\.pth: not a checkpoint \(starts with "
                                         rf"'<!DOCTYPE html>\\n'\); nothing was cached$"):
        visualize.main(["--pretrained", f"{url}/extrema.pth", "--export-timm", str(tmp_path / "export.pth")])
    with pytest.raises(SystemExit, match=rf"^error: cannot download {url}/missing\.pth: HTTP Error 404: File not "
                                         rf"found$"):
        visualize.main(["--pretrained", f"{url}/missing.pth", "--export-timm", str(tmp_path / "export.pth")])
    assert cached(tmp_path) == [] and not (tmp_path / "export.pth").exists()


def open_files(pid):
    """The paths of the files process pid holds open (an unnamed O_TMPFILE file: FOLDER/#N (deleted))."""
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):  # closed meanwhile
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return names


def test_killed_download_leaves_no_partial_file(server, tmp_path):
    """kill -9 of a process while it writes a download into the cache folder leaves nothing there."""
    _, url = server
    child = multiprocessing.get_context("fork").Process(target=utils.load_checkpoint, args=(f"{url}/slow/big.pth",))
    child.start()
    folder = str(tmp_path / "torch" / "hub" / "checkpoints")
    deadline = time.monotonic() + 60
    try:
        while not any(name.startswith(folder + os.sep) for name in open_files(child.pid)):
            assert time.monotonic() < deadline and child.is_alive(), "the download never started"
            time.sleep(0.1)
        time.sleep(0.5)  # bytes on disk
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    assert os.path.isdir(folder) and cached(tmp_path) == []
