"""The training stages, each read top to bottom as config -> process group -> model -> data ->
engine -> loop: :mod:`.mae` (stage 1) and :mod:`.clip` (stage 2, its configuration and
pre-flight checks in :mod:`.clip_config`). The scripts ``launch/mae.py`` and ``launch/clip.py``
run them. Imports every package below: the runtime, the models, the data."""
