#!/usr/bin/env python3
"""The report of hack/bench-coldstart.sh: reads its results.tsv (rate, image,
mode, run, ms to first output, registry link bytes until then), prints a
markdown table of medians and spreads and the ratios the issue aims at, and
with --docs writes the table into docs/benchmarks.md (between the coldstart
markers) and a PNG chart (gnuplot) to docs/coldstart.png."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

MODES = [
    ("full", "overlayfs full pull"),
    ("lazy", "lazybd"),
    ("trace", "lazybd + trace"),
    ("p2p", "lazybd + P2P"),
    ("warm", "warm (local)"),
]
BEGIN = "<!-- coldstart:begin (hack/bench-coldstart.sh DOCS=1 rewrites this) -->"
END = "<!-- coldstart:end -->"


def read(path):
    runs = defaultdict(list)  # (rate, image, mode) -> [(ms, bytes)]
    order = []
    with open(path) as f:
        for line in f:
            rate, image, mode, _run, ms, nbytes = line.rstrip("\n").split("\t")
            if (rate, image) not in order:
                order.append((rate, image))
            runs[(rate, image, mode)].append((int(ms), int(nbytes)))
    return runs, order


def mib(n):
    return f"{n / (1 << 20):.1f}"


def table(runs, order):
    present = [(m, title) for m, title in MODES if any(k[2] == m for k in runs)]
    head = ["image", "link"] + [t for _, t in present] + ["full / lazy", "trace / warm"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rate, image in order:
        cells = [image, rate]
        med = {}
        for mode, _ in present:
            r = runs.get((rate, image, mode))
            if not r:
                cells.append("")
                continue
            ms = [x for x, _ in r]
            med[mode] = statistics.median(ms)
            nbytes = statistics.median(b for _, b in r)
            cells.append(
                f"{med[mode] / 1000:.2f} s ({min(ms) / 1000:.2f}-{max(ms) / 1000:.2f}), {mib(nbytes)} MiB"
            )
        cells.append(f"{med['full'] / med['lazy']:.1f}x" if "full" in med and "lazy" in med else "")
        cells.append(f"{med['trace'] / med['warm']:.2f}x" if "trace" in med and "warm" in med else "")
        rows.append("| " + " | ".join(cells) + " |")
    n = max(len(r) for r in runs.values())
    note = (
        f"\nEach cell: median time from the pull to the first output (min-max of {n} runs), "
        "and the median bytes the registry link carried until then.\n"
    )
    return "\n".join(rows) + "\n" + note


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
    p.add_argument("--docs", action="store_true")
    args = p.parse_args()
    runs, order = read(args.results)
    if not runs:
        sys.exit("coldstart-report: no results")
    md = table(runs, order)
    print(md)
    if args.docs:
        chart(runs, order, "docs/coldstart.png")
        write_docs(md, "docs/benchmarks.md")
        print("wrote docs/benchmarks.md and docs/coldstart.png")


if __name__ == "__main__":
    main()
