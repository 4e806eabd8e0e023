"""The one out-of-distribution verdict, for scoring and evaluation alike.

Two degrees (ARCHITECTURE.md): the model-free precheck (`tasks.scoring.precheck`) refuses a
file that is not a chest radiograph under every mode but "off"; the model's gate
(`tasks.bundle.ood_gate`) marks a radiograph unlike the training data, and `score.ood`
decides what that means: "reject" refuses it, "flag" scores it and marks it, "off" checks
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.bundle.ood_gate import OODGate

OOD_MODES = ("reject", "flag", "off")


@dataclass(frozen=True)
class OODVerdict:
    """refused_by: "precheck", "gate" or None (scored). reason: why refused, or the flag's note.
    score: the gate's distance (None without a gate or a forward pass). over_threshold: the
    distance is past the gate's threshold. flag: the row's `ood_flag` (None when not checked)."""

    refused_by: str | None
    reason: str | None
    score: float | None
    over_threshold: bool
    flag: bool | None


def ood_verdict(mode: str, *, precheck: str | None = None, gate: OODGate | None = None,
                score: float | None = None) -> OODVerdict:
    """The verdict on one decoded file: its precheck reason (None = a chest radiograph) and,
    when it reached the model, its gate distance `score`."""
    if mode not in OOD_MODES:
        raise ValueError(f"unknown out-of-distribution mode {mode!r}")
    if mode == "off":
        return OODVerdict(None, None, score, False, None)
    if precheck:
        return OODVerdict("precheck", precheck, None, False, True)
    over = gate is not None and score is not None and score > gate.threshold
    if over and mode == "reject":
        return OODVerdict("gate", gate.reason(score), score, True, True)
    return OODVerdict(None, gate.reason(score) if over else None, score, over, over)
