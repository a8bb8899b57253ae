"""Built-in recipes (YAML files; this module only makes the folder installable package data)."""
