"""Patches to features: encoders, the patch reader, the runner and the features files.

:mod:`~preprocessing.features.encoders` is the name → builder registry (truncated
ResNet-50, any timm model, the pathology foundation models of
:mod:`~preprocessing.features.encoder_zoo`, the hand-crafted
:mod:`~preprocessing.features.handcrafted`); :mod:`~preprocessing.features.patch_dataset`
reads patches from a slide for the GPU; :mod:`~preprocessing.features.summary` lists the
slides degraded by unreadable patches. ``python -m preprocessing.extract`` and
``python -m preprocessing.import_features`` are the edges over them.
"""
