"""The training runtime both stages share: configuration (:mod:`.config`, :mod:`.cli`), the
process and its collectives (:mod:`.dist`), DeepSpeed behind one door (:mod:`.engine`: the only
module that imports ``deepspeed``), the optimizer's groups and schedules (:mod:`.optim`), the loop
(:mod:`.loop`, with :mod:`.stream`, :mod:`.gradcache`, :mod:`.guard`), the run folder and its
resume checkpoints (:mod:`.run_dir`, :mod:`.checkpoints`) and what a run reports (:mod:`.monitor`,
:mod:`.telemetry`, :mod:`.perf`). Stage-agnostic: imports :mod:`mae.common` and
:mod:`mae.images.sources`, never a model."""
