"""Evaluation of a trained CLIP: metrics on embeddings (:mod:`.metrics`), encoding images and texts
(:mod:`.encode`), the tasks (:mod:`.tasks`: retrieval, zero-shot, cross-lingual, the trainer's
held-out check), their inputs (:mod:`.inputs`, the multilingual benchmark layouts in
:mod:`.layouts`), charts (:mod:`.charts`) and the command line ``python -m clip.eval``
(:mod:`.cli`). Imports :mod:`clip.model`, :mod:`clip.data` and :mod:`mae.images`."""


def main(argv=None) -> int:
    """``python -m clip.eval`` (:func:`clip.eval.cli.main`)."""
    from clip.eval.cli import main as cli

    return cli(argv)
