#!/usr/bin/env python3
"""A small, independent GGUF v3 reader for kvserve's reference tests.

Follows /work/shared/docs/gguf.md Part 1 (section 1.1 byte layout, 1.4 types).
Standard library only, except that tensor data needs numpy (imported lazily,
so `python3 gguf_read.py FILE` lists metadata and tensors without numpy).

    f = GGUFFile("model.gguf")
    f.metadata["general.architecture"]      # -> "llama"
    f.tensors["blk.0.attn_q.weight"].ne     # -> (n_embd, n_head*head_dim)
    w = f.tensor("blk.0.attn_q.weight")     # float64, numpy shape (ne[1], ne[0])

Shape convention: GGUF ne[0] is the contiguous dimension, so ne = [n_cols,
n_rows] becomes a numpy array of shape (n_rows, n_cols) (numpy shape is ne
reversed).

Errors that break the GGUF spec raise GGUFError. Things the spec allows but
llama.cpp b4747 rejects (tensors not packed in info order, names of 64 bytes
or more, arrays of arrays, a non-u32 or non-power-of-two general.alignment)
are collected in GGUFFile.issues instead.
"""

import mmap
import os
import struct
import sys
from collections import OrderedDict

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 64  # llama.cpp GGML_MAX_NAME: names must be shorter than this

# Metadata value types (section 1.1).
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32 = 0, 1, 2, 3, 4, 5
T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 6, 7, 8, 9
T_UINT64, T_INT64, T_FLOAT64 = 10, 11, 12

VALUE_TYPE_NAMES = {
    T_UINT8: "u8", T_INT8: "i8", T_UINT16: "u16", T_INT16: "i16",
    T_UINT32: "u32", T_INT32: "i32", T_FLOAT32: "f32", T_BOOL: "bool",
    T_STRING: "str", T_ARRAY: "arr", T_UINT64: "u64", T_INT64: "i64",
    T_FLOAT64: "f64",
}

# struct format characters of the fixed-size scalar types.
_SCALAR_FMT = {
    T_UINT8: "B", T_INT8: "b", T_UINT16: "H", T_INT16: "h",
    T_UINT32: "I", T_INT32: "i", T_FLOAT32: "f", T_BOOL: "B",
    T_UINT64: "Q", T_INT64: "q", T_FLOAT64: "d",
}

# ggml tensor types: id -> (name, elements per block, bytes per block).
# Sizes for every type are listed so that any file can be listed and
# bounds-checked; only some of them can be dequantized (DEQUANT_TYPES).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
GGML_TYPE_IDS = {v[0]: k for k, v in GGML_TYPES.items()}
DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "F64")


class GGUFError(Exception):
    pass


def type_name(ggml_type):
    t = GGML_TYPES.get(ggml_type)
    return t[0] if t else "type%d" % ggml_type


def pad_to(x, n):
    return (x + n - 1) // n * n


