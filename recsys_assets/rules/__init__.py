"""Business rules shared by pipeline, publish validation and serving (one copy each)."""
