"""Saving: validate and capture state, stage it, commit it, apply retention."""
