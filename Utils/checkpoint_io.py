"""Checkpoint file formats, torch-free: PyTorch's zip `.pth` and Hugging Face safetensors, read and written.

Only file formats live here (no model knowledge, no Jittor): `{name: numpy array}` dicts in and out, and
`LazyTensor`s for safetensors read one tensor at a time, so a loader never holds a whole checkpoint in numpy beside
the model. Which name means which parameter is `Models/checkpoints.py`'s business. bf16 has no numpy dtype, so it
travels as its uint16 bit pattern (`Bf16Bits`) on the way out and is widened to float32 on the way in.
"""
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np

from Utils.errors import UserError

# torch storage class name ↔ numpy dtype; "BFloat16" is read as uint16 bits and widened to float32.
_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
             "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?"}
_ST_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?"}
_DTYPE_NAMES = {"<f4": "float32", "<f8": "float64", "<f2": "float16", "<u2": "bfloat16", "<i8": "int64",
                "<i4": "int32", "<i2": "int16", "|i1": "int8", "|u1": "uint8", "|b1": "bool"}  # LazyTensor.dtype
_ALIGN = 64  # torch's PyTorchStreamWriter aligns every record's data to 64 bytes (kFieldAlignment)


class Bf16Bits:
    """A uint16 array holding bfloat16 bit patterns, so writers can tell it from a real uint16 tensor."""

    def __init__(self, bits):
        self.bits = _contiguous(np.asarray(bits, dtype=np.uint16))


def _contiguous(a):
    return a if a.flags.c_contiguous else a.copy(order="C")  # np.ascontiguousarray would turn 0-d into 1-d


def to_bf16_bits(x):
    """float32 → bfloat16 bit patterns (uint16), round-to-nearest-even like torch's `.bfloat16()`; NaN stays NaN."""
    x = _contiguous(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32)
    r = (u >> 16) & 1            # in place from here on: one uint32 temporary, not five (converters stream GBs)
    r += 0x7FFF
    r += u
    r >>= 16
    out = r.astype(np.uint16)
    del r
    out[np.isnan(x)] = 0x7FC0
    return out


def bf16_bits_to_float32(bits):
    out = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def _encode(value, dtype):
    """(kind, contiguous little-endian array) with kind in 'bf16' / numpy dtype string; dtype converts floats."""
    if isinstance(value, Bf16Bits):
        return "bf16", value.bits
    a = np.asarray(value)
    if dtype and a.dtype.kind == "f":
        if dtype == "bfloat16":
            return "bf16", to_bf16_bits(a)
        a = a.astype(dtype, copy=False)
    a = _contiguous(a).astype(a.dtype.newbyteorder("<"), copy=False)
    return a.dtype.str, a


def _atomic_write(path, write_fn):
    """Write through a temporary file in the same directory and rename: a crash never leaves half a checkpoint."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- PyTorch zip format (torch.save since 1.6)
def _pint(n):
    """A pickle opcode pushing int n (BININT for 32-bit, LONG1 otherwise)."""
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = int(n).to_bytes((int(n).bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pstr(s):
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ptuple(items):
    return b"(" + b"".join(_pint(i) for i in items) + b"t"


def _pglobal(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_EMPTY_ORDERED_DICT = _pglobal("collections", "OrderedDict") + b")R"


def _data_pkl(entries):
    """Protocol-2 pickle of OrderedDict{name: _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())},
    written opcode by opcode because the GLOBALs name torch objects that do not exist without torch."""
    out = [b"\x80\x02", _EMPTY_ORDERED_DICT, b"("]
    for name, (storage, key, arr) in entries.items():
        strides = [int(s // arr.itemsize) for s in arr.strides] if arr.ndim else []
        pid = b"(" + _pstr("storage") + _pglobal("torch", storage) + _pstr(key) + _pstr("cpu") + _pint(arr.size) + b"t"
        out += [_pstr(name), _pglobal("torch._utils", "_rebuild_tensor_v2"), b"(", pid, b"Q", _pint(0),
                _ptuple(arr.shape), _ptuple(strides), b"\x89", _EMPTY_ORDERED_DICT, b"tR"]
    out.append(b"u.")
    return b"".join(out)


def _write_record(zf, name, data):
    """A stored (uncompressed) zip entry whose data starts on a 64-byte boundary, padded like torch ('FB' extra)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(data)
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # the rule zipfile's open("w") uses
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    info.extra = b"FB" + struct.pack("<H", -start % _ALIGN) + b"Z" * (-start % _ALIGN)
    with zf.open(info, "w", force_zip64=zip64) as f:
        f.write(data)


