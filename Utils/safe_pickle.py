"""Reading the pickles the project writes — training checkpoints (`--resume`) and routing dumps — without letting a
file run code: a restricted unpickler that admits only what those files hold.

Admitted: builtin containers and scalars (no global needed), `collections.OrderedDict`, and numpy arrays, dtypes
and scalars through numpy's own reconstruct helpers (`numpy.core.multiarray._reconstruct` / `scalar`,
`numpy.ndarray`, `numpy.dtype`; the `numpy._core` spellings of pickles from numpy 2; `_frombuffer` of protocol 5).
Python's `random.getstate()` and numpy's `get_state()` tuples are made of these. Any other global — `os.system`,
`builtins.eval`, a class of some module — is refused with a UserError naming the file and `module.name`, before
anything is called.
"""
import collections
import importlib
import pickle

from Utils.errors import UserError

_NUMPY_HELPERS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
           ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray")}
ALLOWED |= {("numpy.%s.%s" % (core, mod), name) for core in ("core", "_core") for mod, name in _NUMPY_HELPERS}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise UserError("%s: refused to unpickle %s.%s (only numpy arrays and plain Python values are read; "
                            "this file may have been crafted to run code)" % (self.source, module, name))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise UserError("%s: refused to unpickle a persistent reference %r" % (self.source, pid))


def load(path, what="pickle"):
    """Unpickle `path` with RestrictedUnpickler; a refused global or a corrupt file is a one-line UserError."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except UserError:
        raise
    except OSError as e:
        raise UserError("%s: cannot read the %s (%s)" % (path, what, e.strerror or e))
    except Exception as e:  # unpickling a corrupt file can raise almost anything
        raise UserError("%s: not a readable %s (%s: %s)" % (path, what, type(e).__name__, str(e)[:80]))
