"""Bilingual CLIP (stage 2). The Python API (:mod:`clip.api`) is imported on first use, so
``import clip.model`` stays as light as before::

    model, preprocess = clip.load(run_dir); tokenizer = clip.get_tokenizer(run_dir)
"""
_API = ("load", "create_model", "create_model_and_transforms", "get_tokenizer", "image_transform")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from clip import api

        return getattr(api, name)
    raise AttributeError(f"module 'clip' has no attribute {name!r}")
