"""Stage 6: PEFT adapters on the finalized base, with key coverage so a silent no-op is caught."""

from __future__ import annotations

from ..pipeline import Context, Outcome
from .base import BaseStage


class AdapterLoad(BaseStage):
    name = "adapter_load"

    def run(self, ctx: Context) -> Outcome:
        specs = ctx.config.adapters
        if not specs:
            return Outcome("nothing to do", "no adapters configured")
        from ..adapters import AdapterSpec, apply_adapters

        model, records, findings = apply_adapters(
            ctx.model, [AdapterSpec(path=a.path, name=a.name, merge=a.merge, scale=a.scale) for a in specs],
            requantize=ctx.config.merge_requantize, allow_pickle=ctx.allow_pickle)
        ctx.model = model
        ctx.report.adapters = list(records)
        ctx.report.findings.extend(findings)
        merged = sum(r.merged for r in records)
        matched = sum(r.matched for r in records)
        return Outcome("ran", f"{len(records)} adapter(s), {matched} tensor(s) placed, {merged} merged")
