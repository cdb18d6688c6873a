#!/usr/bin/env python3
"""Runs the libFuzzer harnesses (build/fuzz/bin/fuzz_*) for a while each.

Each harness starts from its committed seeds (tests/fuzz/corpus/<name>/) and
from the crash inputs kept earlier (tests/fuzz/crashes/<name>/, so a crash
found once is retried first, a regression seed); new interesting inputs go
to a scratch corpus under build/fuzz/corpus/<name>/ (never into the
committed seeds). A crash or a broken property stops the harness, keeps the
input as tests/fuzz/crashes/<name>/crash-<sha1> and fails it.

    python3 tests/fuzz/fuzzrun.py --bin build/fuzz/bin [--secs 60] [-k name]

Prints one line per harness (executions, coverage, crash) and exits 1 on
any crash. tests/run.py calls run_one() for `make test`.
"""
import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def harnesses(bindir):
    if not os.path.isdir(bindir):
        return []
    return sorted(n for n in os.listdir(bindir)
                  if n.startswith("fuzz_") and os.access(os.path.join(bindir, n), os.X_OK))


def run_one(bindir, name, secs):
    """Runs harness NAME (fuzz_x) for SECS seconds: (ok, summary, output)."""
    short = name[len("fuzz_"):]
    seeds = os.path.join(HERE, "corpus", short)
    crashes = os.path.join(HERE, "crashes", short)
    scratch = os.path.join(ROOT, "build", "fuzz", "corpus", short)
    os.makedirs(crashes, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    dirs = [scratch] + [d for d in (seeds, crashes) if os.path.isdir(d)]
    argv = [os.path.join(bindir, name), f"-max_total_time={secs}", "-timeout=10",
            "-rss_limit_mb=2048", "-max_len=8192", "-print_final_stats=1",
            f"-artifact_prefix={crashes}/", *dirs]
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "abort_on_error=1:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    t0 = time.time()
    # A harness stops itself at max_total_time; the timeout only catches one
    # that hangs (libFuzzer's own -timeout is per input).
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, errors="replace",
                           timeout=secs * 3 + 120)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        rc = -1
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"\bcov: (\d+)", out)
    units = re.findall(r"Test unit written to (\S+)", out)
    # The kept crash inputs are part of the corpus: ones still crashing show
    # up as a crash too (libFuzzer names the input it ran).
    if not units:
        units = re.findall(r"Running: (\S+)", out) if rc != 0 else []
    ok = rc == 0 and not units
    summary = (f"{execs[-1] if execs else '?'} execs in {time.time() - t0:.0f}s, "
               f"cov {cov[-1] if cov else '?'}")
    if not ok:
        summary += "; CRASH" + (f": input kept at {os.path.relpath(units[-1], ROOT)}" if units
                                else f" (exit {rc})")
    return ok, summary, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "fuzz", "bin"))
    ap.add_argument("--secs", type=int, default=60)
    ap.add_argument("-k", default="")
    args = ap.parse_args()
    names = [n for n in harnesses(args.bin) if args.k in n]
    if not names:
        print(f"no harnesses in {args.bin} (make fuzz-build)")
        sys.exit(1)
    failed = 0
    for n in names:
        ok, summary, out = run_one(args.bin, n, args.secs)
        print(f"{'PASS' if ok else 'FAIL'} fuzz/{n[len('fuzz_'):]}: {summary}", flush=True)
        if not ok:
            failed += 1
            for line in out.rstrip().splitlines()[-40:]:
                print("    " + line)
    print(f"{len(names) - failed} harnesses clean, {failed} crashed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
