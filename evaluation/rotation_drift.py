"""How far a model's learned rotations have drifted from RoPE (the extrapolation evaluation's
`rotation_drift`).

Schemes whose rotation is learned (`SchemeSpec.rotation` "learned": increments
delta_t = b + W x_t; "scaled": delta_t = theta_p 2 sigmoid(c_p + w_p . x_t)) start as RoPE,
delta_t = theta_p for every token, and training may take them far from it: a trained model's
low-frequency pairs can turn hundreds of times faster than RoPE's frequency theta_p. Per layer,
key/value head h and pair p (p = 0..P-1, P = head_dim / 2), with x_t the attention layer's input
(after its norm) at the evaluation tokens:

- static drift |s_hp - theta_p| / theta_p of the static part s_hp = delta_hp(x = 0): b_hp for
  learned rotations, theta_p 2 sigmoid(c_hp) for scaled ones;
- spread: the standard deviation over the evaluation tokens of the data-dependent part
  delta_hp(x_t) - s_hp, divided by theta_p. The population standard deviation (the mean square
  deviation over the N tokens, divided by N, not N - 1).

Each is reduced to the median over the key/value heads (the mean of the two middle heads for an
even count): [n_layers][P] values, 0 for a model at initialisation; 1 is a change by RoPE's whole
angle per token. Schemes without learned increments (rope, frozen random rotations, no rotation)
have none: `rotation_drift` returns None.

TensorBoard and the other trackers get two scalars per layer (`drift_scalars`): the largest value
over the pairs of each, `extrap/rotation_static@layer<i>` and `extrap/rotation_spread@layer<i>`.

The increments are the model's own (`PositionScheme._increments`, in the model's precision).
The layer inputs are captured by a forward pre-hook on each block's `attn` during a no-grad
forward (kept on the host), and the increments computed from them after it, the projection's
weights gathered by `gathered` (ZeRO-3) meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from model import SCHEMES

LEARNED = ("learned", "scaled")  # the rotations whose increments the model learns

Gathered = Callable[[list[nn.Parameter]], AbstractContextManager]


def has_learned_rotations(scheme: str) -> bool:
    """Whether `scheme`'s rotation increments are learned (and so may drift)."""
    return SCHEMES[scheme].rotation in LEARNED


@contextmanager
def attention_inputs(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Within the block, each forward of the model appends every layer's attention input x
    [B, T, d_model] (detached, copied to the host) to that layer's list."""
    captured: list[list[Tensor]] = [[] for _ in model.blocks]

    def recorder(layer: int):
        def record(module, args, kwargs) -> None:
            x = args[0] if args else kwargs["x"]
            captured[layer].append(x.detach().to("cpu", copy=True))

        return record

    handles = [
        block.attn.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class Moments:
    """Count, mean and sum of squared deviations over the first dimension of the batches
    added, merged batch by batch (Chan, Golub and LeVeque), in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, values: Tensor) -> None:
        values = values.double()
        n, mean = values.shape[0], values.mean(0)
        m2 = (values - mean).square().sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total, diff = self.count + n, mean - self.mean
        self.mean = self.mean + diff * (n / total)
        self.m2 = self.m2 + m2 + diff.square() * (self.count * n / total)
        self.count = total

    def std(self) -> Tensor:
        """The population standard deviation."""
        return (self.m2 / self.count).sqrt()


def _median_over_heads(values: Tensor) -> Tensor:
    """[H, P] -> [P]: the median over heads (mean of the two middle ones for even H)."""
    return torch.quantile(values, 0.5, dim=0)


def rotation_drift(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    forward: Callable[[Tensor], object] | None = None,
    gathered: Gathered | None = None,
) -> dict | None:
    """The drift of the model's learned rotations (module docstring) on the tokens of
    `batches` ([B, T] each): {"static": [n_layers, P], "spread": [n_layers, P], "theta": [P]
    (float64 tensors), "tokens": N}; None when the scheme has no learned increments.
    forward(tokens) runs the model (default: model(tokens, head=False)); gathered(params) makes
    ZeRO-3 partitioned parameters whole inside a `with` (default: nothing to gather)."""
    if not has_learned_rotations(model.cfg.scheme):
        return None
    forward = forward or (lambda tokens: model(tokens, head=False))
    gathered = gathered or (lambda params: nullcontext())
    positions = [block.attn.position for block in model.blocks]
    moments = [Moments() for _ in positions]
    static: list[Tensor | None] = [None] * len(positions)
    with torch.no_grad():
        for tokens in batches:
            with attention_inputs(model) as captured:
                forward(tokens)
            for layer, position in enumerate(positions):
                theta = position.theta
                with gathered(list(position.delta.parameters())):
                    for x in captured[layer]:
                        x = x.to(theta.device)
                        if static[layer] is None:
                            zero = x.new_zeros(1, 1, x.shape[-1])
                            static[layer] = position._increments(zero)[0, 0].double()
                        increments = position._increments(x).double()
                        moments[layer].add(increments.flatten(0, 1) - static[layer])
                captured[layer].clear()  # the host copy of this layer's inputs
    if moments[0].count == 0:
        raise ValueError("rotation_drift needs at least one token")
    theta = positions[0].theta.double().cpu()
    return {
        "static": torch.stack(
            [_median_over_heads((s.cpu() - theta).abs() / theta) for s in static]
        ),
        "spread": torch.stack([_median_over_heads(m.std().cpu() / theta) for m in moments]),
        "theta": theta,
        "tokens": moments[0].count,
    }


def drift_scalars(drift: dict | None) -> dict[str, float]:
    """The trackers' scalars of a `rotation_drift` result (as in the results JSON: nested
    lists): per layer, the largest static drift and spread over the pairs."""
    if not drift:
        return {}
    found = {}
    for name in ("static", "spread"):
        for layer, values in enumerate(drift[name]):
            found[f"extrap/rotation_{name}@layer{layer}"] = float(max(values))
    return found
