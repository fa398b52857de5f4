"""Restoring: plan, validate every item, read and check every byte, then apply."""
