"""Wire contracts of the slime services: ``slime.proto`` (package ``slime.v1``) and the code generated from it."""
