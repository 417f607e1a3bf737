"""Slides to patches: everything that reads a whole-slide image or writes a patch grid.

:mod:`~preprocessing.slides.access` opens a slide (OpenSlide, tifffile, DICOM) and finds
its mpp; :mod:`~preprocessing.slides.sheet` reads the slide sheet;
:mod:`~preprocessing.slides.tissue` segments tissue on a thumbnail;
:mod:`~preprocessing.slides.grid` lays the mpp-aware patch grid in level-0 pixels;
:mod:`~preprocessing.slides.patching` patches one slide and writes its outputs, or records
it as failed; :mod:`~preprocessing.slides.patch_files` owns the patches h5 (writing it,
reading it back, the ok/empty/failed status); :mod:`~preprocessing.slides.qc` draws the QC
thumbnails; :mod:`~preprocessing.slides.summary` tabulates a cohort's patching;
:mod:`~preprocessing.slides.synthetic` renders synthetic slides of known geometry and
:mod:`~preprocessing.slides.demo_cohort` the labelled demo cohort made of them.
``python -m preprocessing.patch`` and ``python -m preprocessing.synthetic`` are the edges
over them.
"""
