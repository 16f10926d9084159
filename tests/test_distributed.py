"""Data parallelism over MPI (mnn.distributed): jobs of 2 and 3 ranks launched with mpiexec, each with a timeout.

The ranks' collectives (tests/distributed_checks.py), whole training runs
through the command line against one process on the global batch, resume,
the classifier's shards, gradient accumulation, and a rank that fails.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mnn.train.classifier
from fake_data import write_fake_mnist
from mnn.cli import main
from mnn.distributed import World, shard
from mnn.io import CHECKPOINT_NAME
from mnn.io.checkpoint import read_checkpoint
from mnn.train.classifier import ClassifierTask, MLPTrainConfig

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside python: pip install 'manual-nn[mpi]'")
TEXT = "to be or not to be, that is the question; whether 'tis nobler in the mind to suffer. " * 30
GPT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--max-iters", "6",
       "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1", "--warmup-iters", "2"]


def mpiexec(n: int, args: list, timeout: float = 90, cwd=None) -> subprocess.CompletedProcess:
    """``mpiexec -n n ARGS`` (oversubscribed, allowed as root) with a timeout; its output."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    command = [str(MPIEXEC), "--oversubscribe", "-n", str(n), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def mnn_train(n: int, *args) -> subprocess.CompletedProcess:
    done = mpiexec(n, [sys.executable, "-m", "mnn.cli", "train", *args])
    assert done.returncode == 0, done.stderr
    return done


def tensors(folder: Path) -> dict:
    return load_file(str(folder / CHECKPOINT_NAME))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if not np.array_equal(a[key], b[key])]
    assert not different, different


def loss_lines(text: str) -> list:
    return re.findall(r"step \d+ \| loss [0-9.]+ \| lr [0-9.e+-]+", text)  # without the timings


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("ranks", [2, 3])
def test_collectives_broadcast_average_accumulate_and_keep_ranks_equal(ranks):
    done = mpiexec(ranks, [sys.executable, HERE / "distributed_checks.py"])
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.split() if line != "ok"][:6] == [
        "broadcast", "average", "no_sync", "buckets", "steps", "mean"]


def test_two_ranks_train_a_gpt_as_one_process_on_twice_the_batch(text_file, tmp_path, capsys):
    """Bitwise: each rank's slice of the shared draw is one thread replica's slice of the global batch, and
    halving the upstream gradient (one process) or the summed gradient (two ranks) is exact."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "gpt", "--data", str(text_file), *GPT, "--batch-size", "8", "--replicas", "2",
                 "--out", str(one)]) == 0
    single = capsys.readouterr().out
    done = mnn_train(2, "gpt", "--data", text_file, *GPT, "--batch-size", "4", "--out", two)
    assert "global batch 8 = 4 per rank x 2 ranks x 1 micro-steps (64 tokens per iteration)" in done.stdout
    assert len(loss_lines(single)) == 6
    assert loss_lines(done.stdout) == loss_lines(single)  # the logged loss is the mean over the ranks
    assert done.stdout.count("step 6 | loss") == 1  # rank 0 alone logs
    assert_bitwise_equal(tensors(one), tensors(two))
    metadata = read_checkpoint(two / CHECKPOINT_NAME)[1]
    assert json.loads(metadata["world_size"]) == 2 and metadata["train_config"]["replicas"] == 1


def test_two_rank_resume_is_exact_and_another_rank_count_is_refused(text_file, tmp_path, capsys):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    options = ["--data", text_file, *GPT, "--batch-size", "3", "--dropout", "0.2"]  # per-rank dropout streams
    mnn_train(2, "gpt", *options, "--out", straight)
    mnn_train(2, "gpt", *options, "--max-iters", "3", "--out", halves)
    mnn_train(2, "gpt", "--resume", halves, "--max-iters", "6")
    assert_bitwise_equal(tensors(straight), tensors(halves))
    assert main(["train", "gpt", "--resume", str(halves), "--max-iters", "9"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "written by 2 rank(s), this run has 1" in line and "mpiexec -n 2" in line


def test_two_ranks_train_an_mlp_as_one_process_on_twice_the_batch(tmp_path):
    """Not bitwise: one process multiplies 2B rows in one product, two ranks B rows each; SGD keeps it close.
    600 images in global batches of 32: the last, of 24, is cut 12 and 12."""
    data = tmp_path / "mnist"
    write_fake_mnist(data)
    common = ["--dataset", "mnist", "--data-dir", str(data), "--optimizer", "sgd", "--lr", "0.05",
              "--schedule", "constant", "--hidden", "32", "--epochs", "2"]
    assert main(["train", "mlp", *common, "--batch-size", "32", "--out", str(tmp_path / "one")]) == 0
    mnn_train(2, "mlp", *common, "--batch-size", "16", "--out", tmp_path / "two")
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert read_checkpoint(tmp_path / "two" / CHECKPOINT_NAME)[1]["step"] == 2 * 19


def test_two_ranks_train_a_cnn_as_one_process_in_two_replicas(tmp_path):
    """Bitwise, BatchNorm's running statistics included: rank 0's buffers are broadcast before every step, as
    DataParallel copies replica 0's; 120 images in global batches of 32, the last (24) cut 12 and 12."""
    data = tmp_path / "mnist"
    write_fake_mnist(data, train=120, test=20)
    common = ["--dataset", "mnist", "--data-dir", str(data), "--channels", "2", "4", "--hidden", "8"]
    assert main(["train", "cnn", *common, "--batch-size", "32", "--out", str(tmp_path / "one")]) == 0
    mnn_train(2, "cnn", *common, "--batch-size", "16", "--out", tmp_path / "two")
    assert_bitwise_equal(tensors(tmp_path / "one"), tensors(tmp_path / "two"))
    assert "1.running_mean" in tensors(tmp_path / "two")


