"""Small pure policies: when to save, what to keep, preemption signals."""