class TensorInfo:
    __slots__ = ("name", "ne", "type", "offset", "nbytes", "index")

    def __init__(self, name, ne, ggml_type, offset, nbytes, index):
        self.name = name
        self.ne = ne              # tuple, ne[0] contiguous, len == n_dims
        self.type = ggml_type     # ggml type id
        self.offset = offset      # relative to GGUFFile.data_offset
        self.nbytes = nbytes      # None when the type is unknown
        self.index = index

    @property
    def type_name(self):
        return type_name(self.type)

    @property
    def shape(self):
        """numpy shape: ne reversed."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self):
        n = 1
        for d in self.ne:
            n *= d
        return n

    def __repr__(self):
        return "TensorInfo(%r, ne=%r, %s, offset=%d)" % (
            self.name, self.ne, self.type_name, self.offset)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, size):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError("truncated file: %s needs %d bytes at offset %d "
                            "(file size %d)" % (what, n, self.pos, self.size))

    def unpack(self, fmt, what):
        fmt = "<" + fmt
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what):
        return self.unpack("I", what)[0]

    def u64(self, what):
        return self.unpack("Q", what)[0]

    def string(self, what):
        n = self.u64(what + " length")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # surrogateescape keeps invalid UTF-8 (some vocabularies have it)
        # round-trippable instead of failing.
        return b.decode("utf-8", errors="surrogateescape")


class GGUFFile:
    def __init__(self, path):
        self.path = path
        self.issues = []          # llama.cpp-compatibility problems
        self.metadata = OrderedDict()
        self.metadata_types = OrderedDict()  # key -> type, or (T_ARRAY, elem)
        self.tensors = OrderedDict()
        self._np_map = None
        with open(path, "rb") as fh:
            self.file_size = os.fstat(fh.fileno()).st_size
            if self.file_size < 24:
                raise GGUFError("%s: file too small for a GGUF header (%d bytes)"
                                % (path, self.file_size))
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                self._parse(_Cursor(mm, self.file_size))
            finally:
                mm.close()

    # ---- parsing ---------------------------------------------------------
    def _parse(self, c):
        magic = bytes(c.buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError("bad magic %r (want b'GGUF')" % magic)
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in (2, 3):
            raise GGUFError("unsupported GGUF version %d (2 and 3 are read)"
                            % self.version)
        n_tensors = c.u64("tensor_count")
        n_kv = c.u64("metadata_kv_count")
        if n_tensors >= 1 << 63 or n_kv >= 1 << 63:
            raise GGUFError("negative tensor or KV count")

        for i in range(n_kv):
            key = c.string("key of KV %d" % i)
            vtype = c.u32("type of key %r" % key)
            if key in self.metadata:
                raise GGUFError("duplicate metadata key %r" % key)
            val, tdesc = self._read_value(c, vtype, key, 0)
            self.metadata[key] = val
            self.metadata_types[key] = tdesc

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.metadata_types["general.alignment"] != T_UINT32:
                self.issues.append("general.alignment has type %s, llama.cpp "
                                   "requires u32" % self._tdesc_str(
                                       self.metadata_types["general.alignment"]))
            if isinstance(a, bool) or not isinstance(a, int) or a <= 0:
                raise GGUFError("invalid general.alignment %r" % (a,))
            if a % 8 != 0:
                raise GGUFError("general.alignment %d is not a multiple of 8" % a)
            if a & (a - 1):
                self.issues.append("general.alignment %d is not a power of two "
                                   "(llama.cpp asserts it is)" % a)
            self.alignment = a

        infos = []
        for i in range(n_tensors):
            name = c.string("name of tensor %d" % i)
            n_dims = c.u32("n_dims of %r" % name)
            if n_dims > MAX_DIMS:
                raise GGUFError("tensor %r has %d dims (max %d)"
                                % (name, n_dims, MAX_DIMS))
            ne = c.unpack("%dQ" % n_dims, "ne of %r" % name) if n_dims else ()
            ggml_type = c.u32("type of %r" % name)
            offset = c.u64("offset of %r" % name)
            if name in self.tensors:
                raise GGUFError("duplicate tensor name %r" % name)
            if len(name.encode("utf-8", errors="surrogateescape")) >= MAX_NAME:
                self.issues.append("tensor name %r is %d bytes; llama.cpp "
                                   "needs < %d" % (name, len(name), MAX_NAME))
            if any(d >= 1 << 63 for d in ne):
                raise GGUFError("tensor %r has a negative dimension" % name)
            nbytes = None
            if ggml_type in GGML_TYPES:
                _, blck, tsize = GGML_TYPES[ggml_type]
                ne0 = ne[0] if ne else 1
                if ne0 % blck:
                    raise GGUFError("tensor %r: ne[0]=%d is not a multiple of "
                                    "the %s block size %d"
                                    % (name, ne0, type_name(ggml_type), blck))
                nbytes = ne0 // blck * tsize
                for d in ne[1:]:
                    nbytes *= d
            else:
                self.issues.append("tensor %r has unknown ggml type %d"
                                   % (name, ggml_type))
            if offset % self.alignment:
                raise GGUFError("tensor %r: offset %d is not a multiple of the "
                                "alignment %d" % (name, offset, self.alignment))
            info = TensorInfo(name, tuple(ne), ggml_type, offset, nbytes, i)
            self.tensors[name] = info
            infos.append(info)

        self.header_end = c.pos
        self.data_offset = pad_to(c.pos, self.alignment)
        if n_tensors and self.data_offset > self.file_size:
            raise GGUFError("data section starts at %d, past the end of the "
                            "file (%d bytes)" % (self.data_offset, self.file_size))
        # Padding between the infos and the data must be zero bytes.
        pad = bytes(c.buf[c.pos:min(self.data_offset, self.file_size)])
        if pad.strip(b"\0"):
            self.issues.append("non-zero padding bytes before the data section")

        expect = 0
        for info in infos:
            if info.nbytes is None:
                expect = None
                continue
            end = self.data_offset + info.offset + info.nbytes
            if end > self.file_size:
                raise GGUFError("tensor %r: data [%d, %d) is past the end of "
                                "the file (%d bytes)" % (info.name, end - info.nbytes,
                                                        end, self.file_size))
            if expect is not None:
                if info.offset != expect:
                    self.issues.append(
                        "tensor %r has offset %d, expected %d (llama.cpp wants "
                        "tensors packed in info order, each padded to the "
                        "alignment)" % (info.name, info.offset, expect))
                expect = info.offset + pad_to(info.nbytes, self.alignment)

    def _read_value(self, c, vtype, key, depth):
        if vtype in _SCALAR_FMT:
            v = c.unpack(_SCALAR_FMT[vtype], "value of %r" % key)[0]
            if vtype == T_BOOL:
                if v not in (0, 1):
                    self.issues.append("bool %r has byte value %d" % (key, v))
                v = bool(v)
            return v, vtype
        if vtype == T_STRING:
            return c.string("value of %r" % key), vtype
        if vtype == T_ARRAY:
            etype = c.u32("element type of %r" % key)
            n = c.u64("element count of %r" % key)
            if etype in _SCALAR_FMT:
                fmt = _SCALAR_FMT[etype]
                size = struct.calcsize("<" + fmt)
                if n * size > c.size - c.pos:
                    c.need(n * size, "array %r" % key)
                vals = list(struct.unpack_from("<%d%s" % (n, fmt), c.buf, c.pos))
                c.pos += n * size
                if etype == T_BOOL:
                    vals = [bool(x) for x in vals]
                return vals, (T_ARRAY, etype)
            if etype == T_STRING:
                if n * 8 > c.size - c.pos:
                    c.need(n * 8, "array %r" % key)
                vals = [c.string("element %d of %r" % (j, key)) for j in range(n)]
                return vals, (T_ARRAY, etype)
            if etype == T_ARRAY:
                if depth == 0:
                    self.issues.append("key %r is an array of arrays (llama.cpp "
                                       "rejects these)" % key)
                if n * 12 > c.size - c.pos:
                    c.need(n * 12, "array %r" % key)
                vals, inner = [], None
                for j in range(n):
                    # each element is a whole ARRAY value (elem type, count, items)
                    v, inner = self._read_value(c, T_ARRAY, key, depth + 1)
                    vals.append(v)
                return vals, (T_ARRAY, inner if inner is not None else T_ARRAY)
            raise GGUFError("key %r: unknown array element type %d" % (key, etype))
        raise GGUFError("key %r: unknown value type %d" % (key, vtype))

    @staticmethod
    def _tdesc_str(t):
        if isinstance(t, tuple):
            inner = GGUFFile._tdesc_str(t[1])
            return "arr[%s]" % inner
        return VALUE_TYPE_NAMES.get(t, "type%d" % t)

    # ---- metadata helpers -----------------------------------------------
    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def type_of(self, key):
        return self._tdesc_str(self.metadata_types[key])

    # ---- tensor data -----------------------------------------------------
    def _map(self):
        if self._np_map is None:
            import numpy as np
            self._np_map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._np_map

    def raw(self, name):
        """The tensor's bytes as a read-only uint8 numpy array (memory-mapped)."""
        info = self.tensors[name]
        if info.nbytes is None:
            raise GGUFError("tensor %r has unknown type %d" % (name, info.type))
        start = self.data_offset + info.offset
        return self._map()[start:start + info.nbytes]

    def tensor(self, name, dtype=None):
        """Dequantized tensor as a numpy float64 array of shape ne[::-1]."""
        info = self.tensors[name]
        flat = dequantize(self.raw(name), info.type, info.n_elements)
        out = flat.reshape(info.shape if info.ne else ())
        if dtype is not None:
            out = out.astype(dtype)
        return out

    def __contains__(self, name):
        return name in self.tensors