def fake_world(rank: int, size: int) -> World:
    group = World()
    group.rank, group.size = rank, size
    return group


def test_classifier_shards_are_disjoint_cover_each_epoch_and_change_with_it(tmp_path, monkeypatch):
    data = tmp_path / "mnist"
    write_fake_mnist(data, train=100, test=20)
    seen = {}  # (rank, epoch) -> training-set rows, in order
    for rank in range(2):
        monkeypatch.setattr(mnn.train.classifier, "world", lambda rank=rank: fake_world(rank, 2))
        config = MLPTrainConfig(dataset="mnist", data_dir=str(data), batch_size=16, hidden=[4], epochs=2)
        task = ClassifierTask(config)
        rows = {image.tobytes(): index for index, image in enumerate(task.x_train)}
        assert task.steps_per_epoch == 4  # ceil(100 / 32)
        for step in range(task.total_steps):
            task.optimizer.zero_grad()
            recorded = []
            forward = task.model.forward
            task.model.forward = lambda x, forward=forward: recorded.append(x) or forward(x)
            task.forward_backward(step)
            task.model.forward = forward
            found = [rows[image.tobytes()] for batch in recorded for image in batch]
            seen.setdefault((rank, step // 4 + 1), []).extend(found)
    for epoch in (1, 2):
        first, second = seen[(0, epoch)], seen[(1, epoch)]
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(100))
        assert len(first) == len(second) == 16 * 3 + 2  # the last global batch, of 4 rows, cut in two
    assert seen[(0, 1)] != seen[(0, 2)]
    assert [shard(32, i, 2) for i in range(2)] == [slice(0, 16), slice(16, 32)]
    assert [shard(5, i, 4) for i in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 5)]


def test_grad_accum_equals_one_step_on_the_larger_batch(text_file, tmp_path):
    """One process: 2 micro-batches of 4 windows against 8 windows at once (the same windows), one step.

    No clipping (it would hide a wrong scale, as AdamW's update does): AdamW's first moments are the
    gradients times 0.1, compared with the weights."""
    runs = {}
    for name, options in [("accum", ["--batch-size", "4", "--grad-accum", "2"]), ("big", ["--batch-size", "8"])]:
        out = tmp_path / name
        assert main(["train", "gpt", "--data", str(text_file), *GPT, "--max-iters", "1", "--grad-clip", "1e9",
                     "--replicas", "1", "--out", str(out), *options]) == 0
        runs[name] = tensors(out)
    for key in runs["big"]:
        np.testing.assert_allclose(runs["accum"][key], runs["big"][key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert runs["big"]["optim.step"] == 1


def test_two_ranks_with_grad_accum_equal_one_process_on_four_times_the_batch(text_file, tmp_path):
    no_clip = ["--grad-clip", "1e9"]
    assert main(["train", "gpt", "--data", str(text_file), *GPT, *no_clip, "--batch-size", "8", "--replicas", "1",
                 "--out", str(tmp_path / "one")]) == 0
    mnn_train(2, "gpt", "--data", text_file, *GPT, *no_clip, "--batch-size", "2", "--grad-accum", "2", "--out",
              tmp_path / "two")
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)


FAULTY = """
import os, signal, sys
import mnn.train.language_model as lm
from mnn.distributed import world
from mnn.cli import main
how, at = sys.argv[1], int(sys.argv[2])
original = lm.LanguageModelTask.forward_backward
def faulty(self, step, micro=0):
    if world().rank == 1 and step == at:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure")
    return original(self, step, micro)
lm.LanguageModelTask.forward_backward = faulty
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_and_keeps_the_last_checkpoint(text_file, tmp_path, how):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    out = tmp_path / "run"
    started = time.monotonic()
    done = mpiexec(2, [sys.executable, script, how, 4, "train", "gpt", "--data", text_file, *GPT,
                       "--batch-size", "2", "--checkpoint-interval", "2", "--out", out], timeout=60)
    assert time.monotonic() - started < 60
    assert done.returncode != 0
    if how == "raise":
        errors = [line for line in done.stderr.splitlines() if line.startswith("mnn: error")]
        assert errors == ["mnn: error: rank 1: injected failure"], done.stderr
    tensors_, metadata = read_checkpoint(out / CHECKPOINT_NAME)  # intact: the checksum and every tensor read
    assert metadata["step"] == 4 and tensors_


RSH_AGENT = """#!/bin/sh
# Open MPI's rsh agent here: run "HOST command..." in the network namespace of HOST, under a host name of its own.
host="$1"; shift
case "$host" in
{cases}
  *) echo "unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $ns; $*"
