"""Stage 2: the bilingual CLIP. :mod:`clip.model` (towers, model, losses, tokenizer contract,
checkpoint), :mod:`clip.data` (multi-crop views, image–caption pairs, data preparation),
:mod:`clip.eval` (evaluation), :mod:`clip.interop` (weights in from and out to other tools); the
Python API (:mod:`clip.api`, imported on first use so that ``import clip.model`` stays light)::

    model, preprocess = clip.load(run_dir); tokenizer = clip.get_tokenizer(run_dir)

and the command lines ``python -m clip.eval | clip.export | clip.translate | clip.shards``.
Imports :mod:`mae` (its image tower and image pipeline) and :mod:`tokenizer`; never :mod:`launch`.
"""
_API = ("load", "create_model", "create_model_and_transforms", "get_tokenizer", "image_transform")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from clip import api

        return getattr(api, name)
    raise AttributeError(f"module 'clip' has no attribute {name!r}")
