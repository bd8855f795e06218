"""A slice of the randomized correctness campaign (tests/campaign.py) in every run of the
suite: a few random plans, a fresh master seed each time (printed on failure, so the run
can be repeated with ``python3 tests/campaign.py --seed N --only RUN``)."""

from __future__ import annotations

import os
import random

import attrs
import pytest
import trio
from campaign import Plan, execute

#: SLICE runs per suite run; TRIMIG_CAMPAIGN_SEED repeats a given slice.
SLICE = 6
MASTER_SEED = int(os.environ.get("TRIMIG_CAMPAIGN_SEED", random.randrange(1, 1 << 20)))


@pytest.mark.usefixtures("hugepages")
@pytest.mark.parametrize("run", range(SLICE))
async def test_random_migration_verifies(run: int) -> None:
    plan = Plan.draw(MASTER_SEED, run)
    with trio.fail_after(120):
        outcome = await execute(plan)
    assert outcome["ok"], (
        f"campaign seed {MASTER_SEED} run {run}: {outcome}; plan {attrs.asdict(plan)}"
    )
