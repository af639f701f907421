"""Running the stages: the scripts DeepSpeed's launcher starts (``launch/mae.py``, ``launch/clip.py``,
made runnable by ``launch/_script.py``), the stages they run (:mod:`launch.stages`), the training
runtime they share (:mod:`launch.runtime`) and the end-to-end demo (``python -m launch.demo``).
The only package that touches ``deepspeed`` and the process group (besides the contrastive losses,
handed rank and world size); it imports every other package, none imports it."""
