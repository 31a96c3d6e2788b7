"""Reference model definitions (plain PyTorch): kiln.models.llama, kiln.models.dit, kiln.models.registry.

Nothing is imported here, so `import kiln.models` stays cheap.
"""
