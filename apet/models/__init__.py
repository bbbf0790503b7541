"""Model families, torch-free halves (docs/families.md). :mod:`apet.models.registry` imports the built-in ones by
name and others through the ``apet.families`` entry point group."""
