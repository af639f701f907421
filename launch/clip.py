"""Stage 2: bilingual CLIP from the MAE encoder under DeepSpeed  ->  ``<out_dir>/clip_ckpt.pt``.

    deepspeed launch/clip.py --init runs/mae/mae_ckpt.pt [--config configs/clip.yaml] [key=value ...]
    deepspeed --num_gpus 2 launch/clip.py --init mae_ckpt.pt --config configs/clip_tiny.yaml
    python launch/clip.py --help         # every config key with its type and value

The stage is ``launch/stages/clip.py``; this file only makes it runnable as a script.
"""
if __name__ == "__main__":
    import _script  # launch/_script.py: puts the project root, not launch/, first on sys.path

    _script.run("launch.stages.clip")
