"""README.md for a merged model: Hugging Face front matter, method, parents, recipe.

The front matter is what the Hub indexes: ``base_model`` (every parent, base first),
``library_name``, and the tags ``merge`` and ``dmerge`` (plus ``mergekit``: the recipe is
in mergekit's format and the Hub's merge listings look for that tag). The body says how
the model was made: the method and its paper, the base model, the parents and what each
contributed, the output layer stack for slice recipes, the tokenizer, and the exact
recipe text that was run.
"""

from __future__ import annotations

import yaml

from dmerge.io import storage
from dmerge.methods import get_method


def _display(ref: str, plan=None) -> str:
    """Markdown for a parent: a Hub link for Hub models, the reference otherwise."""
    model = plan.models.get(ref) if plan is not None else None
    loc = model.location if model is not None else storage.resolve_location(ref)
    if loc.startswith("hf://") and not ref.startswith("hf://"):
        repo = ref.split("@", 1)[0]
        return f"[{ref}](https://huggingface.co/{repo})"
    return f"`{ref}`"


def front_matter(plan) -> dict:
    recipe = plan.recipe
    parents = list(plan.models)
    if recipe.base_model in parents:
        parents.remove(recipe.base_model)
        parents.insert(0, recipe.base_model)
    return {
        "base_model": parents,
        "library_name": "transformers",
        "tags": ["merge", "dmerge", "mergekit"],
    }


def model_card(plan, name: str | None = None) -> str:
    """A model card naming the method, the parents and the exact recipe."""
    if plan.method == "moe":
        from dmerge.moe.card import moe_model_card

        return moe_model_card(plan, name)
    recipe = plan.recipe
    method = get_method(plan.method)
    title = name or "Merged model"
    front = yaml.safe_dump(front_matter(plan), sort_keys=False, allow_unicode=True).strip()
    lines = ["---", front, "---", f"# {title}", "",
             "This model is a merge of pre-trained language models, made with dmerge "
             "(a distributed merge engine that runs mergekit recipes).", ""]

    lines += ["## Method", ""]
    ref = f" ([reference]({method.reference}))" if method.reference else ""
    lines.append(f"Merge method: **{plan.method}**{ref}.")
    summary = (method.doc or "").strip().replace("``", "`").split("\n\n")[0]
    if summary:
        lines += ["", " ".join(summary.split())]
    if recipe.base_model:
        lines += ["", f"Base model: {_display(recipe.base_model, plan)}."]
    lines.append("")

    lines += ["## Parents", ""]
    for p in plan.models:
        role = " (base model)" if p == recipe.base_model else ""
        lines.append(f"* {_display(p, plan)}{role}")
    lines.append("")

    if recipe.slices:
        lines += ["## Layers", "", f"{len(plan.layers)} decoder layers, stacked from slices:", "",
                  "| output layers | from |", "|---|---|"]
        for line in plan.layer_summary():
            out, _, src = line.partition(" <- ")
            lines.append(f"| {out} | {src} |")
        lines.append("")

    if plan.tokenizer is not None:
        lines += ["## Tokenizer", "", f"Built from `{plan.tokenizer.spec.source}`: "
                  f"{plan.tokenizer.n_tokens} tokens, vocabulary size {plan.tokenizer.rows}. Embedding and output "
                  "rows were re-indexed to the new vocabulary.", ""]
    if plan.chat_template:
        lines += ["The tokenizer carries the chat template the recipe set.", ""]

    text = (recipe.source_text or "").strip() or yaml.safe_dump(
        recipe.model_dump(exclude_none=True, exclude={"source_dir", "source_text", "allow_crimes"}), sort_keys=False
    ).strip()
    lines += ["## Recipe", "", "The exact recipe used to produce this model:", "", "```yaml", text, "```", ""]
    return "\n".join(lines)
