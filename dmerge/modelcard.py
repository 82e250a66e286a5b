"""README.md for a merged model: Hugging Face front matter, method, parents, recipe."""

from __future__ import annotations

import yaml


def model_card(plan) -> str:
    """A model card naming the method, the parents and the exact recipe."""
    recipe = plan.recipe
    parents = list(plan.models)
    front = {"base_model": parents, "library_name": "transformers", "tags": ["merge", "dmerge", "mergekit"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "# Merged model",
        "",
        f"This model was merged with [dmerge](https://github.com/) using the **{plan.method}** method.",
        "",
        "## Parents",
        "",
    ]
    for p in parents:
        tag = " (base)" if p == recipe.base_model else ""
        lines.append(f"* {p}{tag}")
    lines += ["", "## Recipe", "", "```yaml", (recipe.source_text or "").strip(), "```", ""]
    return "\n".join(lines)
