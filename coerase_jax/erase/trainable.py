"""What a stage trains, and how that recombines with the frozen rest into the UNet's parameters."""

from __future__ import annotations

import dataclasses

from coerase_jax.erase import lora, streams, subsets


@dataclasses.dataclass(frozen=True)
class Trainable:
    """The subset's weights themselves (``lora_rank`` 0), or a rank-r LoRA of the subset's attention
    projections, scaled by ``lora_scale`` (alpha / r)."""

    subset: str
    train_image_kv: bool = False
    lora_rank: int = 0
    lora_scale: float = 1.0
    seed: int = 0
    stage: int = 0  # the stage's index in the run (its LoRA start is drawn from its own stream)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen). With LoRA the frozen part is the whole UNet and the trainable part the
        (A, B) factors, drawn from the stage's own stream so that a resumed run rebuilds the same start."""
        if self.lora_rank:
            return lora.init_lora(params, self.subset, self.lora_rank, streams.lora_key(self.seed, self.stage)), params
        return subsets.split(params, self.subset, self.train_image_kv)

    def compose(self, trainable: dict, frozen: dict) -> dict:
        """The UNet's full parameters (differentiable in ``trainable``)."""
        if self.lora_rank:
            return lora.apply_lora(frozen, trainable, self.lora_scale)
        return subsets.merge(trainable, frozen)
