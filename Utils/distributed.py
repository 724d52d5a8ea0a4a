"""Data-parallel helpers for mpirun (the replacement of the reference's DDP set-up).

Gradients travel through Jittor's MPI ops (one flat float32 all-reduce per optimizer step). Everything on the host —
float64 sums, gathering Python objects (predictions), broadcasting a decision from rank 0, barriers — goes
through mpi4py on the same MPI world: Jittor calls MPI_Init when it is imported under mpirun, so mpi4py is told not
to initialise or finalise MPI itself.

Every function here is a collective: call it on *every* rank, in the same order. Outside mpirun they are cheap
no-ops. Only pure-Python I/O may sit behind `is_main_process()`.
"""
import numpy as np

from Utils.runtime import import_jittor, is_main_process, rank, world_size  # noqa: F401  (re-exported)

_comm = {"world": None}


def launcher_rank():
    """This process's rank as mpirun states it in the environment, without starting MPI or Jittor (cheap paths such
    as `inference.py --score_only`, where only rank 0 works)."""
    import os
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))


def in_mpi():
    return world_size() > 1


def comm():
    """mpi4py's COMM_WORLD, on the MPI that Jittor initialised (None outside mpirun)."""
    if not in_mpi():
        return None
    if _comm["world"] is None:
        import_jittor()  # MPI_Init happens when Jittor's MPI extension loads
        import mpi4py
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
        from mpi4py import MPI
        _comm["world"] = MPI.COMM_WORLD
    return _comm["world"]


def all_reduce_sum(values):
    """Sum over ranks of a float vector, in float64 on the host (counts stay exact)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    c = comm()
    if c is None:
        return arr
    from mpi4py import MPI
    out = np.empty_like(arr)
    c.Allreduce(arr, out, op=MPI.SUM)
    return out


def all_reduce_mean(values):
    """Mean over ranks of a float vector (numpy in, numpy float64 out)."""
    return all_reduce_sum(values) / world_size()


def all_reduce_grads_mean(grads):
    """Average a list of gradient Vars over ranks with ONE all-reduce (flatten, reduce, split)."""
    if not in_mpi() or not grads:
        return list(grads)
    jt = import_jittor()
    flat = jt.concat([g.reshape(-1) for g in grads]).mpi_all_reduce("mean")
    out, offset = [], 0
    for g in grads:
        n = int(np.prod(g.shape))
        out.append(flat[offset:offset + n].reshape(g.shape))
        offset += n
    return out


def broadcast_params(params):
    """Copy rank 0's values into every Var of `params` (same initial weights everywhere)."""
    if not in_mpi():
        return
    jt = import_jittor()
    for p in params:
        p.update(p.mpi_broadcast(0))
    jt.sync(list(params))


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable Python objects, e.g. predictions)."""
    c = comm()
    return [obj] if c is None else c.allgather(obj)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    c = comm()
    return obj if c is None else c.bcast(obj, root=0)


def main_decides(flag):
    """Rank 0's boolean, on every rank (e.g. "the output-dir lock was acquired")."""
    return bool(broadcast_object(bool(flag)))


def barrier():
    c = comm()
    if c is not None:
        c.Barrier()
