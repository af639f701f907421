"""Text-only distillation of a student text tower into a frozen teacher CLIP  ->  ``<out_dir>/clip_ckpt.pt``.

    deepspeed launch/distill_text.py distill.teacher=TEACHER [--config configs/distill_text.yaml] [key=value ...]
    deepspeed launch/distill_text.py --config configs/demo/distill_text.yaml distill.teacher=runs/demo/clip_en
    python launch/distill_text.py --help          # every config key with its type and value

The stage is ``launch/stages/distill_text.py``; this file only makes it runnable as a script.
"""
if __name__ == "__main__":
    import _script  # launch/_script.py: puts the project root, not launch/, first on sys.path

    _script.run("launch.stages.distill_text")
