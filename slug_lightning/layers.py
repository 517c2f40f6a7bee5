"""Candidate layers, their importance and alignment, and the Pareto fronts (METHOD §3–§4).

A *layer* is one weight tensor of an OpenCLIP model, named as in ``model.named_parameters()``. Everything
here is a pure function over names, tensors and floats, so it can be tested without a model or Lightning.

Example::

    >>> import torch
    >>> weights = {"visual.proj": torch.ones(2, 2), "text_projection": torch.ones(2, 2)}
    >>> forget = {"visual.proj": torch.ones(2, 2), "text_projection": torch.ones(2, 2) * 3}
    >>> retain = {"visual.proj": torch.eye(2), "text_projection": torch.eye(2)}
    >>> [(s.name, s.tower, s.importance, s.pareto) for s in layer_statistics(weights, forget, retain)]
    [('visual.proj', 'vision', 1.0, True), ('text_projection', 'language', 3.0, True)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor

VISION, LANGUAGE = "vision", "language"

# The temperature and bias of the contrastive loss belong to neither tower: they are never layers.
_NEITHER_TOWER = ("logit_scale", "logit_bias")
# Substrings that mark a lookup table or learned token rather than a linear map: token, class and
# positional embeddings in OpenCLIP ("embedding", "position"), and their timm spellings ("pos_embed",
# "cls_token", "reg_token") for towers built on timm.
_EMBEDDING_MARKERS = ("embedding", "position", "pos_embed", "cls_token", "reg_token")


def tower_of(param_name: str) -> str:
    """The tower a parameter belongs to: :data:`VISION` for ``visual.*``, :data:`LANGUAGE` otherwise.

    The language tower is everything outside ``visual.``: ``transformer.*``, ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection``, or ``text.*`` for models whose text tower
    is a separate module (open_clip's ``CustomTextCLIP``).

    Args:
        param_name: A name from ``model.named_parameters()``.

    Returns:
        ``"vision"`` or ``"language"``.

    Raises:
        ValueError: for ``logit_scale`` and ``logit_bias``, which belong to neither tower.

    Example::

        >>> tower_of("visual.conv1.weight"), tower_of("text.ln_final.weight"), tower_of("text_projection")
        ('vision', 'language', 'language')
    """
    if param_name in _NEITHER_TOWER:
        raise ValueError(
            f"{param_name!r} belongs to neither tower; only 'visual.*' (vision) and the text parameters "
            f"(language) have a tower."
        )
    return VISION if param_name.startswith("visual.") else LANGUAGE


def is_default_candidate(param_name: str, param: Tensor) -> bool:
    """Whether a parameter is a candidate layer by default (METHOD §3).

    Every parameter of either tower is a candidate except biases (names ending in ``bias``, including
    ``in_proj_bias``), embeddings and learned tokens (names containing ``embedding``, ``position``,
    ``pos_embed``, ``cls_token`` or ``reg_token``), scalars, and ``logit_scale``/``logit_bias``. That keeps
    attention ``in_proj_weight`` and ``out_proj.weight``, MLP ``c_fc``/``c_proj`` weights, the patch
    ``conv1``, LayerNorm weights, ``visual.proj`` and ``text_projection``.

    Note that the name test is on the whole name: in a Hugging Face text tower the LayerNorm inside
    ``embeddings.`` is excluded along with the embeddings; add it back with an ``include`` pattern.

    Args:
        param_name: A name from ``model.named_parameters()``.
        param: The parameter; scalars (0-d tensors) are never layers.

    Returns:
        True if the parameter is a default candidate.

    Example::

        >>> import torch
        >>> w = torch.zeros(4, 4)
        >>> is_default_candidate("visual.transformer.resblocks.0.attn.in_proj_weight", w)
        True
        >>> is_default_candidate("visual.transformer.resblocks.0.attn.in_proj_bias", w[0])
        False
        >>> is_default_candidate("token_embedding.weight", w)
        False
    """
    if param_name in _NEITHER_TOWER or param.ndim == 0:
        return False
    if param_name.endswith("bias"):
        return False
    return not any(marker in param_name for marker in _EMBEDDING_MARKERS)


def _check_patterns(patterns: Sequence[str], what: str) -> tuple[str, ...]:
    # A bare string would be iterated character by character and match almost everything.
    if isinstance(patterns, str):
        raise ValueError(f"{what} must be a list of patterns, got the string {patterns!r}; write [{patterns!r}].")
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what} patterns must be non-empty strings, got {pattern!r} in {list(patterns)!r}.")
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def candidate_layers(
    named_parameters: Iterable[tuple[str, Tensor]],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[str]:
    """The candidate layers of a model: default candidates, widened by ``include``, narrowed by ``exclude``.

    The result is ``[name for each tower parameter if (is_default_candidate or matches include) and not
    matches exclude]``, in parameter order. Patterns are case-sensitive ``fnmatch`` globs over the full
    parameter name (``"visual.*"``, ``"*attn.out_proj*"``, ``"*.bias"``). So ``include`` adds parameters
    that are not candidates by default (biases, embeddings), ``exclude`` removes any, and exclude wins.
    To search one tower only, exclude the other (``exclude=["visual.*"]``).

    Args:
        named_parameters: ``model.named_parameters()`` or any ``(name, tensor)`` pairs.
        include: Patterns of extra parameters to treat as candidates.
        exclude: Patterns of parameters never to treat as candidates.

    Returns:
        Candidate parameter names, in the order given.

    Raises:
        ValueError: if a pattern matches no parameter of either tower (a typo, or ``logit_scale``, which is
            never a layer), if a pattern list is a bare string, or if no candidate is left.

    Example::

        >>> import torch
        >>> params = [("visual.proj", torch.ones(2, 2)), ("visual.ln_post.bias", torch.ones(2)),
        ...           ("text_projection", torch.ones(2, 2)), ("logit_scale", torch.ones(()))]
        >>> candidate_layers(params)
        ['visual.proj', 'text_projection']
        >>> candidate_layers(params, include=["*.bias"], exclude=["text_*"])
        ['visual.proj', 'visual.ln_post.bias']
    """
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    tower_params = [(name, p) for name, p in named_parameters if name not in _NEITHER_TOWER]
    names = [name for name, _ in tower_params]
    for what, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                example = names[0] if names else "visual.proj"
                raise ValueError(
                    f"The {what} pattern {pattern!r} matches no parameter of either tower (patterns are "
                    f"fnmatch globs over full names such as {example!r}; logit_scale/logit_bias are never "
                    f"layers)."
                )
    result = [
        name
        for name, p in tower_params
        if (is_default_candidate(name, p) or _matches(name, include)) and not _matches(name, exclude)
    ]
    if not result:
        raise ValueError(
            f"No candidate layer is left among {len(names)} parameters after include={list(include)!r} and "
            f"exclude={list(exclude)!r}."
        )
    return result


def _norm(tensor: Tensor, what: str) -> float:
    value = torch.linalg.vector_norm(tensor.detach().to(torch.float64)).item()
    if not math.isfinite(value):
        raise ValueError(f"The {what} has a non-finite norm ({value}); check for NaN or inf entries.")
    return value


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")


def importance(grad: Tensor, weight: Tensor) -> float:
    """The importance of a layer for the forget set: ``‖G_f,l‖₂ / ‖θ⁰_l‖₂`` (METHOD §4), in fp64.

    A layer whose weights are all zero has infinite importance if its gradient is not zero (any step is an
    unbounded change relative to it) and zero importance if its gradient is zero too (a step does nothing).

    Args:
        grad: The forget gradient of the layer.
        weight: The layer's weights at θ⁰, same shape.

    Returns:
        The importance, ``>= 0``; ``math.inf`` for a zero weight with a non-zero gradient.

    Raises:
        ValueError: if the shapes differ or a norm is not finite.

    Example::

        >>> import torch
        >>> importance(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0]))
        1.0
    """
    _check_same_shape(grad, weight, "A gradient and its weight")
    grad_norm, weight_norm = _norm(grad, "gradient"), _norm(weight, "weight")
    if weight_norm == 0.0:
        return math.inf if grad_norm > 0.0 else 0.0
    return grad_norm / weight_norm


def alignment(forget_grad: Tensor, retain_grad: Tensor, signed: bool = False) -> float:
    """The cosine between a layer's forget and retain gradients: ``|cos|`` by default (METHOD §4), in fp64.

    Low alignment means a step along the forget gradient is (to first order) harmless to the retain loss.
    A zero gradient has no direction; its alignment is 0.0.

    Args:
        forget_grad: The forget gradient of the layer.
        retain_grad: The retain gradient of the same layer.
        signed: Return the signed cosine in [-1, 1] instead of its absolute value.

    Returns:
        The (absolute) cosine.

    Raises:
        ValueError: if the shapes differ or a norm is not finite.

    Example::

        >>> import torch
        >>> alignment(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])), alignment(
        ...     torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), signed=True)
        (1.0, -1.0)
    """
    _check_same_shape(forget_grad, retain_grad, "Forget and retain gradients")
    f = forget_grad.detach().to(torch.float64).flatten()
    r = retain_grad.detach().to(torch.float64).flatten()
    norms = _norm(f, "forget gradient") * _norm(r, "retain gradient")
    if norms == 0.0:
        return 0.0
    cos = max(-1.0, min(1.0, torch.dot(f, r).item() / norms))  # rounding can leave [-1, 1] by an ulp
    return cos if signed else abs(cos)


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one candidate layer (one row of ``layers.csv``).

    Attributes:
        name: The parameter name.
        tower: ``"vision"`` or ``"language"``.
        importance: ``‖G_f,l‖ / ‖θ⁰_l‖``.
        alignment: ``|cos(G_f,l, G_r,l)|`` (or the signed cosine).
        weight_norm: ``‖θ⁰_l‖``.
        grad_norm: ``‖G_f,l‖``.
        front: Which of its tower's Pareto fronts the layer is on (see :func:`pareto_ranks`): 1 is the Pareto
            front of METHOD §4.
    """

    name: str
    tower: str
    importance: float
    alignment: float
    weight_norm: float
    grad_norm: float
    front: int

    @property
    def pareto(self) -> bool:
        """Whether the layer is on its tower's Pareto front (METHOD §4)."""
        return self.front == 1


