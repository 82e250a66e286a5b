"""FrankenMoE assembly: a mixture-of-experts model from dense fine-tunes of one base.

Attention, norms and embeddings come from the base; each expert's MLP becomes that
expert's MLP in every layer; each layer's router (gate) is computed from prompts.

* :mod:`dmerge.moe.recipe`: mergekit-moe's recipe schema (and ``merge_method: moe``);
* :mod:`dmerge.moe.families`: the output families (Mixtral, Qwen2-MoE, Qwen3-MoE), their
  tensor names and config;
* :mod:`dmerge.moe.plan`: the MoE layout planner, beside the merge planner;
* :mod:`dmerge.moe.gates`: the gate modes and the routing report (pure tensor math);
* :mod:`dmerge.moe.hidden`: the prompt pass, one decoder layer per task.
"""
