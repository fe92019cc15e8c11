#!/usr/bin/env python3
"""The report of hack/bench-coldstart.sh: reads its results.tsv (rate, image,
mode, run, ms to first output, registry link bytes until then; mode `B@M` is
a run of mode B measured right after run `run` of mode M: the warm start after
trace, profile and optimize runs, the lazy start after P2P runs) and, with
--read-volume, the lines of hack/read-volume.sh (image, bytes the workload read
at readahead 0, 128 and 4096 KiB, the layers' compressed and uncompressed
bytes). Prints two markdown tables: the medians and spreads per mode, then the
ratios the issue aims at (speedups against the full pull, lazybd against
stargz, the read volume, the physical limit and bytes on the link against the
compressed read volume). With --docs it writes them into docs/benchmarks.md
(between the coldstart markers) and a PNG chart (gnuplot) to
docs/coldstart.png."""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

MODES = [
    ("full", "overlayfs full pull"),
    ("warm", "warm (local)"),
    ("lazy", "lazybd"),
    ("trace", "lazybd + trace"),
    ("profile", "lazybd, profiled image"),
    ("optimize", "lazybd, convert --record-profile"),
    ("p2p", "lazybd + P2P"),
    ("stargz", "stargz, optimized eStargz"),
    ("stargz-plain", "stargz, plain eStargz"),
]
# tc's rate units, in bits per second.
RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
BEGIN = "<!-- coldstart:begin (hack/bench-coldstart.sh DOCS=1 rewrites this) -->"
END = "<!-- coldstart:end -->"


def read(path):
    """(rate, image, mode) -> [(ms, bytes)], the (rate, image) pairs in order,
    and the most runs of one mode, not counting the runs beside another."""
    runs = defaultdict(list)
    own = defaultdict(int)
    order = []
    with open(path) as f:
        for line in f:
            rate, image, mode, _run, ms, nbytes = line.rstrip("\n").split("\t")
            if (rate, image) not in order:
                order.append((rate, image))
            runs[(rate, image, mode)].append((int(ms), int(nbytes)))
            base, beside, _ = mode.partition("@")
            if beside:
                # A run of its mode all the same, for that mode's column.
                runs[(rate, image, base)].append((int(ms), int(nbytes)))
            else:
                own[(rate, image, mode)] += 1
    return runs, order, max(own.values(), default=0)


def read_volume(path):
    """image -> (bytes at readahead 0, 128, 4096 KiB, layers compressed, uncompressed)"""
    vol = {}
    with open(path) as f:
        for line in f:
            image, *nums = line.rstrip("\n").split("\t")
            vol[image] = tuple(int(x) for x in nums)
    return vol


BREAKDOWN_COLUMNS = [
    "pull", "index", "FUSE/loop/EROFS", "container", "reads waiting", "misses", "registry requests",
]


def read_breakdown(path):
    """(rate, image, mode) -> [[pull_ms, index_ms, expose_ms, container_ms, wait_ms, misses, requests]]"""
    rows = defaultdict(list)
    with open(path) as f:
        for line in f:
            rate, image, mode, _run, *nums = line.rstrip("\n").split("\t")
            rows[(rate, image, mode)].append([float(x) if x else 0.0 for x in nums])
    return rows


def breakdown_table(rows, order):
    """Median of each part per lazybd mode: where a cold start's time went."""
    out = []
    for rate, image in order:
        for mode, _title in MODES:
            runs = rows.get((rate, image, mode))
            if not runs:
                continue
            med = [statistics.median(r[i] for r in runs) for i in range(len(BREAKDOWN_COLUMNS))]
            cells = [f"{v / 1000:.2f} s" for v in med[:5]] + [f"{med[5]:.0f}", f"{med[6]:.0f}"]
            out.append([image, rate, mode] + cells)
    if not out:
        return ""
    return render(["image", "link", "mode"] + BREAKDOWN_COLUMNS, out) + (
        "\nMedians. pull: `lazybd pull` (every Prepare, which waits for its layer's index: "
        "index = reading and checking each index and opening its cache, summed over the "
        "layers; the FUSE file, loop device and EROFS mount finish behind the Prepare, summed "
        "too); container: from the pull to \"ready\"; reads waiting: the "
        "time all reads spent waiting for fetches (the snapshotter's read latency sum, whole "
        "run); misses: chunks reads waited for; registry requests: range requests sent to "
        "the registry.\n"
    )


