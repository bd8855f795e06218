"""The randomized correctness campaign: many migrations of the adversarial guest, each with
its own random seed, RAM size, hugetlb block, write rate, transport, mode, postcopy switch
point and (in precopy) cancel point; every one verified page by page.

    python3 tests/campaign.py --runs 1000 --json campaign.json [--contention] [--seed N]
        [--log runs.jsonl] [--postcopy-only]

A run is *ok* when the destination guest verifies after writing on there (or, for a
cancelled run, the source guest verifies and runs on). Anything else is printed with the
parameters that reproduce it (``--only RUN --seed N``). The engines run in this process on
the library API, as in ``trimig demo``; the CLI and QMP paths are covered by
tests/test_adversarial.py. Exit status 0 only if every run was ok.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial_harness import cpu_contention, guest_command
from hugepool import reserved_hugepages

from trimig._trio import open_nursery
from trimig.demo import receive, running_guest, transport_uris, verify_destination
from trimig.errors import TrimigError
from trimig.loadvm.incoming import IncomingMigration
from trimig.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from trimig.ram_blocks import default_block_specs
from trimig.savevm.outgoing import OutgoingMigration

MiB = 1 << 20
#: Bounds one run; a run past it counts as hung.
RUN_DEADLINE = 120.0
#: Seconds after which a precopy run that has not converged may stop for as long as needed.
FORCE_CONVERGENCE_AFTER = 8.0
#: The adversarial guest's verify replays its whole journal, which a flat-out writer makes
#: long: a slow check on a loaded machine is not a lost page, so it may take this long.
VERIFY_TIMEOUT = 60.0
#: 2 MiB huge pages reserved for the campaign: two 8 MiB blocks and room to spare.
HUGEPAGES_NEEDED = 16


@attrs.frozen
class Plan:
    run: int
    seed: int
    ram: int
    huge: int
    rate: float
    words: int
    transport: str
    mode: str
    warmup: float
    #: Seconds after the start of the migration when postcopy is asked for (postcopy modes).
    switch_at: float
    #: Seconds after the start when the migration is cancelled (precopy only), or None.
    cancel_at: float | None
    max_bandwidth: int

    @classmethod
    def draw(cls, master: int, run: int) -> Plan:
        rng = random.Random(master * 1_000_003 + run)
        transport = rng.choice(["tcp", "unix", "exec", "rdma"])
        mode = (
            "precopy"
            if transport == "exec"
            else rng.choice(["precopy", "postcopy", "postcopy-preempt"])
        )
        cancel = mode == "precopy" and rng.random() < 0.15
        return cls(
            run=run,
            seed=rng.randrange(1, 1 << 30),
            ram=rng.choice([8, 16, 32, 64]) * MiB,
            huge=rng.choice([0, 0, 2, 8]) * MiB,
            rate=rng.choice([0.0, 20.0, 200.0, 1000.0, 5000.0]),
            words=rng.choice([1, 4, 16, 64]),
            transport=transport,
            mode=mode,
            warmup=rng.uniform(0.0, 0.4),
            switch_at=rng.uniform(0.0, 0.3),
            cancel_at=rng.uniform(0.0, 0.3) if cancel else None,
            # Sometimes slow enough that a cancel or a switch lands mid-pass.
            max_bandwidth=rng.choice([0, 0, 64 * MiB, 256 * MiB]),
        )


async def execute(plan: Plan) -> dict[str, Any]:
    """One migration by ``plan``; a dict with ``ok`` and what happened."""
    specs = default_block_specs(plan.ram, huge=plan.huge)
    command = guest_command(plan.seed, plan.rate, plan.words)
    capabilities = MigrationCapabilities()
    parameters = MigrationParameters()
    if plan.mode != "precopy":
        capabilities.set("postcopy-ram", True)
        capabilities.set("postcopy-preempt", plan.mode == "postcopy-preempt")
    parameters.set("max-bandwidth", plan.max_bandwidth)
    if plan.rate == 0.0 and plan.mode == "precopy":
        parameters.set("downtime-limit", 2000)  # a flat-out writer converges within bounds
    outcome: dict[str, Any] = {"ok": False}
    async with transport_uris(plan.transport) as (listen_uri, connect_uri, options):
        incoming = IncomingMigration(
            specs, guest_command=command, capabilities=capabilities, listen_options=options
        )
        try:
            async with (
                running_guest(specs, command) as (guest, blocks),
                open_nursery() as nursery,
            ):
                address = await nursery.start(receive, incoming, listen_uri)
                await trio.sleep(plan.warmup)
                outgoing = OutgoingMigration(
                    guest,
                    blocks,
                    capabilities=capabilities,
                    parameters=parameters,
                    connect_options=options,
                )
                migration = trio.CancelScope()

                async def drive() -> None:
                    if plan.cancel_at is not None:
                        await trio.sleep(plan.cancel_at)
                        migration.cancel()
                    elif plan.mode != "precopy":
                        await trio.sleep(plan.switch_at)
                        if outgoing.status.value.is_running:
                            outgoing.start_postcopy()
                    else:
                        # A guest writing faster than the link never converges (that is
                        # auto-converge's business): as a QEMU user would, allow a longer
                        # downtime after a while, so the run ends and is verified.
                        await trio.sleep(FORCE_CONVERGENCE_AFTER)
                        parameters.set("downtime-limit", 60_000)

                error = None
                with migration:
                    nursery.start_soon(drive)
                    try:
                        await outgoing.run(connect_uri.format(address=address))
                    except TrimigError as exc:
                        error = exc
                outcome["source"] = outgoing.status.value.value
                if error is not None:
                    outcome["error"] = str(error)
                if outgoing.status.value is not MigrationStatus.COMPLETED:
                    # Cancelled or failed before the switch: the source guest runs on, intact.
                    outcome["guest_running"] = guest.running
                    await guest.stop()
                    verdict = await guest.verify(timeout=VERIFY_TIMEOUT)
                    outcome["verdict"] = verdict.detail
                    outcome["ok"] = (
                        outgoing.status.value is MigrationStatus.CANCELLED
                        and verdict.verified
                        and outcome["guest_running"]
                    )
                    nursery.cancel_scope.cancel()
                    return outcome
                await incoming.status.wait_value(lambda status: not status.is_running)
            outcome["destination"] = incoming.status.value.value
            if incoming.error_desc:
                outcome["destination_error"] = incoming.error_desc
            verdict = await verify_destination(incoming, 0.2, timeout=VERIFY_TIMEOUT)
            outcome["verdict"] = verdict.detail if verdict else None
            outcome["ok"] = bool(verdict and verdict.verified)
            if verdict is not None:
                outcome["bad_pages"] = verdict.raw.get("bad_pages")
            return outcome
        finally:
            await incoming.aclose()


def plans(args: argparse.Namespace) -> Iterator[Plan]:
    """The plans to run: ``--only``'s, or ``--runs`` of them from ``--first`` on. With
    ``--postcopy-only`` precopy plans are skipped (not redrawn), so run numbers and
    ``--only`` stay the same as in a full campaign."""
    if args.only is not None:
        yield Plan.draw(args.seed, args.only)
        return
    run, taken = args.first, 0
    while taken < args.runs:
        plan = Plan.draw(args.seed, run)
        run += 1
        if args.postcopy_only and plan.mode == "precopy":
            continue
        taken += 1
        yield plan


async def campaign(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for plan in plans(args):
        started = time.monotonic()
        try:
            with trio.fail_after(RUN_DEADLINE):
                outcome = await execute(plan)
        except trio.TooSlowError:
            outcome = {"ok": False, "error": f"hung: no end within {RUN_DEADLINE:.0f} s"}
        except Exception as exc:  # a crash of the harness or the engine is a failed run
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        outcome["seconds"] = round(time.monotonic() - started, 2)
        result = {"plan": attrs.asdict(plan), **outcome}
        results.append(result)
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps(result) + "\n")
        if not outcome["ok"] or args.verbose:
            print(json.dumps(result), flush=True)
    return results


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    bad = [r for r in results if not r["ok"]]
    return {
        "runs": len(results),
        "ok": len(results) - len(bad),
        "failed": [r["plan"]["run"] for r in bad],
        "bad_pages": sum(r.get("bad_pages") or 0 for r in results),
        "cancelled": sum(r.get("source") == "cancelled" for r in results),
        "by_mode": {
            mode: sum(r["plan"]["mode"] == mode for r in results)
            for mode in ("precopy", "postcopy", "postcopy-preempt")
        },
        "by_transport": {
            t: sum(r["plan"]["transport"] == t for r in results)
            for t in ("tcp", "unix", "exec", "rdma")
        },
        "with_hugetlb": sum(r["plan"]["huge"] > 0 for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--first", type=int, default=0, help="number of the first run")
    parser.add_argument("--seed", type=int, default=1, help="master seed of the plans")
    parser.add_argument("--only", type=int, help="repeat just this run number")
    parser.add_argument("--contention", action="store_true", help="a busy process per core")
    parser.add_argument(
        "--postcopy-only", action="store_true", help="skip the plans that are precopy"
    )
    parser.add_argument("--json", help="write every run's plan and outcome here")
    parser.add_argument("--log", help="append each run as one JSON line here, as it ends")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        # Source and destination hugetlb blocks of the largest plan at once, with room.
        stack.enter_context(reserved_hugepages(HUGEPAGES_NEEDED))
        if args.contention:
            stack.enter_context(cpu_contention())
        results = trio.run(campaign, args)
    report = summary(results)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"summary": report, "args": vars(args), "runs": results}, file, indent=1)
    return 0 if report["ok"] == report["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