def write_torch_pth(path, state, dtype=None):
    """Save {name: array | Bf16Bits} in the format torch.load reads; dtype ('float32', 'float16', 'bfloat16')
    converts every floating tensor, None keeps each array's own dtype."""
    entries, blobs = {}, []
    for i, (name, value) in enumerate(state.items()):
        kind, arr = _encode(value, dtype)
        storage = "BFloat16Storage" if kind == "bf16" else \
            next((s for s, d in _STORAGES.items() if np.dtype(d) == np.dtype(kind) and s != "BFloat16Storage"), None)
        if storage is None:
            raise UserError("%s: tensor %r has dtype %s, which a PyTorch checkpoint cannot hold" % (path, name, kind))
        entries[str(name)] = (storage, str(i), arr)
        blobs.append((str(i), arr))
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"  # torch names the folder after the file

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            _write_record(zf, archive + "/data.pkl", _data_pkl(entries))
            _write_record(zf, archive + "/byteorder", b"little")
            for key, arr in blobs:
                _write_record(zf, "%s/data/%s" % (archive, key), memoryview(arr.reshape(-1)).cast("B"))
            _write_record(zf, archive + "/version", b"3\n")
    _atomic_write(path, write)


class _Storage(str):
    """Stands in for torch.FloatStorage etc. while unpickling: just the class name."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    size, stride = tuple(size), tuple(stride)
    if 0 in size:
        return np.empty(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # bounds check: never read outside the storage
    if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise ValueError("a tensor of size %s reaches past its storage of %d elements" % (size, storage.size))
    if isinstance(storage, _LazyStorage):
        return storage.tensor(offset, last, size, stride)
    return _strided(storage, offset, size, stride)


def _strided(storage, offset, size, stride):
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
    # A view covering its whole storage contiguously is returned as is: no second copy of a large weight.
    return view if view.flags.c_contiguous and view.size == storage.size else view.copy()


def _native_array(x):
    x = x.astype(x.dtype.newbyteorder("="), copy=False)
    # uint16 only ever comes from BFloat16Storage: torch's uint16 storages are not in _STORAGES.
    return bf16_bits_to_float32(x) if x.dtype == np.uint16 else x


class _LazyStorage:
    """Where one storage's bytes lie in the zip (read on demand, only the element range a tensor covers)."""

    def __init__(self, path, zf, entry, dt, numel):
        self.path, self.entry, self.dtype, self.size, self.itemsize = path, entry, dt, int(numel), dt.itemsize
        info = zf.getinfo(entry)
        if info.file_size < self.size * self.itemsize:
            raise EOFError("storage %s is shorter than %d elements" % (entry, self.size))
        self.data_start = None
        if info.compress_type == zipfile.ZIP_STORED:  # torch writes stored records: plain file offsets
            zf.fp.seek(info.header_offset)
            local = zf.fp.read(30)
            n, e = struct.unpack("<HH", local[26:30])
            self.data_start = info.header_offset + 30 + n + e

    def read(self, start, count):
        arr = np.empty(count, self.dtype)
        buf, got = memoryview(arr).cast("B"), 0
        try:
            if self.data_start is not None:
                with open(self.path, "rb") as f:
                    f.seek(self.data_start + start * self.itemsize)
                    got = f.readinto(buf)
            else:
                with zipfile.ZipFile(self.path) as zf, zf.open(self.entry) as f:
                    f.seek(start * self.itemsize)
                    while got < arr.nbytes:
                        n = f.readinto(buf[got:])
                        if not n:
                            break
                        got += n
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError("%s: cannot read %s (%s)" % (self.path, self.entry, _first_line(e)))
        if got != arr.nbytes:
            raise UserError("%s: %s is truncated" % (self.path, self.entry))
        return arr

    def tensor(self, offset, last, size, stride):
        def load():
            part = self.read(offset, last - offset + 1)
            return _native_array(_strided(part, 0, size, stride))
        return LazyTensor(size, load, _DTYPE_NAMES[self.dtype.newbyteorder("<").str])


