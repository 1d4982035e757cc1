"""The pretraining stage: GPT datasets, next-token loss summed over tokens, and forward_step.

A stage (`megatron_ext.stages.Stage`) is the only thing that varies between pretraining, CPT and
post-training; this one is the base the CPT stages extend.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_ext import data
from megatron_ext.stages import LOSS, Stage


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses under the mask, the token count, and a [sum, count] report.

    Returning the sum (not the mean) with the count lets Megatron normalise gradients by the
    global token count (config.calculate_per_token_loss), so every parallel split agrees.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {LOSS: report}


class PretrainStage(Stage):
    """Next-token prediction on Megatron GPT datasets (no rules beyond megatron_ext.config.validate)."""

    cuda_graph_safe = True  # fixed-shape micro-batches, no host syncs in the step

    def datasets(self, cfg, train_samples: int, valid_samples: int):
        return data.build_datasets(cfg, train_samples, valid_samples)

    def forward_step(self, data_iterator, model):
        batch = data.on_this_rank(next(data_iterator))
        output = model(
            batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
        )
        return output, partial(masked_token_loss, batch["loss_mask"])
