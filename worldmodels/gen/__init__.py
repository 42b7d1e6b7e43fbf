"""`wm gen ...`: standalone generation from the core models (text, images)."""
