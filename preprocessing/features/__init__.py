"""Patches to features: encoders, the patch reader, the runner and the features files.

:mod:`~preprocessing.features.encoders` builds encoders by name from the registry
(:mod:`~preprocessing.features.encoder_registry`, a leaf that every entry module registers
into: truncated ResNet-50, any timm model, the pathology foundation models of
:mod:`~preprocessing.features.encoder_zoo`, the hand-crafted
:mod:`~preprocessing.features.handcrafted`), loading checkpoints through
:mod:`~preprocessing.features.encoder_checkpoints`; :mod:`~preprocessing.features.patch_dataset`
reads patches from a slide for the GPU; :mod:`~preprocessing.features.runner` resolves the
device and precision and runs batches through the encoder;
:mod:`~preprocessing.features.features_files` writes and validates the features h5 and its
``.pt`` twin; :mod:`~preprocessing.features.unreadable` judges slides that lost patches to
unreadable tiles; :mod:`~preprocessing.features.extraction` makes one slide's features,
keeping a valid output; :mod:`~preprocessing.features.cohort` does so for every slide of a
sheet with the model loaded once; :mod:`~preprocessing.features.summary` lists the slides
degraded by unreadable patches. Features made elsewhere (CLAM, TRIDENT, the HMIL layout)
are found by :mod:`~preprocessing.features.import_sources`, checked by
:mod:`~preprocessing.features.import_checks` and written as thin, linking features files by
:mod:`~preprocessing.features.importing`. ``python -m preprocessing.extract`` and
``python -m preprocessing.import_features`` are the edges over them.
"""
