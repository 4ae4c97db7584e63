"""Virtual Softmax (Chen, Deng & Shen, NeurIPS 2018): one dynamic virtual negative class.

For sample i with label y the paper injects a virtual class whose weight is
W_virt = ||W_y|| x_i / ||x_i||, so its logit is W_virt . x_i = ||W_y|| ||x_i||. Because
W_y . x_i = ||W_y|| ||x_i|| cos(theta_y) never exceeds it, the target can only win the
(C+1)-way softmax by pushing cos(theta_y) -> 1: a margin-like pull towards the class
centre with no hyper-parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Head, register_head


class VirtualSoftmaxHead(Head):
    """logits = W x (no bias, as in the paper); in training with labels, (N, C+1) logits
    [W x, ||W_y|| ||x_i||] with per-sample norms.

    Gradient flows through the virtual logit (into both ||x_i|| and ||W_y||): the paper
    derives its back-propagation with W_virt as a function of X_i and W_yi, and public
    re-implementations differentiate it too. ``detach_virtual=True`` treats the virtual
    logit as a constant instead (an ablation, not the paper). No clipping: cross-entropy's
    log-sum-exp is already stable. Labels index the first C columns, so
    ``F.cross_entropy(head(f, y), y)`` works unchanged; eval mode (or no labels) gives the
    plain (N, C) logits.
    """

    head_name = "virtual_softmax"

    def __init__(self, num_classes: int, embedding_size: int, detach_virtual: bool = False) -> None:
        super().__init__(num_classes, embedding_size, bias=False)
        self.detach_virtual = bool(detach_virtual)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        use_virtual = self._check(features, labels)
        logits = F.linear(features, self.weight)
        if not use_virtual:
            return logits
        assert labels is not None
        virtual = self.weight[labels].norm(dim=1) * features.norm(dim=1)
        if self.detach_virtual:
            virtual = virtual.detach()
        return torch.cat([logits, virtual.unsqueeze(1).to(logits.dtype)], dim=1)

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval logits are ``W x`` (the virtual class is a training device)."""
        return self.weight.detach(), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_virtual={self.detach_virtual}"


@register_head("virtual_softmax", "virtual", family="virtual_softmax")
def virtual_softmax(
    num_classes: int, embedding_size: int, detach_virtual: bool = False
) -> VirtualSoftmaxHead:
    """Virtual Softmax head (no margin / scale hyper-parameters)."""
    return VirtualSoftmaxHead(num_classes, embedding_size, detach_virtual)
