"""Per-token log-probabilities of a model's labels, exact under tensor parallelism: what DPO and
GRPO train on (`token_logps`)."""

from __future__ import annotations

import torch


def unwrap(model) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model



def token_logps(model, tokens: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[b, s] | tokens[b, :s+1]) per position, [b, s], from logits / temperature.

    Exact under TP: Megatron's vocab-parallel cross entropy returns -log p(label) without
    gathering the logits. Only the chunk that holds the output layer (the last pipeline stage,
    or its last virtual chunk) computes log-probs; every other chunk returns its hidden states
    unchanged, to be handed to the next stage.
    """
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    if not unwrap(model).post_process:
        return model(tokens, position_ids, attention_mask=None)
    if temperature == 1.0:
        return -model(tokens, position_ids, attention_mask=None, labels=labels)
    from megatron_ext.cross_entropy import vocab_parallel_cross_entropy

    logits = model(tokens, position_ids, attention_mask=None)  # [b, s, V/tp]
    return -vocab_parallel_cross_entropy(logits / temperature, labels)
