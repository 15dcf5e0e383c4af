"""Global context block (Cao et al., "GCNet", ICCVW 2019), the relation module of FGD's global
loss."""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GlobalContextBlock"]


class GlobalContextBlock(nn.Module):
    r"""``R(F) = F + transform(context(F))``, ``[N, C, H, W] -> [N, C, H, W]``.

    * context: ``w = softmax_{positions}(conv1x1_{C->1}(F))`` ``[N, HW]``, then
      ``c = sum_p w_p F_p`` ``[N, C, 1, 1]`` (attention pooling over all positions);
    * transform: conv1x1 C -> C/2 (bias) -> LayerNorm([C/2, 1, 1]) -> ReLU -> conv1x1 C/2 -> C
      (bias), added to every position.

    The last conv starts at zero (weight and bias), so a fresh block is the identity and FGD's
    global loss starts as the plain summed squared difference of the two maps. The context conv
    starts with Kaiming-normal weights (fan-in) and a zero bias, the first transform conv with
    PyTorch's default initialisation. ``C/2`` is ``max(C // 2, 1)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        channels = int(channels)
        hidden = max(channels // 2, 1)
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def pooled(self, x: Tensor) -> Tensor:
        """The attention-pooled context ``[N, C, 1, 1]`` of ``x`` ``[N, C, H, W]``."""
        n, c = x.shape[:2]
        weights = F.softmax(self.context(x).flatten(1), dim=1)  # [N, HW]
        return torch.bmm(x.flatten(2), weights.unsqueeze(2)).view(n, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.transform(self.pooled(x))
