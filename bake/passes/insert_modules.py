"""Pass 6: what no fold placed. With `plan.insert_modules` it becomes a small module inside the
forward of the site's module (see bake.modules; the checkpoint then carries generated code).
Without it, this pass names the first such site and why it cannot fold, and stops the compile
before anything is written."""

from __future__ import annotations

from ..errors import BakeError
from ..maps import LinearMap
from ..plan import Plan

NAME = "insert-modules"


def reason(plan: Plan, sp) -> str:
    for seg in sp.pending:
        if not isinstance(seg, LinearMap):
            return seg.why_not_foldable()
    m = sp.pending[0]
    if sp.info.role == "sum" or (sp.info.role == "residual" and sp.info.writer is None and _after_block(plan, sp)):
        return ("a mixture of experts writes here: its output sums the chosen experts weighted by the router, "
                "so only a linear map without a shift folds (into every expert); a shift has no bias it is "
                "added through exactly once")
    if sp.info.role == "residual":
        if sp.info.writer is None:
            return (f"the last write into the residual stream in {plan.adapter.family} is a norm with no bias slot, "
                    f"so no shift folds here")
        if m.scale_is_identity:
            return (f"the shift needs a bias on {sp.info.writer}, which this architecture cannot have (for llama.cpp, "
                    f"--format gguf,control-vector carries a shift at a layer output as a control vector)")
        return ("only an additive map folds on the residual stream (a scale or projection there changes what "
                "every later layer reads); put it on the writers' outputs (attn-out, mlp-out) instead")
    if sp.info.role == "norm" and not sp.info.consumers:
        return ("no Linear reads this norm's output as it is (it feeds the residual stream, lm_head, or a block "
                "that changes it first, as Mamba's mixer zeroes padded tokens), so no bias takes its shift; "
                "only a per-unit scale folds here")
    target = sp.info.module if sp.info.role == "linear" else ", ".join(sp.info.consumers)
    if not m.shift_is_zero:
        return f"the shift needs a bias on {target}, which this architecture cannot have"
    return "no pass handles this site"


def _after_block(plan: Plan, sp) -> bool:
    """The residual site of a layer whose last writer is a mixture-of-experts block."""
    return any(o.role == "sum" and o.module.startswith(sp.info.module + ".") for o in plan.adapter.sites(plan.model).values())


def run(plan: Plan) -> None:
    left = [sp for sp in plan.sites if sp.pending]
    if left and plan.insert_modules:
        from ..modules import insert

        for sp in left:
            kinds = [seg.kind if not isinstance(seg, LinearMap) else "linear" for seg in sp.pending]
            why = reason(plan, sp)
            plan.inserted.append(insert(plan.model, sp.info.module, sp.info.side, sp.pending))
            plan.note(NAME, sp.name, f"inserted module ({', '.join(kinds)}) at the {sp.info.side} of "
                                     f"{sp.info.module}: {why}")
            sp.pending = []
        return
    if left:
        sp = left[0]
        more = f" (and {len(left) - 1} more site(s))" if len(left) > 1 else ""
        if plan.adapter.modality == "text-to-image":
            raise BakeError(f"site {sp.name}: cannot fold exactly: {reason(plan, sp)}{more}; for a pipeline use "
                            f"a scale-only map there (e.g. gaussian-act with the shift dropped) or another site")
        raise BakeError(f"site {sp.name}: cannot fold exactly: {reason(plan, sp)}{more}; pass --insert-modules "
                        f"to keep it as a small module (the checkpoint then needs trust_remote_code=True)")
