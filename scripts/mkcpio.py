#!/usr/bin/env python3
"""Writes a newc cpio archive (the initramfs format) from a spec, without needing root.

Spec lines, one entry each (like the kernel's gen_init_cpio):
    dir   PATH MODE
    file  PATH HOSTFILE MODE
    slink PATH TARGET
    nod   PATH MODE c|b MAJOR MINOR
All entries are owned by uid 0 / gid 0. Octal MODE. `#` starts a comment.

Usage: mkcpio.py SPEC OUT
"""
import os
import stat
import sys


def header(ino, mode, nlink, size, name, rdev=(0, 0)):
    name_b = name.encode() + b"\0"
    fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name_b), 0,
    ]
    h = b"070701" + b"".join(b"%08x" % f for f in fields) + name_b
    return h + b"\0" * (-len(h) % 4)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    spec, out = sys.argv[1], sys.argv[2]
    tmp = out + ".tmp"
    ino = 1
    with open(spec) as f, open(tmp, "wb") as o:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].split()
            if not line:
                continue
            kind, path = line[0], line[1].lstrip("/")
            try:
                if kind == "dir":
                    o.write(header(ino, stat.S_IFDIR | int(line[2], 8), 2, 0, path))
                elif kind == "file":
                    with open(line[2], "rb") as src:
                        data = src.read()
                    o.write(header(ino, stat.S_IFREG | int(line[3], 8), 1, len(data), path))
                    o.write(data + b"\0" * (-len(data) % 4))
                elif kind == "slink":
                    target = line[2].encode()
                    o.write(header(ino, stat.S_IFLNK | 0o777, 1, len(target), path))
                    o.write(target + b"\0" * (-len(target) % 4))
                elif kind == "nod":
                    ftype = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[line[3]]
                    rdev = (int(line[4]), int(line[5]))
                    o.write(header(ino, ftype | int(line[2], 8), 1, 0, path, rdev))
                else:
                    raise ValueError(f"unknown entry kind {kind!r}")
            except (IndexError, ValueError, KeyError, OSError) as e:
                os.unlink(tmp)
                sys.exit(f"{spec}:{lineno}: {e}")
            ino += 1
        o.write(header(0, 0, 1, 0, "TRAILER!!!"))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
