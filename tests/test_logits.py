"""tools.logits at a virtual-pipeline layout: PP=2 with VPP=2 (4 layers, one per virtual stage,
the tied embedding and output layer on different ranks) on 2 gloo ranks must give the logits
of one process, and both transformers' logits, for a batch that does not fill the interleaved
schedule's micro-batches evenly (3 inputs over 2 micro-batches: one padding row). The
virtual-pipeline run goes through the command line (--vpp), which refuses --vpp without
pipeline parallelism."""

from __future__ import annotations

import numpy as np
import torch

from tests.forked_ranks import run_on_ranks
from tests.test_convert import TOL, make_hf_model
from tools.convert import hf_to_mcore
from tools.logits import dump_logits, main

TOKENS = "5,17,200,3,99,42,7,8;255,0,13,128,64,1,77,9;1,2,3,4,5,6,7,8"


def _one_process(rank, world, hf, ckpt, out):
    hf_to_mcore(hf, ckpt)
    dump_logits(ckpt, TOKENS, out, all_positions=True)


def _virtual_pipeline(rank, world, ckpt, out):
    return main(["--ckpt", ckpt, "--tokens", TOKENS, "--out", out, "--all", "--pp", "2", "--vpp", "2"])


def test_virtual_pipeline_logits_equal_one_process_and_transformers(tmp_path, capsys):
    hf = tmp_path / "hf"
    model = make_hf_model("qwen2", True, num_hidden_layers=4)
    model.save_pretrained(hf)
    ckpt = str(tmp_path / "mcore")
    run_on_ranks(_one_process, 1, str(hf), ckpt, str(tmp_path / "one.npy"))
    assert run_on_ranks(_virtual_pipeline, 2, ckpt, str(tmp_path / "vpp.npy")) == [0, 0]
    one, vpp = np.load(tmp_path / "one.npy"), np.load(tmp_path / "vpp.npy")
    ids = torch.tensor([[int(t) for t in row.split(",")] for row in TOKENS.split(";")])
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    assert one.shape == vpp.shape == reference.shape == (3, 8, 256)
    assert np.abs(vpp - one).max() < 1e-5
    assert np.abs(one - reference).max() < TOL
    assert main(["--ckpt", ckpt, "--tokens", "1,2", "--out", str(tmp_path / "bad.npy"), "--vpp", "2"]) == 2
    assert "parallel.vpp=2 needs parallel.pp > 1" in capsys.readouterr().err
