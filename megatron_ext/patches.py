"""Correctness patches to Megatron-Core, pinned to its version, applied on every machine.

(The CUDA-absence interceptions are separate: megatron_ext/cpu_backend.py.)

- moe_aux_loss_token_scale: with `calculate_per_token_loss`, Megatron-Core multiplies each
  rank's load-balancing-loss gradient by its *local* token count so that the global
  1/total_tokens division in finalize_model_grads cancels. Under sequence or context
  parallelism each of the TP x CP ranks holds 1/(tp*cp) of the micro-batch while its aux-loss
  share is already normalised by the whole micro-batch, so the aux-loss gradient ends up
  1/(tp*cp) of what one process computes. The sequence-level variant also passes the sequence
  length instead of the micro-batch token count (its gradient shrinks with micro-batch size;
  fixed upstream after 0.16.1). The patch scales by the micro-batch's tokens across the
  TP x CP group. tests/test_parallel.py's MoE TP+SP layouts fail without it.
"""

from __future__ import annotations

import inspect

PINNED_MEGATRON_CORE = "0.16.1"
_applied = False


def moe_aux_loss_token_scale() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.attach_and_log_load_balancing_loss

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss and not reduce_group_has_dp:
            if aux_loss_name == "seq_load_balancing_loss" or valid_token_count is None:
                valid_token_count = activation.shape[0]  # tokens of this rank's micro-batch share
            valid_token_count = valid_token_count * reduce_group.size()
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    attach_and_log_load_balancing_loss.__wrapped__ = original
    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss


def upstream_call_sites() -> dict:
    """Source facts each patch relies on (checked by tests; a change means: re-check the patch)."""
    from megatron.core.transformer.moe.router import TopKRouter

    scaler = inspect.getsource(getattr(TopKRouter.attach_and_log_load_balancing_loss, "__wrapped__",
                                       TopKRouter.attach_and_log_load_balancing_loss))
    return {
        "moe_aux_loss_token_scale": "activation = MoEAuxLossAutoScaler.apply(activation, aux_loss * num_tokens)"
        in scaler and "num_tokens = valid_token_count if valid_token_count is not None" in scaler,
    }


PATCHES = (moe_aux_loss_token_scale,)


def apply() -> None:
    """Install every patch once (checks the pinned megatron-core version)."""
    global _applied
    if _applied:
        return
    import megatron.core

    if megatron.core.__version__ != PINNED_MEGATRON_CORE:
        raise RuntimeError(f"megatron_ext.patches are pinned to megatron-core {PINNED_MEGATRON_CORE}, found "
                           f"{megatron.core.__version__}; re-check each patch against it")
    for patch in PATCHES:
        patch()
    _applied = True
