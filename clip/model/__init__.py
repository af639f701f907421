"""The CLIP model of stage 2 and everything it is made of: the towers (:mod:`.text`, :mod:`.hf_text`),
the two-tower model (:mod:`.clip`), its contrastive loss (:mod:`.loss`), its tokenizer contract
(:mod:`.tokens`) and its checkpoint (:mod:`.checkpoint`). Plain ``nn.Module``s: no DeepSpeed, no
autocast; only the loss talks to other ranks, given ``rank`` and ``world_size``. Imports
:mod:`mae` (the image tower is its ViT) and :mod:`tokenizer`, nothing else of this project.
"""
from clip.model.checkpoint import CLIP_FORMAT, load_clip, save_clip
from clip.model.clip import CLIP, CLIPConfig

__all__ = ["CLIP", "CLIPConfig", "CLIP_FORMAT", "load_clip", "save_clip"]
