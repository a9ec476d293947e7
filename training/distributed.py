"""Gathering tensors across processes, with and without gradients (the global contrastive batch of stage 1)."""

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for the local rows (all_reduce, which gloo
    supports, then the local slice). Each process computes the same global loss L, so the local rows receive
    W·∂L/∂x; DDP's averaging over W processes then gives exactly ∂L/∂θ (the reference `GatherLayer`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` (N, ...) from every process into (W·N, ...), keeping the autograd graph."""
    return _GatherWithGrad.apply(tensor) if world_size() > 1 else tensor


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
