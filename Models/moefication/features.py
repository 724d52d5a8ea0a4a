"""On-disk store of one layer's MoEfication features: FFN inputs x [n, d] and per-neuron activations h [n, d_ff].

A store is a directory:

    index.json         {"format", "version", "d", "d_ff", "x_dtype", "h_dtype", "shard_rows", "max_tokens",
                        "shards": [{"name": "00000", "rows": r}, …], "rows", "complete"}
    x_00000.npy        float16/float32 [r, d]     (plain .npy: loaded with allow_pickle=False, never unpickled)
    h_00000.npy        float16/float32 [r, d_ff]

`FeatureWriter.add(x, h, mask)` keeps the rows whose mask is true (padding is the caller's mask = False), stops at
`max_tokens`, and writes shards of `shard_rows` rows. Each shard file is written to a temporary name, fsynced and
renamed, and only then listed in index.json (itself replaced atomically), so after a kill the index names only whole
shards. `close()` writes the last, shorter shard and sets "complete".

Resume: opening a store that is not complete checks every listed shard (both files present, header and size
right), keeps the longest good prefix and removes everything else. The caller runs the model over the same token
stream again; the writer silently drops the first `rows` valid rows it is given (they are already on disk), so the
finished store equals the one an uninterrupted run writes. A complete store is final: adds are ignored.
"""
import glob
import json
import os

import numpy as np

from Utils.errors import UserError

FORMAT = "moefication-features"
VERSION = 1
INDEX = "index.json"
DTYPES = ("float16", "float32")


def layer_dir(root, layer, rank=None):
    """Conventional place of one layer's store (one per rank under mpirun, each rank writing its share)."""
    path = os.path.join(root, "layer_%03d" % int(layer))
    return path if rank is None else os.path.join(path, "rank_%03d" % int(rank))


def _shard_files(path, name):
    return os.path.join(path, "x_%s.npy" % name), os.path.join(path, "h_%s.npy" % name)


