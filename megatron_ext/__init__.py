"""The runtime around Megatron-Core: distributed init, CPU backend, model build, training loop."""

import warnings

# Megatron-Core warns at import when Apex/TE are missing. This stack never uses Apex and
# picks TE explicitly (megatron_ext.spec), so the warnings only add noise.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
    warnings.filterwarnings("ignore", message=_message)
