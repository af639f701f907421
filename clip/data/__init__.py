"""The CLIP stage's data: KELIP's multi-crop views (:mod:`.multicrop`), image–caption pairs, their
captions, batches and held-out split (:mod:`.pairs`), and the tools that prepare a data set:
caption shards (:mod:`.shards`) and caption translation (:mod:`.translate`). Builds on
:mod:`mae.images`; imports no model code (the tokenizer object is handed in)."""