"""


@pytest.fixture
def two_hosts(tmp_path):
    """Two network namespaces joined by a veth pair, each a "machine" with its own address and host name."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, ip (iproute2) and unshare for network namespaces")
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    names = [f"mnn{os.getpid()}{side}" for side in "ab"]
    hosts = [f"{subnet}.1", f"{subnet}.2"]
    commands = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
                ["ip", "link", "add", f"v{os.getpid()}a", "type", "veth", "peer", "name", f"v{os.getpid()}b"]]
    for name, host, side in zip(names, hosts, "ab"):
        link = f"v{os.getpid()}{side}"
        commands += [["ip", "link", "set", link, "netns", name],
                     ["ip", "-n", name, "addr", "add", f"{host}/24", "dev", link],
                     ["ip", "-n", name, "link", "set", link, "up"], ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            if subprocess.run(command, capture_output=True).returncode:
                pytest.skip(f"this machine does not allow {' '.join(command)}")
        agent = tmp_path / "rsh.sh"
        agent.write_text(RSH_AGENT.format(cases="\n".join(f"  {h}) ns={n} ;;" for h, n in zip(hosts, names))))
        agent.chmod(0o755)
        yield names, hosts, subnet, agent
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_ranks_on_two_hosts_over_tcp_train_as_one_process(text_file, tmp_path, two_hosts):
    """Two "machines" (network namespaces, a veth pair, Open MPI over TCP only): the GPT run is bitwise the one
    process at twice the batch, as on one machine."""
    names, hosts, subnet, agent = two_hosts
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "gpt", "--data", str(text_file), *GPT, "--batch-size", "8", "--replicas", "2",
                 "--out", str(one)]) == 0
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OPENBLAS_NUM_THREADS": "1", "PATH": f"{MPIEXEC.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    mpiexec_ = [str(MPIEXEC), "--host", f"{hosts[0]}:1,{hosts[1]}:1", "-n", "2", "--mca", "plm_rsh_agent", str(agent),
                "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", f"{subnet}.0/24",
                "--mca", "oob_tcp_if_include", f"{subnet}.0/24", "-x", "PYTHONPATH", "-x", "PATH",
                "-x", "OPENBLAS_NUM_THREADS", sys.executable, "-m", "mnn.cli", "train", "gpt", "--data", str(text_file),
                *GPT, "--batch-size", "4", "--out", str(two)]
    launcher = ["ip", "netns", "exec", names[0], "unshare", "--uts", "/bin/sh", "-c",
                f"hostname {names[0]}; exec " + " ".join(shlex.quote(part) for part in mpiexec_)]
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr
    assert "global batch 8 = 4 per rank x 2 ranks" in done.stdout
    assert_bitwise_equal(tensors(one), tensors(two))


def test_replicas_beyond_the_cores_are_refused_in_one_line(text_file, tmp_path):
    cores = os.cpu_count()
    done = mpiexec(2, [sys.executable, "-m", "mnn.cli", "train", "gpt", "--data", text_file, *GPT,
                       "--replicas", str(cores), "--out", tmp_path / "run"], timeout=60)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("mnn: error")]
    assert errors == [f"mnn: error: --replicas {cores} with 2 ranks on this machine makes {2 * cores} threads for "
                      f"its {cores} cores: give --replicas {max(1, cores // 2)} or leave it out (ranks already use "
                      "every core)"]
