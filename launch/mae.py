"""Stage 1: MAE pretraining of the ViT encoder under DeepSpeed  ->  ``<out_dir>/mae_ckpt.pt``.

    deepspeed launch/mae.py [--config configs/mae.yaml] [--resume] [key=value ...]
    deepspeed --num_gpus 2 launch/mae.py --config configs/mae_tiny.yaml train.steps=50
    python launch/mae.py --help          # every config key with its type and value

The stage is ``launch/stages/mae.py``; this file only makes it runnable as a script.
"""
if __name__ == "__main__":
    import _script  # launch/_script.py: puts the project root, not launch/, first on sys.path

    _script.run("launch.stages.mae")
