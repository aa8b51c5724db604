"""A pretraining run's life: continued pretraining with --init, what a resume keeps, what a fresh start sets
aside, and the faults of a run that must end in one line (test_smoke.py holds the stages end to end)."""
import json
import os
import signal

import pytest
import torch

import finetune
import linprobe
import pretrain
import utils
from test_smoke import TINY, read_log, stage_error

FAST = TINY + ["--arch", "vit_fixture", "--synthetic-size", "16"]  # one step of 16 images per epoch


def strict_log(path):
    """log.jsonl read as strict JSON: NaN or Infinity in a line is an error."""
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for line in f]


def test_init_continues_from_the_checkpoint_with_fresh_optimizer_and_epochs(tmp_path, capsys):
    """--init from a 4-epoch run: the new run's first epoch starts near where that run ended, far below a fresh
    run's first epoch; epochs and lr schedule start afresh; the run records where it started; a resume of it
    reads its own checkpoint-last.pth, never --init again."""
    command = FAST + ["--synthetic-size", "32", "--epochs", "4", "--blr", "1e-2"]
    pretrain.main(command + ["--output-dir", str(tmp_path / "first")])
    first = read_log(tmp_path / "first")
    source = str(tmp_path / "first" / "checkpoint-last.pth")
    fresh = FAST + ["--synthetic-size", "32", "--epochs", "2", "--blr", "1e-2"]
    pretrain.main(fresh + ["--output-dir", str(tmp_path / "fresh")])
    pretrain.main(fresh + ["--output-dir", str(tmp_path / "init"), "--init", source])
    fresh_log, init_log = read_log(tmp_path / "fresh"), read_log(tmp_path / "init")
    assert first[0]["train_loss"] - first[-1]["train_loss"] > 0.2  # the first run learned something
    assert abs(init_log[0]["train_loss"] - first[-1]["train_loss"]) < 0.5 * abs(
        fresh_log[0]["train_loss"] - first[-1]["train_loss"])
    assert [r["epoch"] for r in init_log] == [0, 1] and all(r["init"] == source for r in init_log)
    checkpoint = torch.load(tmp_path / "init" / "checkpoint-last.pth", weights_only=False)
    assert checkpoint["args"]["init"] == source and checkpoint["epoch"] == 1
    assert init_log[0]["lr"] == pytest.approx(fresh_log[0]["lr"])  # the schedule starts afresh
    assert f"--init: started from {source}" in capsys.readouterr().out
    os.remove(source)  # a resume never reads --init again
    pretrain.main(fresh[:-4] + ["--epochs", "3", "--blr", "1e-2", "--output-dir",
                                str(tmp_path / "init"), "--init", source])
    assert [r["epoch"] for r in read_log(tmp_path / "init")] == [0, 1, 2]


def test_init_resizes_and_refuses_another_architecture(tmp_path, capsys):
    pretrain.main(FAST + ["--epochs", "1", "--output-dir", str(tmp_path / "a")])
    source = str(tmp_path / "a" / "checkpoint-last.pth")
    pretrain.main(FAST + ["--epochs", "1", "--img-size", "48", "--output-dir", str(tmp_path / "b"), "--init", source])
    assert "started from" in capsys.readouterr().out  # 4x4 -> 6x6 position table
    message = stage_error("pretrain", FAST + ["--epochs", "1", "--proj-dim", "16", "--output-dir",
                                              str(tmp_path / "c"), "--init", source])
    assert message.startswith(f"error: --init {source}: projector in checkpoint does not fit the model (shape: ")
    assert "\n" not in message


def test_stop_signal_with_a_batch_of_one_saves_and_logs_json(tmp_path, monkeypatch, capsys):
    """A micro-batch of one image has no target_std (NaN): a stop signal still saves the position, the epoch's
    target_std is null in log.jsonl (strict JSON), and the run says why instead of a collapse warning."""
    command = FAST + ["--synthetic-size", "4", "--batch-size", "1", "--epochs", "1", "--output-dir", str(tmp_path)]
    set_lr, calls = utils.set_lr, []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return set_lr(*a, **k)

    monkeypatch.setattr(utils, "set_lr", signalled)
    with pytest.raises(SystemExit) as info:
        pretrain.main(command)
    assert info.value.code == utils.REQUEUE_STATUS
    checkpoint = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (-1, 2)
    monkeypatch.setattr(utils, "set_lr", set_lr)
    pretrain.main(command)
    (record,) = strict_log(tmp_path)
    assert record["target_std"] is None and record["samples"] == 4 and record["train_loss"] > 0
    assert "warning: no target_std in epoch 0: a step's batch of one image" in capsys.readouterr().out


