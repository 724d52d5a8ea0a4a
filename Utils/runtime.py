"""Runtime set-up shared by every entry point and the tests: how Jittor is started on this machine.

`import_jittor()` is the only place that decides CPU vs CUDA, links Debian's oneDNN into Jittor's cache and quiets
the logs; `seed_everything()` gives every mpirun rank the same initial weights (Jittor's default differs per rank).
"""
import glob
import os
import shutil
import sys

_DNNL_DIR_NAME = "dnnl_lnx_2.2.0_cpu_gomp"  # the directory name Jittor's setup_mkl() looks for
_state = {"jt": None, "onednn": None}


def _cuda_usable():
    """True when a CUDA runtime library can really be loaded (nvcc alone is not enough)."""
    if os.environ.get("MOA_FORCE_CPU", "0") == "1":
        return False
    import ctypes
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        try:
            ctypes.CDLL("libcuda.so.1")  # the driver: without it there is no GPU to use
            return True
        except OSError:
            return False
    return False


def _jittor_home():
    return os.environ.get("JITTOR_HOME") or os.path.expanduser("~")


def link_onednn():
    """Make Debian's libdnnl look like the oneDNN tarball Jittor would otherwise download (no internet here).

    Returns a short status string; never raises (a missing oneDNN only makes CPU matmul slower).
    """
    mkl_root = os.path.join(_jittor_home(), ".cache", "jittor", "mkl")
    target = os.path.join(mkl_root, _DNNL_DIR_NAME)
    lib = os.path.join(target, "lib", "libmkldnn.so")
    if os.path.isfile(lib) and os.path.isfile(os.path.join(target, "include", "dnnl.hpp")):
        return "linked"
    header = "/usr/include/dnnl.hpp"
    libs = sorted(glob.glob("/usr/lib/*/libdnnl.so.*") + glob.glob("/usr/lib/libdnnl.so.*"))
    if not os.path.isfile(header) or not libs:
        return "missing (install Debian's libdnnl-dev for fast CPU matmul)"
    try:
        tmp = target + ".tmp%d" % os.getpid()
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "include"))
        os.makedirs(os.path.join(tmp, "lib"))
        # Only the dnnl headers: putting /usr/include itself on the -I path would shadow libc headers' order.
        for h in glob.glob("/usr/include/dnnl*") + ["/usr/include/oneapi"]:
            if os.path.exists(h):
                os.symlink(h, os.path.join(tmp, "include", os.path.basename(h)))
        os.symlink(libs[0], os.path.join(tmp, "lib", "libmkldnn.so"))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        return "linked"
    except OSError as e:  # another process won the race, or the cache is read-only
        if os.path.isfile(lib):
            return "linked"
        return "failed (%s)" % e


def import_jittor(quiet=True):
    """Import Jittor configured for this machine and return the module (idempotent)."""
    if _state["jt"] is not None:
        return _state["jt"]
    cuda = _cuda_usable()
    if not cuda:
        os.environ["nvcc_path"] = ""  # keeps Jittor from loading a CUDA runtime that is not there
    if quiet:
        os.environ.setdefault("log_silent", "1")
    _state["onednn"] = link_onednn()
    import jittor as jt
    # Jittor's core turns on flush-to-zero for the process; numpy then warns, once per dtype, that float64's
    # smallest subnormal is zero. Nothing to act on, so keep it out of users' terminals.
    import warnings
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    if cuda and jt.has_cuda:
        jt.flags.use_cuda = 1
    if _state["onednn"] != "linked" and not jt.flags.use_cuda:
        print("[moa-jittor] oneDNN %s: CPU matmul will be several times slower" % _state["onednn"], file=sys.stderr)
    _state["jt"] = jt
    return jt


def onednn_status():
    return _state["onednn"]


def device_name():
    jt = import_jittor()
    return "cuda" if jt.flags.use_cuda else "cpu"


def seed_everything(seed):
    """Seed python, numpy and Jittor with the same value on every MPI rank (same initial adapter weights)."""
    jt = import_jittor()
    jt.set_global_seed(int(seed), different_seed_for_mpi=False)


def rank():
    jt = import_jittor()
    return int(jt.rank) if jt.in_mpi else 0


def world_size():
    jt = import_jittor()
    return int(jt.world_size) if jt.in_mpi else 1


def is_main_process():
    return rank() == 0


def demo_threads_env():
    """OpenMP threads for a demo's child stages (set in os.environ, which they inherit): the user's OMP_NUM_THREADS,
    else 1 on a machine already busier than its CPU count (2-thread barriers then wait for preempted threads and a
    step runs several times slower), else OpenMP's default. Returns a line for the demo's log. Thread counts change
    float summation order, so runs at different loads need not agree bit for bit."""
    if "OMP_NUM_THREADS" in os.environ:
        return "%s (from the environment)" % os.environ["OMP_NUM_THREADS"]
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        os.environ["OMP_NUM_THREADS"] = "1"
        return "1 (the machine is busy: load %.1f on %d CPUs)" % (os.getloadavg()[0], os.cpu_count() or 1)
    return "OpenMP's default"
