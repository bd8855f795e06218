"""The recovery campaign: postcopy migrations of the adversarial guest with cuts at random
points after the switch (the proxy goes silent or resets, or migrate-pause on one side),
each recovered with QEMU's QMP sequence and verified page by page
(tests/recovery_harness.py: two ``trimig run`` engines, the unmodified qemu.qmp client).

    python3 tests/recovery_campaign.py --runs 100 [--seed N] [--log runs.jsonl] [--only RUN]

A run is *ok* when both sides complete and the destination guest verifies every page
after writing on there. Each plan (transport, preempt, hugetlb, write rate, bandwidth,
1-3 cuts with their delays and kinds, a failed attempt first) comes from the run number
and the master seed, so ``--only RUN --seed N`` repeats one. Exit status 0 only if every
run was ok.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hugepool import reserved_hugepages
from recovery_harness import RecoveryPlan, migrate_with_cuts

#: Two engines with a 4 MiB hugetlb block each, and margin.
HUGEPAGES_NEEDED = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--first", type=int, default=0, help="number of the first run")
    parser.add_argument("--seed", type=int, default=1, help="master seed of the plans")
    parser.add_argument("--only", type=int, help="repeat just this run number")
    parser.add_argument("--log", help="append each run as one JSON line here, as it ends")
    args = parser.parse_args(argv)
    numbers = [args.only] if args.only is not None else range(args.first, args.first + args.runs)
    outcomes: collections.Counter[str] = collections.Counter()
    cuts = pauses = failed_attempts = 0
    started = time.monotonic()
    with reserved_hugepages(HUGEPAGES_NEEDED):
        for number in numbers:
            plan = RecoveryPlan.random(args.seed * 1_000_003 + number)
            t0 = time.monotonic()
            result = migrate_with_cuts(plan)
            seconds = round(time.monotonic() - t0, 1)
            outcome = "ok" if result.ok else "FAILED"
            outcomes[outcome] += 1
            cuts += len(plan.cuts)
            pauses += len(result.pauses)
            failed_attempts += result.failed_attempts
            line = (
                f"run {number}: {outcome} in {seconds} s; {len(result.pauses)} of "
                f"{len(plan.cuts)} cuts landed (paused after {result.pauses} s), "
                f"{result.recoveries} recoveries; {plan}"
            )
            print(line, flush=True)
            if not result.ok:
                print(result.describe(), flush=True)
            if args.log:
                with open(args.log, "a") as log:
                    record = {
                        "run": number,
                        "seed": args.seed,
                        "ok": result.ok,
                        "seconds": seconds,
                        "plan": repr(plan),
                        "pauses": result.pauses,
                        "recoveries": result.recoveries,
                        "failed_attempts": result.failed_attempts,
                        "error": result.error,
                        "verify": result.verify.get("detail"),
                    }
                    log.write(json.dumps(record) + "\n")
    print(
        f"{sum(outcomes.values())} runs: {outcomes['ok']} ok, {outcomes['FAILED']} failed; "
        f"{pauses} of {cuts} cuts landed in postcopy and were recovered from "
        f"({failed_attempts} failed attempts retried); "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    return 0 if not outcomes["FAILED"] else 1


if __name__ == "__main__":
    sys.exit(main())