def layer_statistics(
    weights: Mapping[str, Tensor],
    forget_grads: Mapping[str, Tensor],
    retain_grads: Mapping[str, Tensor],
    signed: bool = False,
) -> list[LayerStats]:
    """Importance, alignment and Pareto front (per tower) of every layer in ``forget_grads``.

    Args:
        weights: θ⁰ by parameter name (may hold more than the candidates).
        forget_grads: The forget gradient of each candidate layer; its keys are the layers, in order.
        retain_grads: The retain gradient of each candidate layer.
        signed: Use the signed cosine as the alignment.

    Returns:
        One :class:`LayerStats` per layer, in the order of ``forget_grads``.

    Raises:
        ValueError: if ``forget_grads`` is empty, or a layer lacks its weight or retain gradient.
    """
    if not forget_grads:
        raise ValueError("forget_grads is empty: there are no candidate layers to rank.")
    for what, mapping in (("weights", weights), ("retain_grads", retain_grads)):
        missing = [name for name in forget_grads if name not in mapping]
        if missing:
            raise ValueError(f"{what} lacks {len(missing)} candidate layer(s): {missing[:5]!r}.")
    rows = []
    for name, grad in forget_grads.items():
        weight = weights[name]
        rows.append(
            dict(
                name=name,
                tower=tower_of(name),
                importance=importance(grad, weight),
                alignment=alignment(grad, retain_grads[name], signed=signed),
                weight_norm=_norm(weight, f"weight {name!r}"),
                grad_norm=_norm(grad, f"forget gradient {name!r}"),
            )
        )
    fronts: dict[int, int] = {}
    for tower in (VISION, LANGUAGE):
        members = [i for i, row in enumerate(rows) if row["tower"] == tower]
        ranks = pareto_ranks([(rows[i]["importance"], rows[i]["alignment"]) for i in members])
        fronts.update(zip(members, ranks))
    return [LayerStats(**row, front=fronts[i]) for i, row in enumerate(rows)]


