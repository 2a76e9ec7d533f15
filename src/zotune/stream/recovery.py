"""A streamed run's way back: checking the tier against the run's log when it resumes, and putting the
blocks back as they were when a step fails."""

from __future__ import annotations

from zotune.config import ConfigError
from zotune.methods import StepKey


def restore(engine, records: list) -> None:
    """Check the tier against a run's log and keep its records, so every block can catch up.

    A block written during a step that never reached the log (the run was killed inside it)
    goes back to its previous slot, from before that step: the resume is exact. A block
    ahead of the log belongs to another run and is refused.
    """
    n = len(records)
    back = []
    for j, st in enumerate(engine.states):
        prev = engine.tier.previous(j) if st.perturbed >= n else None
        if prev is not None and 0 <= prev.version <= n and prev.perturbed < n:
            engine.tier.go_back(j)
            engine.states[j] = prev
            back.append(j)
    if back:
        engine.log(f"the run stopped inside step {n + 1}: blocks {back[0]}..{back[-1]} go back to their copies "
                   f"from before it, and step {n + 1} is taken again")
    ahead = [j for j, st in enumerate(engine.states) if st.version > n or st.perturbed >= n]
    if ahead:
        st = engine.states[ahead[0]]
        raise ConfigError(f"the stream folder's block {ahead[0]} is at step {max(st.version, st.perturbed + 1)} "
                          f"but the run's log ends at step {n}: the folder was trained by another run; "
                          f"prepare a fresh folder for a new run")
    engine.history = {r.step: r for r in records}


def abandon(engine, opt, key: StepKey, j: int, offsets: dict[int, float]) -> None:
    """After a failed step: blocks end as they were before it.

    On disk each block still has its copy from before the step in its other slot: going back
    is exact. In host memory the moves are taken back (equal up to float rounding), the block
    in hand now and the others when they next arrive, as in the whole-model step.
    """
    in_hand = j if j >= 0 and j in engine._resident else None
    if engine.tier.durable:  # every block's copy from before the step is in its other slot
        engine.wait()
        if in_hand is not None:  # never written: drop it, the tier holds it as it was
            engine._drop(in_hand)
            engine._carry.drop(in_hand, opt)  # and its optimizer state: the tier's copy is the current one
        for b, state in enumerate(engine.states):
            if state.perturbed == key.step:
                engine.tier.go_back(b)
            if b == in_hand or state.perturbed == key.step:
                engine.states[b] = engine.tier.get_state(b)
    elif in_hand is not None:
        opt.undo(engine._pairs(in_hand), key, offsets)
        engine._rebind_trained(in_hand)
        engine._leave(in_hand)
