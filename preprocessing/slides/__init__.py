"""Slides to patches: everything that reads a whole-slide image or writes a patch grid.

:mod:`~preprocessing.slides.access` opens a slide (OpenSlide, tifffile, DICOM) and finds
its mpp; :mod:`~preprocessing.slides.sheet` reads the slide sheet;
:mod:`~preprocessing.slides.tissue` segments tissue on a thumbnail;
:mod:`~preprocessing.slides.grid` lays the mpp-aware patch grid in level-0 pixels;
:mod:`~preprocessing.slides.qc` draws the QC thumbnails; :mod:`~preprocessing.slides.summary`
tabulates a cohort's patching. ``python -m preprocessing.patch`` is the edge over them.
"""
