"""Error feedback around any compressor (Seide et al. 2014; Karimireddy et al., "Error Feedback
Fixes SignSGD and other Gradient Compression Schemes", ICML 2019): what a round's compression
dropped is added to the next round's input, one residual per parameter."""

from __future__ import annotations

import torch

from hvd_qpr.compression.base import Compressor, Segments, as_compressor


class ErrorFeedback(Compressor):
    """Wraps a compressor with one residual per parameter, keyed by the parameter's name.

    Before compressing, each parameter's stretch of the input gets its residual added; after,
    the residual becomes the corrected input minus what this worker's payload decodes to.
    :class:`hvd_qpr.DistributedOptimizer` passes the names (``error_feedback=True`` is shorthand
    for this wrapper). Horovod's own optimizer does not pass names, so ``compress`` without a
    name raises a ValueError instead of mixing residuals of different parameters.

    Args:
        compressor: any hvd_qpr or Horovod compressor.

    Example:
        >>> ef = ErrorFeedback(hvd_qpr.Compression.qsgd(bits=2))
        >>> payload, ctx = ef.compress(torch.randn(1000), name="fc.weight")
        >>> sorted(ef.residuals)
        ['fc.weight']
    """

    def __init__(self, compressor: object) -> None:
        inner = as_compressor(compressor)
        if isinstance(inner, ErrorFeedback):
            raise ValueError("ErrorFeedback: the compressor already has error feedback")
        self.inner = inner
        self.traits = inner.traits
        self.name = f"ErrorFeedback({inner.name})"
        self.residuals: dict[str, torch.Tensor] = {}

    # -- residuals ---------------------------------------------------------------------------------

    @property
    def needs_residual(self) -> bool:
        return True

    @property
    def without_residuals(self) -> Compressor:
        return self.inner

    def add_residual(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        out = x.detach().reshape(-1).to(torch.float32, copy=True)
        offset = 0
        for name, numel in segments:
            residual = self.residuals.get(name)
            if residual is not None:
                if residual.numel() != numel:
                    raise ValueError(
                        f"ErrorFeedback: parameter {name!r} has {numel} values but its residual "
                        f"{residual.numel()}"
                    )
                out[offset : offset + numel] += residual.to(out.device)
            offset += numel
        if offset != out.numel():
            raise ValueError(f"ErrorFeedback: segments cover {offset} of {out.numel()} values")
        return out

    def store_residual(
        self, corrected: torch.Tensor, sent: torch.Tensor, segments: Segments
    ) -> None:
        error = corrected.reshape(-1).to(torch.float32) - sent.reshape(-1).to(torch.float32)
        offset = 0
        for name, numel in segments:
            self.residuals[name] = error[offset : offset + numel].clone()
            offset += numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residuals, by parameter name."""
        return {name: r.clone() for name, r in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {name: r.detach().clone().to(torch.float32) for name, r in state.items()}

    # -- Horovod's contract ------------------------------------------------------------------------

    def compress(
        self, tensor: torch.Tensor, name: str | None = None
    ) -> tuple[torch.Tensor, object]:
        if name is None:
            raise ValueError(
                "ErrorFeedback keeps one residual per parameter and needs the parameter's name, "
                "which hvd.DistributedOptimizer does not pass; use "
                "hvd_qpr.DistributedOptimizer(..., error_feedback=True)"
            )
        if not tensor.dtype.is_floating_point:
            return self.inner.compress(tensor)
        segments = [(name, tensor.numel())]
        corrected = self.add_residual(tensor, segments).view(tensor.shape).to(tensor.dtype)
        payload, ctx = self.inner.compress(corrected)
        self.store_residual(corrected, self.inner.decompress(payload.clone(), ctx), segments)
        return payload, ctx

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        return self.inner.decompress(tensor, ctx)

    # -- everything else is the wrapped compressor's ---------------------------------------------

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.inner.encode(x, seed)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return self.inner.decode(payload, numel)

    def payload_bytes(self, numel: int) -> float:
        return self.inner.payload_bytes(numel)

    def __getattr__(self, attr: str) -> object:
        # shared-scale methods and attributes (bucket_scales, quantize_fields, levels_max, ...)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)
