"""The MoE output families: their tensor names (as the Hub's reference checkpoints
write them) and the config each needs.

=========== ============================ ============================================
family      from experts of              per layer ``model.layers.{i}.``
=========== ============================ ============================================
Mixtral     Llama, Mistral               ``block_sparse_moe.gate.weight`` [E, H];
                                         ``block_sparse_moe.experts.{e}.w1/w2/w3.weight``
                                         (gate, down, up projections)
Qwen2-MoE   Llama, Mistral, Qwen2        ``mlp.gate.weight``; ``mlp.experts.{e}.{gate,up,down}_proj.weight``;
            (one shared expert)          ``mlp.shared_expert.{gate,up,down}_proj.weight``;
                                         ``mlp.shared_expert_gate.weight`` [1, H]
Qwen3-MoE   Qwen3                        ``mlp.gate.weight``; ``mlp.experts.{e}.{gate,up,down}_proj.weight``
=========== ============================ ============================================

transformers 5 converts these names to its fused layout when it loads them, and vLLM's
and llama.cpp's converters expect them. ``expert_layout: packed`` writes transformers
5's own fused tensors instead: ``mlp.experts.gate_up_proj`` [E, 2I, H] (each expert's
gate rows, then its up rows) and ``mlp.experts.down_proj`` [E, H, I], router
``mlp.gate.weight``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from dmerge.errors import RecipeError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoEFamily:
    name: str  # output model_type
    display: str
    architecture: str  # output architectures entry
    input_types: tuple[str, ...]  # model_type of the experts it is built from
    shared: bool  # exactly one shared expert (with its own gate)
    router: str  # router name inside a layer
    expert: str  # an expert projection inside a layer: {e}, {proj}
    proj_names: dict  # dense projection -> its name in an expert

    def expert_tensor(self, layer: int, e: int, proj: str) -> str:
        """Name of expert ``e``'s dense projection ``proj`` (gate_proj, up_proj, down_proj) in ``layer``."""
        return f"model.layers.{layer}." + self.expert.format(e=e, proj=self.proj_names[proj])

    def router_tensor(self, layer: int, packed: bool = False) -> str:
        """Name of the router of ``layer`` (transformers 5's own with the packed layout)."""
        return f"model.layers.{layer}." + ("mlp.gate.weight" if packed else self.router)

    @staticmethod
    def packed_tensor(layer: int, which: str) -> str:
        """Name of a fused expert tensor (gate_up_proj, down_proj) of ``layer``."""
        return f"model.layers.{layer}.mlp.experts.{which}"

    @staticmethod
    def shared_tensor(layer: int, proj: str) -> str:
        """Name of the shared expert's projection ``proj`` in ``layer``."""
        return f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"

    @staticmethod
    def shared_gate_tensor(layer: int) -> str:
        """Name of the shared expert's sigmoid gate of ``layer``."""
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


_SAME = {p: p for p in PROJECTIONS}
MIXTRAL = MoEFamily("mixtral", "Mixtral", "MixtralForCausalLM", ("llama", "mistral"), False,
                    "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{proj}.weight",
                    {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"})
QWEN2_MOE = MoEFamily("qwen2_moe", "Qwen2-MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), True,
                      "mlp.gate.weight", "mlp.experts.{e}.{proj}.weight", _SAME)
QWEN3_MOE = MoEFamily("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM", ("qwen3",), False,
                      "mlp.gate.weight", "mlp.experts.{e}.{proj}.weight", _SAME)
FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
# recipe ``architecture`` values (mergekit-moe matches a prefix of its family names)
_NAMES = {"mixtral": MIXTRAL, "qwen": QWEN2_MOE, "qwen moe": QWEN2_MOE, "qwen2": QWEN2_MOE, "qwen2_moe": QWEN2_MOE,
          "qwen2-moe": QWEN2_MOE, "qwen3": QWEN3_MOE, "qwen3 moe": QWEN3_MOE, "qwen3_moe": QWEN3_MOE,
          "qwen3-moe": QWEN3_MOE}


def choose_family(architecture: str | None, input_type: str, n_shared: int) -> MoEFamily:
    """The output family: the recipe's ``architecture`` if given, else the one the
    experts and shared experts fit (Mixtral first, as mergekit-moe prefers it)."""
    def fits(f: MoEFamily) -> str | None:
        if input_type not in f.input_types:
            return f"{f.display} is built from {' or '.join(f.input_types)} models, these are {input_type}"
        if f.shared and n_shared != 1:
            return f"{f.display} needs exactly one shared expert, the recipe has {n_shared}"
        if not f.shared and n_shared:
            return f"{f.display} has no shared experts, the recipe has {n_shared}"
        return None

    if architecture:
        fam = _NAMES.get(architecture.strip().lower())
        if fam is None:
            raise RecipeError(f"architecture: unknown MoE family {architecture!r} (known: mixtral, qwen, qwen3)")
        problem = fits(fam)
        if problem:
            raise RecipeError(f"architecture: {problem}")
        return fam
    problems = []
    for fam in FAMILIES:
        problem = fits(fam)
        if problem is None:
            return fam
        problems.append(problem)
    raise RecipeError("no MoE family fits these experts: " + "; ".join(problems))


def output_config(family: MoEFamily, base: dict, *, n_experts: int, experts_per_token: int, dtype: str,
                  qkv_bias: bool) -> dict:
    """config.json of the MoE: the base's, turned into the family's (as mergekit-moe sets it)."""
    cfg = copy.deepcopy(base)
    cfg["architectures"] = [family.architecture]
    cfg["model_type"] = family.name
    cfg["num_experts_per_tok"] = experts_per_token
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    inter = cfg.get("intermediate_size")
    if family is MIXTRAL:
        cfg["num_local_experts"] = n_experts
        cfg["sliding_window"] = None
        for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
            cfg.pop(key, None)
    else:
        cfg["num_experts"] = n_experts
        cfg["decoder_sparse_step"] = 1
        cfg["norm_topk_prob"] = True
        cfg["moe_intermediate_size"] = inter
        cfg["mlp_only_layers"] = []
        if family is QWEN2_MOE:
            cfg["shared_expert_intermediate_size"] = inter
            cfg["sliding_window"] = None
            cfg["use_sliding_window"] = False
            cfg["qkv_bias"] = qkv_bias
            cfg.pop("layer_types", None)
            for key in ("mlp_bias", "attention_bias", "pretraining_tp"):
                cfg.pop(key, None)
    return cfg