class _PthUnpickler(pickle.Unpickler):
    """Weights-only unpickling: tensors become numpy arrays (or LazyTensors when `lazy`); any other global is refused
    (no code execution)."""

    def __init__(self, data, zf, prefix, order, lazy_path=None):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.zf, self.prefix, self.order, self.storages = zf, prefix, order, {}
        self.lazy_path = lazy_path

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" and name in _STORAGES:
            return _Storage(name)
        raise pickle.UnpicklingError("unsupported object %s.%s" % (module, name))

    def persistent_load(self, pid):
        typename, storage, key, _location, numel = pid[:5]
        if typename != "storage" or type(storage) is not _Storage:
            raise pickle.UnpicklingError("unsupported storage %r" % (pid,))
        if key not in self.storages:
            dt = np.dtype(_STORAGES[storage]).newbyteorder(self.order)
            entry = self.prefix + "data/" + str(key)
            if self.lazy_path is not None:
                self.storages[key] = _LazyStorage(self.lazy_path, self.zf, entry, dt, numel)
                return self.storages[key]
            arr = np.empty(int(numel), dt)
            with self.zf.open(entry) as f:
                buf, got = memoryview(arr).cast("B"), 0
                while got < arr.nbytes:
                    n = f.readinto(buf[got:])
                    if not n:
                        raise EOFError("storage %s is shorter than %d elements" % (key, numel))
                    got += n
            self.storages[key] = arr
        return self.storages[key]


def read_torch_pth(path, lazy=False):
    """torch.save'd state dict → {name: numpy array}; bf16 comes back as float32, other dtypes as they were.

    lazy=True gives {name: LazyTensor} instead: only the pickle is read now; each tensor reads just the bytes of
    its own storage range when loaded, so a converter holds one tensor at a time, not the file.
    """
    if not os.path.isfile(path):
        raise UserError("%s: not found (expected a PyTorch checkpoint)" % path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("data.pkl")]
            if not pkl:
                raise KeyError("no data.pkl record")
            prefix = pkl[0][:-len("data.pkl")]
            big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
            obj = _PthUnpickler(zf.read(pkl[0]), zf, prefix, ">" if big else "<",
                                lazy_path=path if lazy else None).load()
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError, IndexError, AttributeError,
            pickle.UnpicklingError, struct.error, OSError) as e:
        raise UserError("%s: not a readable PyTorch checkpoint (%s)" % (path, _first_line(e)))

    def native(x):
        if isinstance(x, dict):
            return {k: native(v) for k, v in x.items()}
        return _native_array(x) if isinstance(x, np.ndarray) else x
    return native(obj)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- safetensors (Hugging Face)
