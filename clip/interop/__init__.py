"""Models in and out of other tools: weights a run starts from (:mod:`.init`: our MAE export, timm
ViT state dicts, OpenAI-layout CLIPs via :mod:`.timm_vit` and :mod:`.openai_layout`) and exports
to open_clip and safetensors folders (:mod:`.export`); frozen teacher CLIPs for distillation
(:mod:`.teacher`) and their text embeddings computed once (:mod:`.teacher_cache`). Imports
:mod:`clip.model` and :mod:`mae`."""
