"""Run an exported graphdistill bundle with nothing but its runtime, numpy and Pillow (never torch code of
the student): the reference a phone app ports. See :mod:`graphdistill.runner.bundle`."""

from graphdistill.runner.bundle import BUNDLE_FORMAT, BundleError, BundleRunner, Raw, read_manifest

__all__ = ["BUNDLE_FORMAT", "BundleError", "BundleRunner", "Raw", "read_manifest"]
