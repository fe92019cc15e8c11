#!/usr/bin/env python3
"""Gives an OCI diff layer an entry for every parent directory of its entries.

umoci's diff layers (`umoci repack`) hold only what changed, so a file added
under /usr/lib/python3.11 comes without entries for /usr (unchanged). Tools
that reorder a layer's entries by path need them: `ctr-remote image optimize`
(stargz) moves each file read at start to the front together with its parent
directories, and silently leaves out every file whose parents the layer lacks.

  layer-parents.py add --lower L0 [--lower L1 ...] TOP OUT
      writes OUT: an entry for each parent directory TOP lacks, then TOP
      byte for byte. Each added entry is the header of that directory in the
      highest lower layer that has it, copied verbatim (mode, owner, times,
      xattrs): a directory a diff layer leaves out did not change, so that
      header is its state in the image. Fails if no lower layer has it, or
      has it as something other than a directory.
  layer-parents.py check LAYER...
      fails unless every entry's parent directories are in its own layer.

Layers may be plain or gzip tars. The output depends only on the inputs
(same layers, same bytes), so images stay reproducible.
"""

import argparse
import gzip
import shutil
import sys
import tarfile
import tempfile


def norm(name):
    """The entry's path without leading "./" or "/" or a trailing "/"."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def parents(path):
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def open_plain(path, tmpdir):
    """A seekable file with the uncompressed tar of `path`."""
    f = open(path, "rb")
    if f.read(2) != b"\x1f\x8b":
        f.seek(0)
        return f
    f.close()
    out = tempfile.TemporaryFile(dir=tmpdir)
    with gzip.open(path, "rb") as z:
        shutil.copyfileobj(z, out, 1 << 20)
    out.seek(0)
    return out


def members(f):
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as t:
        return t.getmembers()


def missing_parents(ms):
    have = {norm(m.name) for m in ms}
    need = set()
    for m in ms:
        need.update(p for p in parents(norm(m.name)) if p not in have)
    return sorted(need)  # a parent sorts before its children: it is a prefix


def add(args):
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        top = open_plain(args.top, tmp)
        need = missing_parents(members(top))
        headers = {}
        for lower in args.lower:  # lowest first: a higher layer's header wins
            lf = open_plain(lower, tmp)
            for m in members(lf):
                p = norm(m.name)
                if p not in need:
                    continue
                if not m.isdir():
                    sys.exit(f"layer-parents: {p} is a parent in {args.top} but not a directory in {lower}")
                lf.seek(m.offset)
                # The header blocks (with any PAX or GNU long-name blocks); a
                # directory has no data.
                headers[p] = lf.read(m.offset_data - m.offset)
            lf.close()
        absent = [p for p in need if p not in headers]
        if absent:
            sys.exit(f"layer-parents: no lower layer has {', '.join(absent[:5])} ({len(absent)} in all)")
        with open(args.out, "wb") as out:
            for p in need:
                out.write(headers[p])
            top.seek(0)
            shutil.copyfileobj(top, out, 1 << 20)
        top.close()
    print(f"layer-parents: {args.top}: added {len(need)} parent directories", file=sys.stderr)


def check(args):
    bad = 0
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for layer in args.layers:
            f = open_plain(layer, tmp)
            need = missing_parents(members(f))
            f.close()
            if need:
                bad += 1
                print(f"layer-parents: {layer} lacks {len(need)} parent directories, e.g. {', '.join(need[:3])}",
                      file=sys.stderr)
    if bad:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tmpdir", help="where to decompress gzip layers (default: $TMPDIR)")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add")
    a.add_argument("--lower", action="append", default=[])
    a.add_argument("top")
    a.add_argument("out")
    c = sub.add_parser("check")
    c.add_argument("layers", nargs="+")
    args = p.parse_args()
    add(args) if args.cmd == "add" else check(args)


if __name__ == "__main__":
    main()
