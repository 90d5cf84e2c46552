"""grpo_ar: GRPO and its relatives for any autoregressive token model.

Importing the package stays light: adapters, diffusers and reward models load lazily.
"""

__version__ = "0.1.0"
