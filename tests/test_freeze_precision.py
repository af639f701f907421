"""Tower freezing under DeepSpeed ZeRO-2 and bf16 with 2 CPU ranks: the MAE-initialised image
tower stays bit-identical through the freeze window and trains after it; bf16 keeps fp32 weights
(autocast), and the temperature parameter is clamped to its cap after every step."""
import glob
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from launch.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_freeze_window_bf16_zero2(tmp_path, tiny_tokenizer_dir, free_port):
    from launch.stages.mae import MAERunConfig
    from mae.model import MaskedAutoencoder
    from mae.checkpoint import save_encoder_checkpoint

    mae_cfg = load_config(MAERunConfig, str(ROOT / "configs" / "mae_tiny.yaml")).model
    torch.manual_seed(0)
    save_encoder_checkpoint(MaskedAutoencoder(mae_cfg), tmp_path / "mae_ckpt.pt")
    out = tmp_path / "clip"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port), str(ROOT / "launch" / "clip.py"),
           "--init", str(tmp_path / "mae_ckpt.pt"), "--config", str(ROOT / "configs" / "clip_tiny.yaml"),
           f"run.out_dir={out}", f"data.tokenizer={tiny_tokenizer_dir}", "train.zero_stage=2",
           "train.precision=bf16", "freeze.image_steps=3", "freeze.image_epochs=0", "run.ckpt_every=3",
           "run.keep_last=0", "train.steps=6", "train.micro_batch_size=8", "val_every=0", "train.num_workers=0",
           "model.init_logit_scale=1000"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    mae = torch.load(tmp_path / "mae_ckpt.pt", weights_only=True)["model"]

    def module(tag):  # DeepSpeed's own checkpoint file (pickled by DeepSpeed itself)
        f = glob.glob(str(out / "checkpoints" / tag / "mp_rank_00_model_states.pt"))[0]
        return torch.load(f, weights_only=False, map_location="cpu")["module"]

    at3, at6 = module("step_0000003"), module("step_0000006")
    assert {v.dtype for v in at3.values() if v.is_floating_point()} == {torch.float32}  # LayerNorm, logit_scale too
    for k, v in mae.items():
        assert torch.equal(at3["visual." + k], v), f"visual.{k} moved inside the freeze window"
    assert sum(not torch.equal(at6["visual." + k], at3["visual." + k]) for k in mae) >= len(mae) // 2
    for k in ("visual_proj.weight", "text_proj.weight", "text.token_embedding.weight"):
        assert not torch.equal(at3[k], at6[k]), f"{k} did not train"
    # initialised at log(1000), clamped to log(100) after every step (also in ZeRO-2's fp32 partitions)
    final = torch.load(out / "clip_ckpt.pt", weights_only=True)["model"]["logit_scale"]
    assert abs(final.item() - math.log(100)) < 0.02 and at3["logit_scale"].item() <= math.log(100) + 1e-6
