"""healthyluncher: personalize an ONNX lunch-photo classifier on your own machine."""

__version__ = "0.1.0"
