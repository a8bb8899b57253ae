"""The interventions: one module per method (schema, compile step, search, declaration).

`registry` holds the declarations; `builtin` imports the built-in methods, which register
themselves (the `attnedit` package imports it, so the built-ins are always there).
"""
