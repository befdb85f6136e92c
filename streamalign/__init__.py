"""streamalign: align streaming text-to-video generators with reward models."""

__version__ = "0.1.0"
