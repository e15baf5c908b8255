"""The Python engine and the kernel tables agree, packet by packet (see differential.py)."""

from __future__ import annotations

import pytest

from . import differential

pytestmark = pytest.mark.linux

SEED = 15
POLICIES = 50
FLOWS = 40  # per policy; with replies and fragments about 3,400 datagrams in all


def test_engine_and_kernel_give_the_same_verdicts(kernel_lab):
    mismatches, judged, stats = differential.run(kernel_lab, SEED, POLICIES, FLOWS)
    assert judged >= 2000, stats
    verdicts = stats["verdicts"]
    # the generator must exercise both verdicts, fragments and replies
    assert verdicts.get("new_pass", 0) > 200 and verdicts.get("new_drop", 0) > 200, verdicts
    assert verdicts.get("new_pass_frag", 0) > 20 and verdicts.get("new_drop_frag", 0) > 20
    assert verdicts.get("reply_pass", 0) > 200 and verdicts.get("reply_drop", 0) > 20
    assert stats["refused"] == 0 and stats["full_rebuilds"] == 1, stats
    if mismatches:
        shown = "\n\n".join(str(m) for m in mismatches[:5])
        pytest.fail(f"{len(mismatches)} of {judged} datagrams disagree (seed {SEED}):\n{shown}")
