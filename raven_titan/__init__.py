"""raven_titan: pretraining toolkit for depth-recurrent (Huginn-style) language models."""

__version__ = "0.1.0"