def rate_bps(rate):
    m = re.fullmatch(r"([0-9.]+)([a-z]*)", rate.lower())
    if not m or m.group(2) not in RATE_UNITS:
        return None
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


def mib(n):
    return f"{n / (1 << 20):.1f}"


def medians(runs, rate, image):
    """mode -> (median ms, median link bytes) for the modes measured."""
    out = {}
    for mode, _ in MODES:
        r = runs.get((rate, image, mode))
        if r:
            out[mode] = (statistics.median(x for x, _ in r), statistics.median(b for _, b in r))
    return out


def render(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def times_table(runs, order, n):
    present = [(m, title) for m, title in MODES if any(k[2] == m for k in runs)]
    rows = []
    for rate, image in order:
        cells = [image, rate]
        for mode, _ in present:
            r = runs.get((rate, image, mode))
            if not r:
                cells.append("")
                continue
            ms = [x for x, _ in r]
            nbytes = statistics.median(b for _, b in r)
            cells.append(
                f"{statistics.median(ms) / 1000:.2f} s ({min(ms) / 1000:.2f}-{max(ms) / 1000:.2f}), {mib(nbytes)} MiB"
            )
        rows.append(cells)
    note = (
        f"\nEach cell: median time from the pull to the first output (min-max of {n} runs, "
        "and of the runs beside another mode's: the warm start after each trace, profile and "
        "optimize run, the lazy start after each P2P run), and the median bytes the registry "
        "link carried until then.\n"
    )
    return render(["image", "link"] + [t for _, t in present], rows) + note


def ratio(a, b, fmt="{:.2f}x"):
    return fmt.format(a / b) if a is not None and b else ""


def ratios_tables(runs, order, vol):
    """Two tables of ratios of the medians: against stargz and the full pull,
    then against the workload's read volume and the physical limit."""
    measured = {k[2] for k in runs}

    def t(med, mode):
        return med[mode][0] if mode in med else None

    def limit_ms(med, rate, image):
        """The workload's compressed read volume over the link, plus the warm start."""
        v, bps = vol.get(image), rate_bps(rate)
        if not v or not v[4] or not bps or "warm" not in med:
            return None
        return compressed_read(v) * 8 / bps * 1000 + med["warm"][0]

    speed = []  # (title, cell function of (med, rate, image))
    for mode in ("lazy", "trace", "profile", "optimize", "stargz"):
        if "full" in measured and mode in measured:
            speed.append((f"full / {mode}", lambda med, r, i, m=mode: ratio(t(med, "full"), t(med, m), "{:.1f}x")))
    if vol and {"full", "warm"} <= measured:
        speed.append(("full / limit", lambda med, r, i: ratio(t(med, "full"), limit_ms(med, r, i), "{:.1f}x")))
    for a, b in (("lazy", "stargz"), ("trace", "stargz"), ("profile", "stargz"),
                 ("optimize", "stargz")):
        if {a, b} <= measured:
            speed.append((f"{a} / {b}", lambda med, r, i, a=a, b=b: ratio(t(med, a), t(med, b))))
    for a, b in (("trace", "warm"), ("profile", "warm"), ("optimize", "warm"), ("p2p", "lazy")):
        if {a, b} <= measured:
            speed.append((f"{a} / {b}", lambda med, r, i, a=a, b=b: paired_ratio(runs, r, i, a, b)
                          or ratio(t(med, a), t(med, b))))

    limit = []
    if vol:
        limit.append(("read volume, MiB (readahead 0 / 128 / 4096 KiB)",
                      lambda med, r, i: " / ".join(mib(x) for x in vol[i][:3]) if i in vol else ""))
        limit.append(("compressed read volume (est.)",
                      lambda med, r, i: f"{mib(compressed_read(vol[i]))} MiB (/{vol[i][4] / vol[i][3]:.2f})"
                      if i in vol and vol[i][3] else ""))
        if "warm" in measured:
            limit.append(("physical limit",
                          lambda med, r, i: f"{limit_ms(med, r, i) / 1000:.2f} s" if limit_ms(med, r, i) else ""))
            for mode in ("lazy", "trace", "profile", "optimize", "stargz"):
                if mode in measured:
                    limit.append((f"{mode} / limit", lambda med, r, i, m=mode: ratio(t(med, m), limit_ms(med, r, i))))
        for mode in ("lazy", "trace", "profile", "optimize", "stargz", "stargz-plain"):
            if mode in measured:
                limit.append((f"{mode}: link / compressed read",
                              lambda med, r, i, m=mode: ratio(med[m][1], compressed_read(vol[i]))
                              if m in med and i in vol else ""))

    def one(cols):
        rows = []
        for rate, image in order:
            med = medians(runs, rate, image)
            rows.append([image, rate] + [f(med, rate, image) for _, f in cols])
        return render(["image", "link"] + [title for title, _ in cols], rows)

    out = ""
    if speed:
        out += one(speed) + (
            "\nRatios of the median times above; against the warm start and P2P against the "
            "registry, the median of each run's ratio to the run measured right after it (on "
            "this host the same start varies by up to 40% from one minute to another).\n\n"
        )
    if limit:
        out += one(limit) + (
            "\nRead volume: the bytes the workload reads from its rootfs as one EROFS image on a "
            "plain loop device (hack/read-volume.sh); compressed at the layers' ratio (in "
            "brackets) it estimates the bytes a lazy pull must move at least. Physical limit: "
            "that estimate over the link rate, plus the warm start. Link / compressed read: "
            "the median bytes on the registry link before the first output against that "
            "estimate.\n"
        )
    return out


def paired_ratio(runs, rate, image, mode, base):
    """The median over `mode`'s runs of each one's time over the run of
    `base` measured right after it (the `BASE@MODE` rows, in the same
    order), or "" without such rows."""
    mine, beside = runs.get((rate, image, mode)), runs.get((rate, image, f"{base}@{mode}"))
    if not mine or not beside or len(mine) != len(beside):
        return ""
    return f"{statistics.median(m / b for (m, _), (b, _) in zip(mine, beside)):.2f}x"


def compressed_read(v):
    ra0, _ra128, _ra4096, compressed, uncompressed = v
    return ra0 * compressed / uncompressed if uncompressed else 0


def table(runs, order, n, vol):
    return times_table(runs, order, n) + "\n" + ratios_tables(runs, order, vol)


def chart(runs, order, png):
    present = [(m, t) for m, t in MODES if any(k[2] == m for k in runs)]
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as dat:
        for rate, image in order:
            meds = []
            for mode, _ in present:
                r = runs.get((rate, image, mode))
                meds.append(f"{statistics.median(x for x, _ in r) / 1000:.3f}" if r else "NaN")
            dat.write(f'"{image}\\n{rate}" ' + " ".join(meds) + "\n")
    plots = ", ".join(
        f"'{dat.name}' using {i + 2}:xtic(1) title '{title}'"
        for i, (_, title) in enumerate(present)
    )
    script = f"""
set terminal pngcairo size 1100,520 font ',10'
set output '{png}'
set title 'Cold start: pull to first output (median, s); hack/bench-coldstart.sh'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key top right
set bmargin 4
set ylabel 'seconds'
set yrange [0:*]
set grid ytics
plot {plots}
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    os.unlink(dat.name)


def write_docs(md, docs):
    text = open(docs).read()
    block = f"{BEGIN}\n{md}\n![cold start chart](coldstart.png)\n{END}"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    open(docs, "w").write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results")
    p.add_argument("--read-volume", help="hack/read-volume.sh's lines, one per image")
    p.add_argument("--breakdown", help="hack/bench-coldstart.sh's breakdown lines")
    p.add_argument("--docs", action="store_true")
    args = p.parse_args()
    runs, order, n = read(args.results)
    if not runs:
        sys.exit("coldstart-report: no results")
    vol = read_volume(args.read_volume) if args.read_volume else {}
    md = table(runs, order, n, vol)
    if args.breakdown:
        md += "\n" + breakdown_table(read_breakdown(args.breakdown), order)
    print(md)
    if args.docs:
        chart(runs, order, "docs/coldstart.png")
        write_docs(md, "docs/benchmarks.md")
        print("wrote docs/benchmarks.md and docs/coldstart.png")


if __name__ == "__main__":
    main()
