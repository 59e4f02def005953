"""bake: compile activation steering into model weights.

A spec (JSON manifest + one safetensors file) says which maps apply at which activation sites.
The hooked reference runtime (`bake.runtime`) defines what a spec means; the compiler
(`bake.compiler`) folds the maps into the weights and exports a stock checkpoint, and
`bake.verify` checks the export against the reference.
"""

__version__ = "0.1.0"
