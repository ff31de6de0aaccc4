"""cai-ray: Constitutional AI at cluster scale on Ray."""

__version__ = "0.1.0"
