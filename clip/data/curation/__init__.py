"""From a raw bilingual crawl to a balanced training set, after MetaCLIP 2 (Chuang et al., 2025,
facebookresearch/MetaCLIP ``metaclip/curation/``): language identification, metadata matching
and counting, balancing by per-language caps, deduplication, per-sample keep probabilities that
the loaders apply online, caption-variant weights, and the report. ``python -m clip.curate``
is the command line (:mod:`clip.curate`); :func:`clip.data.curation.pipeline.curate` the library
entry point.

This subpackage owns the curation rules (the keep files it writes are read by the streams:
:mod:`mae.images.keep`). It may import the shared
source and shard readers (:mod:`mae.images.sources`, :mod:`mae.images.shards`), the atomic
writers (:mod:`mae.common.files`), the image decoder (:mod:`mae.images.decode`) and caption
cleaning (:mod:`clip.data.pairs`); nothing in it imports a trainer, a model or ``torch`` directly.
The training collate calls :mod:`clip.data.curation.online` (weighted caption variants), which
imports nothing but the standard library.
"""
