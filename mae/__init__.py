"""Stage 1 (MAE pretraining of the ViT encoder) and the foundation both stages stand on.

``mae.vit`` is the image encoder (timm's ``VisionTransformer``), ``mae.model`` the masked
autoencoder around it, ``mae.checkpoint`` the ``mae_ckpt.pt`` it hands to stage 2. Two subpackages
serve both stages: ``mae.images``, the image pipeline (decoding, sources and shards, the
partitioned stream, the crop engine), and ``mae.common``, what every package writes and builds
with (atomic files, weights-only checkpoints, configs from plain data). ``mae`` imports no other
package of this project (``clip`` and ``launch`` import it, never the other way).
"""
