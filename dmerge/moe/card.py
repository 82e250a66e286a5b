"""README.md of a FrankenMoE: the family, the experts and their prompts, the gate mode, the recipe."""

from __future__ import annotations

import yaml

from dmerge.modelcard import _display


def moe_model_card(plan, name: str | None = None) -> str:
    """A model card for a MoE plan: what it is made of and how its routers were set."""
    recipe = plan.recipe
    parents = [recipe.base_model] + [p for p in plan.models if p != recipe.base_model]
    front = yaml.safe_dump({"base_model": parents, "library_name": "transformers",
                            "tags": ["moe", "frankenmoe", "merge", "dmerge", "mergekit"]},
                           sort_keys=False, allow_unicode=True).strip()
    lines = ["---", front, "---", f"# {name or 'FrankenMoE'}", "",
             f"A mixture of experts ({plan.architecture}) assembled with dmerge from dense models: attention, "
             f"norms and embeddings from {_display(recipe.base_model, plan)}, each expert's MLP from its model, "
             f"routers initialised with gate mode `{recipe.gate_mode}`; {recipe.experts_per_token} experts per token.",
             "", "## Experts", ""]
    for i, e in enumerate(recipe.experts):
        prompts = ", ".join(f"\"{p}\"" for p in (e.positive_prompts or [])[:3])
        lines.append(f"{i}. {_display(e.source_model, plan)}" + (f": {prompts}" if prompts else ""))
    for e in recipe.shared_experts or []:
        lines.append(f"* shared expert: {_display(e.source_model, plan)}")
    lines += ["", "The routing report (`routing_report.json`) says how often each expert's prompts were routed "
              "to it, per layer.", "", "## Recipe", "", "```yaml", (recipe.source_text or "").strip(), "```", ""]
    return "\n".join(lines)
