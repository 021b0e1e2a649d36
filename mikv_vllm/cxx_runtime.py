"""Refuse a kernel build that carries its own copy of the C++ runtime.

torch and every library it loads share the system's libstdc++.so.6. An extension linked with a
static libstdc++ (a toolchain whose libstdc++.so link is missing falls back to libstdc++.a
without a word, as `-static-libstdc++` in LDFLAGS does) brings a second runtime into the
process, and the two disagree on the locale's facet ids: the first error message that prints a
number crashes inside the extension (built on the GPU machine with gcc 13.3: a segfault in
`decode_ctas_per_sm`'s head_dim check) or loses the number (gcc 12). Such a build exports the
runtime's own entry points, which is what this looks for. Standard library only: setup.py runs
it after linking, `ops.load_kernels` before loading."""
from __future__ import annotations

import struct

# Defined only by a C++ runtime: exception throwing, and the ostream inserter a TORCH_CHECK
# message with an integer goes through.
RUNTIME_SYMBOLS = ("__cxa_throw", "_ZNSo9_M_insertIlEERSoT_")

_SHT_DYNSYM = 11
_SHN_UNDEF = 0


def defined_dynamic_symbols(path: str) -> set[str]:
    """Names the shared object at `path` (ELF64, little endian) defines in its dynamic symbol
    table."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 shared object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != _SHT_DYNSYM:
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize or 24):
            name, _, _, shndx = struct.unpack_from("<IBBH", data, pos)
            if shndx != _SHN_UNDEF and name:
                end = data.index(b"\0", strtab + name)
                names.add(data[strtab + name:end].decode("ascii", "replace"))
    return names


def static_runtime_problem(path: str) -> str | None:
    """One line saying why the extension at `path` must not be loaded, or None."""
    found = sorted(set(RUNTIME_SYMBOLS) & defined_dynamic_symbols(path))
    if not found:
        return None
    return (f"{path} carries its own C++ runtime (it defines {', '.join(found)}): it was linked "
            "with a static libstdc++, which crashes beside torch's shared one: it must link "
            "libstdc++.so.6.")
