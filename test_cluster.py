"""pretrain.sbatch under stub Slurm commands: two "nodes" on this machine, one CPU process each."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# 2 epochs of 6 steps (96 synthetic images, global batch 16): a stop after step 1 leaves 10 steps to go.
FLAGS = ["--data", "synthetic", "--synthetic-size", "96", "--arch", "vit_fixture", "--img-size", "32",
         "--patch-size", "8", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--proj-dim", "32",
         "--proj-hidden-dim", "64", "--mask-ratio", "0.75", "--num-masks", "2", "--device", "cpu",
         "--num-workers", "0", "--print-freq", "1"]


def stub_slurm(folder):
    """srun: one copy of the command per node (their pids in `tasks`); scontrol: two host names, and a requeue
    appended to `requeued`, after a line if the tasks still run; scancel: the signal to the step's tasks."""
    stubs = {
        "srun": f"""while [[ $1 == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" & pids+=($!)
done
echo "${{pids[@]}}" > {folder}/tasks
status=0
for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
exit $status""",
        "scontrol": f"""case $1 in
    show) printf 'localhost\\nlocalhost\\n' ;;
    requeue) kill -0 $(cat {folder}/tasks) 2> /dev/null && echo "tasks still run" >> {folder}/requeued
             echo "$2" >> {folder}/requeued ;;
esac""",
        "scancel": f"""[[ $1 == --signal=TERM && $2 == "$SLURM_JOB_ID" ]] || exit 1
kill -TERM $(cat {folder}/tasks)""",
    }
    for name, text in stubs.items():
        (folder / name).write_text("#!/bin/bash\n" + text + "\n")
        (folder / name).chmod(0o755)


def read_epochs(folder):
    if not os.path.exists(folder / "log.jsonl"):
        return []
    with open(folder / "log.jsonl") as f:
        return [json.loads(line)["epoch"] for line in f]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_two_nodes_stop_requeue_resume(tmp_path):
    """Two nodes of one process train as one run of two; USR1 to the batch shell leaves a mid-epoch checkpoint, then
    a recorded requeue; the job run again resumes and ends the run with one log line per epoch."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    stub_slurm(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "NPROC_PER_NODE": "1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = ["bash", "pretrain.sbatch", *FLAGS, "--output-dir", str(out)]
    job = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.startswith("epoch 0 step 1/6"):  # a step done, 11 to go
            job.send_signal(signal.SIGUSR1)  # --signal=B:USR1 signals the batch shell only
            break
    try:
        lines += job.communicate(timeout=120)[0].splitlines(keepends=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail("the job left processes behind")
    text = "".join(lines)
    assert job.returncode == 143, text[-3000:]
    assert re.search(r"^\S+ [\d.]+M online params \| 96 images, 2 process\(es\) x 8 x 1 = batch 16 ", text, re.M)
    saved = re.findall(r"^SIGTERM: saved \S+ at epoch (\d) step (\d)/6; exiting with status 143", text, re.M)
    assert len(saved) == 1, text[-3000:]  # rank 0 says it once
    epoch, step = map(int, saved[0])
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (epoch - 1, step) and 1 < epoch * 6 + step < 12
    assert read_epochs(out) == list(range(epoch))
    assert (bin_dir / "requeued").read_text() == "77\n"  # once, after every task had ended

    rerun = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {out}/checkpoint-last.pth (" in rerun.stdout
    assert read_epochs(out) == [0, 1]
    assert (bin_dir / "requeued").read_text() == "77\n"