def test_a_stage_pointed_at_another_stages_folder_says_whose(tmp_path):
    pretrain.main(FAST + ["--epochs", "1", "--output-dir", str(tmp_path)])
    message = stage_error("linprobe", ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4",
                                       "--arch", "vit_fixture", "--img-size", "32", "--patch-size", "8",
                                       "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
                                       "--output-dir", str(tmp_path)])
    assert message == (f"error: {tmp_path / 'checkpoint-last.pth'} is pretrain.py's checkpoint, not linprobe.py's: "
                       f"give another --output-dir (pass it as --pretrained to start from its encoder)")


def test_fresh_start_sets_aside_numbered_checkpoints(tmp_path, capsys):
    pretrain.main(FAST + ["--epochs", "2", "--save-every", "1", "--output-dir", str(tmp_path)])
    os.remove(tmp_path / "checkpoint-last.pth")
    pretrain.main(FAST + ["--epochs", "1", "--save-every", "0", "--output-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth.1", "checkpoint-1.pth.1", "checkpoint-last.pth",
                                            "log.jsonl", "log.jsonl.1"]
    assert "the earlier run's checkpoint-<epoch>.pth files are kept as checkpoint-<epoch>.pth.1" in capsys.readouterr().out


def test_resume_refuses_other_statistics_and_keeps_estimated_ones(tmp_path, monkeypatch):
    """The model learned on its inputs' statistics: a resume with other --mean/--std stops in one line; a resumed
    --norm-stats auto takes the run's values without estimating again, and a changed --in-chans is refused
    before any estimate."""
    command = FAST + ["--epochs", "1", "--output-dir", str(tmp_path)]
    pretrain.main(command + ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"])
    message = stage_error("pretrain", command + ["--epochs", "2", "--mean", "0.4", "0.5", "0.5", "--std", "0.2",
                                                 "0.2", "0.2"])
    assert message.startswith(f"error: {tmp_path / 'checkpoint-last.pth'} was trained with --mean [0.5, 0.5, 0.5]")
    auto = tmp_path / "auto"
    pretrain.main(FAST + ["--epochs", "1", "--norm-stats", "auto", "--output-dir", str(auto)])
    estimated = torch.load(auto / "checkpoint-last.pth", weights_only=False)["args"]["mean"]
    monkeypatch.setattr(pretrain, "estimate_stats", lambda *a: pytest.fail("estimated again on resume"))
    pretrain.main(FAST + ["--epochs", "2", "--norm-stats", "auto", "--output-dir", str(auto)])
    assert torch.load(auto / "checkpoint-last.pth", weights_only=False)["args"]["mean"] == estimated
    message = stage_error("pretrain", FAST + ["--epochs", "3", "--norm-stats", "auto", "--in-chans", "1",
                                              "--output-dir", str(auto)])
    assert "was trained with --in-chans 3" in message


@pytest.mark.parametrize("flag, value, words", [("--save-interval", "nan", "at least 0"),
                                                ("--blr", "inf", "positive"), ("--weight-decay", "inf", "at least 0")])
def test_non_finite_flag_values_are_refused(tmp_path, flag, value, words):
    message = stage_error("pretrain", FAST + ["--epochs", "1", "--output-dir", str(tmp_path), flag, value])
    assert message.startswith(f"error: {flag} must be {words}") and message.endswith(value)
    assert not (tmp_path / "checkpoint-last.pth").exists()


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    forward = pretrain.models.ExtreMA.forward
    monkeypatch.setattr(pretrain.models.ExtreMA, "forward",
                        lambda self, *a, **k: tuple(v * float("nan") if i == 0 else v
                                                    for i, v in enumerate(forward(self, *a, **k))))
    message = stage_error("pretrain", FAST + ["--epochs", "1", "--output-dir", str(tmp_path)])
    assert message == "error: non-finite loss nan at epoch 0 step 0; no checkpoint was written"


def test_compile_gives_the_eager_loss(tmp_path, monkeypatch):
    """--compile through pretrain.main traces the whole forward (both branches and the loss; the masks are drawn
    outside it, so the same random numbers as eager): the same losses as the eager run. torch.compile's inductor
    takes minutes to build its kernels on a 2-core CPU, so the test compiles with the aot_eager backend: Dynamo's
    graph capture and AOTAutograd's joint graph, without code generation."""
    compile_model = pretrain.compile_model
    monkeypatch.setattr(pretrain, "compile_model", lambda learner, mode: learner.compile(backend="aot_eager"))
    command = FAST + ["--epochs", "2", "--drop-path", "0"]
    pretrain.main(command + ["--output-dir", str(tmp_path / "eager")])
    pretrain.main(command + ["--output-dir", str(tmp_path / "compiled"), "--compile"])
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["train_loss"] for r in compiled] == pytest.approx([r["train_loss"] for r in eager], rel=1e-5)
    assert compile_model is not pretrain.compile_model and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_eval_only_and_resume_need_no_architecture_flags(tmp_path):
    """A fine-tuning run started from a checkpoint without architecture flags is evaluated (--eval-only) and
    resumed without --pretrained or any architecture flag: the run's own checkpoint says what it is."""
    pretrain.main(FAST + ["--epochs", "1", "--output-dir", str(tmp_path / "pre")])
    run = ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4", "--batch-size", "4",
           "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--output-dir", str(tmp_path / "ft")]
    finetune.main(run + ["--epochs", "1", "--pretrained", str(tmp_path / "pre" / "checkpoint-last.pth")])
    finetune.main(run + ["--epochs", "1", "--eval-only"])
    finetune.main(run + ["--epochs", "2"])
    first, evaluated, second = read_log(tmp_path / "ft")
    assert evaluated["eval_only"] and evaluated["acc1"] == first["acc1"] and second["epoch"] == 1
    args = torch.load(tmp_path / "ft" / "checkpoint-last.pth", weights_only=True)["args"]
    assert (args["arch"], args["patch_size"], args["img_size"]) == ("vit_fixture", 8, 32)


