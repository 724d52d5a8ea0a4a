"""Host collectives (mpi4py on the MPI world Jittor initialised) and the gradient all-reduce, under mpirun -np 2."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")

SCRIPT = r"""
import sys
sys.path.insert(0, %(root)r)
import numpy as np
from Utils import distributed as dist
from Utils.runtime import import_jittor
jt = import_jittor()
r, w = dist.rank(), dist.world_size()
assert w == 2
# float64 sums stay exact where a float32 reduction would not
big = dist.all_reduce_sum([1e12 + r, 0.1 * (r + 1)])
assert big[0] == 2e12 + 1 and abs(big[1] - 0.3) < 1e-15, big
assert dist.all_reduce_mean([r]).tolist() == [0.5]
assert dist.gather_objects({"rank": r, "preds": ["a"] * (r + 1)}) == [{"rank": 0, "preds": ["a"]},
                                                                       {"rank": 1, "preds": ["a", "a"]}]
assert dist.broadcast_object("from %%d" %% r) == "from 0"
assert dist.main_decides(r == 0) is True and dist.main_decides(r == 1) is False
g = dist.all_reduce_grads_mean([jt.array(np.full((2, 3), r, np.float32)), jt.array(np.array([2.0 * r], np.float32))])
assert np.allclose(g[0].numpy(), 0.5) and np.allclose(g[1].numpy(), 1.0)
dist.barrier()
# one write: an unbuffered print("OK", r) writes its four pieces apart, and two ranks' pieces can interleave
sys.stdout.write("OK %%d\n" %% r)
"""


def test_host_collectives_under_mpirun(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT % {"root": ROOT})
    r = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(script)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(line for line in r.stdout.splitlines() if line.startswith("OK")) == ["OK 0", "OK 1"]


def test_single_process_collectives_are_identities():
    from Utils import distributed as dist
    assert dist.all_reduce_sum([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert dist.gather_objects("x") == ["x"]
    assert dist.broadcast_object(3) == 3 and dist.main_decides(True) is True
    dist.barrier()
