"""Privacy arithmetic shared by every accountant (pure functions, no state)."""
