"""Beyond one process (SPEC 10): `--shard i/K` and `torchrun` split the realizations and give
the single-process store bit for bit; a killed rank is finished by a rerun; the store may be a
`memory://` or `file://` URL.
"""

import json
import subprocess
import sys
import uuid

import pytest

from edtool.study.aggregate import aggregate_run
from edtool.errors import EdtoolError
from edtool.study.compute import compute
from edtool.study.plots import plot_run
from edtool.store.locks import lock_holders
from edtool.store.run import open_run
from helpers import assert_same_arrays, cli, config, PNG, REPO, snapshot, subprocess_env, wait_for_done_cell

pytestmark = pytest.mark.usefixtures("tiny_networks")

# torchrun runs: enough work per rank that one can be killed mid-run
TORCHRUN_RUN = dict(nsteps=3, realizations=4, probes=32)


def compute_args(run_dir, nsteps, realizations, probes):
    return ["compute", "--models", "resnet,is", "--nsteps", str(nsteps), "--realizations", str(realizations),
            "--probes", str(probes), "--device", "cpu", "--run-dir", str(run_dir)]


def torchrun(run_dir, **kw):
    """`torchrun --standalone --nproc-per-node 2 -m edtool compute ...` (gloo on CPU, a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edtool",
           *compute_args(run_dir, **{**TORCHRUN_RUN, **kw})]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture
def single_process_run(computed_run):
    """The reference: the torchrun settings (models resnet,is: compute_args) computed by one process."""
    return computed_run(models=["resnet", "is"], **TORCHRUN_RUN)


def test_shards_together_equal_one_process_and_rerun_alone(tmp_path, capsys, monkeypatch, computed_run):
    single = computed_run(realizations=5)
    code, _, err = cli(capsys, monkeypatch, *compute_args(tmp_path / "sharded", 2, 5, 2), "--shard", "1/2", "--quiet")
    assert code == 0, err
    done = open_run(tmp_path / "sharded").done_mask()
    assert done.tolist() == [[False] * 2, [True] * 2, [False] * 2, [True] * 2, [False] * 2]  # r % 2 == 1
    partial = aggregate_run(tmp_path / "sharded")  # a partly finished run aggregates what it has
    assert (partial["realizations_used"], partial["realizations_total"]) == (2, 5)
    assert partial["resnet"]["num_realizations"] == 2
    compute(config(tmp_path / "sharded", realizations=5, shard=(0, 2)))
    assert_same_arrays(tmp_path / "sharded", single)

    before = snapshot(tmp_path / "sharded")  # a shard rerun alone on a finished run computes nothing
    summary = compute(config(tmp_path / "sharded", realizations=5, shard=(0, 2)))
    assert summary["progress"]["done"] == 10 and snapshot(tmp_path / "sharded") == before

    for i in (2, 0, 1):  # another K, in any order, gives the same store
        compute(config(tmp_path / "three", realizations=5, shard=(i, 3)))
    assert_same_arrays(tmp_path / "three", single)


@pytest.mark.slow  # two torchrun processes, 17-25 s on 2 cores
def test_torchrun_two_ranks_equal_one_process(tmp_path, single_process_run):
    proc = torchrun(tmp_path / "run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("mean ||J-J^T||_F") == 1  # rank 0 alone prints the results table
    assert_same_arrays(tmp_path / "run", single_process_run)
    assert lock_holders(tmp_path / "run") == []
    from edtool.store.status import run_status

    assert run_status(str(tmp_path / "run"))["shards"] == ["shard 0/2: complete (4/4 cells)",
                                                            "shard 1/2: complete (4/4 cells)"]


@pytest.mark.slow  # two torchrun processes, 17-25 s on 2 cores
def test_killed_rank_then_rerun_finishes_the_run(tmp_path, single_process_run):
    proc = torchrun(tmp_path / "run")
    try:
        wait_for_done_cell(tmp_path / "run", proc, timeout=240)
        ranks = {h["shard"]: h["pid"] for h in lock_holders(tmp_path / "run")}
        assert set(ranks) == {"0/2", "1/2"}, ranks  # each rank holds the lock of its own realizations
        subprocess.run(["kill", "-KILL", str(ranks["1/2"])], check=True)
        proc.communicate(timeout=120)  # torchrun stops the other rank and fails
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    interrupted = open_run(tmp_path / "run").done_mask()
    assert not interrupted.all(), "the run finished before a rank could be killed: give it more work"
    assert all(h["stale"] for h in lock_holders(tmp_path / "run"))

    rerun = torchrun(tmp_path / "run")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "taking over" in err
    assert_same_arrays(tmp_path / "run", single_process_run)
    assert lock_holders(tmp_path / "run") == []


SHORT_TIMEOUT = """import sys
from datetime import timedelta
from torch.distributed import distributed_c10d
distributed_c10d.default_pg_timeout = timedelta(seconds=1)  # torch's collective timeout, 30 minutes, shortened
from edtool.cli import main
sys.argv[0] = "edtool"
main()
"""


@pytest.mark.slow  # two torchrun processes, 15-25 s on 2 cores
def test_a_rank_with_nothing_left_waits_for_the_other(tmp_path, single_process_run):
    """A resumed run where rank 1's realizations are all done: it waits at the final barrier while rank 0
    computes (about 3 s here). The wait must not depend on torch's collective timeout (30 minutes, 1 s
    here): before, rank 1 gave up after it and torchrun stopped rank 0 mid-run."""
    compute(config(tmp_path / "run", **TORCHRUN_RUN, shard=(1, 2)))  # rank 1's share, done beforehand
    wrapper = tmp_path / "edtool_short_timeout.py"
    wrapper.write_text(SHORT_TIMEOUT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
           *compute_args(tmp_path / "run", **TORCHRUN_RUN), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_arrays(tmp_path / "run", single_process_run)
    assert lock_holders(tmp_path / "run") == []


# ------------------------------------------------------------------ store URLs


def test_memory_url_through_the_python_api(tmp_path, computed_copy):
    url = f"memory://edtool-test-{uuid.uuid4().hex}/run"
    with pytest.warns(UserWarning, match="no lock"):
        compute(config(url, realizations=3, shard=(1, 2)))
        assert open_run(url).done_mask().sum() == 2
        compute(config(url, realizations=3, shard=(0, 2)))
    computed_copy(tmp_path / "local", realizations=3)  # a copy: aggregate_run below writes into it
    assert_same_arrays(url, tmp_path / "local")
    with pytest.warns(UserWarning, match="no lock"):
        again = compute(config(url, realizations=3))  # the same settings: a finished run, nothing to do
    assert again["progress"]["done"] == 6
    assert_same_arrays(url, tmp_path / "local")
    with pytest.raises(EdtoolError, match="nsteps=2.*nsteps=3"), pytest.warns(UserWarning, match="no lock"):
        compute(config(url, realizations=3, nsteps=3))

    summary = aggregate_run(url)
    local = aggregate_run(tmp_path / "local")
    assert summary["resnet"]["mean_ed_magnitude"] == local["resnet"]["mean_ed_magnitude"]
    paths = plot_run(url, out_dir=tmp_path / "figures")
    assert {p.name for p in paths} >= {"ed_analysis_single.png", "ed_analysis_aggregated.png", "asym_vs_time.png"}
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_file_url_through_the_cli(tmp_path, capsys, monkeypatch, computed_run):
    url = f"file://{tmp_path}/run"
    code, _, err = cli(capsys, monkeypatch, *compute_args(url, 2, 2, 2), "--quiet")
    assert code == 0, err
    assert (tmp_path / "run" / "ed.zarr").is_dir()
    assert_same_arrays(tmp_path / "run", computed_run())
    code, _, err = cli(capsys, monkeypatch, *compute_args(url, 3, 2, 2), "--quiet")
    assert code == 2 and "nsteps=2" in err, err
    code, out, err = cli(capsys, monkeypatch, "aggregate", url)
    assert code == 0 and "aggregated 2 of 2" in out, err
    assert json.loads((tmp_path / "run" / "summary_stats.json").read_text())["resnet"]["num_realizations"] == 2
    code, out, err = cli(capsys, monkeypatch, "status", url, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["state"] == "complete"
