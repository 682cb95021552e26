"""deepreglib: the registration engine of DeepRegExtension.

Plain Python on torch, numpy and SimpleITK; never imports slicer, qt, ctk or vtk. Spatial
conventions are in :mod:`deepreglib.core.conventions`.
"""
__version__ = "0.1.0"