def write_safetensors(path, state, dtype="float32", progress=None):
    """{name: array | Bf16Bits | LazyTensor} → safetensors; floats are stored as dtype ('float32', 'float16',
    'bfloat16'). A LazyTensor (floating point) is read only while it is written, block by block (`iter_chunks`), so
    a writer of lazy tensors holds one block at a time; `progress(n_bytes)` is called after each block."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0  # transformers refuses files without format
    codes = {np.dtype(v): k for k, v in _ST_DTYPES.items() if k != "BF16"}
    lazy_kind = "bf16" if dtype == "bfloat16" else np.dtype(dtype or "float32").newbyteorder("<").str
    for name, value in state.items():
        if isinstance(value, LazyTensor):
            if value.dtype is not None and not _is_float_name(value.dtype):
                raise UserError("%s: lazy tensor %r has dtype %s (only floating-point tensors stream)"
                                % (path, name, value.dtype))
            kind, shape, arr = lazy_kind, value.shape, value
            nbytes = int(np.prod(shape)) * (2 if kind == "bf16" else np.dtype(kind).itemsize)
        else:
            kind, arr = _encode(value, dtype)
            shape, nbytes = arr.shape, arr.nbytes
        code = "BF16" if kind == "bf16" else codes.get(np.dtype(kind))
        if code is None:
            raise UserError("%s: tensor %r has dtype %s, which safetensors cannot hold" % (path, name, kind))
        header[str(name)] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append((str(name), kind, arr, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header so tensor data stays 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, kind, arr, nbytes in blobs:
            if not isinstance(arr, LazyTensor):
                f.write(memoryview(arr.reshape(-1)).cast("B"))
                if progress is not None:
                    progress(nbytes)
                continue
            written = 0
            for block in arr.iter_chunks():
                for part in _row_parts(np.asarray(block)):   # encode in small parts: few MB of temporaries
                    got, data = _encode(part, dtype or "float32")
                    if got != kind:
                        raise ValueError("tensor %r: a block of dtype %s, expected %s" % (name, got, kind))
                    f.write(memoryview(data.reshape(-1)).cast("B"))
                    written += data.nbytes
                    if progress is not None:
                        progress(data.nbytes)
                    del part, data
                del block   # one block at a time
            if written != nbytes:   # a short or long tensor would shift every later tensor: refuse the file
                raise ValueError("tensor %r: its blocks hold %d bytes, its shape %s needs %d"
                                 % (name, written, list(arr.shape), nbytes))
    _atomic_write(path, write)


def _row_parts(a, max_elems=1 << 22):
    """Consecutive row ranges of `a` (views) of at most ~max_elems elements each (the whole array if smaller)."""
    if a.ndim < 2 or a.size <= max_elems:
        yield a
        return
    step = max(1, max_elems // max(1, a.size // a.shape[0]))
    for i in range(0, a.shape[0], step):
        yield a[i:i + step]


def _is_float_name(name):
    return name in ("float32", "float64", "float16", "bfloat16")


class LazyTensor:
    """A tensor not read yet: its shape, and a function that reads it (and applies any transforms given by `then`).

    `dtype` is the stored dtype when a reader knows it ("float32", "bfloat16", "int64", ...; bf16 still loads as
    float32). A tensor made `from_chunks` is a concatenation of row blocks along axis 0 that a streaming writer
    produces and writes one block at a time (`iter_chunks`), so the whole tensor is never held at once.
    """

    def __init__(self, shape, load, dtype=None):
        self.shape, self._load, self.dtype = tuple(int(n) for n in shape), load, dtype
        self._chunks = None

    @classmethod
    def from_chunks(cls, shape, chunks, dtype=None):
        """A tensor whose rows are the concatenation of what the callables `chunks` return, in order."""
        t = cls(shape, lambda: np.concatenate([np.asarray(f()) for f in chunks], 0), dtype)
        t._chunks = list(chunks)
        return t

    def load(self):
        return self._load()

    def iter_chunks(self):
        """Row blocks whose concatenation is the tensor (one block: the whole tensor)."""
        if self._chunks is None:
            yield self.load()
            return
        for f in self._chunks:
            yield f()

    def then(self, fn, shape=None):
        """A LazyTensor for fn(this tensor), of `shape` (default: the same shape)."""
        return LazyTensor(self.shape if shape is None else shape, lambda: fn(self.load()), self.dtype)


def _safetensors_header(path):
    """(header dict, byte offset of the data, file size) of a safetensors file; errors name the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length %d exceeds the file size %d" % (n, size))
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header, 8 + n, size
    except FileNotFoundError:
        raise UserError("%s: not found (expected a safetensors file)" % path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise UserError("%s: not a readable safetensors file (%s)" % (path, _first_line(e)))


def _read_entry(path, name, dt, shape, begin, bf16):
    try:
        with open(path, "rb") as f:
            f.seek(begin)
            arr = np.empty(shape, dt)
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise UserError("%s: tensor %r is truncated" % (path, name))
    except OSError as e:
        raise UserError("%s: cannot read tensor %r (%s)" % (path, name, _first_line(e)))
    return bf16_bits_to_float32(arr) if bf16 else arr.astype(dt.newbyteorder("="))


def read_safetensors(path, lazy=False):
    """safetensors → {name: numpy array}; BF16 is widened to float32, other dtypes stay as stored. lazy=True gives
    {name: LazyTensor} instead (the header is checked now, each tensor is read when loaded)."""
    header, base, size = _safetensors_header(path)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = np.dtype(_ST_DTYPES[meta["dtype"]])
            begin, end = (int(v) for v in meta["data_offsets"])
            shape = tuple(int(v) for v in meta["shape"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError("%s: tensor %r has a bad header entry (%s)" % (path, name, _first_line(e)))
        if end - begin != int(np.prod(shape)) * dt.itemsize or base + end > size or begin < 0:
            raise UserError("%s: tensor %r: data_offsets %s do not fit shape %s %s in a %d-byte file"
                            % (path, name, [begin, end], list(shape), meta["dtype"], size))
        args = (path, name, dt, shape, base + begin, meta["dtype"] == "BF16")
        out[name] = LazyTensor(shape, lambda a=args: _read_entry(*a), _DTYPE_NAMES[dt.str])
    return out if lazy else {k: v.load() for k, v in out.items()}
