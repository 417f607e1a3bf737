"""The presets the package ships, as package data: label hierarchies, loss and MHIM settings.

``hierarchies/{bracs,panda,ccc}.yaml`` (:mod:`hmil.data.hierarchy`), ``loss_presets.yaml``
(:mod:`hmil.training.losses`) and ``mhim_presets.yaml`` (:mod:`hmil.models.mhim_masking`) are
read through :mod:`importlib.resources`, so an installed wheel finds them as a checkout does.
It holds no code and imports nothing: every layer may read it. Users point at their own
files by path instead.
"""
