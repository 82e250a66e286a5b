"""The routing report in words, and the warning for routers that cannot tell experts apart."""

from __future__ import annotations

# Two experts whose router rows have a cosine above this in a layer get the same
# tokens there: their prompts do not separate them.
PARALLEL_COSINE = 0.95


def describe_report(report: dict) -> str:
    """A few lines: each expert's share of held-out prompts routed top-1 to it, overall and
    the layers where it wins the majority."""
    n = len(report["per_layer"])
    lines = [f"routing report ({report['gate_mode']} gates; held-out prompts routed top-1 to their own expert):"]
    for name in report["experts"]:
        share = report["overall_share_top1_own"][name]
        text = "no prompts" if share is None else f"{share:.0%} of prompt-layers"
        lines.append(f"  expert {name}: {text}, majority in {report['layers_majority_own'][name]}/{n} layers")
    if report["overall"] is not None:
        lines.append(f"  overall: {report['overall']:.0%}")
    return "\n".join(lines)


def parallel_rows_warning(report: dict, threshold: float = PARALLEL_COSINE) -> str | None:
    """A warning naming the layers where two experts' router rows are nearly parallel."""
    bad = [(pl["layer"], pl["max_row_cosine"], pl["closest_experts"]) for pl in report["per_layer"]
           if pl["max_row_cosine"] > threshold]
    if not bad:
        return None
    layer, cos, pair = max(bad, key=lambda b: b[1])
    return (f"router rows of two experts are nearly parallel (cosine > {threshold}) in {len(bad)} of "
            f"{len(report['per_layer'])} layers (worst: layer {layer}, experts {pair[0]} and {pair[1]}, cosine "
            f"{cos:.3f}): their prompts do not separate them, so they will receive the same tokens; give them "
            "more distinct positive prompts, or negative prompts")