def test_signal_before_the_first_step_saves_the_start(tmp_path, monkeypatch):
    """docs/RELIABILITY.md: a stop signal once the stage has its utils.Run, before the first step, saves the
    position epoch 0 step 0 and exits 143; the same command then trains the whole run."""
    resume = utils.Run.resume

    def signalled(self, *a, **k):
        checkpoint = resume(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return checkpoint

    monkeypatch.setattr(utils.Run, "resume", signalled)
    command = FAST + ["--epochs", "1", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        pretrain.main(command)
    assert info.value.code == utils.REQUEUE_STATUS
    checkpoint = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (-1, 0) and not os.path.exists(tmp_path / "log.jsonl")
    monkeypatch.setattr(utils.Run, "resume", resume)
    pretrain.main(command)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]


def test_later_stages_build_the_class_attention_the_checkpoint_holds(tmp_path):
    """A pretraining run with one class-attention block: fine-tuning and the probe, given only --pretrained, build
    and load it (the depth comes from the checkpoint, as the widths do)."""
    pretrain.main(FAST + ["--epochs", "1", "--ca-depth", "1", "--output-dir", str(tmp_path / "pre")])
    run = ["--data", "synthetic", "--synthetic-size", "8", "--num-classes", "4", "--batch-size", "4", "--epochs", "1",
           "--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0",
           "--pretrained", str(tmp_path / "pre" / "checkpoint-last.pth")]
    finetune.main(run + ["--output-dir", str(tmp_path / "ft")])
    linprobe.main(run + ["--output-dir", str(tmp_path / "probe")])
    blocks = {stage: {k.split(".")[2] for k in torch.load(tmp_path / stage / "checkpoint-last.pth",
                                                          weights_only=True)["model"] if ".ca_blocks." in k}
              for stage in ("ft", "probe")}
    assert blocks == {"ft": set(), "probe": {"0"}}  # fine-tuning drops class attention after loading it
