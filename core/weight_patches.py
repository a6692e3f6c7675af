"""Temporary low-rank weight patches on any torch module (LoRA, FaceID's attention LoRA, ...).

A :class:`WeightPatch` is data: for each sub-module name (as in ``module.named_modules()``) a tuple of
:class:`LowRankDelta` factors.  ``patch.applied(module)`` adds ``strength · scale · up @ down`` to the named
modules' ``weight`` tensors in place for the duration of a ``with`` block and copies the exact original
values back afterwards, on errors and KeyboardInterrupt too.  Patches stack: entering several ``applied``
blocks adds each delta; leaving them restores every weight bit-identically, whatever the order of the deltas'
rounding, because each block keeps its own backup of the tensors it touched.

Patching in place (instead of wrapping modules) keeps the model's own forward, attention processors and
module names untouched, so the IP-Adapter backend and any other patch see the same module tree.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping

import torch


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """One weight delta ``strength · scale · up @ down``, reshaped to the weight it patches.

    ``up`` is ``[out, rank, (1, 1)]`` and ``down`` ``[rank, in, (kh, kw)]``: a linear LoRA has 2-d factors, a
    convolution LoRA 4-d ones (its ``up`` is a 1×1 convolution).  ``scale`` is the file's ``alpha / rank``.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.up.ndim not in (2, 4) or self.down.ndim not in (2, 4):
            raise ValueError(f"LowRankDelta: up and down must be 2-d (linear) or 4-d (convolution) tensors; got "
                             f"up {list(self.up.shape)} and down {list(self.down.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LowRankDelta: the ranks differ: up is {list(self.up.shape)} (rank {self.up.shape[1]}) "
                             f"but down is {list(self.down.shape)} (rank {self.down.shape[0]})")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 delta for a weight of ``shape`` (a 2-d LoRA on a 1×1 convolution is reshaped).

        Raises ``ValueError`` when the factors cannot make a tensor of that shape.
        """
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        product = up @ down  # [out, in·kh·kw]
        if product.numel() != torch.Size(shape).numel() or product.shape[0] != shape[0]:
            raise ValueError(f"a rank-{self.rank} delta of up {list(self.up.shape)} @ down {list(self.down.shape)} "
                             f"makes {list(product.shape)}, which does not fit a weight of shape {list(shape)}")
        return product.reshape(shape) * (float(self.strength) * float(self.scale))


def _frozen_deltas(deltas: Mapping[str, tuple[LowRankDelta, ...] | list[LowRankDelta]]):
    return MappingProxyType({name: tuple(items) for name, items in deltas.items()})


@dataclass(frozen=True, eq=False)
class WeightPatch:
    """Low-rank deltas for named sub-modules of one model; applied only inside :meth:`applied`.

    ``label`` names the patch in errors (e.g. the LoRA file).  Module names are those of
    ``module.named_modules()`` of the model the patch is applied to.
    """

    deltas: Mapping[str, tuple[LowRankDelta, ...]] = field(default_factory=dict)
    label: str = "weight patch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", _frozen_deltas(self.deltas))

    def __len__(self) -> int:
        return len(self.deltas)

    def with_strength(self, strength: float) -> "WeightPatch":
        """A copy whose every delta has its strength multiplied by ``strength``."""
        scaled = {name: tuple(LowRankDelta(d.up, d.down, d.scale, d.strength * strength) for d in items)
                  for name, items in self.deltas.items()}
        return WeightPatch(scaled, self.label)

    def restricted(self, prefix: str) -> "WeightPatch":
        """The deltas whose module names start with ``prefix + '.'``, with that prefix removed."""
        start = prefix + "."
        kept = {name[len(start):]: items for name, items in self.deltas.items() if name.startswith(start)}
        return WeightPatch(kept, self.label)

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The ``weight`` tensor of every named sub-module; ``KeyError`` naming the missing ones."""
        found, missing = {}, []
        for name in self.deltas:
            try:
                target = module.get_submodule(name)
            except AttributeError:
                missing.append(name)
                continue
            weight = getattr(target, "weight", None)
            if not isinstance(weight, torch.Tensor):
                missing.append(name)
                continue
            found[name] = weight
        if missing:
            shown = ", ".join(f"'{n}'" for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise KeyError(f"{self.label}: {len(missing)} of its {len(self.deltas)} target modules are not weighted "
                           f"modules of this {type(module).__name__}: {shown}; the patch was made for another model")
        return found

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Add the deltas to ``module``'s weights for the ``with`` block; restore the exact originals after."""
        weights = self.weights(module)
        backups: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, weight in weights.items():
                    total = None
                    for item in self.deltas[name]:
                        try:
                            part = item.delta(weight.shape, weight.device)
                        except ValueError as err:
                            raise ValueError(f"{self.label}: module '{name}': {err}") from None
                        total = part if total is None else total + part
                    backups[name] = weight.detach().clone()
                    # add in float32 and round once to the weight's dtype (fp16 weights lose less)
                    weight.copy_((weight.float() + total).to(weight.dtype))
            yield module
        finally:
            with torch.no_grad():
                for name, original in backups.items():
                    weights[name].copy_(original)


def merged(patches: tuple[WeightPatch, ...] | list[WeightPatch], label: str = "weight patches") -> WeightPatch:
    """One patch holding the deltas of several (same module tree), in order."""
    combined: dict[str, list[LowRankDelta]] = {}
    for patch in patches:
        for name, items in patch.deltas.items():
            combined.setdefault(name, []).extend(items)
    return WeightPatch(combined, label)
