"""The synthesis loops: gradient matching (``gm``) and distribution matching (``dm``).

Both start from ``ipc`` real examples per class, drawn at random (both papers' "real" initialization), and
update the synthetic inputs with SGD with momentum. The labels stay fixed: ``ipc`` examples of each class.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.dataset_distillation.matching import gradient_distance, mean_embedding_distance

log = logging.getLogger(__name__)

METHODS = ("gm", "dm")
# Each paper's learning rate for the synthetic inputs (SGD, momentum 0.5): DC lr_img 0.1, DM lr_img 1.0.
DEFAULT_LR = {"gm": 0.1, "dm": 1.0}
# DC's (outer_loop, inner_loop) per ipc, from its reference code (get_loops): more examples per class get
# more matching steps per network and fewer network updates between them.
GM_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}

ModelFactory = Callable[[int], nn.Module]  # seed -> a freshly initialized model


@dataclass
class Synthesis:
    """The learned set and how it was made."""

    x: Tensor
    y: Tensor
    losses: list[float] = field(default_factory=list)  # the matching loss of each iteration
    seconds: float = 0.0


def gm_loops(ipc: int) -> tuple[int, int]:
    """DC's loops for ``ipc``; between its table's rows, those of the next smaller ipc."""
    return GM_LOOPS[max(k for k in GM_LOOPS if k <= ipc)]


def class_indices(y: Tensor, num_classes: int) -> list[Tensor]:
    return [(y == c).nonzero().flatten() for c in range(num_classes)]


def initial_set(x: Tensor, y: Tensor, num_classes: int, ipc: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``ipc`` real examples per class, drawn without replacement: the synthetic set's start, and the
    random-real baseline it is compared to (the same examples, not learned)."""
    picked = [idx[torch.randperm(len(idx), generator=generator)[:ipc]] for idx in class_indices(y, num_classes)]
    chosen = torch.cat(picked)
    return x[chosen].clone(), y[chosen].clone()


def sample(x: Tensor, idx: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` real examples of one class (all of them if it has fewer)."""
    return x[idx[torch.randperm(len(idx), generator=generator)[:n]]]


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """The model's penultimate representation (its ``embedding_tap``), flattened to ``(B, D)``."""
    captured: list[Tensor] = []
    module = model.get_submodule(model.embedding_tap)
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


def freeze_norm_statistics(model: nn.Module, x: Tensor, by_class: list[Tensor], g: torch.Generator) -> None:
    """Batch norms normalize with the statistics of a mixed-class real batch, then stay fixed.

    Matching runs on one class at a time. Batch statistics of such a batch differ from those of the mixed
    batches the network trains on, and a real and a synthetic batch would each be normalized by their own.
    DC's code freezes them at real statistics for that reason (16 examples per class)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one forward sets the statistics of that batch exactly
    with torch.no_grad():
        model(torch.cat([sample(x, idx, 16, g) for idx in by_class]))
    for m in norms:
        m.eval()


def synthesize(
    method: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    ipc: int,
    make_model: ModelFactory,
    iterations: int,
    lr: float,
    momentum: float = 0.5,
    seed: int = 0,
    batch_real: int = 256,
    net_lr: float = 0.01,
    loops: tuple[int, int] | None = None,
    log_every: int = 0,
) -> Synthesis:
    """Learn ``ipc`` examples per class from the real set ``(x, y)``.

    ``gm``: ``iterations`` outer iterations, each with a new network (seed ``seed * 100_003 + it``, so seeds
    never share one); ``loops`` = (outer_loop, inner_loop) of DC, default ``gm_loops(ipc)``. ``dm``: one new
    network per iteration, used only to embed. ``net_lr``: the gm network's SGD learning rate between
    matching steps (DC's lr_net)."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x_syn, y_syn = initial_set(x, y, num_classes, ipc, g)
    x_syn.requires_grad_(True)
    opt = torch.optim.SGD([x_syn], lr=lr, momentum=momentum)
    by_class = class_indices(y, num_classes)
    losses: list[float] = []
    for it in range(iterations):
        model = make_model(seed * 100_003 + it)
        if method == "gm":
            loops = loops or gm_loops(ipc)
            loss = _gm_iteration(model, x, by_class, x_syn, y_syn, ipc, opt, g, batch_real, net_lr, loops)
        else:
            loss = _dm_iteration(model, x, by_class, x_syn, ipc, opt, g, batch_real)
        losses.append(loss)
        if log_every and (it + 1) % log_every == 0:
            log.info("%s iteration %d/%d: matching loss %.4f", method, it + 1, iterations, loss)
    return Synthesis(x_syn.detach(), y_syn, losses, time.perf_counter() - start)


def _gm_iteration(model, x, by_class, x_syn, y_syn, ipc, opt, g, batch_real, net_lr, loops) -> float:
    outer_loop, inner_loop = loops
    params = [p for p in model.parameters() if p.requires_grad]
    net_opt = torch.optim.SGD(params, lr=net_lr)
    total = 0.0
    for step in range(outer_loop):
        freeze_norm_statistics(model, x, by_class, g)
        loss = x_syn.new_zeros(())
        for c, idx in enumerate(by_class):
            real = sample(x, idx, batch_real, g)
            target = torch.full((len(real),), c, dtype=torch.long)
            g_real = torch.autograd.grad(F.cross_entropy(model(real), target), params)
            g_real = [t.detach() for t in g_real]
            syn = x_syn[c * ipc : (c + 1) * ipc]
            syn_loss = F.cross_entropy(model(syn), y_syn[c * ipc : (c + 1) * ipc])
            g_syn = torch.autograd.grad(syn_loss, params, create_graph=True)  # differentiable wrt x_syn
            loss = loss + gradient_distance(g_real, g_syn)
        opt.zero_grad()
        (x_syn.grad,) = torch.autograd.grad(loss, [x_syn])  # the network's own .grad stays untouched
        opt.step()
        total += float(loss.detach())
        if step == outer_loop - 1:
            break
        # DC trains the network on the current synthetic set between matching steps, so later steps
        # match gradients along a training trajectory, not only at initialization
        data = x_syn.detach()
        model.train()
        for _ in range(inner_loop):
            net_opt.zero_grad()
            F.cross_entropy(model(data), y_syn).backward()
            net_opt.step()
    return total / outer_loop


def _dm_iteration(model, x, by_class, x_syn, ipc, opt, g, batch_real) -> float:
    model.requires_grad_(False)  # DM never trains the network: it only embeds
    # eval mode: a fresh batch norm is then the identity, so real and synthetic batches go through one
    # fixed map; in train mode each batch would be normalized by its own statistics, hiding the mean shift
    model.eval()
    loss = x_syn.new_zeros(())
    for c, idx in enumerate(by_class):
        with torch.no_grad():
            real = embed(model, sample(x, idx, batch_real, g))
        loss = loss + mean_embedding_distance(real, embed(model, x_syn[c * ipc : (c + 1) * ipc]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())
