"""The image pipeline both stages stand on, from an encoded file to a normalised crop batch:
decoding to upright RGB (:mod:`.decode`, :mod:`.jpeg`), where images come from (:mod:`.sources`:
folders, manifests, tables, WebDataset shards in :mod:`.shards`), the partitioned, resumable,
skip-counting stream over them (:mod:`.stream`), and the crop engine (:mod:`.views`, with the
torchvision reference in :mod:`.transforms`). Knows nothing of captions or models; imports
:mod:`mae.common` only."""
