"""The real model these tests use (a module of its own: ``conftest`` names several files in this suite)."""

REAL_MODEL = "smollm2-135m-instruct"