def dequantize(raw, ggml_type, n_elements):
    """raw: uint8 numpy array of a tensor's bytes. Returns flat float64."""
    import numpy as np
    name = type_name(ggml_type)
    raw = np.ascontiguousarray(raw)
    if name == "F32":
        out = raw.view("<f4").astype(np.float64)
    elif name == "F64":
        out = raw.view("<f8").astype(np.float64)
    elif name == "F16":
        out = raw.view("<f2").astype(np.float64)
    elif name == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << np.uint32(16)
        out = bits.view(np.float32).astype(np.float64)
    elif name == "Q8_0":
        blk = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
        assert blk.itemsize == 34
        b = raw.view(blk)
        out = (b["d"].astype(np.float64)[:, None] *
               b["qs"].astype(np.float64)).reshape(-1)
    else:
        raise NotImplementedError("dequantization of %s is not implemented "
                                  "(supported: %s)" % (name, ", ".join(DEQUANT_TYPES)))
    if out.size != n_elements:
        raise GGUFError("dequantized %d elements, expected %d"
                        % (out.size, n_elements))
    return out


# ---- stand-alone listing ---------------------------------------------------
def _fmt_value(v, limit=8):
    if isinstance(v, list):
        head = ", ".join(_fmt_value(x, limit) for x in v[:limit])
        more = ", ... (%d total)" % len(v) if len(v) > limit else ""
        return "[" + head + more + "]"
    if isinstance(v, str):
        s = v if len(v) <= 200 else v[:200] + "..."
        return ascii(s) if len(v) <= 200 else ascii(s) + " (%d chars)" % len(v)
    return repr(v)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="List a GGUF file's metadata and tensors.")
    ap.add_argument("file")
    ap.add_argument("--all", action="store_true", help="print arrays in full")
    ap.add_argument("--stats", action="store_true",
                    help="dequantize each supported tensor and print min/max/mean "
                         "(needs numpy)")
    args = ap.parse_args(argv)
    try:
        f = GGUFFile(args.file)
    except GGUFError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print("file: %s (%d bytes)" % (args.file, f.file_size))
    print("version: %d  tensors: %d  kv: %d  alignment: %d  data_offset: %d"
          % (f.version, len(f.tensors), len(f.metadata), f.alignment, f.data_offset))
    print("metadata:")
    limit = 1 << 62 if args.all else 8
    for k, v in f.metadata.items():
        print("  %-48s %-10s %s" % (k, f.type_of(k), _fmt_value(v, limit)))
    print("tensors:")
    print("  %-4s %-36s %-7s %-24s %-22s %12s %10s" % (
        "#", "name", "type", "ne", "numpy shape", "offset", "nbytes"))
    for t in f.tensors.values():
        line = "  %-4d %-36s %-7s %-24s %-22s %12d %10s" % (
            t.index, t.name, t.type_name, list(t.ne), t.shape, t.offset,
            t.nbytes if t.nbytes is not None else "?")
        if args.stats and t.type_name in DEQUANT_TYPES:
            x = f.tensor(t.name)
            line += "  min %.4g max %.4g mean %.4g" % (x.min(), x.max(), x.mean())
        print(line)
    for msg in f.issues:
        print("issue: %s" % msg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
