"""fleetlm: a self-hosted platform for small language models.

Importing the package does no work: no model is loaded, no torch import happens
until a submodule that needs it is imported.
"""

__version__ = "0.1.0"
