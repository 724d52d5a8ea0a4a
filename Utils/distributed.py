"""Data-parallel helpers for mpirun (the port's replacement of the reference's DDP set-up, SPEC §5.6).

Every function here is a collective: call it on *every* rank, in the same order (JITTOR_NOTES A4). Outside
mpirun they are cheap no-ops. Only pure-Python I/O may sit behind `is_main_process()`.
"""
import numpy as np

from Utils.runtime import import_jittor, is_main_process, rank, world_size  # noqa: F401  (re-exported)


def in_mpi():
    return world_size() > 1


def all_reduce_mean(values):
    """Mean over ranks of a float vector (numpy in, numpy float64 out)."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if not in_mpi():
        return arr.astype(np.float64)
    jt = import_jittor()
    return jt.array(arr).mpi_all_reduce("mean").numpy().astype(np.float64)


def all_reduce_sum(values):
    """Sum over ranks of a float vector, accumulated in float64 on the host so counts stay exact."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not in_mpi():
        return arr
    # Jittor's MPI ops work on float32; split into high and low parts to keep ~1e-14 relative precision.
    jt = import_jittor()
    hi = arr.astype(np.float32)
    lo = (arr - hi.astype(np.float64)).astype(np.float32)
    out = jt.array(np.concatenate([hi, lo])).mpi_all_reduce("add").numpy().astype(np.float64)
    return out[:arr.size] + out[arr.size:]


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
    """Copy rank 0's values into every Var of `params` (same initial adapters everywhere)."""
    if not in_mpi():
        return
    jt = import_jittor()
    for p in params:
        p.update(p.mpi_broadcast(0))
    jt.sync(list(params))


def main_decides(flag):
    """Rank 0's boolean, on every rank (e.g. "the output-dir lock was acquired")."""
    if not in_mpi():
        return bool(flag)
    jt = import_jittor()
    return bool(jt.array(np.array([1.0 if flag else 0.0], np.float32)).mpi_broadcast(0).item() > 0.5)


def barrier():
    all_reduce_sum([0.0])
