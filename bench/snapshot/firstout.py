#!/usr/bin/env python3
"""First-output latency of a command, as its caller sees it.

firstout.py N CONCURRENCY -- CMD...: runs CMD N times, CONCURRENCY at once
(batches started together), and prints one JSON object: for each run the
time from spawn to its first byte of stdout (`first_s`), to its exit
(`exit_s`) and the first line it printed (`line`). A run that exits non-zero
or prints nothing fails the whole measurement (exit 1, its stderr shown).
"""
import json
import os
import subprocess
import sys
import threading
import time


def one(cmd, out, i):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    t1 = time.monotonic()
    rest, err = p.communicate()
    t2 = time.monotonic()
    out[i] = {
        "first_s": t1 - t0,
        "exit_s": t2 - t0,
        "line": first.decode(errors="replace").strip(),
        "rc": p.returncode,
        "stderr": err.decode(errors="replace")[-2000:],
    }


def main():
    n, conc = int(sys.argv[1]), int(sys.argv[2])
    assert sys.argv[3] == "--"
    cmd = sys.argv[4:]
    runs = [None] * n
    i = 0
    while i < n:
        batch = range(i, min(n, i + conc))
        ts = [threading.Thread(target=one, args=(cmd, runs, j)) for j in batch]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        i += conc
    bad = [r for r in runs if r["rc"] != 0 or not r["line"]]
    if bad:
        sys.stderr.write("run failed (rc %d):\n%s\n" % (bad[0]["rc"], bad[0]["stderr"]))
        sys.exit(1)
    for r in runs:
        del r["stderr"]
    json.dump(runs, sys.stdout)


if __name__ == "__main__":
    main()