def pareto_front(stats: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(importance, alignment)`` points, in input order (METHOD §4).

    Point i is dominated iff some point j has ``importance_j > importance_i`` **and**
    ``alignment_j < alignment_i``, both strict: a tie in either coordinate never dominates.

    Args:
        stats: ``(importance, alignment)`` pairs.

    Returns:
        The indices of the points on the front, ascending.

    Raises:
        ValueError: if a value is NaN (it would compare false and sit on the front by accident).

    Example: ``(0.5, 0.2)`` is dominated by ``(1.0, 0.1)``; ``(2.0, 0.5)`` is not dominated by ``(2.0, 0.1)``,
    which is only as important::

        >>> pareto_front([(1.0, 0.1), (2.0, 0.5), (0.5, 0.2), (2.0, 0.1)])
        [0, 1, 3]
    """
    points = [(float(imp), float(ali)) for imp, ali in stats]
    for i, (imp, ali) in enumerate(points):
        if math.isnan(imp) or math.isnan(ali):
            raise ValueError(f"Point {i} is {(imp, ali)}: importance and alignment must not be NaN.")
    # Sweep from the most important down, one group of equal importance at a time: a point is dominated
    # exactly when some strictly more important point (an earlier group) has a strictly lower alignment.
    order = sorted(range(len(points)), key=lambda i: -points[i][0])
    front: list[int] = []
    lowest_before = math.inf
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and points[order[end]][0] == points[order[start]][0]:
            end += 1
        group = order[start:end]
        front.extend(i for i in group if not lowest_before < points[i][1])
        lowest_before = min(lowest_before, *(points[i][1] for i in group))
        start = end
    return sorted(front)


def pareto_ranks(stats: Sequence[tuple[float, float]]) -> list[int]:
    """The Pareto front each ``(importance, alignment)`` point is on (non-dominated sorting).

    Front 1 is :func:`pareto_front`; front 2 is the Pareto front of the points left once front 1 is taken
    out; and so on. Searching the first few fronts, not just the first, trades more probes for layers the
    two proxies rank just behind the best.

    Example: ``(0.5, 0.2)`` is dominated by ``(1.0, 0.1)`` and ``(2.0, 0.1)``, both on front 1, so it is on front 2::

        >>> pareto_ranks([(1.0, 0.1), (2.0, 0.5), (0.5, 0.2), (2.0, 0.1)])
        [1, 1, 2, 1]
    """
    ranks = [0] * len(stats)
    left = list(range(len(stats)))
    rank = 0
    while left:
        rank += 1
        front = set(pareto_front([stats[i] for i in left]))
        for j in front:
            ranks[left[j]] = rank
        left = [i for j, i in enumerate(left) if j not in front]
    return ranks


# Rewrites from a full OpenCLIP name (tower prefix already removed) to its short form, applied in order.
# Only ".weight" is dropped, so a weight and its bias keep distinct labels ("v.3.ln_1", "v.3.ln_1.bias").
_SHORT_FORMS = (
    (r"^transformer\.resblocks\.(\d+)\.", r"\1."),
    (r"^text_projection$", "proj"),
    (r"\.attn\.in_proj_weight$", ".attn.in"),
    (r"\.attn\.in_proj_bias$", ".attn.in.bias"),
    (r"\.attn\.out_proj\.", ".attn.out."),
    (r"\.mlp\.c_fc\.", ".mlp.fc."),
    (r"\.mlp\.c_proj\.", ".mlp.proj."),
    (r"\.weight$", ""),
)


def front_layers(
    stats: Sequence[LayerStats], fronts: int = 1, towers: Iterable[str] = (VISION, LANGUAGE)
) -> list[LayerStats]:
    """The layers a search steps along: those of Pareto fronts 1..``fronts`` (§4) in ``towers`` that have a forget
    gradient and a weight (a zero norm gives no direction, or no scale, to step along).

    Example::

        >>> stats = [LayerStats("visual.proj", VISION, 2.0, 0.1, 1.0, 1.0, front=1),
        ...          LayerStats("text_projection", LANGUAGE, 1.0, 0.2, 1.0, 0.0, front=1),
        ...          LayerStats("visual.conv1.weight", VISION, 1.0, 0.5, 1.0, 1.0, front=2)]
        >>> [s.name for s in front_layers(stats)], [s.name for s in front_layers(stats, fronts=2)]
        (['visual.proj'], ['visual.proj', 'visual.conv1.weight'])
    """
    towers = set(towers)
    return [s for s in stats if s.front <= fronts and s.tower in towers and s.grad_norm > 0 and s.weight_norm > 0]


def short_name(param_name: str) -> str:
    """A compact, still unique label for plots and tables: tower letter, block index, module.

    Args:
        param_name: A parameter name of either tower.

    Returns:
        The short label; names outside the OpenCLIP layout keep their structure under the tower letter.

    Raises:
        ValueError: for ``logit_scale``/``logit_bias`` (neither tower).

    Example::

        >>> short_name("visual.transformer.resblocks.11.attn.out_proj.weight")
        'v.11.attn.out'
        >>> short_name("transformer.resblocks.0.mlp.c_fc.weight"), short_name("text_projection")
        ('t.0.mlp.fc', 't.proj')
        >>> short_name("visual.conv1.weight"), short_name("visual.transformer.resblocks.3.ln_1.weight")
        ('v.conv1', 'v.3.ln_1')
    """
    tower = tower_of(param_name)
    rest = param_name
    for prefix in ("visual.", "text."):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    for pattern, replacement in _SHORT_FORMS:
        rest = re.sub(pattern, replacement, rest)
    return f"{'v' if tower == VISION else 't'}.{rest}"
