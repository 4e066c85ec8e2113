"""Walks over the API's windows into the archive, knowing only interfaces: one sync cycle
(and what builds on it)."""
