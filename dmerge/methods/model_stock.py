"""Model Stock: move from the base model towards the average of the fine-tunes, by how
much the fine-tunes agree.

With base ``w0``, ``N >= 2`` fine-tunes ``w_i`` and task vectors ``v_i = w_i - w0``:

    cos = mean over pairs i < j of <v_i, v_j> / max(|v_i| |v_j|, 1e-6)   (clamped to [-1, 1])
    t   = N cos / (1 + (N - 1) cos)                 (0 where |1 + (N - 1) cos| < 1e-6)
    out = t * (sum_i w_i / N) + (1 - t) * w0

Fine-tunes that agree (cos near 1) give t near 1, the average; unrelated ones (cos near
0) stay near the base. The angle is taken over the whole tensor (one ``<v_i, v_j>`` per
pair, reduced exactly over chunks), or with ``filter_wise: true`` per vector along the
last dimension (each row of a matrix), inside the chunk. All-zero task vectors give
cos = 0, t = 0: the base model.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._reduce import as_float64, blockwise, gram_statistic, lastdim_sum


def _offsets(x: ChunkInputs):
    return (t - x.base for t in x.others)


def interpolation_factor(g: dict, n: int) -> torch.Tensor:
    """t from the inner products ``g[i, j]`` (float64 tensors, any common shape)."""
    norms = {i: torch.sqrt(g[i, i]) for i in range(n)}
    total = None
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            cos = (g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            total = cos if total is None else total + cos
            pairs += 1
    cos = total / pairs
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def _whole(g: list[list[float]], context: ChunkInputs) -> float:
    n = len(g)
    return interpolation_factor({(i, j): torch.tensor(g[i][j], dtype=torch.float64) for i in range(n) for j in range(n)}, n).item()


def _tensor_wide(context: ChunkInputs) -> bool:
    return not context.params["filter_wise"]


def _check(params: dict, model_params: list[dict]) -> str | None:
    if len(model_params) < 3:
        return f"model_stock needs the base_model and at least two other models (got {len(model_params)} in all)"
    return None


@merge_method(
    "model_stock",
    requires_base=True,
    params=[Param("filter_wise", kind=bool, default=False, doc="one angle per row (last-dimension vector), not per tensor")],
    statistics=[gram_statistic("model_stock", lambda x: list(_offsets(x)), _whole, when=_tensor_wide)],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    check=_check,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(x: ChunkInputs) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by their agreement."""
    n = len(x.others)
    whole_t = x.stats["model_stock"] if _tensor_wide(x) else None

    def combine(xb: ChunkInputs) -> torch.Tensor:
        others = xb.others
        if whole_t is None:  # one t per vector along the last dimension
            v = [as_float64(o) for o in _offsets(xb)]
            g = {}
            for i in range(n):
                for j in range(i, n):
                    g[i, j] = g[j, i] = lastdim_sum(v[i] * v[j]).unsqueeze(-1)
            del v
            t = interpolation_factor(g, n).to(xb.base.dtype)
        else:
            t = whole_t
        average = others[0].clone()
        for o in others[1:]:
            average += o
        average /= n
        out = average * t
        out += xb.base * (1 - t)
        return out

    return blockwise(x, combine)