def _write_atomic(path, write):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _npy_ok(path, rows, cols, dtype):
    """True when the file is a complete .npy of shape [rows, cols] and this dtype (header + exact byte size)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
            else:
                return False
            offset = f.tell()
        size = os.path.getsize(path)
    except (OSError, ValueError):
        return False
    want = np.dtype(dtype)
    return (tuple(shape) == (rows, cols) and not fortran and dt == want
            and size == offset + rows * cols * want.itemsize)


def _read_index(path):
    index_path = os.path.join(path, INDEX)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError("%s: not a readable feature index (%s)" % (index_path, e)) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError("%s: not a %s v%d index" % (index_path, FORMAT, VERSION))
    return index


class FeatureWriter:
    """Write (or resume) one layer's feature store; use as a context manager or call close() at the end."""

    def __init__(self, path, d, d_ff, shard_rows=4096, max_tokens=None, x_dtype="float16", h_dtype="float16",
                 overwrite=False):
        for name, v in (("d", d), ("d_ff", d_ff), ("shard_rows", shard_rows)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError("%s: expected a positive integer, got %r" % (name, v))
        if max_tokens is not None and (not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0):
            raise UserError("max_tokens: expected a non-negative integer or None, got %r" % (max_tokens,))
        for name, v in (("x_dtype", x_dtype), ("h_dtype", h_dtype)):
            if str(v) not in DTYPES:
                raise UserError("%s: expected one of %s, got %r" % (name, "/".join(DTYPES), v))
        self.path = path
        self.meta = {"format": FORMAT, "version": VERSION, "d": int(d), "d_ff": int(d_ff), "x_dtype": str(x_dtype),
                     "h_dtype": str(h_dtype), "shard_rows": int(shard_rows)}
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.shards, self.complete = [], False
        self._buf_x, self._buf_h, self._buffered = [], [], 0
        os.makedirs(path, exist_ok=True)
        if overwrite or not os.path.exists(os.path.join(path, INDEX)):
            self._remove_files(keep=())  # a fresh store: no leftovers of an earlier one
        else:
            self._resume()
        self._skip = self.stored_rows  # rows of the replayed stream that are already on disk
        self._write_index()

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def stored_rows(self):
        return sum(s["rows"] for s in self.shards)

    @property
    def rows(self):
        """Rows kept so far (on disk + buffered)."""
        return self.stored_rows + self._buffered

    @property
    def full(self):
        """True once the budget is reached (or the store was already complete): the caller may stop."""
        return self.complete or (self.max_tokens is not None and self.rows >= self.max_tokens)

    @property
    def skip_remaining(self):
        """Valid rows still to be dropped from the replayed stream after a resume."""
        return self._skip

    # -- resume --------------------------------------------------------------------------------------------------
    def _resume(self):
        index = _read_index(self.path)
        index_path = os.path.join(self.path, INDEX)
        for key, value in self.meta.items():
            if index.get(key) != value:
                raise UserError("%s: existing store has %s=%r, this run asks for %r (use a new directory or "
                                "overwrite)" % (index_path, key, index.get(key), value))
        self.complete = bool(index.get("complete"))
        for shard in index.get("shards", []):
            xf, hf = _shard_files(self.path, shard["name"])
            if not (_npy_ok(xf, shard["rows"], self.meta["d"], self.meta["x_dtype"])
                    and _npy_ok(hf, shard["rows"], self.meta["d_ff"], self.meta["h_dtype"])):
                self.complete = False  # a damaged shard: everything from it on is written again
                break
            self.shards.append({"name": shard["name"], "rows": int(shard["rows"])})
        self._remove_files(keep=[s["name"] for s in self.shards])

    def _remove_files(self, keep):
        """Delete this store's shard and temporary files not in `keep` (never other files in the directory)."""
        keep_files = {f for name in keep for f in _shard_files(self.path, name)}
        patterns = ("x_*.npy", "h_*.npy", "x_*.npy.tmp.*", "h_*.npy.tmp.*", INDEX + ".tmp.*")
        for pattern in patterns:
            for f in glob.glob(os.path.join(self.path, pattern)):
                if f not in keep_files:
                    os.remove(f)
        if not keep and os.path.exists(os.path.join(self.path, INDEX)):
            os.remove(os.path.join(self.path, INDEX))

    # -- writing -------------------------------------------------------------------------------------------------
    def add(self, x, h, mask=None):
        """Keep rows of x [..., d] and h [..., d_ff] where mask [...] is true. Returns the number of rows kept."""
        if self.complete:
            return 0
        x, h = np.asarray(x), np.asarray(h)
        d, d_ff = self.meta["d"], self.meta["d_ff"]
        if x.ndim < 1 or x.shape[-1] != d:
            raise UserError("x: expected [..., %d] FFN inputs, got shape %s" % (d, x.shape))
        if h.shape[:-1] != x.shape[:-1] or h.ndim < 1 or h.shape[-1] != d_ff:
            raise UserError("h: expected %s activations, got shape %s" % (x.shape[:-1] + (d_ff,), h.shape))
        x, h = x.reshape(-1, d), h.reshape(-1, d_ff)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.size != x.shape[0]:
                raise UserError("mask: expected a bool array with %d entries, got %s %s" % (x.shape[0], mask.shape,
                                                                                           mask.dtype))
            keep = mask.reshape(-1)
            x, h = x[keep], h[keep]
        if self._skip:
            drop = min(self._skip, x.shape[0])
            x, h, self._skip = x[drop:], h[drop:], self._skip - drop
        if self.max_tokens is not None:
            room = max(0, self.max_tokens - self.rows)
            x, h = x[:room], h[:room]
        if x.shape[0] == 0:
            return 0
        with np.errstate(over="ignore"):  # overflow is reported just below, as a user error
            xc, hc = x.astype(self.meta["x_dtype"]), h.astype(self.meta["h_dtype"])
        # A silent fp16 overflow would store inf; say so instead (LLaMA's outlier features can exceed 65 504).
        for name, orig, cast in (("x", x, xc), ("h", h, hc)):
            if not np.isfinite(cast).all() and np.isfinite(orig).all():
                raise UserError("%s: values overflow %s; store them as float32" % (name, cast.dtype))
        self._buf_x.append(xc)
        self._buf_h.append(hc)
        self._buffered += x.shape[0]
        while self._buffered >= self.meta["shard_rows"]:
            self._flush(self.meta["shard_rows"])
        return x.shape[0]

    def _flush(self, rows):
        bx, bh = np.concatenate(self._buf_x), np.concatenate(self._buf_h)
        name = "%05d" % len(self.shards)
        xf, hf = _shard_files(self.path, name)
        _write_atomic(xf, lambda f: np.save(f, np.ascontiguousarray(bx[:rows]), allow_pickle=False))
        _write_atomic(hf, lambda f: np.save(f, np.ascontiguousarray(bh[:rows]), allow_pickle=False))
        self.shards.append({"name": name, "rows": int(rows)})
        self._buf_x, self._buf_h = ([bx[rows:]], [bh[rows:]]) if rows < bx.shape[0] else ([], [])
        self._buffered -= rows
        self._write_index()

    def _write_index(self):
        index = dict(self.meta, max_tokens=self.max_tokens, shards=self.shards, rows=self.stored_rows,
                     complete=self.complete)
        data = json.dumps(index, indent=1).encode()
        _write_atomic(os.path.join(self.path, INDEX), lambda f: f.write(data))

    def close(self):
        """Write the buffered rows as the last shard and mark the store complete."""
        if self.complete:
            return
        if self._buffered:
            self._flush(self._buffered)
        self.complete = True
        self._write_index()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:  # after an error the store stays resumable, not complete
            self.close()
        return False


class FeatureReader:
    """Read a store written by FeatureWriter; by default it must be complete."""

    def __init__(self, path, require_complete=True):
        self.path = path
        self.index = _read_index(path)
        if require_complete and not self.index.get("complete"):
            raise UserError("%s: the feature store is incomplete (its run was interrupted: run it again to resume)"
                            % os.path.join(path, INDEX))
        self.d, self.d_ff = int(self.index["d"]), int(self.index["d_ff"])
        self.shards = list(self.index["shards"])
        self.rows = sum(int(s["rows"]) for s in self.shards)

    def __len__(self):
        return len(self.shards)

    def shard(self, i, mmap=False):
        """(x, h) of shard i; mmap=True maps the files read-only instead of reading them."""
        s = self.shards[i]
        out = []
        for f, cols, dt in zip(_shard_files(self.path, s["name"]), (self.d, self.d_ff),
                               (self.index["x_dtype"], self.index["h_dtype"])):
            try:
                a = np.load(f, allow_pickle=False, mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as e:
                raise UserError("%s: unreadable feature shard (%s)" % (f, e)) from None
            if a.shape != (int(s["rows"]), cols) or a.dtype != np.dtype(dt):
                raise UserError("%s: shape %s %s, the index says (%d, %d) %s" % (f, a.shape, a.dtype, s["rows"],
                                                                                cols, dt))
            out.append(a)
        return tuple(out)

    def __iter__(self):
        for i in range(len(self.shards)):
            yield self.shard(i)

    def load(self, max_rows=None):
        """All rows (or the first max_rows) as two arrays."""
        xs, hs, n = [], [], 0
        for x, h in self:
            if max_rows is not None and n >= max_rows:
                break
            take = x.shape[0] if max_rows is None else min(x.shape[0], max_rows - n)
            xs.append(x[:take])
            hs.append(h[:take])
            n += take
        if not xs:
            return (np.zeros((0, self.d), self.index["x_dtype"]), np.zeros((0, self.d_ff), self.index["h_dtype"]))
        return np.concatenate(xs), np.concatenate(hs)
