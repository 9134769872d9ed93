"""DINOHead: the projection head of DINO / iBOT (MLP -> bottleneck -> L2 norm -> prototypes)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """``in_dim -> hidden_dim -> ... -> bottleneck_dim`` MLP (GELU), L2 normalisation, then a bias-free linear
    layer onto ``num_prototypes`` (upstream: 3 layers, 2048 hidden, 256 bottleneck, 65536 prototypes).

    The prototype layer is ``last_layer``: the SSL module gives it learning rate 0 for the first steps, as upstream.
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Upstream: truncated normal (std 0.02) for every linear layer, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # eps as upstream: fp16-safe normalisation of the bottleneck.
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
