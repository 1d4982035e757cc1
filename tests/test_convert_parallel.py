"""Conversion and logits at parallel layouts on 2 gloo ranks, against transformers.

Per family: convert the HF model at layout A (TP=2 for dense, EP=2 for MoE) and at layout B
(PP=2); run each checkpoint at the *other* layout and at its own, so resharding on load is
exercised both ways, and at TP=2 with sequence parallelism; every run's logits must match
transformers' within 1e-4. The checkpoint written at layout A must also convert back to HF
bit-exactly.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.forked_ranks import run_on_ranks
from tests.test_convert import TOKENS, TOL, hf_logits, read_tensors, save_hf
from tools.convert import hf_to_mcore, mcore_to_hf
from tools.logits import dump_logits

# family -> (tied embeddings?, layout A, layout C). Tied cases put the embedding and the output
# layer on different pipeline stages at PP=2. Layout C is TP=2 with sequence parallelism (which
# MoE needs at TP>1; the converter tools switch it on for MoE by themselves).
CASES = {"qwen2": (True, dict(tp=2), dict(tp=2, sp=True)), "qwen3": (False, dict(tp=2), dict(tp=2, sp=True)),
         "qwen2_moe": (False, dict(ep=2), dict(tp=2)), "qwen3_moe": (True, dict(ep=2), dict(tp=2))}
LAYOUT_B = dict(pp=2)


def _family_runs(hf_dir: str, root: Path, layout_a: dict, layout_c: dict) -> list:
    hf_to_mcore(hf_dir, str(root / "ckpt_a"), **layout_a)
    hf_to_mcore(hf_dir, str(root / "ckpt_b"), **LAYOUT_B)
    runs = {"a_at_a": ("ckpt_a", layout_a), "a_at_b": ("ckpt_a", LAYOUT_B), "b_at_a": ("ckpt_b", layout_a),
            "b_at_c": ("ckpt_b", layout_c)}
    for tag, (ckpt, layout) in runs.items():
        dump_logits(str(root / ckpt), TOKENS, str(root / f"{tag}.npy"), all_positions=True, **layout)
    # Back to HF from the checkpoint written across 2 ranks (loaded whole; rank 0 writes).
    mcore_to_hf(str(root / "ckpt_a"), str(root / "back"))
    return sorted(runs)


def _parallel_worker(rank, world_size, root):
    """Every family in one pair of ranks (starting ranks costs more than the work itself).
    A family's failure is returned, not raised, so the other families still run."""
    results = {}
    for family, (_, layout_a, layout_c) in sorted(CASES.items()):
        try:
            results[family] = _family_runs(str(Path(root) / family / "hf"), Path(root) / family, layout_a, layout_c)
        except Exception:
            results[family] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    for family, (tied, _, _) in CASES.items():
        save_hf(family, tied, root / family / "hf")
    return root, run_on_ranks(_parallel_worker, 2, str(root))[0]


@pytest.mark.parametrize("family", sorted(CASES))
def test_parallel_layouts_match_transformers(family, parallel_runs):
    root, results = parallel_runs
    runs, family_dir = results[family], root / family
    assert isinstance(runs, list), f"{family} failed on the ranks:\n{runs}"
    reference = hf_logits(family_dir / "hf")
    for tag in runs:
        ours = np.load(family_dir / f"{tag}.npy")
        assert ours.shape == reference.shape, tag
        assert np.abs(ours - reference).max() < TOL, f"{family} {tag}: max diff {np.abs(ours - reference).max()}"
    # The checkpoint written across 2 ranks converts back to the same bits.
    before, after = read_tensors(family_dir / "hf"), read_tensors(family_dir / "back")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(after[n], t) for n, t in before.items())
